"""The embedded default model: what ships, that stock nnU-Net loads it, and that it still predicts the same.

The golden file holds the model's own prediction for one fixed phantom case;
it is remade by ``python tests/golden/make_golden.py`` whenever the default
model is retrained (and only then).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rtseg.cases import load_case
from rtseg.metrics import dice
from rtseg.model.default import MODEL_NAME, default_model_dir
from rtseg.model.manifest import load_manifest
from rtseg.model.segmenter import NnunetSegmenter
from rtseg.phantom.cohort import write_case
from rtseg.structures import STRUCTURES

GOLDEN = Path(__file__).parent / "golden" / "default_model_prediction.npz"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="module")
def segmenter(model_dir: Path) -> NnunetSegmenter:
    return NnunetSegmenter(model_dir, threads=2)


def test_shipped_model_is_a_small_standard_nnunet_folder(model_dir: Path) -> None:
    manifest = load_manifest(model_dir)
    assert manifest.name == MODEL_NAME
    assert manifest.structures == STRUCTURES
    assert (model_dir / "dataset.json").is_file() and (model_dir / "plans.json").is_file()
    checkpoint_path = model_dir / "fold_all" / "checkpoint_final.pth"
    size_mb = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file()) / 2**20
    assert size_mb <= 25, f"default model is {size_mb:.1f} MB"
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"  # any nnU-Net can load it
    assert "optimizer_state" not in checkpoint
    assert manifest.provenance.get("command") == "rtseg model build-default"


def test_stock_nnunet_predictor_loads_the_default_model(model_dir: Path) -> None:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=False)
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=("all",))
    assert predictor.network is not None


@pytest.fixture(scope="module")
def fresh_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fresh")
    info = write_case("B", 9001, 0, out, matrix=128)
    return out / info.case_id


def test_default_model_segments_a_fresh_case(segmenter: NnunetSegmenter, fresh_case: Path) -> None:
    """A regression guard at what model 0.4.0 (28 short CPU epochs) measurably does on a fresh case.

    0.4.0 outlines the body and finds the large organs (seen here: body 0.996,
    Liver 0.911, Heart 0.869, Lung_L 0.815, Lung_R 0.956, V_Venacava_I 0.750)
    but not the small ones (issue 2's target, mean OAR Dice ≥ 0.85, needs a
    longer schedule); raise these bounds with the model.
    """
    case = load_case(fresh_case)
    predicted = segmenter.segment(case.volume).labels
    assert predicted.shape == case.labels.shape
    body = dice(predicted > 0, case.labels > 0)
    assert body is not None and body > 0.97, f"External Dice {body}"
    floors = (("Liver", 0.8), ("Heart", 0.75), ("Lung_L", 0.7), ("Lung_R", 0.85), ("V_Venacava_I", 0.5))
    for name, floor in floors:
        label = next(s.label for s in STRUCTURES if s.name == name)
        d = dice(predicted == label, case.labels == label)
        assert d is not None and d > floor, f"{name} Dice {d}"


@pytest.mark.skipif(not GOLDEN.is_file(), reason="golden prediction not generated for this model yet")
def test_prediction_matches_the_golden_output(segmenter: NnunetSegmenter, tmp_path: Path) -> None:
    golden = np.load(GOLDEN)
    info = write_case(str(golden["center"]), int(golden["seed"]), 0, tmp_path, matrix=int(golden["matrix"]))
    case = load_case(tmp_path / info.case_id)
    predicted = segmenter.segment(case.volume).labels
    expected = golden["labels"]
    assert predicted.shape == expected.shape
    for s in STRUCTURES:
        a, b = predicted == s.label, expected == s.label
        if b.sum() < 50:
            continue
        d = dice(a, b)
        assert d is not None and d > 0.99, f"{s.name}: Dice {d:.4f} against the golden output"
