"""nnU-Net's sliding window along z, its logits written to a file as rows become final.

A stock-size nnU-Net (0.8 × 0.8 × 1.5 mm, 19 classes) on a 1,500-slice series
makes 2.2 GB of half-precision logits on the model grid, 15 GB on a 500 mm
field of view, and nnU-Net's sliding window holds them all at once. Here the
windows run in nnU-Net's order (z outermost) with nnU-Net's arithmetic
(Gaussian weight, float16 accumulation of float32 predictions, the division
by the summed weights), into a buffer one patch deep. A row that no later
window reaches is final: it is divided and written to a :class:`LogitFile`
(under the node's data directory) and leaves the buffer. Every voxel gets the
same additions in the same order as in nnU-Net's one-piece buffer, and all of
these operations are element-wise, so the rows are nnU-Net's bit for bit.
Several folds are summed in the file and averaged as
:func:`rtseg.model.inference.sliding_window_logits` does.

Memory: the buffer (classes × patch depth × the padded plane × 2 bytes), the
network's activations, and the one-byte argmax of every model-grid voxel,
which the island removal and the labels work from
(:func:`rtseg.model.inference.predict_labels`).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from rtseg.errors import ModelError

if TYPE_CHECKING:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

log = logging.getLogger(__name__)

INF_MESSAGE = (  # nnU-Net's own words for the same failure
    "Encountered inf in predicted array. Aborting... If this problem persists, "
    "reduce value_scaling_factor in compute_gaussian or increase the dtype of predicted_logits to fp32"
)


DISK_MARGIN = 256 << 20  # bytes left free beyond the logit file itself
PREFIX = "rtseg-logits-"  # then the writing process's id: a dead worker's files can be told apart


def remove_left_behind(folder: Path, pid: int | None = None) -> int:
    """Remove logit files a killed process left in ``folder`` (those of ``pid``; all with None).

    Returns how many folders went.
    """
    pattern = f"{PREFIX}{pid}-*" if pid is not None else f"{PREFIX}*"
    gone = 0
    for left in folder.glob(pattern) if folder.is_dir() else []:
        shutil.rmtree(left, ignore_errors=True)
        gone += 1
    if gone:
        log.info("removed %d logit file folder(s) left behind in %s", gone, folder)
    return gone


class LogitFile:
    """Logits ``[z][class][y][x]`` in float16 in a temporary file: written by rows, read back by ranges.

    The file lives in a fresh folder under ``folder`` (the system's temporary
    folder when None), named with :data:`PREFIX` and the process's id, and goes
    with :meth:`close` (one left by a killed process: :func:`remove_left_behind`).
    Reads and writes go through the file, not a memory map, so the process holds
    only what it asked for.
    """

    def __init__(self, folder: Path | None, classes: int, shape_zyx: tuple[int, int, int]) -> None:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        where = Path(folder if folder is not None else tempfile.gettempdir())
        need = classes * math.prod(shape_zyx) * 2 + DISK_MARGIN
        free = shutil.disk_usage(where).free
        if free < need:
            log.error("scratch folder %s: %.1f GB free, %.1f GB needed", where, free / 2**30, need / 2**30)
            raise ModelError(
                f"the model's logits for this series need {need / 2**30:.1f} GB of disk in the scratch"
                f" folder, {free / 2**30:.1f} GB are free: free disk space there and send the series again"
            )
        self._dir = tempfile.TemporaryDirectory(prefix=f"{PREFIX}{os.getpid()}-", dir=folder)
        self.path = Path(self._dir.name) / "logits.f16"
        self.classes = classes
        self.shape = shape_zyx
        self._row = classes * shape_zyx[1] * shape_zyx[2]  # values per z row
        self._file = open(self.path, "w+b")  # noqa: SIM115 - held open until close()
        self.minimum = float("inf")  # of every value written with final=True
        self.coarse = np.zeros(shape_zyx, dtype=np.uint8)  # argmax over classes of the final rows

    def write(self, z0: int, rows: torch.Tensor, final: bool) -> None:
        """Store ``rows [class, n, y, x]`` (float16) as rows ``z0 .. z0 + n``.

        ``final``: these are the finished values; their argmax and minimum are kept.
        """
        import torch

        values = rows.permute(1, 0, 2, 3).contiguous()
        self._file.seek(z0 * self._row * 2)
        try:
            self._file.write(values.numpy().tobytes())
        except OSError as exc:  # the disk filled up after the check (another job, another program)
            log.error("cannot write logits to %s: %s", self.path, exc)
            message = f"cannot write the model's logits to the scratch folder: {exc.strerror}"
            raise ModelError(message) from exc
        if final:
            self.minimum = min(self.minimum, float(rows.min()))
            self.coarse[z0 : z0 + rows.shape[1]] = rows.argmax(dim=0).to(torch.uint8).numpy()

    def read(self, z0: int, z1: int) -> torch.Tensor:
        """Rows ``z0 .. z1`` as ``[class, n, y, x]`` float16 (a permuted view of a fresh buffer)."""
        import torch

        n = z1 - z0
        values = np.empty((n, self.classes, self.shape[1], self.shape[2]), dtype=np.float16)
        self._file.seek(z0 * self._row * 2)
        got = self._file.readinto(values.reshape(-1).view(np.uint8).data)
        if got != values.nbytes:
            raise OSError(f"logit file {self.path} is short: {got} of {values.nbytes} bytes at row {z0}")
        return torch.from_numpy(values).permute(1, 0, 2, 3)

    def gather(self, flat: npt.NDArray[np.int64]) -> torch.Tensor:
        """Every class's value at model-grid voxels ``flat`` (indices into ``[z, y, x]``): ``[n, class]``."""
        import torch

        self._file.flush()
        plane_size = self.shape[1] * self.shape[2]
        layout = (self.shape[0], self.classes, plane_size)
        mapped = np.memmap(self.path, dtype=np.float16, mode="r", shape=layout)
        z, plane = np.divmod(flat, plane_size)
        values = np.array(mapped[z, :, plane])  # a copy: the map goes with `mapped`
        del mapped
        return torch.from_numpy(values)

    def close(self) -> None:
        self._file.close()
        self._dir.cleanup()

    def __enter__(self) -> LogitFile:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def stream_to_file(
    predictor: nnUNetPredictor,
    padded: torch.Tensor,
    revert: Sequence[slice],
    slicers: Sequence[tuple[slice, ...]],
    store: LogitFile,
) -> None:
    """Every fold's sliding window over ``padded [1, z, y, x]``, the folds' mean into ``store``.

    ``slicers``: nnU-Net's windows (or a subset, for skipping air) in its
    order; ``revert``: the slices that undo nnU-Net's padding. Rows only
    skipped windows covered get background, as in
    :func:`rtseg.model.inference.logits_skipping_air`.
    """
    import torch

    folds = predictor.list_of_parameters
    network = getattr(predictor.network, "_orig_mod", predictor.network)  # torch.compile wraps it
    predictor.network.eval()
    with torch.inference_mode():
        for index, params in enumerate(folds):
            network.load_state_dict(params)
            last = index == len(folds) - 1
            for z0, rows in _final_rows(predictor, padded, revert, slicers):
                if index:
                    rows = store.read(z0, z0 + rows.shape[1]) + rows  # as nnU-Net's folds: total + logits
                if last and len(folds) > 1:
                    rows = rows / len(folds)
                store.write(z0, rows, final=last)
    log.info("sliding window streamed in z: %d windows × %d fold(s)", len(slicers), len(folds))


def _final_rows(
    predictor: nnUNetPredictor,
    padded: torch.Tensor,
    revert: Sequence[slice],
    slicers: Sequence[tuple[slice, ...]],
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(z0, rows [class, n, y, x])`` of one fold's logits, unpadded, as they become final, in z order."""
    import torch
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    patch = tuple(int(p) for p in predictor.configuration_manager.patch_size)
    heads = predictor.label_manager.num_segmentation_heads
    plane = tuple(int(s) for s in padded.shape[2:])
    acc = torch.zeros((heads, patch[0], *plane), dtype=torch.half)
    weight = torch.zeros((patch[0], *plane), dtype=torch.half)
    gaussian: Any = 1
    if predictor.use_gaussian:
        cpu = torch.device("cpu")
        gaussian = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=cpu)
    base = 0  # padded z of the buffer's first row; every row below it has been handed on
    for window in slicers:
        start = int(window[1].start)
        if start < base:
            raise ValueError("sliding-window slicers out of z order")
        if start > base:
            yield from _hand_on(acc, weight, base, start, revert)
            _shift(acc, weight, start - base)
            base = start
        workon = torch.clone(padded[window][None], memory_format=torch.contiguous_format)
        prediction = predictor._internal_maybe_mirror_and_predict(workon)[0].to("cpu")
        if predictor.use_gaussian:
            prediction *= gaussian
        local = (slice(None), slice(0, patch[0]), window[2], window[3])
        acc[local] += prediction
        weight[local[1:]] += gaussian
    yield from _hand_on(acc, weight, base, min(base + patch[0], int(padded.shape[1])), revert)


def _hand_on(
    acc: torch.Tensor, weight: torch.Tensor, base: int, stop: int, revert: Sequence[slice]
) -> Iterator[tuple[int, torch.Tensor]]:
    """The buffer's rows ``base .. stop`` (padded z) divided by their weights, cropped to the image."""
    import torch

    keep = revert[1]
    first, last = max(base, int(keep.start or 0)), min(stop, int(keep.stop))
    if first >= last:
        return
    rows = torch.div(acc[:, first - base : last - base], weight[first - base : last - base])
    if torch.any(torch.isinf(rows)):
        raise RuntimeError(INF_MESSAGE)
    rows = rows[(slice(None), slice(None), revert[2], revert[3])]
    uncovered = torch.isnan(rows[0])  # no window ran there (skipped air): background, as logits_skipping_air
    if bool(uncovered.any()):
        rows[:, uncovered] = 0
        rows[0, uncovered] = 1
    yield first - int(keep.start or 0), rows


def _shift(acc: torch.Tensor, weight: torch.Tensor, by: int) -> None:
    """Drop the buffer's first ``by`` rows, move the rest to the front and zero the rows freed at the end."""
    depth = int(weight.shape[0])
    if by < depth:
        acc[:, : depth - by] = acc[:, by:].clone()
        weight[: depth - by] = weight[by:].clone()
    acc[:, max(depth - by, 0) :] = 0
    weight[max(depth - by, 0) :] = 0
