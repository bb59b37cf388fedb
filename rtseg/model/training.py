"""Plan, preprocess, train and export an nnU-Net v2 model sized for a CPU.

Every nnU-Net step runs in a child process (see :mod:`rtseg.model.children`);
the configuration is :class:`rtseg.model.cpu.CpuConfig`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rtseg.errors import InputError, ModelError
from rtseg.model.children import ProgressCallback, dataset_folder, nnunet_dirs, run_child
from rtseg.model.cpu import PLANS_IDENTIFIER, CpuConfig, validate_config
from rtseg.model.dataset import IGNORE
from rtseg.model.manifest import ModelManifest, read_json, save_manifest


def plan_and_preprocess(work_dir: Path, dataset_id: int, config: CpuConfig = CpuConfig()) -> Path:
    """Fingerprint, plan and preprocess 3d_fullres; returns the preprocessed dataset folder.

    The plans are nnU-Net's default planner's, reduced by :func:`~rtseg.model.cpu.cpu_plans`.
    """
    validate_config(config)
    raw = dataset_folder(nnunet_dirs(work_dir).raw, dataset_id)
    if raw is None or not (raw / "dataset.json").is_file():
        raise InputError(f"no raw dataset {dataset_id} in {nnunet_dirs(work_dir).raw}; write it first")
    done = run_child("plan", {"dataset_id": dataset_id}, work_dir, config, None)
    return Path(done["preprocessed_dir"])


def train(
    work_dir: Path,
    dataset_id: int,
    config: CpuConfig = CpuConfig(),
    fold: str = "all",
    progress: ProgressCallback | None = None,
    start_from: Path | None = None,
) -> Path:
    """Train one fold with :class:`rtseg.model.trainer.RtsegTrainer`; returns the results folder.

    The results folder is nnU-Net's ``Trainer__Plans__configuration`` folder
    holding ``fold_<fold>/checkpoint_final.pth``. No final validation is run.
    ``progress`` is called after every epoch; if it raises, training is stopped
    and the exception propagates. With ``start_from`` (a checkpoint of a network
    of the same plans) training starts from its weights, with a fresh optimizer
    and learning-rate schedule.
    """
    if fold != "all" and not fold.isdigit():
        raise InputError(f"fold must be 'all' or a number, got {fold!r}")
    if start_from is not None and not Path(start_from).is_file():
        raise InputError(f"{start_from}: no checkpoint to start training from")
    preprocessed = dataset_folder(nnunet_dirs(work_dir).preprocessed, dataset_id)
    if preprocessed is None or not (preprocessed / f"{PLANS_IDENTIFIER}.json").is_file():
        raise InputError(
            f"dataset {dataset_id} is not preprocessed in {work_dir}; run plan_and_preprocess first"
        )
    args: dict[str, Any] = {"dataset_id": dataset_id, "fold": fold}
    if start_from is not None:
        args["start_from"] = str(Path(start_from).resolve())
    done = run_child("train", args, work_dir, config, progress)
    return Path(done["results_dir"])


def export_model(
    results_dir: Path,
    out_dir: Path,
    manifest: ModelManifest,
    strip_optimizer: bool = True,
) -> Path:
    """Copy a trained model into ``out_dir`` as a standard results folder plus ``rtseg-model.json``.

    ``out_dir`` gets ``dataset.json``, ``plans.json`` and ``fold_<f>/<checkpoint>``
    for the manifest's folds. With ``strip_optimizer`` the checkpoints lose their
    optimizer and grad-scaler state (the bulk of their size); everything nnU-Net's
    predictor reads stays.
    """
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    dataset = read_json(results_dir / "dataset.json")
    # nnU-Net's ignore label has no output channel: the exported model is a plain one
    dataset["labels"] = {k: v for k, v in dict(dataset.get("labels") or {}).items() if k != IGNORE}
    if dataset["labels"] != manifest.labels():
        raise ModelError(
            f"manifest structures {manifest.labels()} do not match"
            f" dataset.json labels {dataset.get('labels')}",
            source=str(results_dir),
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    for name in ("plans.json", "dataset_fingerprint.json"):
        if (results_dir / name).is_file():
            shutil.copyfile(results_dir / name, out_dir / name)
    for fold in manifest.folds:
        source = results_dir / f"fold_{fold}" / manifest.checkpoint
        if not source.is_file():
            raise ModelError(f"missing fold_{fold}/{manifest.checkpoint}", source=str(results_dir))
        (out_dir / f"fold_{fold}").mkdir(exist_ok=True)
        _copy_checkpoint(source, out_dir / f"fold_{fold}" / manifest.checkpoint, strip_optimizer)
    save_manifest(out_dir, manifest)
    return out_dir


def _copy_checkpoint(source: Path, target: Path, strip_optimizer: bool) -> None:
    if not strip_optimizer:
        shutil.copyfile(source, target)
        return
    import torch  # deferred: importing torch costs seconds and export is rare

    from rtseg.model.checkpoints import load_checkpoint

    checkpoint = load_checkpoint(source)
    for key in ("optimizer_state", "grad_scaler_state"):
        checkpoint.pop(key, None)
    torch.save(checkpoint, target)
