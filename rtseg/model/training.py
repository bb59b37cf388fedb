"""Plan, preprocess, train and export an nnU-Net v2 model sized for a CPU.

nnU-Net is used as a library. It reads ``nnUNet_raw``, ``nnUNet_preprocessed``
and ``nnUNet_results`` from the environment and spawns worker processes, so
every step runs in a child process (``python -m rtseg.model._run``) whose
environment points inside ``work_dir``; this process never imports nnU-Net
for training and its own environment is left alone. The child's output goes to
``work_dir/logs/``; epochs are reported back through a pipe.

Layout of ``work_dir``::

    nnUNet_raw/DatasetXXX_Name/        (written by :func:`rtseg.model.dataset.write_raw_dataset`)
    nnUNet_preprocessed/DatasetXXX_Name/
    nnUNet_results/DatasetXXX_Name/RtsegTrainer__nnUNetPlans__3d_fullres/fold_all/
    logs/
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import rtseg
from rtseg.errors import InputError, ModelError
from rtseg.model.manifest import ModelManifest, read_json, save_manifest
from rtseg.model.plans_check import check_plans

log = logging.getLogger(__name__)

CONFIGURATION = "3d_fullres"
PLANS_IDENTIFIER = "nnUNetPlans"
OPTIMIZERS = frozenset({"sgd", "adamw"})


@dataclass(frozen=True)
class CpuConfig:
    """A small 3-D U-Net and a short schedule that train on a few CPU cores.

    Spacing and patch size are canonical ``(z, y, x)``. ``n_stages`` counts
    resolution levels (the first has stride 1), features double per stage up
    to ``max_features``.
    """

    target_spacing_zyx: tuple[float, float, float] = (3.0, 2.0, 2.0)
    patch_size_zyx: tuple[int, int, int] = (48, 96, 96)
    batch_size: int = 2
    base_features: int = 8
    n_stages: int = 4
    max_features: int = 128
    epochs: int = 50
    iterations_per_epoch: int = 50
    val_iterations_per_epoch: int = 5
    learning_rate: float = 1e-2
    optimizer: str = "sgd"  # "sgd": nnU-Net's SGD (Nesterov, momentum 0.99); "adamw": AdamW (amsgrad)
    rotation_deg: float = 30.0  # augmentation: rotation range about each axis (nnU-Net's 3-D default 30°)
    da_workers: int = 1  # data-augmentation processes (0: in the training process)
    preprocess_workers: int = 1
    seed: int = 0
    threads: int | None = None  # torch threads of the training process; None: torch's default

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> CpuConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(doc) - known
        if unknown:
            raise InputError(f"unknown training settings {sorted(unknown)}")
        values = dict(doc)
        for key in ("target_spacing_zyx", "patch_size_zyx"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


@dataclass(frozen=True)
class EpochProgress:
    """One finished epoch, as nnU-Net logs it (pseudo Dice per foreground label)."""

    epoch: int  # 0-based
    epochs: int
    train_loss: float
    val_loss: float
    pseudo_dice: tuple[float, ...]
    seconds: float


ProgressCallback = Callable[[EpochProgress], None]


@dataclass(frozen=True)
class NnunetDirs:
    raw: Path
    preprocessed: Path
    results: Path
    logs: Path


def nnunet_dirs(work_dir: Path) -> NnunetDirs:
    """Where the nnU-Net folders of ``work_dir`` are (the raw dataset goes into ``.raw``)."""
    work_dir = Path(work_dir).resolve()
    return NnunetDirs(
        work_dir / "nnUNet_raw",
        work_dir / "nnUNet_preprocessed",
        work_dir / "nnUNet_results",
        work_dir / "logs",
    )


def plan_and_preprocess(work_dir: Path, dataset_id: int, config: CpuConfig = CpuConfig()) -> Path:
    """Fingerprint, plan (nnU-Net's default planner, then :func:`cpu_plans`) and preprocess 3d_fullres.

    Returns the preprocessed dataset folder.
    """
    validate_config(config)
    raw = _dataset_folder(nnunet_dirs(work_dir).raw, dataset_id)
    if raw is None or not (raw / "dataset.json").is_file():
        raise InputError(f"no raw dataset {dataset_id} in {nnunet_dirs(work_dir).raw}; write it first")
    done = _run_child("plan", {"dataset_id": dataset_id}, work_dir, config, None)
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
    preprocessed = _dataset_folder(nnunet_dirs(work_dir).preprocessed, dataset_id)
    if preprocessed is None or not (preprocessed / f"{PLANS_IDENTIFIER}.json").is_file():
        raise InputError(
            f"dataset {dataset_id} is not preprocessed in {work_dir}; run plan_and_preprocess first"
        )
    args: dict[str, Any] = {"dataset_id": dataset_id, "fold": fold}
    if start_from is not None:
        args["start_from"] = str(Path(start_from).resolve())
    done = _run_child("train", args, work_dir, config, progress)
    return Path(done["results_dir"])


def _dataset_folder(root: Path, dataset_id: int) -> Path | None:
    """nnU-Net's ``DatasetXXX_*`` folder of ``dataset_id`` under ``root``, if there is one."""
    found = sorted(root.glob(f"Dataset{dataset_id:03d}_*")) if root.is_dir() else []
    return found[0] if found else None


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
    if dataset.get("labels") != manifest.labels():
        raise ModelError(
            f"manifest structures {manifest.labels()} do not match"
            f" dataset.json labels {dataset.get('labels')}",
            source=str(results_dir),
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("dataset.json", "plans.json", "dataset_fingerprint.json"):
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


def validate_config(config: CpuConfig) -> None:
    """Refuse settings nnU-Net would fail on much later."""
    if config.n_stages < 2:
        raise InputError("n_stages must be at least 2")
    if config.batch_size < 1 or config.epochs < 1 or config.iterations_per_epoch < 1:
        raise InputError("batch_size, epochs and iterations_per_epoch must be positive")
    if config.val_iterations_per_epoch < 1:
        raise InputError("val_iterations_per_epoch must be positive")
    if config.optimizer not in OPTIMIZERS:
        raise InputError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {config.optimizer!r}")
    if not 0 <= config.rotation_deg <= 180:
        raise InputError(f"rotation_deg must be within 0–180, got {config.rotation_deg}")
    if any(s <= 0 for s in config.target_spacing_zyx):
        raise InputError(f"target spacing must be positive, got {config.target_spacing_zyx}")
    network_topology(config.target_spacing_zyx, config.patch_size_zyx, config.n_stages)


def network_topology(
    spacing_zyx: tuple[float, float, float], patch_zyx: tuple[int, int, int], n_stages: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Strides and kernel sizes per stage, following nnU-Net's rules for anisotropic spacing.

    An axis is pooled (stride 2) while its spacing is at most twice the finest
    one and its feature map stays at least 4 voxels; its kernel is 1 instead of
    3 while its spacing is more than twice the finest.
    """
    spacing, size = list(spacing_zyx), list(patch_zyx)
    strides: list[list[int]] = [[1, 1, 1]]
    kernels: list[list[int]] = []
    for stage in range(n_stages):
        finest = min(spacing)
        kernels.append([3 if s <= 2 * finest else 1 for s in spacing])
        if stage == n_stages - 1:
            break
        stride = [2 if s <= 2 * finest and n >= 8 else 1 for s, n in zip(spacing, size, strict=True)]
        if stride == [1, 1, 1]:
            raise InputError(f"patch size {patch_zyx} is too small for {n_stages} stages")
        for axis, step in enumerate(stride):
            if size[axis] % step:
                raise InputError(f"patch size {patch_zyx} must be divisible by 2 at every pooled stage")
            size[axis] //= step
            spacing[axis] *= step
        strides.append(stride)
    return strides, kernels


def cpu_plans(plans: dict[str, Any], config: CpuConfig) -> dict[str, Any]:
    """nnU-Net's default plans reduced to one ``3d_fullres`` configuration sized by ``config``.

    Axes are kept in canonical (z, y, x) order (no transpose), so the spacing
    and patch size of ``config`` apply as given.
    """
    out: dict[str, Any] = json.loads(json.dumps(plans))
    forward = list(out.get("transpose_forward", [0, 1, 2]))
    if CONFIGURATION not in out["configurations"]:
        raise ModelError("nnU-Net planned no 3d_fullres configuration (2-D data?)")
    cfg = out["configurations"][CONFIGURATION]
    untranspose = [forward.index(a) for a in range(3)]  # planner order → z, y, x
    old_spacing = [cfg["spacing"][i] for i in untranspose]
    old_median = [cfg["median_image_size_in_voxels"][i] for i in untranspose]
    strides, kernels = network_topology(config.target_spacing_zyx, config.patch_size_zyx, config.n_stages)
    n = config.n_stages
    cfg["spacing"] = [float(s) for s in config.target_spacing_zyx]
    cfg["median_image_size_in_voxels"] = [
        max(1, round(m * o / t)) for m, o, t in zip(old_median, old_spacing, cfg["spacing"], strict=True)
    ]
    cfg["patch_size"] = [int(p) for p in config.patch_size_zyx]
    cfg["batch_size"] = int(config.batch_size)
    for key in ("previous_stage", "next_stage"):
        cfg.pop(key, None)
    arch = cfg["architecture"]["arch_kwargs"]
    arch["n_stages"] = n
    arch["features_per_stage"] = [min(config.base_features * 2**s, config.max_features) for s in range(n)]
    arch["kernel_sizes"] = kernels
    arch["strides"] = strides
    arch["n_conv_per_stage"] = [2] * n
    arch["n_conv_per_stage_decoder"] = [2] * (n - 1)
    for key in ("original_median_spacing_after_transp", "original_median_shape_after_transp"):
        if key in out:
            out[key] = [out[key][i] for i in untranspose]
    out["transpose_forward"] = [0, 1, 2]
    out["transpose_backward"] = [0, 1, 2]
    out["configurations"] = {CONFIGURATION: cfg}
    return out


def child_env(work_dir: Path, config: CpuConfig) -> dict[str, str]:
    """Environment of an nnU-Net child process: nnU-Net folders inside ``work_dir``."""
    dirs = nnunet_dirs(work_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(
        nnUNet_raw=str(dirs.raw),
        nnUNet_preprocessed=str(dirs.preprocessed),
        nnUNet_results=str(dirs.results),
        nnUNet_n_proc_DA=str(config.da_workers),
        nnUNet_def_n_proc=str(max(1, config.preprocess_workers)),
        nnUNet_compile="false",
        PYTHONUNBUFFERED="1",
    )
    # The child must import this very rtseg, whatever the working directory.
    package_root = str(Path(rtseg.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def _run_child(
    command: str,
    args: dict[str, Any],
    work_dir: Path,
    config: CpuConfig,
    progress: ProgressCallback | None,
) -> dict[str, Any]:
    """Run ``python -m rtseg.model._run command`` and relay its events; returns its 'done' event."""
    validate_config(config)
    dirs = nnunet_dirs(work_dir)
    for folder in (dirs.raw, dirs.preprocessed, dirs.results, dirs.logs):
        folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    log_path = dirs.logs / f"{command}-{stamp}.log"
    read_fd, write_fd = os.pipe()
    payload = json.dumps({**args, "config": config.to_dict(), "events_fd": write_fd})
    log.info("nnU-Net %s started (log: %s)", command, log_path)
    with log_path.open("wb") as out:
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "rtseg.model._run", command, payload],
                env=child_env(work_dir, config),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                cwd=str(dirs.logs),
                start_new_session=True,  # its own process group: nnU-Net's workers go with it
            )
        finally:
            os.close(write_fd)
        try:
            done = _relay_events(read_fd, progress)
        except BaseException:  # interrupted, or the progress callback raised: stop the child, re-raise
            _stop(child)
            raise
        returncode = child.wait()
    if returncode != 0 or done is None:
        raise ModelError(
            f"nnU-Net {command} failed (exit code {returncode}); last output:\n{_tail(log_path)}",
            source=str(log_path),
        )
    log.info("nnU-Net %s finished", command)
    return done


def _stop(child: subprocess.Popen[bytes]) -> None:
    """Terminate the child's process group (the child and nnU-Net's workers)."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, None)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _relay_events(read_fd: int, progress: ProgressCallback | None) -> dict[str, Any] | None:
    done: dict[str, Any] | None = None
    with os.fdopen(read_fd, "r") as events:
        for line in events:
            event = json.loads(line)
            kind = event.pop("event")
            if kind == "done":
                done = event
            elif kind == "epoch":
                _report_epoch(
                    EpochProgress(**{**event, "pseudo_dice": tuple(event["pseudo_dice"])}), progress
                )
            else:
                log.info("nnU-Net: %s %s", kind, event)
    return done


def _report_epoch(epoch: EpochProgress, progress: ProgressCallback | None) -> None:
    log.info(
        "epoch %d/%d: train loss %.4f, val loss %.4f, pseudo Dice %s (%.1f s)",
        epoch.epoch + 1,
        epoch.epochs,
        epoch.train_loss,
        epoch.val_loss,
        [round(d, 4) for d in epoch.pseudo_dice],
        epoch.seconds,
    )
    if progress is not None:
        progress(epoch)


def _tail(path: Path, lines: int = 25) -> str:
    with path.open("r", errors="replace") as handle:
        return "".join(deque(handle, maxlen=lines))


# --- federated rounds: plans from a pooled fingerprint, training from given weights ----------------
#
# Weights cross process (and site) boundaries only as ``.npz`` files of plain numeric arrays, read
# with ``allow_pickle=False``. Their keys are the network's ``state_dict`` keys without
# ``_orig_mod.`` prefixes and without aliased keys (nnU-Net's decoder repeats ``encoder.*`` as
# ``decoder.encoder.*``; see :func:`rtseg.model.trainer.network_arrays`).


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
    done = _run_child(
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
    raw = _dataset_folder(nnunet_dirs(work_dir).raw, dataset_id)
    if raw is None or not (raw / "dataset.json").is_file():
        raise InputError(f"no raw dataset {dataset_id} in {nnunet_dirs(work_dir).raw}; write it first")
    check_plans(plans, "plans to preprocess with")
    if plans.get("dataset_name") != raw.name:
        raise ModelError(f"the plans are for dataset {plans.get('dataset_name')!r}, not {raw.name}")
    config = replace(config, da_workers=max(1, config.da_workers))
    done = _run_child(
        "preprocess",
        {"dataset_id": dataset_id, "plans": plans, "fingerprint": fingerprint},
        work_dir,
        config,
        None,
    )
    return Path(done["preprocessed_dir"])


def initial_weights(work_dir: Path, plans: dict[str, Any], dataset_json: dict[str, Any], out: Path) -> Path:
    """Initialise the network of ``plans`` once (seeded); write its arrays to ``out`` (``.npz``).

    Also writes ``<out>.aliases.json``: aliased key → the key whose array it shares.
    """
    check_plans(plans, "plans to initialise weights with")
    _run_child(
        "init_weights",
        {"plans": plans, "dataset_json": dataset_json, "out": str(out)},
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
    preprocessed = _dataset_folder(nnunet_dirs(work_dir).preprocessed, dataset_id)
    if preprocessed is None or not (preprocessed / f"{PLANS_IDENTIFIER}.json").is_file():
        raise InputError(f"dataset {dataset_id} is not preprocessed in {work_dir}")
    args = {
        "dataset_id": dataset_id,
        "weights_in": str(weights_in),
        "weights_out": str(weights_out),
        "optimizer_state": str(Path(work_dir).resolve() / "optimizer_state.pt"),
        "schedule": asdict(schedule),
    }
    return _run_child("train_round", args, work_dir, config, progress)


def load_arrays(path: Path) -> dict[str, Any]:
    """Arrays of a weights file; refuses anything that is not plain numeric data (no pickles)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    for key, value in arrays.items():
        if value.dtype.kind not in "fiub":
            raise ModelError(f"array {key!r} has non-numeric dtype {value.dtype}", source=str(path))
    return arrays


def save_arrays(path: Path, arrays: dict[str, Any]) -> Path:
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez(handle, **arrays)
    return path


def write_checkpoint(
    arrays: dict[str, Any],
    aliases: dict[str, str],
    plans: dict[str, Any],
    dataset_json: dict[str, Any],
    out_dir: Path,
    epoch: int = 0,
) -> Path:
    """A standard nnU-Net v2 results folder (``fold_all/checkpoint_final.pth``) from plain arrays.

    Aliased keys are restored, so nnU-Net's predictor loads the state dict strictly.
    """
    from collections import OrderedDict

    import torch

    from rtseg.model.trainer import SAVED_TRAINER_NAME

    out_dir = Path(out_dir)
    (out_dir / "fold_all").mkdir(parents=True, exist_ok=True)
    weights: OrderedDict[str, Any] = OrderedDict((k, torch.from_numpy(v.copy())) for k, v in arrays.items())
    for alias, key in aliases.items():
        weights[alias] = weights[key]
    checkpoint = {
        "network_weights": weights,
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": None,
        "_best_ema": None,
        "current_epoch": epoch,
        "init_args": {
            "plans": plans,
            "configuration": CONFIGURATION,
            "fold": "all",
            "dataset_json": dataset_json,
            "device": "cpu",
        },
        "trainer_name": SAVED_TRAINER_NAME,
        "inference_allowed_mirroring_axes": None,  # lateralised labels: never mirror
    }
    torch.save(checkpoint, out_dir / "fold_all" / "checkpoint_final.pth")
    (out_dir / "plans.json").write_text(json.dumps(plans, indent=2))
    (out_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return out_dir
