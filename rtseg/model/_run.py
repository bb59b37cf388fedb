"""Child-process entry point for nnU-Net steps: ``python -m rtseg.model._run COMMAND JSON``.

Started by :func:`rtseg.model.children.run_child` with the nnU-Net environment already
set. Events (one JSON object per line) go to the file descriptor ``events_fd``
named in the arguments; nnU-Net's own output goes to stdout/stderr.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from rtseg.model.cpu import CONFIGURATION, OUT_OF_MEMORY, PLANS_IDENTIFIER, CpuConfig, cpu_plans
from rtseg.model.plans_check import check_plans
from rtseg.paths import safe_child


def plan(args: dict[str, Any], config: CpuConfig, emit: Callable[..., None]) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    dataset_id = int(args["dataset_id"])
    workers = max(1, config.preprocess_workers)
    plans_file = _fingerprint_and_plan(dataset_id, workers)
    folder = plans_file.parent
    plans = cpu_plans(json.loads(plans_file.read_text()), config)
    plans_file.write_text(json.dumps(plans, indent=4))
    emit(
        "planned",
        configuration=CONFIGURATION,
        patch_size=plans["configurations"][CONFIGURATION]["patch_size"],
    )
    preprocess_dataset(
        dataset_id, PLANS_IDENTIFIER, (CONFIGURATION,), [workers], verbose=False, show_progress_bar=False
    )
    emit("done", preprocessed_dir=str(folder))


def _fingerprint_and_plan(dataset_id: int, workers: int) -> Path:
    """nnU-Net's fingerprint and default planner for ``dataset_id``; returns its plans file."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
    )
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    extract_fingerprint_dataset(
        dataset_id,
        num_processes=workers,
        check_dataset_integrity=True,
        verbose=False,
        show_progress_bar=False,
    )
    plan_experiment_dataset(dataset_id)
    folder = Path(nnUNet_preprocessed.require()) / str(convert_id_to_dataset_name(dataset_id))
    return folder / f"{PLANS_IDENTIFIER}.json"


def train(args: dict[str, Any], config: CpuConfig, emit: Callable[..., None]) -> None:
    fold = args["fold"] if args["fold"] == "all" else int(args["fold"])
    trainer = _make_trainer(args, config, emit, fold)
    if args.get("start_from"):
        _load_start_weights(trainer, Path(args["start_from"]))
    trainer.run_training()  # no perform_actual_validation: pseudo Dice per epoch is enough here
    emit("done", results_dir=str(trainer.output_folder_base))


def _load_start_weights(trainer: Any, checkpoint_file: Path) -> None:
    """Start from the network weights of an nnU-Net checkpoint of the same plans (fresh optimizer)."""
    from rtseg.model.trainer import plain_network

    trainer.initialize()
    _load_weights(plain_network(trainer.network), checkpoint_file)


def _load_weights(network: Any, checkpoint_file: Path) -> None:
    """The network weights of a checkpoint (restricted unpickler, names checked) into ``network``."""
    from rtseg.model.checkpoints import load_checkpoint

    checkpoint = load_checkpoint(checkpoint_file)
    try:
        network.load_state_dict(checkpoint["network_weights"])
    except (KeyError, RuntimeError) as exc:
        raise ValueError(f"{checkpoint_file} does not fit the network of these plans: {exc}") from exc


def _dataset_name(dataset_id: int, dataset_json: dict[str, Any]) -> str:
    return f"Dataset{dataset_id:03d}_{dataset_json['name']}"


def plan_fingerprint(args: dict[str, Any], config: CpuConfig, emit: Callable[..., None]) -> None:
    """Plan from a given fingerprint; a blank placeholder image only tells the planner the reader."""
    import numpy as np
    import SimpleITK as sitk
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw

    dataset_id, dataset_json = int(args["dataset_id"]), dict(args["dataset_json"])
    name = _dataset_name(dataset_id, dataset_json)
    raw = Path(nnUNet_raw.require()) / name
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    blank = sitk.GetImageFromArray(np.zeros((4, 4, 4), np.int16))
    sitk.WriteImage(blank, str(raw / "imagesTr" / "placeholder_0000.nii.gz"))
    sitk.WriteImage(
        sitk.GetImageFromArray(np.zeros((4, 4, 4), np.uint8)), str(raw / "labelsTr" / "placeholder.nii.gz")
    )
    (raw / "dataset.json").write_text(json.dumps({**dataset_json, "numTraining": 1}, indent=2))
    folder = Path(nnUNet_preprocessed.require()) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_fingerprint.json").write_text(json.dumps(args["fingerprint"], indent=2))
    plan_experiment_dataset(dataset_id)
    plans_file = folder / f"{PLANS_IDENTIFIER}.json"
    plans = cpu_plans(json.loads(plans_file.read_text()), config)
    plans_file.write_text(json.dumps(plans, indent=4))
    emit("done", plans_file=str(plans_file))


def preprocess(args: dict[str, Any], config: CpuConfig, emit: Callable[..., None]) -> None:
    """Preprocess with plans made elsewhere (the federation's coordinator)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    dataset_id, plans = int(args["dataset_id"]), dict(args["plans"])
    check_plans(plans, "plans to preprocess with")
    name = convert_id_to_dataset_name(dataset_id)  # this dataset's own folder, never a name from the plans
    if plans["dataset_name"] != name:
        raise ValueError(f"the plans are for dataset {plans['dataset_name']}, not {name}")
    raw = safe_child(Path(nnUNet_raw.require()), name, "dataset folder")
    folder = safe_child(Path(nnUNet_preprocessed.require()), name, "dataset folder")
    if folder.exists():
        shutil.rmtree(folder)  # data preprocessed with other plans must not mix in
    folder.mkdir(parents=True)
    (folder / f"{PLANS_IDENTIFIER}.json").write_text(json.dumps(plans, indent=4))
    (folder / "dataset.json").write_text((raw / "dataset.json").read_text())
    (folder / "dataset_fingerprint.json").write_text(json.dumps(args["fingerprint"], indent=2))
    workers = max(1, config.preprocess_workers)
    preprocess_dataset(
        dataset_id, PLANS_IDENTIFIER, (CONFIGURATION,), [workers], verbose=False, show_progress_bar=False
    )
    emit("done", preprocessed_dir=str(folder))


def plan_stock(args: dict[str, Any], config: CpuConfig, emit: Callable[..., None]) -> None:
    """nnU-Net's own fingerprint, default planner and 3d_fullres preprocessing, plans kept as planned.

    The planner's plans are kept in ``stock_plans.json`` beside ``nnUNetPlans.json``;
    the latter then gets ``config.patch_size_zyx`` and ``config.batch_size`` for
    training on small patches (the network, fully convolutional, is the same).
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    dataset_id = int(args["dataset_id"])
    workers = max(1, config.preprocess_workers)
    plans_file = _fingerprint_and_plan(dataset_id, workers)
    folder = plans_file.parent
    plans = json.loads(plans_file.read_text())
    (folder / "stock_plans.json").write_text(json.dumps(plans, indent=4))
    preprocess_dataset(
        dataset_id, PLANS_IDENTIFIER, (CONFIGURATION,), [workers], verbose=False, show_progress_bar=False
    )
    training = plans["configurations"][CONFIGURATION]
    training["patch_size"] = [int(p) for p in config.patch_size_zyx]
    training["batch_size"] = int(config.batch_size)
    plans_file.write_text(json.dumps(plans, indent=4))
    emit("done", preprocessed_dir=str(folder), stock_plans=str(folder / "stock_plans.json"))


def init_weights(args: dict[str, Any], config: CpuConfig, emit: Callable[..., None]) -> None:
    """Build the network of the plans once, seeded (or from ``start_checkpoint``); write its arrays."""
    import torch

    from rtseg.model.network import build_network
    from rtseg.model.trainer import network_arrays, seed_everything
    from rtseg.model.weights import save_arrays

    seed_everything(config.seed)
    network = build_network(
        dict(args["plans"]), dict(args["dataset_json"]), purpose="plans to initialise weights with"
    )
    if args.get("start_checkpoint"):  # a federation that continues from a model
        _load_weights(network, Path(args["start_checkpoint"]))
    with torch.no_grad():
        arrays, aliases = network_arrays(network)
    out = Path(args["out"])
    save_arrays(out, arrays)
    Path(f"{out}.aliases.json").write_text(json.dumps(aliases, indent=1))
    emit("done", out=str(out), n_arrays=len(arrays), n_aliases=len(aliases))


def train_round(args: dict[str, Any], config: CpuConfig, emit: Callable[..., None]) -> None:
    """E local epochs from given weights; optimizer state kept in a local file between rounds."""
    import time

    import torch

    from rtseg.model.trainer import (
        OffsetPolyLR,
        add_proximal_term,
        load_network_arrays,
        network_arrays,
    )
    from rtseg.model.weights import load_arrays, save_arrays

    schedule = args["schedule"]
    os.nice(int(schedule["nice"]))  # below DICOM receiving and inference
    # seeded per round: the same seed every round would draw the same patches every round
    round_config = replace(
        config, epochs=int(schedule["epochs"]), seed=config.seed + int(schedule["epoch_offset"])
    )
    trainer = _make_trainer(args, round_config, emit)
    trainer.initialize()
    load_network_arrays(trainer.network, load_arrays(Path(args["weights_in"])))
    optimizer_state = Path(args["optimizer_state"])
    if optimizer_state.is_file():
        trainer.optimizer.load_state_dict(torch.load(optimizer_state, weights_only=True))
    trainer.lr_scheduler = OffsetPolyLR(
        trainer.optimizer, config.learning_rate, int(schedule["total_epochs"]), int(schedule["epoch_offset"])
    )
    if float(schedule["prox_mu"]) > 0:
        add_proximal_term(trainer.network, float(schedule["prox_mu"]))
    started = time.monotonic()
    trainer.run_training()
    seconds = time.monotonic() - started
    arrays, _ = network_arrays(trainer.network)
    save_arrays(Path(args["weights_out"]), arrays)
    torch.save(trainer.optimizer.state_dict(), optimizer_state)
    emit("done", seconds=seconds)


def _make_trainer(
    args: dict[str, Any], config: CpuConfig, emit: Callable[..., None], fold: int | str = "all"
) -> Any:
    """nnU-Net's trainer for the preprocessed dataset, seeded, on CUDA when this torch has it."""
    import torch
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    from rtseg.model.trainer import RtsegTrainer, seed_everything

    seed_everything(config.seed)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    folder = Path(nnUNet_preprocessed.require()) / convert_id_to_dataset_name(int(args["dataset_id"]))
    plans = json.loads((folder / f"{PLANS_IDENTIFIER}.json").read_text())
    check_plans(plans, str(folder / f"{PLANS_IDENTIFIER}.json"))  # nnU-Net builds the network from them
    plans["continue_training"] = False  # nnU-Net's run_training adds this key; the trainer pops it
    dataset_json = json.loads((folder / "dataset.json").read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainer = RtsegTrainer(plans, CONFIGURATION, fold, dataset_json, device)
    trainer.configure_schedule(
        epochs=config.epochs,
        iterations_per_epoch=config.iterations_per_epoch,
        val_iterations_per_epoch=config.val_iterations_per_epoch,
        learning_rate=config.learning_rate,
        optimizer=config.optimizer,
        rotation_deg=config.rotation_deg,
        epoch_report=lambda report: emit("epoch", **report),
    )
    return trainer


COMMANDS: dict[str, Callable[[dict[str, Any], CpuConfig, Callable[..., None]], None]] = {
    "plan": plan,
    "train": train,
    "plan_fingerprint": plan_fingerprint,
    "plan_stock": plan_stock,
    "preprocess": preprocess,
    "init_weights": init_weights,
    "train_round": train_round,
}


def main(argv: list[str]) -> int:
    command, args = argv[1], json.loads(argv[2])
    config = CpuConfig.from_dict(args.pop("config"))
    if config.memory_gb is not None:  # before torch is imported; nnU-Net's workers inherit it
        limit = int(config.memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        with os.fdopen(int(args.pop("events_fd")), "w") as events:
            COMMANDS[command](args, config, _emitter(events))
    except (MemoryError, RuntimeError, OSError, ImportError) as exc:
        if config.memory_gb is None or not _out_of_memory(exc):
            raise
        print(f"rtseg: out of the {config.memory_gb:g} GB this process may use: {exc}", file=sys.stderr)
        return OUT_OF_MEMORY
    return 0


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation refused: NumPy's MemoryError, torch's allocator, a library that cannot be mapped."""
    text = str(exc)
    return (
        isinstance(exc, MemoryError)
        or getattr(exc, "errno", None) == errno.ENOMEM
        or "can't allocate memory" in text
        or "failed to map segment" in text
    )


def _emitter(events: TextIO) -> Callable[..., None]:
    def emit(kind: str, **fields: Any) -> None:
        events.write(json.dumps({"event": kind, **fields}) + "\n")
        events.flush()

    return emit


if __name__ == "__main__":  # nnU-Net's spawned workers re-import this module
    sys.exit(main(sys.argv))
