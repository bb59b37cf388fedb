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
