"""Shift ensemble: the model's labels voted over copies of the CT shifted by about half a model voxel.

The network sees the CT resampled to its own grid (4 × 3 × 3 mm for the
default model): where that grid falls on the patient decides which voxels a
thin or small organ gets, and the network's strided layers answer a little
differently to each phase of it. Predicting copies of the CT shifted by whole
*input* voxels (about half a model voxel along each axis, the eight corners of
that cube), moving each copy's labels back by the same whole voxels (exact,
no interpolation), and taking the per-voxel majority averages both effects
away (docs/model.md, "Shift ensemble"). It costs one prediction per copy.

Only integer shifts of the canonical ``[z, y, x]`` array are used, so the
labels come back onto the very voxels they were predicted for; where a
shifted copy lacks the CT (its first rows are repeats of the edge), its vote
there is the unshifted prediction's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

# the corners of the shift cube, the unshifted copy first (it breaks ties)
CORNERS: tuple[tuple[int, int, int], ...] = tuple((z, y, x) for z in (0, 1) for y in (0, 1) for x in (0, 1))


def shift_steps(
    model_spacing_zyx: Sequence[float], input_spacing_zyx: Sequence[float]
) -> tuple[int, int, int]:
    """Input voxels per axis nearest to half a model voxel (at least one)."""
    steps = [
        max(1, round(0.5 * float(m) / float(s)))
        for m, s in zip(model_spacing_zyx, input_spacing_zyx, strict=True)
    ]
    return steps[0], steps[1], steps[2]


def shifted(array: npt.NDArray[Any], offset: Sequence[int]) -> npt.NDArray[Any]:
    """``array`` moved by ``offset`` voxels along its three axes: ``out[i] = array[i - offset]``.

    The rows the move empties repeat the array's edge row. A new array; ``array`` is not changed.
    """
    for axis, (k, n) in enumerate(zip(offset, array.shape, strict=True)):
        if k and abs(k) >= n:
            raise ValueError(f"a shift of {k} voxels along axis {axis} leaves nothing of {n}")
    # pad k edge rows before (k > 0) or -k after (k < 0), then keep n rows: out[i] = array[i - k]
    pads = [(max(k, 0), max(-k, 0)) for k in offset]
    padded = np.pad(array, pads, mode="edge")
    return padded[tuple(slice(after, after + n) for (_, after), n in zip(pads, array.shape, strict=True))]


def unshift_labels(
    labels: npt.NDArray[np.uint8], offset: Sequence[int], fallback: npt.NDArray[np.uint8]
) -> npt.NDArray[np.uint8]:
    """The labels of a copy shifted by ``offset``, moved back onto the unshifted grid.

    The last ``offset`` rows along an axis were never in the shifted copy's CT:
    there the result is ``fallback`` (the unshifted prediction).
    """
    back = shifted(labels, [-k for k in offset])
    for axis, k in enumerate(offset):
        if k == 0:
            continue
        rows = [slice(None)] * back.ndim
        n = back.shape[axis]
        rows[axis] = slice(n - k, n) if k > 0 else slice(0, -k)
        back[tuple(rows)] = fallback[tuple(rows)]
    return back


def vote(members: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.uint8]:
    """The per-voxel majority label of ``members``; a tie goes to the first member's label where it is
    among the most voted, else to the lowest label among them. Only voxels where the members disagree
    are counted (a few percent of a CT)."""
    first = members[0]
    differ = np.zeros(first.shape, dtype=bool)
    for member in members[1:]:
        differ |= member != first
    if not differ.any():
        return first.copy()
    stack = np.stack([m[differ] for m in members])  # [member, voxel]
    classes = np.unique(stack)
    counts = np.stack([(stack == c).sum(axis=0, dtype=np.int16) for c in classes])  # [class, voxel]
    top = counts.max(axis=0)
    winner = classes[counts.argmax(axis=0)]
    first_count = counts[np.searchsorted(classes, stack[0]), np.arange(stack.shape[1])]
    winner = np.where(first_count == top, stack[0], winner)
    out = first.copy()
    out[differ] = winner.astype(first.dtype, copy=False)
    return out


def predict_shift_ensemble(
    predict: Callable[[npt.NDArray[Any], tuple[float, float, float]], npt.NDArray[np.uint8]],
    array_zyx: npt.NDArray[Any],
    spacing_zyx: tuple[float, float, float],
    model_spacing_zyx: Sequence[float],
) -> npt.NDArray[np.uint8]:
    """The majority of ``predict``'s labels over the eight shifted copies of ``array_zyx`` (see module)."""
    steps = shift_steps(model_spacing_zyx, spacing_zyx)
    if any(s >= n for s, n in zip(steps, array_zyx.shape, strict=True)):
        log.info(
            "shift ensemble: the series is too thin to shift (%s voxels); one prediction", array_zyx.shape
        )
        return predict(array_zyx, spacing_zyx)
    unshifted = predict(array_zyx, spacing_zyx)
    members = [unshifted]
    for corner in CORNERS[1:]:
        offset = [c * s for c, s in zip(corner, steps, strict=True)]
        labels = predict(shifted(array_zyx, offset), spacing_zyx)
        members.append(unshift_labels(labels, offset, unshifted))
    labels = vote(members)
    changed = float(np.count_nonzero(labels != unshifted)) / max(labels.size, 1)
    log.info(
        "shift ensemble: %d predictions (steps %s voxels), %.2f %% of voxels changed",
        len(members),
        steps,
        100 * changed,
    )
    return labels
