"""nnU-Net's preprocessing of a long series in z-chunks: the one-piece result, without its big copies.

:func:`rtseg.model.preprocess.preprocess_fast` holds the whole cropped series
in float32 and its cubic resampling in float64 (most of the ~10 MB per 512²
slice the scaling bench measured). Here the model grid's rows are made a chunk
at a time from a slab of the input, converted to float32 a slab at a time, and
written into the model-grid array, which comes out bit for bit as the one-piece
path makes it, by construction:

* A chunk's rows of the model grid are resampled from the input slab
  :func:`rtseg.model.preprocess.rows_needed` names: for nnU-Net's separate z
  the slices the z taps read; for the 3-D cubic zoom the taps' slices plus
  ``PREFILTER_MARGIN`` (48) on each side, which the spline prefilter's
  recursion needs to forget where the slab was cut (its start-up error decays as
  0.268^48 ≈ 3e-28 of the signal, below float64 resolution). Every other step
  is per line or per voxel and rounds the same whatever else is batched with it
  (the prefilter's initial sum is taken row by row, not through BLAS), and
  skimage's clip range is the whole image's.
* The normalisation must be per voxel (CT or none): a z-score would need the
  whole image's statistics.

The model grid (4 × 3 × 3 mm for the default model) is small, so the sliding
window, island suppression and the labels run on it as before
(:func:`rtseg.model.inference.predict_labels`): same network calls, same labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from rtseg.model.preprocess import (
    RowSpan,
    fast_path_applies,
    nonzero_bbox,
    resample_cubic,
    rows_needed,
    separate_z_axis,
)

if TYPE_CHECKING:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

log = logging.getLogger(__name__)

# Series of more slices than this are preprocessed in chunks of about this many (rtseg's default
# for [node] chunk_slices): ~300 slices of 512² is where the one-piece path passes ~3 GB.
CHUNK_SLICES = 300
POINTWISE_SCHEMES = frozenset({"CTNormalization", "NoNormalization"})  # no statistics of the image itself


@dataclass(frozen=True)
class ChunkPlan:
    """How one series is cut: nnU-Net's properties, the model grid and each chunk's model-grid rows."""

    properties: dict[str, Any]
    new_shape: tuple[int, int, int]
    spacings: tuple[list[float], list[float]]  # the input's and the model's, in model axis order
    rule: str  # "cubic", "nearest" or "linear" along z (rows_needed)
    chunks: list[tuple[int, int]]


def plan_chunks(
    predictor: nnUNetPredictor,
    image: npt.NDArray[Any],
    spacing_zyx: tuple[float, float, float],
    chunk_slices: int,
) -> ChunkPlan | None:
    """The chunks of ``image [c, z, y, x]``, or None where the one-piece path must run.

    None when the series is not longer than ``chunk_slices`` (0: never chunk) or
    when the preprocessing is not one whose slab-wise result is provably the
    whole's: rtseg's fast path with a per-voxel normalisation, z the first axis
    of the model grid and, with nnU-Net's separate z, the resampled one.
    """
    manager = predictor.configuration_manager
    forward = list(predictor.plans_manager.transpose_forward)
    if chunk_slices < 1 or image.shape[1] <= chunk_slices or forward[0] != 0:
        return None
    if not fast_path_applies(predictor, manager.preprocessor_class, image):
        return None
    if not set(manager.normalization_schemes[: image.shape[0]]) <= POINTWISE_SCHEMES:
        return None
    data = image.transpose([0, *[i + 1 for i in forward]])
    bbox = nonzero_bbox(data)
    cropped = tuple(b - a for a, b in bbox)
    spacing = [float(spacing_zyx[i]) for i in forward]
    new_shape = _model_shape(cropped, spacing, list(manager.spacing))
    kwargs = dict(manager.configuration.get("resampling_fn_data_kwargs") or {})
    axis = separate_z_axis(spacing, list(manager.spacing), kwargs)
    if new_shape is None or axis not in (None, 0):
        return None
    rule = "cubic" if axis is None else ("nearest" if int(kwargs.get("order_z", 0)) == 0 else "linear")
    rows = max(1, chunk_slices * new_shape[0] // max(cropped[0], 1))
    chunks = [(a, min(a + rows, new_shape[0])) for a in range(0, new_shape[0], rows)]
    properties = {
        "spacing": [float(s) for s in spacing_zyx],
        "shape_before_cropping": data.shape[1:],
        "bbox_used_for_cropping": bbox,
        "shape_after_cropping_and_before_resampling": cropped,
    }
    return ChunkPlan(properties, new_shape, (spacing, list(manager.spacing)), rule, chunks)


def _model_shape(
    cropped: tuple[int, ...], spacing: list[float], target: list[float]
) -> tuple[int, int, int] | None:
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    shape = tuple(int(n) for n in compute_new_shape(cropped, spacing, target))
    return None if len(shape) != 3 or min(shape) < 1 else (shape[0], shape[1], shape[2])


def preprocess_chunked(
    predictor: nnUNetPredictor, image: npt.NDArray[Any], plan: ChunkPlan
) -> tuple[torch.Tensor, dict[str, Any]]:
    """:func:`rtseg.model.inference.preprocess`'s data and properties, made chunk by chunk."""
    import torch

    from rtseg.model.preprocess import _normalize

    forward = list(predictor.plans_manager.transpose_forward)
    data = image.transpose([0, *[i + 1 for i in forward]])
    (z0, z1), (y0, y1), (x0, x1) = plan.properties["bbox_used_for_cropping"]
    kwargs = dict(predictor.configuration_manager.configuration.get("resampling_fn_data_kwargs") or {})
    ranges = _value_ranges(predictor, data[:, z0:z1, y0:y1, x0:x1]) if plan.rule == "cubic" else None
    out = np.empty((data.shape[0], *plan.new_shape), dtype=np.float32)
    for start, stop in plan.chunks:
        first, end = rows_needed(z1 - z0, plan.new_shape[0], start, stop, plan.rule)
        slab = np.array(data[:, z0 + first : z0 + end, y0:y1, x0:x1], dtype=np.float32, order="C")
        _normalize(slab, predictor)
        span = RowSpan(z1 - z0, first, start, stop)
        out[:, start:stop] = resample_cubic(slab, plan.new_shape, *plan.spacings, kwargs, span, ranges)
        del slab
    log.info("series preprocessed in %d z-chunks", len(plan.chunks))
    return torch.from_numpy(out), dict(plan.properties)


def _value_ranges(predictor: nnUNetPredictor, cropped: npt.NDArray[Any]) -> list[tuple[float, float]]:
    """Each channel's ``(min, max)`` after normalisation, as skimage clips the whole image to it.

    The pointwise schemes (clip, subtract, divide by a positive number) are
    monotone and so is every rounding step, so the normalised extremes are the
    raw extremes normalised: no normalised copy of the whole series is needed.
    """
    from rtseg.model.preprocess import _normalize, value_range_of

    extremes = np.empty((cropped.shape[0], 1, 1, 2), dtype=np.float32)
    for c in range(cropped.shape[0]):
        extremes[c, 0, 0] = value_range_of(cropped[c])
    _normalize(extremes, predictor)
    return [(float(extremes[c, 0, 0, 0]), float(extremes[c, 0, 0, 1])) for c in range(cropped.shape[0])]
