"""rtseg's inference path around nnU-Net's predictor: preprocess, sliding-window logits, labels in slabs.

nnU-Net's ``predict_single_npy_array`` interpolates every class's logits to the
CT's full grid before the argmax (for 20 classes on 512×512×200 that is 2 GB of
float16, plus float64 scratch per class) and caps torch at ``nnUNet_def_n_proc``
threads while it predicts. Here the same preprocessing and sliding window run on
the threads torch is given, the argmax is taken at the model's spacing, and only
output voxels near a label boundary are interpolated over all classes, with
nnU-Net's own rule (linear in-plane, linear or nearest along z as its
resampling settings say, half-pixel centres, clamped edges); the labels equal
the argmax of nnU-Net's full interpolation. Anything this path does not cover (region-based
labels, other resampling functions) goes through nnU-Net's own conversion.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from rtseg.model.chunked import plan_chunks, preprocess_chunked
from rtseg.model.preprocess import resampling_taps
from rtseg.model.streamed import LogitFile, stream_to_file
from rtseg.structures import EXTERNAL, MIN_ISLAND_ML

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

log = logging.getLogger(__name__)

SLAB_SLICES = 16  # output slices labelled at once; only boundary voxels hold class scores


@dataclass(frozen=True, eq=False)
class Prediction:
    """Canonical ``[z, y, x]`` labels and the seconds each phase took."""

    labels: npt.NDArray[np.uint8]
    phases: dict[str, float] = field(default_factory=dict)


def predict_labels(
    predictor: nnUNetPredictor,
    image: npt.NDArray[Any],
    spacing_zyx: tuple[float, float, float],
    min_island_ml: float = MIN_ISLAND_ML,
    chunk_slices: int = 0,
    skip_air: bool = False,
    stream_mb: float | None = None,
    scratch: Path | None = None,
) -> Prediction:
    """Labels of a ``[1, z, y, x]`` image on its own grid, through nnU-Net's preprocessing and network.

    Connected pieces of a structure smaller than ``min_island_ml`` at the
    model's spacing give way to the next most likely class (see
    :func:`suppress_islands`); 0 keeps them. An image of more than
    ``chunk_slices`` slices (0: never) is preprocessed in z-chunks of about that
    many slices (:mod:`rtseg.model.chunked`): the same model-grid data, the same labels.
    ``skip_air``: windows of nothing but air are not run (:func:`logits_skipping_air`).
    Model-grid logits of more than ``stream_mb`` MB (None: never) are streamed
    to a file under ``scratch`` (:mod:`rtseg.model.streamed`): memory bounded by
    one patch's depth of the model grid, the same labels.
    """
    t0 = time.perf_counter()
    plan = plan_chunks(predictor, image, spacing_zyx, chunk_slices) if chunk_slices else None
    if plan is not None:
        data, properties = preprocess_chunked(predictor, image, plan)
    else:
        data, properties = preprocess(predictor, np.asarray(image), spacing_zyx)
    t1 = time.perf_counter()
    if streams(predictor, data, properties, stream_mb):
        labels, network_s = streamed_labels(predictor, data, properties, min_island_ml, skip_air, scratch)
        del data
        t2 = t1 + network_s
    else:
        logits = sliding_window_logits(predictor, data, skip_air)
        del data
        if min_island_ml > 0:
            voxel_ml = float(np.prod(predictor.configuration_manager.spacing)) / 1000.0
            logits = suppress_islands(logits, voxel_ml, min_island_ml, keep=_external_labels(predictor))
        t2 = time.perf_counter()
        labels = labels_on_input_grid(predictor, logits, properties)
    t3 = time.perf_counter()
    phases = {"preprocess_s": t1 - t0, "network_s": t2 - t1, "resample_s": t3 - t2}
    log.info("inference phases: %s", ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    return Prediction(labels, phases)


def suppress_islands(
    scores: torch.Tensor, voxel_ml: float, min_ml: float, keep: frozenset[int] = frozenset()
) -> torch.Tensor:
    """``scores [class, z, y, x]`` where the argmax's connected pieces under ``min_ml`` lose their class.

    An undertrained or out-of-distribution model scatters one-voxel specks of
    a structure through the body: clinically meaningless, and thousands of
    contours that make the RTSTRUCT huge and slow in the TPS. Every connected
    piece (6-neighbourhood, as the contours see it) of a class smaller than ``min_ml`` gets that
    class's score pushed below every other score there, so the next most
    likely class takes it. Background (0) and the ``keep`` classes (the body
    outline, which legitimately fills thin gaps between organs) are left alone.
    A class that takes over a speck may form a new speck itself, so this
    repeats (at most ``ISLAND_PASSES`` times) until no piece is too small.
    ``min_ml`` 0 leaves ``scores`` as they are.
    """
    if min_ml <= 0:
        return scores
    for _ in range(ISLAND_PASSES):
        cleaned = _suppress_once(scores, voxel_ml, min_ml, keep)
        if cleaned is None:
            break
        scores = cleaned
    return scores


ISLAND_PASSES = 3


def _suppress_once(
    scores: torch.Tensor, voxel_ml: float, min_ml: float, keep: frozenset[int]
) -> torch.Tensor | None:
    """One pass of :func:`suppress_islands`; None when no piece is too small."""
    import torch

    small = small_pieces(scores.argmax(dim=0).numpy(), voxel_ml, min_ml, keep)
    if not small:
        return None
    out = scores.clone()
    floor = float(out.min()) - 1.0  # finite: interpolation weights of 0 must not meet infinities
    for c, (z, y, x) in small:
        out[c, torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(x)] = floor
    log.info("dropped islands under %.2f ml of %d structure(s)", min_ml, len(small))
    return out


def small_pieces(
    labels: npt.NDArray[Any], voxel_ml: float, min_ml: float, keep: frozenset[int]
) -> list[tuple[int, tuple[npt.NDArray[np.intp], ...]]]:
    """``(class, voxels)`` of every connected piece (face neighbours) of a class smaller than ``min_ml``.

    Background (0) and the ``keep`` classes are never small.
    """
    from scipy import ndimage

    boxes = ndimage.find_objects(labels)  # one pass; a class absent from labels has no box
    small_at: list[tuple[int, tuple[npt.NDArray[np.intp], ...]]] = []
    for c, box in enumerate(boxes, start=1):
        if box is None or c in keep:
            continue
        pieces, n = ndimage.label(labels[box] == c)  # face neighbours: a checkerboard is all specks
        sizes = np.bincount(pieces.ravel(), minlength=n + 1) * voxel_ml
        small = sizes < min_ml
        small[0] = False
        if not small.any():
            continue
        where = np.nonzero(small[pieces])
        small_at.append((c, tuple(w + b.start for w, b in zip(where, box, strict=True))))
    return small_at


def suppress_islands_in_file(
    store: LogitFile, voxel_ml: float, min_ml: float, keep: frozenset[int] = frozenset()
) -> tuple[npt.NDArray[np.int64], torch.Tensor]:
    """:func:`suppress_islands` on streamed logits: ``store.coarse`` changed in place, the file untouched.

    Returns the voxels whose scores changed (flat indices into the model grid,
    sorted) and their scores after the change ``[n, class]``, which
    :func:`labels_from_file` puts over the file's. Only the specks' scores are
    read back: every voxel that changes class lies in a piece found small in the
    first pass (a piece that gains voxels does not shrink). The floors are
    nnU-Net's values for the one-piece path's (the minimum of every score, less
    one, rounded to the scores' precision), so the labels are the same.
    """
    import torch

    touched = np.empty(0, dtype=np.int64)
    scores = torch.empty((0, store.classes), dtype=torch.half)
    if min_ml <= 0:
        return touched, scores
    minimum = store.minimum
    for _ in range(ISLAND_PASSES):
        small = small_pieces(store.coarse, voxel_ml, min_ml, keep)
        if not small:
            break
        flats = [np.ravel_multi_index(at, store.shape).astype(np.int64) for _, at in small]
        new = np.setdiff1d(np.concatenate(flats), touched)
        if new.size:
            touched = np.concatenate([touched, new])
            scores = torch.cat([scores, store.gather(new)])
            order = np.argsort(touched, kind="stable")
            touched, scores = touched[order], scores[torch.from_numpy(order)]
        rounded = scores.new_zeros(1)
        rounded[0] = minimum - 1.0  # rounded to the scores' precision as the one-piece path's assignment
        floor = float(rounded[0])
        minimum = min(minimum, floor)
        for (c, _), flat in zip(small, flats, strict=True):
            scores[torch.from_numpy(np.searchsorted(touched, flat)), c] = floor
        every = np.concatenate(flats)
        now = scores[torch.from_numpy(np.searchsorted(touched, every))]
        store.coarse.flat[every] = now.argmax(dim=1).numpy()
        log.info("dropped islands under %.2f ml of %d structure(s)", min_ml, len(small))
    return touched, scores


def _external_labels(predictor: nnUNetPredictor) -> frozenset[int]:
    """Label ids of the body outline (TG-263 ``External``), kept whole by :func:`suppress_islands`."""
    labels = predictor.dataset_json.get("labels", {})
    names = {EXTERNAL.lower(), "body"}  # a foreign model may call it BODY
    return frozenset(v for k, v in labels.items() if str(k).lower() in names and isinstance(v, int))


def preprocess(
    predictor: nnUNetPredictor, image: npt.NDArray[Any], spacing_zyx: tuple[float, float, float]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """nnU-Net's own preprocessing (transpose, crop, normalise, resample to the model's spacing).

    Where :func:`rtseg.model.preprocess.fast_path_applies` holds (nnU-Net's
    default preprocessor and cubic resampling), the same result comes from
    :func:`rtseg.model.preprocess.preprocess_fast` several times faster;
    anything else runs nnU-Net's ``run_case_npy``.
    """
    import torch

    from rtseg.model.preprocess import fast_path_applies, preprocess_fast

    manager = predictor.configuration_manager
    preprocessor_class = manager.preprocessor_class
    spacing = [float(s) for s in spacing_zyx]
    if fast_path_applies(predictor, preprocessor_class, image):
        fast = preprocess_fast(predictor, image, {"spacing": spacing})
        if fast is not None:
            return torch.from_numpy(fast[0]), fast[1]
    preprocessor = preprocessor_class(verbose=False)
    data, _, properties = preprocessor.run_case_npy(
        np.asarray(image, dtype=np.float32),
        None,
        {"spacing": spacing},
        predictor.plans_manager,
        manager,
        predictor.dataset_json,
    )
    return torch.from_numpy(data), properties


def sliding_window_logits(
    predictor: nnUNetPredictor, data: torch.Tensor, skip_air: bool = False
) -> torch.Tensor:
    """Logits ``[class, z, y, x]`` at the model's spacing, averaged over the predictor's folds.

    ``skip_air``: windows that hold nothing but air are not run (see :func:`logits_skipping_air`).
    """
    import torch

    network = getattr(predictor.network, "_orig_mod", predictor.network)  # torch.compile wraps it
    total: torch.Tensor | None = None
    with torch.inference_mode():
        for params in predictor.list_of_parameters:
            network.load_state_dict(params)
            if skip_air:
                logits = logits_skipping_air(predictor, data)
            else:
                logits = predictor.predict_sliding_window_return_logits(data).to("cpu")
            total = logits if total is None else total + logits
    assert total is not None  # nnU-Net refuses a model folder without folds
    if len(predictor.list_of_parameters) > 1:
        total = total / len(predictor.list_of_parameters)  # not in place: an inference tensor
    return total


AIR_TOLERANCE = 1e-3  # normalised units: cubic resampling of a constant region rounds, nothing more


def air_floor(predictor: nnUNetPredictor) -> float | None:
    """The normalised value of air: nnU-Net's CT normalisation clips everything below the 0.5th percentile
    of foreground HU to one value. None when the model's normalisation is not nnU-Net's CT one."""
    manager = predictor.configuration_manager
    if list(manager.normalization_schemes) != ["CTNormalization"]:
        return None
    props = predictor.plans_manager.foreground_intensity_properties_per_channel["0"]
    return float((props["percentile_00_5"] - props["mean"]) / max(props["std"], 1e-8))


def window_slicers(
    predictor: nnUNetPredictor, data: torch.Tensor, skip_air: bool = True
) -> tuple[Any, list[Any], list[bool]]:
    """nnU-Net's padded input, its sliding-window slicers and which windows hold more than air
    (every window without ``skip_air``)."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    patch = predictor.configuration_manager.patch_size
    padded, revert = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
    slicers = predictor._internal_get_sliding_window_slicers(padded.shape[1:])
    floor = air_floor(predictor) if skip_air else None
    if floor is None:
        return (padded, revert), slicers, [True] * len(slicers)
    # padding is 0 (the mean foreground HU), never air: a window reaching into it is run
    busy = [bool(padded[s].max() > floor + AIR_TOLERANCE) for s in slicers]
    return (padded, revert), slicers, busy


def logits_skipping_air(predictor: nnUNetPredictor, data: torch.Tensor) -> torch.Tensor:
    """nnU-Net's Gaussian-weighted sliding window over only the windows that hold more than air.

    A window whose every input voxel is at the CT normalisation's lower clip
    (air, or anything below the 0.5th percentile of the training foreground's
    HU) is not run. No voxel above that floor lies in a skipped window, so every
    such voxel gets exactly the windows and weights nnU-Net gives it: the
    logits there are nnU-Net's. Voxels that only skipped windows cover get
    background. Uses nnU-Net's own slicer and accumulation (private methods of
    ``nnUNetPredictor``, checked against its public path by the tests).
    """
    import torch
    from nnunetv2.utilities.helpers import empty_cache

    (padded, revert), slicers, busy = window_slicers(predictor, data)
    kept = [s for s, b in zip(slicers, busy, strict=True) if b]
    log.info("sliding window: %d of %d windows hold more than air", len(kept), len(slicers))
    heads = predictor.label_manager.num_segmentation_heads
    if not kept:
        logits = torch.zeros((heads, *padded.shape[1:]), dtype=torch.half)
    else:
        # as nnU-Net's public predict_sliding_window_return_logits: the network on the predictor's device,
        # CUDA autocast, the accumulation on the device where it may be (it falls back to the CPU on OOM)
        device = predictor.device
        predictor.network = predictor.network.to(device)
        predictor.network.eval()
        on_device = bool(predictor.perform_everything_on_device) and device.type == "cuda"
        with torch.autocast(device.type, enabled=True) if device.type == "cuda" else nullcontext():
            try:
                logits = predictor._internal_predict_sliding_window_return_logits(padded, kept, on_device)
            except RuntimeError:
                if not on_device:
                    raise
                empty_cache(device)
                logits = predictor._internal_predict_sliding_window_return_logits(padded, kept, False)
        logits = logits.to("cpu")
    uncovered = torch.isnan(logits[0]) if kept else torch.ones(padded.shape[1:], dtype=torch.bool)
    logits[:, uncovered] = 0  # 0 / 0 where no window ran: background there
    logits[0, uncovered] = 1
    return logits[(slice(None), *revert[1:])]


def labels_on_input_grid(
    predictor: nnUNetPredictor, logits: torch.Tensor, properties: dict[str, Any]
) -> npt.NDArray[np.uint8]:
    """Labels on the grid the image came in: interpolate the logits slab by slab, argmax, uncrop."""
    z_mode = _z_interpolation(predictor, properties)
    if predictor.label_manager.has_regions or z_mode is None:
        from nnunetv2.inference.export_prediction import (
            convert_predicted_logits_to_segmentation_with_correct_shape,
        )

        labels = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits,
            predictor.plans_manager,
            predictor.configuration_manager,
            predictor.label_manager,
            properties,
        )
        return np.asarray(labels).astype(np.uint8, copy=False)
    target = tuple(int(s) for s in properties["shape_after_cropping_and_before_resampling"])
    return _uncrop(predictor, upsample_argmax(logits, (target[0], target[1], target[2]), z_mode), properties)


def _uncrop(
    predictor: nnUNetPredictor, cropped: npt.NDArray[np.uint8], properties: dict[str, Any]
) -> npt.NDArray[np.uint8]:
    """Labels of nnU-Net's crop put back into the image's grid, in the image's axis order."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    full = np.zeros(tuple(properties["shape_before_cropping"]), dtype=np.uint8)
    full = insert_crop_into_image(full, cropped, properties["bbox_used_for_cropping"])
    return np.ascontiguousarray(np.asarray(full).transpose(predictor.plans_manager.transpose_backward))


def labels_from_file(
    predictor: nnUNetPredictor,
    store: LogitFile,
    changed: tuple[npt.NDArray[np.int64], torch.Tensor],
    properties: dict[str, Any],
) -> npt.NDArray[np.uint8]:
    """:func:`labels_on_input_grid` of streamed logits: ``store.coarse`` and the file's rows, with the
    scores island removal ``changed`` (:func:`suppress_islands_in_file`) over the file's."""
    import torch

    z_mode = _z_interpolation(predictor, properties)
    assert z_mode is not None  # streamed only where this path applies (streams())
    touched, scores = changed
    plane = store.shape[1] * store.shape[2]

    def rows(z0: int, z1: int) -> torch.Tensor:
        block = store.read(z0, z1)
        here = slice(*np.searchsorted(touched, (z0 * plane, z1 * plane)))
        if here.stop > here.start:
            z, y, x = np.unravel_index(touched[here] - z0 * plane, (z1 - z0, *store.shape[1:]))
            block[:, torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(x)] = scores[here].T
        return block

    target = tuple(int(s) for s in properties["shape_after_cropping_and_before_resampling"])
    cropped = upsample_labels(
        store.coarse, rows, store.classes, torch.float16, (target[0], target[1], target[2]), z_mode
    )
    return _uncrop(predictor, cropped, properties)


STREAM_MB = 1024  # model-grid logits above this many MB are streamed to a file (rtseg.model.streamed)


def streams(
    predictor: nnUNetPredictor, data: torch.Tensor, properties: dict[str, Any], stream_mb: float | None
) -> bool:
    """Whether the sliding window's logits go to a file: big, on the CPU, labels by rtseg's rule.

    ``stream_mb``: the logits' size (MB, float16) above which they are streamed; None never streams.
    """
    if stream_mb is None or predictor.device.type != "cpu" or predictor.label_manager.has_regions:
        return False
    if len(predictor.configuration_manager.patch_size) != 3:
        return False
    if _z_interpolation(predictor, properties) is None:
        return False
    heads = predictor.label_manager.num_segmentation_heads
    return bool(heads * math.prod(int(s) for s in data.shape[1:]) * 2 > stream_mb * 2**20)


def streamed_labels(
    predictor: nnUNetPredictor,
    data: torch.Tensor,
    properties: dict[str, Any],
    min_island_ml: float,
    skip_air: bool,
    scratch: Path | None,
) -> tuple[npt.NDArray[np.uint8], float]:
    """The labels of :func:`predict_labels` with the logits streamed to a file under ``scratch``.

    Returns the labels and the seconds until the network and island removal were done.
    """
    (padded, revert), slicers, busy = window_slicers(predictor, data, skip_air)
    kept = [s for s, b in zip(slicers, busy, strict=True) if b]
    heads = predictor.label_manager.num_segmentation_heads
    start = time.perf_counter()
    with LogitFile(scratch, heads, (int(data.shape[1]), int(data.shape[2]), int(data.shape[3]))) as store:
        stream_to_file(predictor, padded, revert, kept, store)
        del padded  # nnU-Net's padded copy, where it made one (the caller holds ``data``)
        voxel_ml = float(np.prod(predictor.configuration_manager.spacing)) / 1000.0
        changed = suppress_islands_in_file(store, voxel_ml, min_island_ml, keep=_external_labels(predictor))
        network_s = time.perf_counter() - start
        return labels_from_file(predictor, store, changed, properties), network_s


def _z_interpolation(predictor: nnUNetPredictor, properties: dict[str, Any]) -> str | None:
    """``"linear"`` or ``"nearest"`` along z as nnU-Net would resample these logits; None if not covered."""
    from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

    config = predictor.configuration_manager.configuration
    kwargs = dict(config.get("resampling_fn_probabilities_kwargs") or {})
    if (
        config.get("resampling_fn_probabilities") != "resample_data_or_seg_to_shape"
        or kwargs.get("order") != 1
    ):
        return None
    spacing = predictor.configuration_manager.spacing
    new_spacing = [properties["spacing"][i] for i in predictor.plans_manager.transpose_forward]
    if len(spacing) != len(new_spacing):
        return None  # a 2-D configuration
    separate, axis = determine_do_sep_z_and_axis(kwargs.get("force_separate_z"), spacing, new_spacing)
    if not separate:
        return "linear"
    if axis != 0 or kwargs.get("order_z", 0) not in (0, 1):
        return None
    return "linear" if kwargs.get("order_z", 0) == 1 else "nearest"


def upsample_argmax(
    logits: torch.Tensor, shape: tuple[int, int, int], z_mode: str = "linear", slab: int = SLAB_SLICES
) -> npt.NDArray[np.uint8]:
    """Argmax of ``logits [class, z, y, x]`` interpolated to ``shape``.

    Interpolation weights are non-negative, so where all eight corners of a
    model-grid cell have the same argmax, every output voxel inside that cell
    has it too: those voxels take the label at once (``slab`` output slices at a
    time). Only cells whose corners disagree (label boundaries, ~10 % of cells)
    are interpolated over all classes, cell by cell with the separable weights.
    The result is the argmax of the full interpolation (up to float ties).
    Like nnU-Net, which casts the resampled logits back to their dtype before
    the argmax, interpolated half-precision logits are rounded to half
    precision first: where two classes then tie, the lower label wins in both
    (an undertrained model's left and right lung logits can agree that closely
    over whole regions).
    """
    coarse = logits.argmax(dim=0).numpy().astype(np.uint8)
    classes = int(logits.shape[0])
    return upsample_labels(
        coarse, lambda z0, z1: logits[:, z0:z1], classes, logits.dtype, shape, z_mode, slab
    )


def upsample_labels(
    coarse: npt.NDArray[np.uint8],
    rows: Callable[[int, int], torch.Tensor],
    classes: int,
    dtype: torch.dtype,
    shape: tuple[int, int, int],
    z_mode: str = "linear",
    slab: int = SLAB_SLICES,
) -> npt.NDArray[np.uint8]:
    """:func:`upsample_argmax` from the argmax ``coarse`` and the scores ``rows(z0, z1) [class, n, y, x]``.

    The boundary cells are labelled a block of model rows at a time, so only
    that block's scores (and the next row) are held in float32.
    """
    import torch

    taps = [
        resampling_taps(int(coarse.shape[0]), shape[0], z_mode),
        resampling_taps(int(coarse.shape[1]), shape[1], "linear"),
        resampling_taps(int(coarse.shape[2]), shape[2], "linear"),
    ]
    out = np.empty(shape, dtype=np.uint8)
    for start in range(0, shape[0], slab):
        stop = min(start + slab, shape[0])
        out[start:stop] = coarse[np.ix_(taps[0][0][start:stop], taps[1][0], taps[2][0])]
    rounding = dtype if dtype in (torch.float16, torch.bfloat16) else None
    # thin slices put more output voxels in a cell: fewer cells at once keep the scratch bounded
    per_cell = math.prod(-(-n_out // int(n_in)) + 1 for n_out, n_in in zip(shape, coarse.shape, strict=True))
    batch = max(1, CELL_BATCH * CELL_VOXELS // per_cell)
    z_pairs = z_mode == "linear"
    for z0, z1 in _row_blocks(coarse.shape, classes):
        mixed = np.argwhere(~_uniform_cells(coarse[z0 : z1 + 1], z_pairs)[: z1 - z0])
        if not len(mixed):
            continue
        mixed[:, 0] += z0
        scores = rows(z0, min(z1 + 1, coarse.shape[0])).float()
        for first in range(0, len(mixed), batch):
            _label_mixed_cells(scores, mixed[first : first + batch], taps, out, rounding, z0, coarse.shape[0])
    return out


BLOCK_BYTES = 256 << 20  # float32 scores of the model rows whose boundary cells are labelled at once


def _row_blocks(shape: tuple[int, ...], classes: int) -> list[tuple[int, int]]:
    """Model-grid row ranges ``[z0, z1)`` whose float32 scores (plus one row) fit ``BLOCK_BYTES``."""
    row_bytes = classes * shape[1] * shape[2] * 4
    step = max(1, BLOCK_BYTES // max(row_bytes, 1) - 1)
    return [(z0, min(z0 + step, shape[0])) for z0 in range(0, shape[0], step)]


CELL_BATCH = 8192  # boundary cells interpolated at once: 8192 × ~75 voxels × 20 classes float32 ≈ 50 MB
CELL_VOXELS = 150  # ... of up to this many voxels (ceil + 1 per axis: 512² × 200 slices); larger, fewer


def _uniform_cells(coarse: npt.NDArray[np.uint8], z_pairs: bool) -> npt.NDArray[np.bool_]:
    """True at ``[i, j, k]`` where the corners ``i..i+1 × j..j+1 × k..k+1`` (edges clamped) share a label."""
    padded = np.pad(coarse, ((0, 1), (0, 1), (0, 1)), mode="edge")
    n_z, n_y, n_x = coarse.shape
    same = np.ones(coarse.shape, dtype=bool)
    for dz in (0, 1) if z_pairs else (0,):
        for dy in (0, 1):
            for dx in (0, 1):
                if dz or dy or dx:
                    same &= padded[dz : dz + n_z, dy : dy + n_y, dx : dx + n_x] == coarse
    return same


def _label_mixed_cells(
    scores: torch.Tensor,
    cells: npt.NDArray[np.intp],
    taps: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], Any]],
    out: npt.NDArray[np.uint8],
    rounding: torch.dtype | None = None,
    z0: int = 0,
    rows: int | None = None,
) -> None:
    """Write the argmax of the interpolated scores at every output voxel inside ``cells`` (``[n, 3]``).

    ``rounding``: the dtype the interpolated scores are cast to before the argmax (ties → lower label).
    ``scores`` may hold only the model rows from ``z0`` on, of ``rows`` in all (default: all of them).
    """
    import torch

    corner_index: list[npt.NDArray[np.int64]] = []
    weights: list[torch.Tensor] = []
    positions: list[npt.NDArray[np.int64]] = []
    valid: list[npt.NDArray[np.bool_]] = []
    for axis, (lower, _upper, w) in enumerate(taps):
        size = int(scores.shape[axis + 1]) if axis or rows is None else rows
        cell = cells[:, axis]
        first = np.searchsorted(lower, cell, side="left")
        count = np.searchsorted(lower, cell, side="right") - first
        offset = np.arange(max(int(count.max()), 1))
        inside = offset[None, :] < count[:, None]
        at = np.minimum(first[:, None] + offset[None, :], len(lower) - 1)
        corner_index.append(np.stack([cell, np.minimum(cell + 1, size - 1)], axis=1))
        weights.append(torch.from_numpy(np.stack([1.0 - w[at], w[at]], axis=-1).astype(np.float32)))
        positions.append(at)
        valid.append(inside)
    z, y, x = corner_index
    z = z - z0
    corners = scores[:, z[:, :, None, None], y[:, None, :, None], x[:, None, None, :]]  # [c, n, 2, 2, 2]
    along_x = torch.einsum("cnijk,nxk->nijxc", corners, weights[2])
    along_y = torch.einsum("nijxc,nyj->niyxc", along_x, weights[1])
    scored = torch.einsum("niyxc,nzi->nzyxc", along_y, weights[0])
    if rounding is not None:
        scored = scored.to(rounding)
    labels = scored.argmax(dim=-1).to(torch.uint8).numpy()
    keep = valid[0][:, :, None, None] & valid[1][:, None, :, None] & valid[2][:, None, None, :]
    shape = keep.shape
    out[
        np.broadcast_to(positions[0][:, :, None, None], shape)[keep],
        np.broadcast_to(positions[1][:, None, :, None], shape)[keep],
        np.broadcast_to(positions[2][:, None, None, :], shape)[keep],
    ] = labels[keep]
