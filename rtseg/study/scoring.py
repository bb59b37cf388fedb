"""Inference of every arm on the held-out cases through the node's own path, and the per-case scores.

Each case goes through :func:`rtseg.pipeline.segment_series` from its DICOM
folder (loader, orientation handling, model, RTSTRUCT build and write). The
predicted label map is scored against the reference (Dice, HD95, mean surface
distance in mm); the written RTSTRUCT is read back and compared with the label
map, so a mirrored or shifted contour shows up as low ``rtstruct_dice``.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from rtseg.cases import load_case
from rtseg.evaluation import score_case
from rtseg.metrics import dice, structure_masks
from rtseg.model.segmenter import EnsembleSegmenter, NnunetSegmenter, Segmentation, Segmenter
from rtseg.pipeline import segment_series
from rtseg.rtstruct import rasterize_rtstruct
from rtseg.structures import EXTERNAL
from rtseg.study.arms import model_dir, rounds_dir
from rtseg.study.data import TestCase
from rtseg.study.design import ENSEMBLE, LOCAL_ARMS
from rtseg.volume import CTVolume

log = logging.getLogger(__name__)
LATERALITY_FLAG = "centre lies on the patient's"  # the pipeline's wrong-side check


@dataclass(frozen=True)
class ScoreRow:
    """One structure of one case predicted by one arm."""

    arm: str
    kind: str  # "test" (as drawn) or "orientation" (stored again in a forced position)
    case_id: str
    center: str
    position: str
    variant: str
    structure: str
    dice: float | None
    hd95_mm: float | None
    msd_mm: float | None
    reference_ml: float
    predicted_ml: float
    rtstruct_dice: float | None  # RTSTRUCT read back vs the predicted label map
    wrong_side: bool  # the pipeline flagged the structure on the wrong side of the patient


@dataclass(frozen=True)
class CurvePoint:
    """Held-out mean OAR Dice of the federated global model after one round."""

    round: int
    center: str
    case_id: str
    oar_dice: float


def load_arm(work: Path, arm: str, threads: int | None = None) -> Segmenter:
    if arm == ENSEMBLE:
        members = [NnunetSegmenter(model_dir(work, name), threads=threads) for name in LOCAL_ARMS.values()]
        return EnsembleSegmenter(members, name="rtseg-study-ensemble")
    return NnunetSegmenter(model_dir(work, arm), threads=threads)


class _Recorder:
    """A segmenter that keeps what it returned, so the pipeline's label map can be scored."""

    def __init__(self, inner: Segmenter) -> None:
        self.inner = inner
        self.manifest = inner.manifest
        self.last: Segmentation | None = None

    def segment(self, volume: CTVolume) -> Segmentation:
        self.last = self.inner.segment(volume)
        return self.last


def score_arm(
    arm: str,
    segmenter: Segmenter,
    cases: Iterable[tuple[str, TestCase]],
    rtstruct_dir: Path,
    advance: Callable[[], None] | None = None,
) -> list[ScoreRow]:
    """Rows of every (kind, case): the whole pipeline per case, then the metrics."""
    rows: list[ScoreRow] = []
    rtstruct_dir.mkdir(parents=True, exist_ok=True)
    for kind, case in cases:
        rows += score_one(arm, kind, segmenter, case, rtstruct_dir)
        if advance:
            advance()
    return rows


def score_one(
    arm: str, kind: str, segmenter: Segmenter, case: TestCase, rtstruct_dir: Path
) -> list[ScoreRow]:
    recorder = _Recorder(segmenter)
    out = rtstruct_dir / f"{case.case_id}.dcm"
    result = segment_series(case.case_dir / "ct", recorder, out)
    if recorder.last is None:
        raise RuntimeError("the pipeline returned without segmenting")  # a bug, not a user error
    labelled = load_case(case.case_dir)
    predicted = recorder.last.labels
    structures = segmenter.manifest.structures
    scores = score_case(labelled, predicted, structures)
    read_back = rasterize_rtstruct(pydicom.dcmread(out), labelled.volume)
    wrong_side = {s.name for s in result.structures if any(LATERALITY_FLAG in f for f in s.flags)}
    rows = []
    for s in structures:
        mask = structure_masks(predicted, s.label, s.name == EXTERNAL)
        back = read_back.get(s.name, np.zeros_like(mask))
        sc = scores[s.name]
        rows.append(
            ScoreRow(
                arm, kind, case.case_id, case.center, case.position, case.variant, s.name,
                sc.dice, sc.hd95_mm, sc.msd_mm, sc.reference_ml, sc.predicted_ml,
                dice(back, mask), s.name in wrong_side,
            )
        )  # fmt: skip
    return rows


def federated_curve(
    work: Path, cases: list[TestCase], threads: int | None = None, advance: Callable[[], None] | None = None
) -> list[CurvePoint]:
    """Mean OAR Dice of the global model of every round (round 0: initial weights) on ``cases``."""
    loaded = [load_case(c.case_dir) for c in cases]
    points = []
    for folder in sorted(p for p in rounds_dir(work).iterdir() if p.name.startswith("round_")):
        segmenter = NnunetSegmenter(folder, threads=threads)
        for case, labelled in zip(cases, loaded, strict=True):
            labels = segmenter.segment(labelled.volume).labels
            scores = score_case(labelled, labels, segmenter.manifest.structures, surfaces=False)
            oars = [v.dice for n, v in scores.items() if n != EXTERNAL and v.reference_ml > 0]
            present = [d for d in oars if d is not None]
            points.append(CurvePoint(int(folder.name.split("_")[1]), case.center, case.case_id,
                                     float(np.mean(present)) if present else 0.0))  # fmt: skip
        if advance:
            advance()
    return points


def write_rows(path: Path, rows: Iterable[Any], kind: type) -> None:
    """Dataclass rows as CSV (``None`` as an empty cell), written atomically."""
    names = [f.name for f in fields(kind)]
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("w", newline="") as out:
        writer = csv.DictWriter(out, names)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
    tmp.replace(path)


def read_score_rows(path: Path) -> list[ScoreRow]:
    with path.open(newline="") as handle:
        return [_score_row(r) for r in csv.DictReader(handle)]


def _score_row(r: dict[str, str]) -> ScoreRow:
    def opt(key: str) -> float | None:
        return float(r[key]) if r[key] != "" else None

    return ScoreRow(
        r["arm"], r["kind"], r["case_id"], r["center"], r["position"], r["variant"], r["structure"],
        opt("dice"), opt("hd95_mm"), opt("msd_mm"), float(r["reference_ml"]), float(r["predicted_ml"]),
        opt("rtstruct_dice"), r["wrong_side"] == "True",
    )  # fmt: skip


def read_curve(path: Path) -> list[CurvePoint]:
    with path.open(newline="") as handle:
        return [
            CurvePoint(int(r["round"]), r["center"], r["case_id"], float(r["oar_dice"]))
            for r in csv.DictReader(handle)
        ]
