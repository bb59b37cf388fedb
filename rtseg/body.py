"""The patient's body outline from CT numbers: the External without couch, mattress and immobilisation.

A treatment planning system calculates dose inside the External, so the couch,
the mattress, a vacuum bag or a thermoplastic mask must lie outside it, while
lungs and bowel gas lie inside. A network trained on phantoms can paint the
couch into the External (or miss it); the outline here comes from the image
alone and is applied to every segmentation (:func:`apply_body_outline`).

The steps, per axial slice unless said otherwise:

0. the couch top: rows (the same in every slice) where a flat structure under
   ``COUCH_MM`` thick spans ``COUCH_SPAN`` of the reconstruction circle's width,
   searched from the posterior and the anterior edge of the image (supine,
   prone) to its middle (:func:`couch_rows`); those rows and everything beyond them are
   not body. Where the patient lies directly on the couch top, the External ends
   at its surface.
1. tissue: CT numbers above ``TISSUE_HU`` (-300). Fat is about -100 HU, foam
   mattresses, vacuum bags and couch cores -900 to -400 HU; the classic -500 HU
   body threshold would take in a compressed mattress where the patient lies on it.
2. opening with a disk of ``OPEN_MM``: cuts the thin links (mask mesh,
   carbon-fibre skins, head-rest rims) between the patient and the devices.
3. the 3-D connected components that are the patient: the largest one, and
   every other that is a limb (:func:`_is_limb`): an arm down beside the trunk
   without touching it, a leg, a hand. A limb is at least ``PART_ML`` and
   ``PART_SHARE`` of the largest component, mostly soft tissue (median HU in
   ``SOFT_HU``: fat to muscle, not foam or plastic), and holds at least
   ``BONE_ML`` of bone (over ``BONE_HU``) ``BONE_DEPTH_MM`` or more inside it.
   A TPS computes dose inside the External, so a beam through an arm must see
   the arm; the couch, a foam block, a knee wedge, a vacuum bag or a head rest
   hold no bone under soft tissue and stay outside.
4. detail back within ``OPEN_MM`` of them (nose tip, ears, fingers), then one
   pixel of partial volume down to ``EDGE_HU`` (-500), the air–skin midpoint.
5. per slice: pieces under ``MIN_PIECE_FRACTION`` of the slice's largest piece
   are dropped unless they are a limb in that slice (at least ``LIMB_MM2``, the
   rule of step 3 with ``BONE_MM2`` of bone): an arm cut obliquely or a forearm
   can be under 10 % of the trunk, while a head-rest piece that touches the head
   in other slices holds no bone. Then holes are filled (lungs, bowel gas,
   airways are body; the air between the body and the couch is not a hole once
   the couch is gone).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from rtseg.region import fill_holes, label_counts

log = logging.getLogger(__name__)

TISSUE_HU = -300.0
EDGE_HU = -500.0
OPEN_MM = 3.0
MIN_PIECE_FRACTION = 0.1  # head rests, blocks; limbs are kept by their bone (step 5)
# A limb (step 3): a forearm 10 cm long is about 250 ml, 5 % of an adult's abdomen over that length,
# a hand at the scan's end about 1 %; 5 ml drops noise and trimmed edges of devices.
PART_ML = 5.0
PART_SHARE = 0.01
SOFT_HU = (-150.0, 100.0)  # fat to muscle; PMMA is about 120 HU, foams and vacuum bags far below -300
BONE_HU = 250.0  # cortical bone is 700 HU and more; plastic, carbon-fibre cores and muscle stay under it
BONE_DEPTH_MM = 5.0  # bone under skin and muscle, not a dense rim or insert on a device's surface
BONE_ML = 0.5  # a humerus's cortex is about 2 ml per cm of arm
LIMB_MM2 = 200.0  # one slice of a limb: two fingers or more
BONE_MM2 = 20.0  # one slice of a humerus's or a radius's cortex is 100 mm² and more
COUCH_SPAN = 0.8  # of the reconstruction circle's chord: a body row that wide would fill the field of view
COUCH_MM = 50.0  # a couch top is thinner than this

Mask = npt.NDArray[np.bool_]


def body_mask(hu_zyx: npt.NDArray[Any], spacing_zyx: tuple[float, float, float]) -> Mask:
    """The patient's body on a canonical ``[z, y, x]`` HU array (axial slices along axis 0).

    Parameters
    ----------
    hu_zyx
        CT numbers (HU), any numeric dtype.
    spacing_zyx
        Voxel spacing in mm; the in-plane spacing sizes the opening disk.

    Returns
    -------
    numpy.ndarray
        Boolean mask of ``hu_zyx.shape``; empty where no slice holds tissue.
    """
    hu = np.asarray(hu_zyx)
    # whole-series masks are a byte a voxel each (a 1,500-slice 512² series: 390 MB): each is freed as
    # soon as it is used, and the morphology works in slabs
    dense = hu > EDGE_HU
    beyond_couch = couch_rows(dense, spacing_zyx[1])[None, :, None]
    dense &= ~beyond_couch
    tissue = hu > TISSUE_HU
    tissue &= ~beyond_couch
    disk = _disk(OPEN_MM, spacing_zyx[1], spacing_zyx[2])
    opened = disk_dilation(disk_erosion(tissue, disk), disk)  # scipy's binary_opening, 10x faster
    core = _patient_components(opened, hu, spacing_zyx)
    del opened
    if not core.any():
        return core
    body: Mask = disk_dilation(core, disk)
    del core
    body &= tissue
    del tissue
    edge = disk_dilation(body, _disk(1.0, 1.0, 1.0))
    edge &= dense
    del dense
    body |= edge
    del edge
    for z in range(body.shape[0]):
        body[z] = _fill_slice(body[z], hu[z], spacing_zyx)
    return body


def couch_rows(dense: Mask, dy: float) -> npt.NDArray[np.bool_]:
    """Rows ``y`` of a ``[z, y, x]`` mask that are a couch top or lie beyond it, seen from the patient.

    Searched from the posterior edge, then from the anterior edge, to the middle
    row: the first row where ``dense`` covers ``COUCH_SPAN`` of the inscribed
    circle's chord (median over the slices) starts a couch top if the rows
    covering half of it end within ``COUCH_MM``. A body wide enough to fill a
    tight field of view covers half of it far longer, so it is never taken for one.
    """
    n_z, n_y, n_x = dense.shape
    radius = min(n_y, n_x) / 2.0
    offset = np.arange(n_y) - (n_y - 1) / 2.0
    chord = np.minimum(2.0 * np.sqrt(np.clip(radius**2 - offset**2, 0.0, None)), n_x)
    share = np.median(np.count_nonzero(dense, axis=2), axis=0) / np.maximum(chord, 1.0)
    share[chord < 0.3 * n_x] = 0.0  # the circle's tips: too few pixels to tell
    out = np.zeros(n_y, dtype=bool)
    posterior = _couch_top(share[::-1][: n_y // 2], max(int(COUCH_MM / dy), 1))
    if posterior is not None:
        out[n_y - 1 - posterior :] = True
    anterior = _couch_top(share[: n_y // 2], max(int(COUCH_MM / dy), 1))
    if anterior is not None:
        out[: anterior + 1] = True
    return out


def _couch_top(share: npt.NDArray[np.float64], band: int) -> int | None:
    """Index (from the edge) of the couch top's patient side in a row-share profile, or None."""
    wide = np.nonzero(share >= COUCH_SPAN)[0]
    if wide.size == 0:
        return None
    first = int(wide[0])
    thin = np.nonzero(share[first:] < 0.5)[0]
    if thin.size == 0 or thin[0] > band:
        return None
    return first + int(thin[0]) - 1


def apply_body_outline(
    labels: npt.NDArray[np.uint8], body: Mask, external_label: int | None
) -> npt.NDArray[np.uint8]:
    """Labels with nothing outside ``body`` and every unlabelled body voxel ``external_label``.

    The External (the union of all labels in the RTSTRUCT) then equals the body
    outline; organ voxels outside the body are clipped. A model without an
    External label gets its labels clipped only.
    """
    out = labels.copy()
    clipped = np.count_nonzero(out[~body])
    out[~body] = 0
    if external_label is not None:
        out[body & (out == 0)] = external_label
    if clipped:
        log.info("body outline: %d labelled voxel(s) outside the patient's body set to background", clipped)
    return out


def _disk_rows(disk: Mask) -> list[tuple[int, int]]:
    """``(dy, half width)`` of each row of a one-slice ``[1, y, x]`` disk (each row one centred run)."""
    plane = disk[0]
    cy, cx = plane.shape[0] // 2, plane.shape[1] // 2
    rows = []
    for y in range(plane.shape[0]):
        cols = np.nonzero(plane[y])[0]
        if cols.size == 0:
            continue
        half = cx - int(cols[0])
        if cols.size != 2 * half + 1 or int(cols[-1]) != cx + half:
            raise ValueError("not a disk: a row is not one run centred on the middle column")
        rows.append((y - cy, half))
    return rows


def _row_runs(a: Mask, halves: set[int], erode: bool) -> dict[int, Mask]:
    """Erosion (``erode``) or dilation of ``a`` by centred runs along x of each half width in ``halves``,
    built up one pixel each side at a time (outside the image counts as background)."""
    n = a.shape[2]
    runs: dict[int, Mask] = {}
    current = a.copy()
    for h in range(max(halves) + 1):
        if 0 < h < n:
            if erode:
                current[..., : n - h] &= a[..., h:]
                current[..., n - h :] = False
                current[..., h:] &= a[..., : n - h]
                current[..., :h] = False
            else:
                current[..., : n - h] |= a[..., h:]
                current[..., h:] |= a[..., : n - h]
        elif h >= n and erode:
            current[...] = False
        if h in halves:
            runs[h] = current.copy()
    return runs


def _combine_rows(runs: dict[int, Mask], rows: list[tuple[int, int]], erode: bool) -> Mask:
    """AND (erosion) or OR (dilation) of each row's run shifted by its ``dy`` (rows beyond the image: 0)."""
    shape = next(iter(runs.values())).shape
    n = shape[1]
    out = np.full(shape, erode, dtype=bool)
    for dy, h in rows:
        run = runs[h]
        if not erode:
            dy = -dy  # dilation reflects the structure (symmetric here: the same rows)
        if abs(dy) >= n:
            if erode:
                out[...] = False
            continue
        if erode:  # out[y] &= run[y + dy]
            if dy >= 0:
                out[:, : n - dy] &= run[:, dy:]
                out[:, n - dy :] = False
            else:
                out[:, -dy:] &= run[:, : n + dy]
                out[:, :-dy] = False
        elif dy >= 0:  # out[y] |= run[y + dy]
            out[:, : n - dy] |= run[:, dy:]
        else:
            out[:, -dy:] |= run[:, : n + dy]
    return out


def disk_erosion(mask: Mask, disk: Mask) -> Mask:
    """``scipy.ndimage.binary_erosion(mask, structure=disk)`` for a one-slice disk, exactly, in a fraction
    of the time: a disk is a stack of centred row runs, and erosion by a union is the intersection of the
    erosions, each a run along x shifted in y (outside the image counts as background)."""
    return _by_slabs(mask, disk, erode=True)


def disk_dilation(mask: Mask, disk: Mask) -> Mask:
    """``scipy.ndimage.binary_dilation(mask, structure=disk)`` for a one-slice, symmetric disk, exactly:
    the union of runs along x, each shifted in y."""
    return _by_slabs(mask, disk, erode=False)


SLAB = 16  # slices at a time: the runs of each width are held for one slab only (memory, and cache)


def _by_slabs(mask: Mask, disk: Mask, erode: bool) -> Mask:
    rows = _disk_rows(disk)
    halves = {h for _, h in rows}
    mask = np.asarray(mask, dtype=bool)
    out = np.empty(mask.shape, dtype=bool)
    for z in range(0, mask.shape[0], SLAB):
        runs = _row_runs(mask[z : z + SLAB], halves, erode)
        out[z : z + SLAB] = _combine_rows(runs, rows, erode)
    return out


def _disk(radius_mm: float, dy: float, dx: float) -> Mask:
    """A one-slice ``[1, y, x]`` disk of ``radius_mm`` (at least the 3×3 cross) for per-slice morphology."""
    ry = max(int(radius_mm / dy), 1)
    rx = max(int(radius_mm / dx), 1)
    yy, xx = np.mgrid[-ry : ry + 1, -rx : rx + 1]
    disk: Mask = (yy / ry) ** 2 + (xx / rx) ** 2 <= 1.0
    return disk[None]


def _patient_components(mask: Mask, hu: npt.NDArray[Any], spacing: tuple[float, float, float]) -> Mask:
    """The largest face-connected 3-D component of ``mask`` and every other that is a limb (empty if none)."""
    pieces, n = _label_compact(mask)
    if n == 0:
        return np.zeros_like(mask)
    sizes = label_counts(pieces, n + 1, SLAB)  # not bincount's 64-bit copy of the whole series
    sizes[0] = 0
    largest = int(sizes.argmax())
    keep = np.zeros(n + 1, dtype=bool)
    keep[largest] = True
    voxel_ml = float(np.prod(spacing)) / 1000.0
    least = max(PART_ML / voxel_ml, PART_SHARE * sizes[largest])
    candidates = [k for k in np.nonzero(sizes >= least)[0] if k != largest]
    if candidates:  # find_objects costs a pass over the volume: only when there is something to judge
        boxes = ndimage.find_objects(pieces)
        for k in candidates:
            box = boxes[k - 1]
            keep[k] = _is_limb(pieces[box] == k, hu[box], spacing, BONE_ML / voxel_ml)
    return np.asarray(keep[pieces])


def _label_compact(mask: Mask) -> tuple[npt.NDArray[np.integer], int]:
    """``ndimage.label`` (face connectivity) into 16-bit labels where they fit, else 32-bit: a label
    array is the largest whole-series array of the outline (4 bytes a voxel at scipy's default)."""
    pieces = np.empty(mask.shape, dtype=np.uint16)
    try:
        n = int(ndimage.label(mask, output=pieces))
    except RuntimeError:  # more than 65,535 pieces
        del pieces
        labelled, n = ndimage.label(mask)
        return labelled, int(n)
    return pieces, n


def _is_limb(
    part: Mask, hu: npt.NDArray[Any], spacing: tuple[float, float, float], bone_voxels: float
) -> bool:
    """Whether ``part`` (``[z, y, x]``, cropped as ``hu``) is soft tissue around bone: an arm, a leg, a hand.

    Soft tissue by its median HU (a plastic wedge or a foam block is not); bone
    counted only ``BONE_DEPTH_MM`` or more inside the part (in-plane), so a dense
    rim or insert on a device's surface does not make it a limb.
    """
    median = float(np.median(hu[part]))
    if not SOFT_HU[0] <= median <= SOFT_HU[1]:
        return False
    deep = ndimage.binary_erosion(part, structure=_disk(BONE_DEPTH_MM, spacing[1], spacing[2]))
    return int(np.count_nonzero(deep & (hu > BONE_HU))) >= bone_voxels


def _fill_slice(
    mask: npt.NDArray[np.bool_], hu: npt.NDArray[Any], spacing: tuple[float, float, float]
) -> npt.NDArray[np.bool_]:
    """One slice without its specks (relative to its largest piece, limbs kept) and with its holes filled."""
    pieces, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    keep = sizes >= MIN_PIECE_FRACTION * sizes.max()
    pixel_mm2 = spacing[1] * spacing[2]
    small = np.nonzero(~keep & (sizes >= LIMB_MM2 / pixel_mm2))[0]
    if small.size:
        boxes = ndimage.find_objects(pieces)
        for k in small:
            box = boxes[k - 1]
            piece = (pieces[box] == k)[None]
            keep[k] = _is_limb(piece, hu[box][None], spacing, BONE_MM2 / pixel_mm2)
    keep[0] = False
    return fill_holes(keep[pieces])
