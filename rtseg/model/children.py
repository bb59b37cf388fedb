"""nnU-Net in a child process: the work folder's layout, the child's environment, its events.

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
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import rtseg
from rtseg.errors import ModelError
from rtseg.model.cpu import OUT_OF_MEMORY, CpuConfig, validate_config

log = logging.getLogger(__name__)


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


def dataset_folder(root: Path, dataset_id: int) -> Path | None:
    """nnU-Net's ``DatasetXXX_*`` folder of ``dataset_id`` under ``root``, if there is one."""
    found = sorted(root.glob(f"Dataset{dataset_id:03d}_*")) if root.is_dir() else []
    return found[0] if found else None


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


def run_child(
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
    if returncode == OUT_OF_MEMORY and config.memory_gb is not None:
        raise ModelError(
            f"nnU-Net {command} needed more memory than the {config.memory_gb:g} GB it may use"
            " (a site's [federation] max_memory_gb)",
            source=str(log_path),
        )
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
