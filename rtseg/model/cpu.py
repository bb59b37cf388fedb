"""The CPU-sized nnU-Net configuration: a small 3-D U-Net, a short schedule, and the plans for it.

Plain values and arithmetic only (no nnU-Net, no torch), so both the parent
process and the nnU-Net child (:mod:`rtseg.model._run`) import it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from rtseg.errors import InputError, ModelError

CONFIGURATION = "3d_fullres"
PLANS_IDENTIFIER = "nnUNetPlans"
OPTIMIZERS = frozenset({"sgd", "adamw"})
# exit status of the nnU-Net child (:mod:`rtseg.model._run`) that ran out of its ``memory_gb``
OUT_OF_MEMORY = 3


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
    # address space the nnU-Net child may take (a site's max_memory_gb); None: no limit. A resource
    # limit like ``threads``: the site sets it, whatever a coordinator's settings say.
    memory_gb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        if doc["memory_gb"] is None:  # settings written before the limit existed read the same
            del doc["memory_gb"]
        return doc

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
    if config.memory_gb is not None and not config.memory_gb > 0:
        raise InputError(f"memory_gb must be positive, got {config.memory_gb}")
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
