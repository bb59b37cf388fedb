"""Logits of a long series in z-chunks: the one-piece path's logits, without its full-resolution copies.

:func:`rtseg.model.inference.predict_labels` holds the whole cropped series in
float32 and its cubic resampling in float64 (about 10 MB per 512² slice). Here
the model grid's rows are made a chunk at a time, and every logit comes out
bit for bit as the one-piece path makes it, by construction:

* The tiles are the whole image's own sliding-window tiles (nnU-Net's
  ``_internal_get_sliding_window_slicers`` on the whole padded shape), run in
  the whole's order (nnU-Net's loops put z outermost), each on the rows of the
  model grid it covers, and added into one accumulator of the whole model grid
  in float16 as nnU-Net adds them: every voxel sees the same sums in the same
  order. A chunk is a run of consecutive tile z-positions; the rows two chunks'
  tiles share (the tiles' z-overlap) are preprocessed twice, no tile runs twice.
* A chunk's rows of the model grid are resampled from a slab of the input
  (:func:`rtseg.model.preprocess.rows_needed`): for nnU-Net's separate z the
  slices the z taps read; for the 3-D cubic zoom the taps' slices plus
  ``PREFILTER_MARGIN`` (48) on each side, which the spline prefilter's
  recursion needs to forget where the slab was cut (its start-up error decays as
  0.268^48 ≈ 3e-28 of the signal, below float64 resolution). Every other step
  is per line or per voxel and rounds the same whatever else is batched with it,
  and skimage's clip range is the whole image's.
* Only the model-grid logits are held whole (``classes × rows × y × x``
  float16, as in the one-piece path): island suppression needs the connected
  pieces and the score floor of the whole volume.

Nothing else changes: the predictor's network is called per tile through
nnU-Net's ``_internal_maybe_mirror_and_predict``, folds are averaged as
:func:`rtseg.model.inference.sliding_window_logits` does (each fold preprocesses
the chunks again: only the model-grid accumulators outlive a chunk).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from rtseg.errors import ModelError
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

# Series of more slices than this are predicted in chunks of about this many (rtseg's default
# for [node] chunk_slices): ~300 slices of 512² is where the one-piece path passes ~3 GB.
CHUNK_SLICES = 300
POINTWISE_SCHEMES = frozenset({"CTNormalization", "NoNormalization"})  # no statistics of the image itself
Slicer = tuple[slice, ...]


@dataclass(frozen=True)
class ChunkPlan:
    """How one series is cut: the preprocessing it needs and the tiles of each chunk."""

    properties: dict[str, Any]
    new_shape: tuple[int, int, int]
    spacings: tuple[list[float], list[float]]  # the input's and the model's, in model axis order
    rule: str  # "cubic", "nearest" or "linear" along z (rows_needed)
    chunks: list[list[Slicer]]  # the whole's slicers, in order, grouped by z-start

    def rows(self, chunk: list[Slicer]) -> tuple[int, int]:
        """Model-grid rows ``[first, end)`` the tiles of ``chunk`` read."""
        return int(chunk[0][1].start), int(chunk[-1][1].stop)


def plan_chunks(
    predictor: nnUNetPredictor,
    image: npt.NDArray[Any],
    spacing_zyx: tuple[float, float, float],
    chunk_slices: int,
) -> ChunkPlan | None:
    """The chunks of ``image [1, z, y, x]``, or None where the one-piece path must run.

    None when the series fits one chunk, when the model grid holds a single tile
    along z, or when the preprocessing is not one whose slab-wise result is
    provably the whole's (rtseg's fast path with a per-voxel normalisation, z the
    first axis of the model grid and, with nnU-Net's separate z, the resampled one).
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
    patch = [int(p) for p in manager.patch_size]
    if new_shape is None or axis not in (None, 0) or new_shape[0] <= patch[0]:
        return None
    rule = "cubic" if axis is None else ("nearest" if int(kwargs.get("order_z", 0)) == 0 else "linear")
    padded = (new_shape[0], max(new_shape[1], patch[1]), max(new_shape[2], patch[2]))
    budget = max(patch[0], chunk_slices * new_shape[0] // max(cropped[0], 1))
    chunks = _group(predictor._internal_get_sliding_window_slicers(padded), patch[0], budget)
    if len(chunks) < 2:
        return None
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


def _group(slicers: list[Slicer], patch_z: int, budget: int) -> list[list[Slicer]]:
    """Consecutive slicers in chunks whose tiles span at most ``budget`` rows (at least one z-position)."""
    chunks: list[list[Slicer]] = []
    for sl in slicers:
        start = int(sl[1].start)
        same_row = bool(chunks) and int(chunks[-1][-1][1].start) == start
        if same_row or (chunks and start + patch_z - int(chunks[-1][0][1].start) <= budget):
            chunks[-1].append(sl)
        else:
            chunks.append([sl])
    return chunks


def chunked_logits(
    predictor: nnUNetPredictor, image: npt.NDArray[Any], plan: ChunkPlan
) -> tuple[torch.Tensor, dict[str, float]]:
    """Logits ``[class, z, y, x]`` at the model's spacing, as the one-piece path's, and phase seconds."""
    network = getattr(predictor.network, "_orig_mod", predictor.network)  # torch.compile wraps it
    predictor.network = predictor.network.to(predictor.device)
    predictor.network.eval()
    total: torch.Tensor | None = None
    seconds = {"preprocess_s": 0.0, "network_s": 0.0}
    for params in predictor.list_of_parameters:
        network.load_state_dict(params)
        logits = _fold_logits(predictor, image, plan, seconds).to("cpu")
        total = logits if total is None else total + logits
    assert total is not None  # nnU-Net refuses a model folder without folds
    if len(predictor.list_of_parameters) > 1:
        total = total / len(predictor.list_of_parameters)  # not in place: an inference tensor
    log.info("series predicted in %d z-chunks", len(plan.chunks))
    return total, seconds


def _fold_logits(
    predictor: nnUNetPredictor, image: npt.NDArray[Any], plan: ChunkPlan, seconds: dict[str, float]
) -> torch.Tensor:
    """nnU-Net's ``predict_sliding_window_return_logits`` for one fold, chunk by chunk."""
    import torch
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    device = predictor.device
    on_device = predictor.perform_everything_on_device and device.type != "cpu"
    results_device = device if on_device else torch.device("cpu")
    patch = tuple(int(p) for p in predictor.configuration_manager.patch_size)
    padded = (plan.new_shape[0], max(plan.new_shape[1], patch[1]), max(plan.new_shape[2], patch[2]))
    heads = predictor.label_manager.num_segmentation_heads
    predicted = torch.zeros((heads, *padded), dtype=torch.half, device=results_device)
    n_predictions = torch.zeros(padded, dtype=torch.half, device=results_device)
    gaussian = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=results_device)
    revert: Slicer = ()
    autocast = (
        torch.autocast(device.type, enabled=True) if device.type == "cuda" else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        for slicers, rows in _preprocessed_chunks(predictor, image, plan, seconds):
            data, revert = pad_nd_image(rows, patch, "constant", {"value": 0}, True, None)
            data = data.to(results_device)
            offset = plan.rows(slicers)[0]
            started = time.perf_counter()
            for sl in slicers:
                local = (sl[0], slice(sl[1].start - offset, sl[1].stop - offset), *sl[2:])
                workon = torch.clone(data[local][None], memory_format=torch.contiguous_format).to(device)
                prediction = predictor._internal_maybe_mirror_and_predict(workon)[0].to(results_device)
                prediction *= gaussian
                predicted[sl] += prediction
                n_predictions[sl[1:]] += gaussian
            seconds["network_s"] += time.perf_counter() - started
        torch.div(predicted, n_predictions, out=predicted)
    if torch.any(torch.isinf(predicted)):
        raise ModelError("the model's logits overflowed float16 (inf) in the sliding window")
    return predicted[(slice(None), slice(None), *revert[2:])]


def _preprocessed_chunks(
    predictor: nnUNetPredictor, image: npt.NDArray[Any], plan: ChunkPlan, seconds: dict[str, float]
) -> Iterator[tuple[list[Slicer], torch.Tensor]]:
    """Each chunk's slicers and its model-grid rows (float32 ``[c, rows, y, x]``) made from its slab."""
    import torch

    from rtseg.model.preprocess import _normalize

    forward = list(predictor.plans_manager.transpose_forward)
    data = image.transpose([0, *[i + 1 for i in forward]])
    (z0, z1), (y0, y1), (x0, x1) = plan.properties["bbox_used_for_cropping"]
    kwargs = dict(predictor.configuration_manager.configuration.get("resampling_fn_data_kwargs") or {})
    ranges = _value_ranges(predictor, data[:, z0:z1, y0:y1, x0:x1]) if plan.rule == "cubic" else None
    for chunk in plan.chunks:
        started = time.perf_counter()
        start, stop = plan.rows(chunk)
        first, end = rows_needed(z1 - z0, plan.new_shape[0], start, stop, plan.rule)
        slab = np.array(data[:, z0 + first : z0 + end, y0:y1, x0:x1], dtype=np.float32, order="C")
        _normalize(slab, predictor)
        span = RowSpan(z1 - z0, first, start, stop)
        rows = resample_cubic(slab, plan.new_shape, *plan.spacings, kwargs, span, ranges)
        del slab
        seconds["preprocess_s"] += time.perf_counter() - started
        yield chunk, torch.from_numpy(np.ascontiguousarray(rows))


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
