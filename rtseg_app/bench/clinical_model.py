"""A stock-size nnU-Net v2 model for the clinical-scale bench, made by the bench itself.

nnU-Net's own fingerprint and default planner (``ExperimentPlanner``) run on
phantom CTs resampled to a clinical grid (1.5 mm slices, 0.8 mm pixels, the
resolution of a thin-slice abdominal CT): the 3d_fullres plans they give are a
6-stage, 32–320-feature plain U-Net of about 31 M parameters, as for a
TotalSegmentator-like model. The weights are trained briefly on the same
phantoms with rtseg's trainer (AdamW, the default model's recipe) on small
random patches (the network is fully convolutional, so the planner's patch
size still applies at inference), enough for a model that draws organ-shaped
labels rather than random ones. Built once under the bench's work folder and
reused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rtseg.model.children import EpochProgress, nnunet_dirs, run_child
from rtseg.model.cpu import CONFIGURATION, CpuConfig

log = logging.getLogger(__name__)

DATASET_ID, DATASET_NAME = 620, "RtsegClinicalBench"
CLINICAL_SPACING_ZYX = (1.5, 0.8, 0.8)  # thin-slice abdominal CT: the fingerprint nnU-Net plans from
MODEL_NAME, MODEL_VERSION = "rtseg-bench-clinical", "1"


@dataclass(frozen=True)
class ClinicalRecipe:
    """The phantoms and the short schedule of the clinical-scale bench model.

    ``train`` trains on ``patch_size_zyx`` patches; its ``n_stages`` and
    ``base_features`` are not used (the plans are nnU-Net's own, see
    :func:`rtseg.model._run.plan_stock`).
    """

    center: str = "A"
    cases: int = 8
    seed: int = 3100
    matrix: int = 256  # the phantoms' pixels are then 0.7–0.9 mm, a clinical in-plane resolution
    train: CpuConfig = CpuConfig(
        target_spacing_zyx=CLINICAL_SPACING_ZYX,
        patch_size_zyx=(32, 64, 64),
        batch_size=2,
        n_stages=2,
        epochs=14,
        iterations_per_epoch=10,
        val_iterations_per_epoch=1,
        learning_rate=1e-3,
        optimizer="adamw",
        rotation_deg=10.0,
        da_workers=1,
        preprocess_workers=2,
        seed=0,
        threads=2,
    )


RECIPE = ClinicalRecipe()


def clinical_model(
    work: Path, say: Callable[[str], None] = log.info, recipe: ClinicalRecipe = RECIPE
) -> Path:
    """The model folder under ``work`` (built on the first call: cohort, plans, ~12 min of training)."""
    out = work / "model"
    if (out / "rtseg-model.json").is_file():
        return out
    from rtseg.model.dataset import write_raw_dataset
    from rtseg.model.default import canonical_cases
    from rtseg.phantom.cohort import generate_cohort
    from rtseg.structures import dataset_labels

    say(f"clinical model: {recipe.cases} phantoms of center {recipe.center} at {recipe.matrix}²")
    cohort = work / "cohort"
    workers = _workers(recipe.cases)
    generate_cohort(recipe.center, recipe.cases, recipe.seed, cohort, matrix=recipe.matrix, workers=workers)
    cases = canonical_cases(cohort, CLINICAL_SPACING_ZYX)
    write_raw_dataset(nnunet_dirs(work).raw, DATASET_ID, DATASET_NAME, cases, dataset_labels())
    say("clinical model: nnU-Net fingerprint, default planner, 3d_fullres preprocessing")
    planning = replace(recipe.train, preprocess_workers=max(recipe.train.preprocess_workers, workers))
    planned = run_child("plan_stock", {"dataset_id": DATASET_ID}, work, planning, None)
    stock_plans = Path(planned["stock_plans"])
    say(f"clinical model: {describe_plans(json.loads(stock_plans.read_text()))}")
    return _train_and_export(work, out, stock_plans, recipe, say)


def _workers(cases: int) -> int:
    """Processes for drawing and preprocessing the phantoms: 2 as on the bench's 2 cores, more where there
    are more cores (a GPU machine); the cases and the plans do not depend on it."""
    return max(2, min(cases, os.cpu_count() or 2))


def _train_and_export(
    work: Path, out: Path, stock_plans: Path, recipe: ClinicalRecipe, say: Callable[[str], None]
) -> Path:
    from rtseg.model.manifest import ModelManifest, default_provenance
    from rtseg.model.training import export_model, train
    from rtseg.structures import STRUCTURES

    cfg = recipe.train
    say(
        f"clinical model: training {cfg.epochs} × {cfg.iterations_per_epoch} iterations"
        f" on {list(cfg.patch_size_zyx)} patches"
    )
    results = train(work, DATASET_ID, cfg, fold="all", progress=_progress(say))
    manifest = ModelManifest(
        name=MODEL_NAME,
        version=MODEL_VERSION,
        structures=STRUCTURES,
        provenance={
            **default_provenance(
                training_data={"kind": "rtseg phantom", "centers": [recipe.center], "cases": recipe.cases},
                seeds={"cohort": recipe.seed, "training": cfg.seed},
                command="rtseg bench --section clinical",
            ),
            "config": cfg.to_dict(),
            "note": "bench model: nnU-Net's default plans, briefly trained; not for clinical use",
        },
    )
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    export_model(results, staging, manifest, strip_optimizer=True)
    shutil.copyfile(stock_plans, staging / "plans.json")  # the planner's patch size, not the training one
    staging.rename(out)
    return out


def _progress(say: Callable[[str], None]) -> Callable[[EpochProgress], None]:
    def report(epoch: EpochProgress) -> None:
        say(
            f"   epoch {epoch.epoch + 1}/{epoch.epochs}: train loss {epoch.train_loss:.3f},"
            f" val loss {epoch.val_loss:.3f} ({epoch.seconds:.0f} s)"
        )

    return report


def describe_plans(plans: dict[str, Any]) -> dict[str, Any]:
    """Patch size, spacing, stages and features of the 3d_fullres configuration (canonical z, y, x)."""
    cfg = plans["configurations"][CONFIGURATION]
    arch = cfg["architecture"]["arch_kwargs"]
    return {
        "patch_size": [int(p) for p in cfg["patch_size"]],
        "spacing": [float(s) for s in cfg["spacing"]],
        "n_stages": int(arch["n_stages"]),
        "features_per_stage": [int(f) for f in arch["features_per_stage"]],
        "strides": [[int(s) for s in stage] for stage in arch["strides"]],
        "transpose_forward": list(plans.get("transpose_forward", [0, 1, 2])),
    }
