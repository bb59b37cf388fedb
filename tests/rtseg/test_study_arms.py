"""In full mode the study's arms start from the study's start model (0.9.0): its plans and weights."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from rtseg.model.checkpoints import load_checkpoint
from rtseg.model.manifest import load_manifest
from rtseg.phantom.cohort import generate_cohort
from rtseg.study.arms import STUDY_START_DIR, start_model, train_arm
from rtseg.study.design import FULL, QUICK

CHECKPOINT = Path("fold_all") / "checkpoint_final.pth"


def test_full_mode_starts_every_arm_from_the_start_model_and_quick_mode_from_random_weights() -> None:
    assert start_model(FULL) == STUDY_START_DIR and start_model(QUICK) is None
    # the study's start stays 0.9.0 whatever model ships as the default: its figures stay reproducible
    start = load_manifest(STUDY_START_DIR)
    assert FULL.start_model == f"{start.name} {start.version}" == "rtseg-peds-abdomen 0.9.0"
    assert "rtseg-peds-abdomen 0.9.0's weights" in FULL.budget()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_arm_fine_tunes_the_start_models_weights_with_its_plans(tmp_path: Path) -> None:
    cases = tmp_path / "cases"
    generate_cohort("C", 2, 2000, cases, matrix=48)
    config = replace(FULL.cpu, epochs=1, iterations_per_epoch=2, val_iterations_per_epoch=1)
    out = train_arm("local-C", [cases], tmp_path / "work", config, start=STUDY_START_DIR)

    plans = json.loads((out / "plans.json").read_text())
    start_plans = json.loads((STUDY_START_DIR / "plans.json").read_text())
    assert plans["configurations"] == start_plans["configurations"]  # the start model's network and grid
    manifest = load_manifest(out)
    default = load_manifest(STUDY_START_DIR)
    assert manifest.provenance["started_from"] == f"{default.name} {default.version}"

    start = load_checkpoint(STUDY_START_DIR / CHECKPOINT)["network_weights"]
    tuned = load_checkpoint(out / CHECKPOINT)["network_weights"]
    assert set(tuned) == set(start)
    a = np.concatenate([start[k].float().numpy().ravel() for k in sorted(start)])
    b = np.concatenate([tuned[k].float().numpy().ravel() for k in sorted(start)])
    assert not np.array_equal(a, b), "two iterations changed nothing"
    # two small steps away from the start: a network from random weights would be uncorrelated with it
    assert np.corrcoef(a, b)[0, 1] > 0.99
