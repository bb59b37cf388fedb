"""``rtseg model eval``: scores on labelled cases, of what the node delivers unless asked for raw labels."""

from __future__ import annotations

import csv
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtseg.cases import iter_cases
from rtseg.evaluation import evaluate
from rtseg.model.default import default_model_dir
from rtseg.model.manifest import ModelManifest, load_manifest
from rtseg.model.segmenter import Segmentation
from rtseg.volume import CTVolume


@dataclass
class _LungOverLiver:
    """A stand-in model: the reference labels, with the left lung drawn where the liver is (no lung air)."""

    manifest: ModelManifest

    def segment(self, volume: CTVolume, labels: np.ndarray | None = None) -> Segmentation:
        assert self.reference is not None
        label = {s.name: s.label for s in self.manifest.structures}
        out = self.reference.copy()
        out[out == label["Lung_L"]] = label["External"]
        out[out == label["Liver"]] = label["Lung_L"]
        # no speck floor: the reference's own specks stay, so only the impossible lung is cleaned
        return Segmentation(out, self.manifest, 0.1, min_piece_ml=0.0)

    reference: np.ndarray | None = None


def test_eval_scores_what_the_node_delivers_unless_raw_is_asked(phantom_ct96: Path) -> None:
    (case,) = list(iter_cases(phantom_ct96.parent.parent))
    model = _LungOverLiver(load_manifest(default_model_dir()), case.labels)
    (delivered,) = evaluate(model, [case], surfaces=False)  # type: ignore[arg-type]
    (raw,) = evaluate(model, [case], surfaces=False, delivered=False)  # type: ignore[arg-type]
    # raw: a "lung" of liver; delivered: the node drops a lung that is not air, as it would in the TPS
    assert raw.scores["Lung_L"].predicted_ml > 100 and raw.scores["Lung_L"].dice == 0
    assert delivered.scores["Lung_L"].predicted_ml == 0
    assert delivered.scores["Spleen"].dice == raw.scores["Spleen"].dice == 1.0  # the rest as drawn


def test_model_eval_command_writes_scores(phantom_ct96: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rtseg_app", "model", "eval", "--data", str(phantom_ct96.parent.parent)]
    proc = subprocess.run(
        [*cmd, "--no-surfaces", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert "mean Dice" in proc.stdout and "Liver" in proc.stdout
    rows = list(csv.DictReader((out / "scores.csv").open()))
    liver = [r for r in rows if r.get("structure") == "Liver"]
    assert liver and 0.5 < float(liver[0]["dice"]) <= 1.0

    # --shift-ensemble: the node's [node] shift_ensemble, eight predictions voted: close, not identical
    voted = tmp_path / "voted"
    proc = subprocess.run(
        [*cmd, "--no-surfaces", "--shift-ensemble", "--out", str(voted)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    dice = {r["structure"]: r["dice"] for r in rows}
    voted_dice = {r["structure"]: r["dice"] for r in csv.DictReader((voted / "scores.csv").open())}
    assert voted_dice.keys() == dice.keys() and voted_dice != dice
    assert abs(float(voted_dice["Liver"]) - float(dice["Liver"])) < 0.02
