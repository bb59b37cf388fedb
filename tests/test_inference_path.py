"""rtseg's slab-wise logits → labels step gives nnU-Net's own labels (its resampling rule, then argmax)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

from rtseg.model.inference import upsample_argmax


def _stock_labels(
    logits: np.ndarray, shape: tuple[int, int, int], model_spacing: list[float], ct_spacing: list[float]
) -> np.ndarray:
    resampled = resample_data_or_seg_to_shape(
        logits, shape, model_spacing, ct_spacing, is_seg=False, order=1, order_z=0, force_separate_z=None
    )
    return np.asarray(resampled).argmax(0)


@pytest.mark.parametrize(
    ("shape", "model_spacing", "ct_spacing", "z_mode"),
    [
        ((13, 23, 21), [3.0, 1.5, 1.5], [1.4, 0.7, 0.75], "linear"),  # isotropic enough: trilinear
        ((31, 20, 20), [5.0, 1.0, 1.0], [1.0, 0.5, 0.5], "nearest"),  # anisotropic model: z nearest
        ((6, 10, 10), [3.0, 1.5, 1.5], [3.0, 1.5, 1.5], "linear"),  # same grid
    ],
)
def test_labels_match_nnunet_resampling(
    shape: tuple[int, int, int], model_spacing: list[float], ct_spacing: list[float], z_mode: str
) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 6, 10, 10)).astype(np.float32)
    ours = upsample_argmax(torch.from_numpy(logits), shape, z_mode, slab=4)
    stock = _stock_labels(logits, shape, model_spacing, ct_spacing)
    assert ours.shape == shape and ours.dtype == np.uint8
    assert (ours == stock).mean() > 0.999


def _smooth_logits(classes: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Logits of blob-like structures: most cells agree on a label, boundaries are thin."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij"))
    centres = rng.uniform(0.15, 0.85, size=(classes, 3))
    return np.stack(
        [-np.sum((grid - c.reshape(3, 1, 1, 1)) ** 2, axis=0) * rng.uniform(20, 40) for c in centres]
    ).astype(np.float32)


@pytest.mark.parametrize(
    ("model_spacing", "ct_spacing", "z_mode"),
    [
        ([4.0, 3.0, 3.0], [1.6, 1.05, 1.1], "linear"),  # the default model's spacing: trilinear
        ([6.0, 1.0, 1.0], [1.0, 0.35, 0.37], "nearest"),  # anisotropic model: z nearest
    ],
)
def test_boundary_only_interpolation_equals_full_interpolation_on_organ_like_logits(
    model_spacing: list[float], ct_spacing: list[float], z_mode: str
) -> None:
    logits = _smooth_logits(8, (12, 40, 36), seed=3)
    shape = (29, 113, 97)
    ours = upsample_argmax(torch.from_numpy(logits), shape, z_mode, slab=5)
    stock = _stock_labels(logits, shape, model_spacing, ct_spacing)
    assert len(np.unique(stock)) == 8  # every structure shows up
    assert (ours == stock).mean() > 0.9999
