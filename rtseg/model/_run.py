"""Child-process entry point for nnU-Net steps: ``python -m rtseg.model._run COMMAND JSON``.

Started by :mod:`rtseg.model.training` with the nnU-Net environment already
set. Events (one JSON object per line) go to the file descriptor ``events_fd``
named in the arguments; nnU-Net's own output goes to stdout/stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from rtseg.model.training import CONFIGURATION, PLANS_IDENTIFIER, CpuConfig, cpu_plans


def plan(args: dict[str, Any], config: CpuConfig, emit: Callable[..., None]) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    dataset_id = int(args["dataset_id"])
    workers = max(1, config.preprocess_workers)
    extract_fingerprint_dataset(
        dataset_id,
        num_processes=workers,
        check_dataset_integrity=True,
        verbose=False,
        show_progress_bar=False,
    )
    plan_experiment_dataset(dataset_id)
    folder = Path(nnUNet_preprocessed.require()) / convert_id_to_dataset_name(dataset_id)
    plans_file = folder / f"{PLANS_IDENTIFIER}.json"
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


def train(args: dict[str, Any], config: CpuConfig, emit: Callable[..., None]) -> None:
    import torch
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    from rtseg.model.trainer import RtsegTrainer, seed_everything

    seed_everything(config.seed)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    folder = Path(nnUNet_preprocessed.require()) / convert_id_to_dataset_name(int(args["dataset_id"]))
    plans = json.loads((folder / f"{PLANS_IDENTIFIER}.json").read_text())
    plans["continue_training"] = False  # nnU-Net's run_training adds this key; the trainer pops it
    dataset_json = json.loads((folder / "dataset.json").read_text())
    fold = args["fold"] if args["fold"] == "all" else int(args["fold"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainer = RtsegTrainer(plans, CONFIGURATION, fold, dataset_json, device)
    trainer.configure_schedule(
        epochs=config.epochs,
        iterations_per_epoch=config.iterations_per_epoch,
        val_iterations_per_epoch=config.val_iterations_per_epoch,
        learning_rate=config.learning_rate,
        epoch_report=lambda report: emit("epoch", **report),
    )
    trainer.run_training()  # no perform_actual_validation: pseudo Dice per epoch is enough here
    emit("done", results_dir=str(trainer.output_folder_base))


COMMANDS: dict[str, Callable[[dict[str, Any], CpuConfig, Callable[..., None]], None]] = {
    "plan": plan,
    "train": train,
}


def main(argv: list[str]) -> int:
    command, args = argv[1], json.loads(argv[2])
    config = CpuConfig.from_dict(args.pop("config"))
    with os.fdopen(int(args.pop("events_fd")), "w") as events:
        COMMANDS[command](args, config, _emitter(events))
    return 0


def _emitter(events: TextIO) -> Callable[..., None]:
    def emit(kind: str, **fields: Any) -> None:
        events.write(json.dumps({"event": kind, **fields}) + "\n")
        events.flush()

    return emit


if __name__ == "__main__":  # nnU-Net's spawned workers re-import this module
    sys.exit(main(sys.argv))
