"""Federated rounds: plans from a pooled fingerprint, training from given weights.

Each step runs in an nnU-Net child process (see :mod:`rtseg.model.children`);
weights come and go as ``.npz`` files (see :mod:`rtseg.model.weights`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rtseg.errors import InputError, ModelError
from rtseg.model.children import ProgressCallback, dataset_folder, nnunet_dirs, run_child
from rtseg.model.cpu import PLANS_IDENTIFIER, CpuConfig, validate_config
from rtseg.model.dataset import dataset_folder_name
from rtseg.model.plans_check import check_plans


def plan_from_fingerprint(
    work_dir: Path,
    dataset_id: int,
    dataset_json: dict[str, Any],
    fingerprint: dict[str, Any],
    config: CpuConfig = CpuConfig(),
) -> Path:
    """nnU-Net's planner on a given (pooled) ``dataset_fingerprint.json``; returns the plans file.

    No image is read: the planner only needs a file to pick its reader, so a tiny
    blank placeholder case (zeros, not data) is written next to ``dataset.json``.
    """
    validate_config(config)
    config = replace(config, da_workers=max(1, config.da_workers))  # the planner sets torch threads from it
    done = run_child(
        "plan_fingerprint",
        {"dataset_id": dataset_id, "dataset_json": dataset_json, "fingerprint": fingerprint},
        work_dir,
        config,
        None,
    )
    return Path(done["plans_file"])


def preprocess_with_plans(
    work_dir: Path,
    dataset_id: int,
    plans: dict[str, Any],
    fingerprint: dict[str, Any],
    config: CpuConfig = CpuConfig(),
) -> Path:
    """Preprocess the raw dataset of ``work_dir`` with given plans (no local planning).

    The plans must be for this dataset (``dataset_name``) and pass
    :func:`~rtseg.model.plans_check.check_plans`; else :class:`ModelError`.
    """
    raw = dataset_folder(nnunet_dirs(work_dir).raw, dataset_id)
    if raw is None or not (raw / "dataset.json").is_file():
        raise InputError(f"no raw dataset {dataset_id} in {nnunet_dirs(work_dir).raw}; write it first")
    check_plans(plans, "plans to preprocess with")
    if plans.get("dataset_name") != raw.name:
        raise ModelError(f"the plans are for dataset {plans.get('dataset_name')!r}, not {raw.name}")
    config = replace(config, da_workers=max(1, config.da_workers))
    done = run_child(
        "preprocess",
        {"dataset_id": dataset_id, "plans": plans, "fingerprint": fingerprint},
        work_dir,
        config,
        None,
    )
    return Path(done["preprocessed_dir"])


def preprocess_like_model(
    work_dir: Path,
    dataset_id: int,
    dataset_name: str,
    model_dir: Path,
    config: CpuConfig = CpuConfig(),
) -> Path:
    """Preprocess the raw dataset of ``work_dir`` with the plans and fingerprint of a model folder.

    No local planning: ``model_dir``'s ``plans.json`` (renamed to dataset ``dataset_id``,
    ``dataset_name``) and ``dataset_fingerprint.json`` (its CT normalisation) preprocess the
    cases, so the model's weights fit them. Both are left in the preprocessed folder, where
    planning would have put them (later preprocessing and training read them there).
    Returns that folder.
    """
    plans = json.loads((Path(model_dir) / "plans.json").read_text())
    fingerprint = json.loads((Path(model_dir) / "dataset_fingerprint.json").read_text())
    plans["dataset_name"] = dataset_folder_name(dataset_id, dataset_name)
    _same_labels(model_dir, nnunet_dirs(work_dir).raw / plans["dataset_name"] / "dataset.json")
    return preprocess_with_plans(work_dir, dataset_id, plans, fingerprint, config)


def _labels_of(path: Path) -> Any:
    """The ``labels`` of a dataset.json; a file that is not one is a :class:`ModelError` naming it."""
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path.name}: {exc}", source=str(path)) from exc
    if not isinstance(found, dict) or not isinstance(found.get("labels"), dict):
        raise ModelError(f"{path.name} has no 'labels' table", source=str(path))
    return found["labels"]


def _same_labels(model_dir: Path, dataset_json: Path) -> None:
    """Refuse a model whose label table is not the dataset's: its weights cannot go on with these cases."""
    theirs, ours = _labels_of(Path(model_dir) / "dataset.json"), _labels_of(dataset_json)
    if theirs != ours:
        other = sorted(set(theirs or {}) ^ set(ours or {})) or ["the same names with other numbers"]
        raise ModelError(
            f"the model in {model_dir} has other labels than the dataset ({', '.join(other)}): "
            "its weights cannot be continued on these cases"
        )


def initial_weights(
    work_dir: Path,
    plans: dict[str, Any],
    dataset_json: dict[str, Any],
    out: Path,
    start_from: Path | None = None,
) -> Path:
    """Initialise the network of ``plans`` once (seeded); write its arrays to ``out`` (``.npz``).

    ``start_from``: an nnU-Net checkpoint of these plans whose weights replace the
    initial ones (read with the restricted loader of :mod:`rtseg.model.checkpoints`).
    Also writes ``<out>.aliases.json``: aliased key → the key whose array it shares.
    """
    check_plans(plans, "plans to initialise weights with")
    start = {"start_checkpoint": str(Path(start_from).resolve())} if start_from is not None else {}
    run_child(
        "init_weights",
        {"plans": plans, "dataset_json": dataset_json, "out": str(out), **start},
        work_dir,
        CpuConfig(threads=1),
        None,
    )
    return Path(out)


@dataclass(frozen=True)
class RoundSchedule:
    """Local training of one federated round."""

    epochs: int  # local epochs of this round
    epoch_offset: int  # global epochs done before this round (for the learning-rate schedule)
    total_epochs: int  # global epochs of the whole federation
    prox_mu: float = 0.0  # FedProx proximal weight (0: plain local SGD)
    nice: int = 10  # scheduling priority increment of the training process


def train_round(
    work_dir: Path,
    dataset_id: int,
    weights_in: Path,
    weights_out: Path,
    schedule: RoundSchedule,
    config: CpuConfig = CpuConfig(),
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Train ``schedule.epochs`` epochs starting from the arrays in ``weights_in``.

    The optimizer state is kept in ``work_dir/optimizer_state.pt`` (never sent) and
    reloaded next round. Returns the child's summary (seconds, cases).
    """
    if schedule.epochs < 1 or schedule.total_epochs < schedule.epoch_offset + schedule.epochs:
        raise InputError(f"inconsistent round schedule {schedule}")
    preprocessed = dataset_folder(nnunet_dirs(work_dir).preprocessed, dataset_id)
    if preprocessed is None or not (preprocessed / f"{PLANS_IDENTIFIER}.json").is_file():
        raise InputError(f"dataset {dataset_id} is not preprocessed in {work_dir}")
    args = {
        "dataset_id": dataset_id,
        "weights_in": str(weights_in),
        "weights_out": str(weights_out),
        "optimizer_state": str(Path(work_dir).resolve() / "optimizer_state.pt"),
        "schedule": asdict(schedule),
    }
    return run_child("train_round", args, work_dir, config, progress)
