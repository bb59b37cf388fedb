"""Overlap and surface-distance metrics in physical units (mm)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.ndimage import binary_erosion, distance_transform_edt

Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Scores:
    """Agreement of a predicted and a reference mask; ``None`` where undefined."""

    dice: float | None
    hd95_mm: float | None
    msd_mm: float | None
    reference_ml: float
    predicted_ml: float


def dice(a: Mask, b: Mask) -> float | None:
    """Dice coefficient; None when both masks are empty (nothing to agree on)."""
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return None
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def _surface(mask: Mask) -> Mask:
    return np.asarray(mask & ~binary_erosion(mask, border_value=0), dtype=bool)


def surface_distances(a: Mask, b: Mask, spacing: tuple[float, ...]) -> tuple[float | None, float | None]:
    """(HD95, mean surface distance) in mm, symmetric (both directions)."""
    if not a.any() or not b.any():
        return None, None
    box = _joint_box(a, b)
    a, b = a[box], b[box]
    sa, sb = _surface(a), _surface(b)
    da = distance_transform_edt(~sb, sampling=spacing)[sa]
    db = distance_transform_edt(~sa, sampling=spacing)[sb]
    both = np.concatenate([da, db])
    return float(np.percentile(both, 95)), float(both.mean())


def _joint_box(a: Mask, b: Mask, pad: int = 2) -> tuple[slice, ...]:
    idx = np.nonzero(a | b)
    return tuple(slice(max(int(i.min()) - pad, 0), int(i.max()) + pad + 1) for i in idx)


def score(pred: Mask, ref: Mask, spacing: tuple[float, float, float], surfaces: bool = True) -> Scores:
    """All metrics for one structure; ``spacing`` in the masks' axis order."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    hd95, msd = surface_distances(pred, ref, spacing) if surfaces else (None, None)
    return Scores(dice(pred, ref), hd95, msd, float(ref.sum()) * voxel_ml, float(pred.sum()) * voxel_ml)


def structure_masks(labels: npt.NDArray[Any], label: int, external: bool = False) -> Mask:
    """Mask of one label; the External structure is the union of all labels."""
    return np.asarray(labels > 0) if external else np.asarray(labels == label)
