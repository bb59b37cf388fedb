"""The one nnU-Net trainer subclass rtseg needs.

It changes only what a short CPU schedule needs: epochs, iterations and
learning rate from :class:`rtseg.model.cpu.CpuConfig`, an epoch report to
the parent process, and checkpoints that name the stock ``nnUNetTrainer`` so any
nnU-Net installation loads them (nnU-Net finds trainers by name, and on a
CPU-only torch its search crashes for every name but ``nnUNetTrainer``).

Import this module only in a process whose nnU-Net environment is set
(see :mod:`rtseg.model._run`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch._dynamo import OptimizedModule

from rtseg.model.cpu import OPTIMIZERS

SAVED_TRAINER_NAME = "nnUNetTrainer"  # the network is the stock one built from the plans

EpochReport = Callable[[dict[str, Any]], None]


class RtsegTrainer(nnUNetTrainer):  # type: ignore[misc]  # nnU-Net is untyped
    """``nnUNetTrainer`` with a configurable schedule and stock-named checkpoints."""

    # nnU-Net records the __init__ arguments by inspecting this signature (to
    # re-create the trainer from a checkpoint), so it must match the base class.
    def __init__(
        self,
        plans: dict[str, Any],
        configuration: str,
        fold: int | str,
        dataset_json: dict[str, Any],
        device: torch.device = torch.device("cuda"),  # noqa: B008 (nnU-Net's own default)
    ) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.epoch_report: EpochReport | None = None
        self.optimizer_name = "sgd"
        self.rotation_deg = 30.0

    def configure_schedule(
        self,
        *,
        epochs: int,
        iterations_per_epoch: int,
        val_iterations_per_epoch: int,
        learning_rate: float,
        optimizer: str = "sgd",
        rotation_deg: float = 30.0,
        epoch_report: EpochReport | None = None,
    ) -> None:
        """Set the schedule; must come before training starts (the LR scheduler reads it)."""
        if self.was_initialized:
            raise RuntimeError("configure_schedule() after the trainer was initialized")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}")
        self.num_epochs = epochs
        self.num_iterations_per_epoch = iterations_per_epoch
        self.num_val_iterations_per_epoch = val_iterations_per_epoch
        self.initial_lr = learning_rate
        self.optimizer_name = optimizer
        self.rotation_deg = rotation_deg
        self.epoch_report = epoch_report

    def configure_optimizers(self) -> tuple[Any, Any]:
        """nnU-Net's SGD, or AdamW as in nnU-Net's ``nnUNetTrainerAdam``; poly schedule either way.

        AdamW converges in far fewer iterations than SGD with momentum 0.99,
        which matters on a CPU budget of a few thousand iterations.
        """
        if self.optimizer_name == "sgd":
            optimizers: tuple[Any, Any] = super().configure_optimizers()  # nnU-Net is untyped
            return optimizers
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

        optimizer = torch.optim.AdamW(
            self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay, amsgrad=True
        )
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self) -> tuple[Any, bool, Any, None]:
        """nnU-Net's augmentation without mirroring, in training and at inference.

        Mirroring swaps left and right (and head and feet) while the labels keep
        their names, so a mirrored Kidney_L sits where Kidney_R belongs: the
        network cannot learn lateralised structures. Inputs are in the canonical
        orientation, so mirroring buys no robustness either.
        """
        configure = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size
        rotation, dummy_2d, initial_patch_size, _ = configure()
        self.inference_allowed_mirroring_axes = None
        if not dummy_2d:
            # nnU-Net's 3-D range is ±30° (the default); the canonical orientation of
            # rtseg's inputs makes large tilts unnecessary, and smaller ones train faster.
            from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

            limit = np.deg2rad(self.rotation_deg)
            rotation = (-limit, limit)
            patch_size = self.configuration_manager.patch_size
            initial_patch_size = get_patch_size(patch_size, rotation, rotation, rotation, (0.85, 1.25))
            self.print_to_log_file(f"rotation for augmentation: ±{self.rotation_deg}°")
        return rotation, dummy_2d, initial_patch_size, None

    def on_epoch_end(self) -> None:
        epoch = self.current_epoch
        super().on_epoch_end()
        if self.epoch_report is not None:
            value = self.logger.get_value
            self.epoch_report(
                {
                    "epoch": epoch,
                    "epochs": self.num_epochs,
                    "train_loss": float(value("train_losses", step=-1)),
                    "val_loss": float(value("val_losses", step=-1)),
                    "pseudo_dice": [float(d) for d in value("dice_per_class_or_region", step=-1)],
                    "seconds": float(value("epoch_end_timestamps", step=-1))
                    - float(value("epoch_start_timestamps", step=-1)),
                }
            )

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, with ``trainer_name`` set to the stock trainer."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        module = plain_network(self.network.module if self.is_ddp else self.network)
        checkpoint = {
            "network_weights": module.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": SAVED_TRAINER_NAME,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
        }
        torch.save(checkpoint, filename)


def seed_everything(seed: int) -> None:
    """Seed the training process (augmentation workers draw their own seeds)."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- federated rounds ---------------------------------------------------------------------------

COMPILE_PREFIX = "_orig_mod."


def plain_network(network: torch.nn.Module) -> torch.nn.Module:
    """The network itself, not ``torch.compile``'s wrapper (whose state-dict keys carry ``_orig_mod.``)."""
    return network._orig_mod if isinstance(network, OptimizedModule) else network


def network_arrays(network: torch.nn.Module) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The network's tensors as NumPy arrays without aliases, and the aliases.

    nnU-Net's decoder holds the encoder, so its state dict repeats the same
    tensors under ``decoder.encoder.*`` (nnUNet #2553); each storage is sent
    once, under the first key that names it. ``_orig_mod.`` prefixes added by
    ``torch.compile`` are dropped.
    """
    network = plain_network(network)
    arrays: dict[str, np.ndarray] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    for key, tensor in network.state_dict().items():
        key = key.replace(COMPILE_PREFIX, "")
        identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if identity in seen and tensor.numel() > 0:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        arrays[key] = tensor.detach().cpu().numpy().copy()
    return arrays, aliases


def load_network_arrays(network: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load arrays from :func:`network_arrays`; every key the network has must be covered."""
    network = plain_network(network)
    _, aliases = network_arrays(network)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    missing, unexpected = network.load_state_dict(state, strict=False)
    uncovered = [k for k in missing if k not in aliases]
    if uncovered or unexpected:
        raise ValueError(
            f"weights do not fit the network: missing {uncovered[:5]}, unexpected {unexpected[:5]}"
        )


def add_proximal_term(network: torch.nn.Module, mu: float) -> None:
    """FedProx: add ``mu * (w - w_global)`` to every gradient (the gradient of ``mu/2 ||w - w_global||²``).

    Gradient hooks leave nnU-Net's ``train_step`` untouched.
    """
    for param in network.parameters():
        if not param.requires_grad:
            continue
        anchor = param.detach().clone()
        param.register_hook(lambda grad, p=param, a=anchor: grad + mu * (p.detach() - a))  # type: ignore[no-untyped-call]


class OffsetPolyLR:
    """nnU-Net's poly schedule over the whole federation: local epoch e is global epoch offset + e."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, total: int, offset: int) -> None:
        self.optimizer, self.initial_lr, self.total, self.offset = optimizer, initial_lr, total, offset

    def step(self, current_step: int | None = None) -> None:
        epoch = self.offset + (current_step or 0)
        lr = self.initial_lr * (1 - epoch / self.total) ** 0.9
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]
