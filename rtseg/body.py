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

from rtseg.region import fill_holes

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
    # One whole-series mask (a byte a voxel: 390 MB for 1,500 slices of 512²) is held and changed in
    # place. Every step but the 3-D components is in-plane (the disks are one slice thick), so each
    # runs a slab of slices at a time, from thresholds computed again where they are needed.
    beyond_couch = _couch_rows_of(hu, spacing_zyx[1])[None, :, None]
    disk = _disk(OPEN_MM, spacing_zyx[1], spacing_zyx[2])
    slabs = [slice(z, z + SLAB) for z in range(0, hu.shape[0], SLAB)]
    body: Mask = np.empty(hu.shape, dtype=bool)
    for s in slabs:  # the tissue, opened: scipy's binary_opening, 10x faster
        body[s] = disk_dilation(disk_erosion(_above(hu[s], TISSUE_HU, beyond_couch), disk), disk)
    _keep_patient(body, hu, spacing_zyx)
    if not body.any():
        return body
    pixel = _disk(1.0, 1.0, 1.0)
    for s in slabs:  # detail back within OPEN_MM, then one pixel of partial volume
        part = disk_dilation(body[s], disk) & _above(hu[s], TISSUE_HU, beyond_couch)
        edge = disk_dilation(part, pixel) & _above(hu[s], EDGE_HU, beyond_couch)
        body[s] = part | edge
    for z in range(body.shape[0]):
        body[z] = _fill_slice(body[z], hu[z], spacing_zyx)
    return body


def _above(hu: npt.NDArray[Any], threshold: float, beyond_couch: Mask) -> Mask:
    """``hu > threshold`` outside the couch rows (of a slab: the callers work a slab at a time)."""
    out: Mask = (hu > threshold) & ~beyond_couch
    return out


def _couch_rows_of(hu: npt.NDArray[Any], dy: float) -> npt.NDArray[np.bool_]:
    """:func:`couch_rows` of ``hu > EDGE_HU``, counted a slab at a time (no whole-series mask)."""
    parts = [np.count_nonzero(hu[z : z + SLAB] > EDGE_HU, axis=2) for z in range(0, hu.shape[0], SLAB)]
    counts = np.concatenate(parts) if parts else np.zeros((0, hu.shape[1]), dtype=np.int64)
    return _couch_rows_from_counts(counts, hu.shape[2], dy)


def couch_rows(dense: Mask, dy: float) -> npt.NDArray[np.bool_]:
    """Rows ``y`` of a ``[z, y, x]`` mask that are a couch top or lie beyond it, seen from the patient.

    Searched from the posterior edge, then from the anterior edge, to the middle
    row: the first row where ``dense`` covers ``COUCH_SPAN`` of the inscribed
    circle's chord (median over the slices) starts a couch top if the rows
    covering half of it end within ``COUCH_MM``. A body wide enough to fill a
    tight field of view covers half of it far longer, so it is never taken for one.
    """
    return _couch_rows_from_counts(np.count_nonzero(dense, axis=2), dense.shape[2], dy)


def _couch_rows_from_counts(counts: npt.NDArray[np.integer], n_x: int, dy: float) -> npt.NDArray[np.bool_]:
    """:func:`couch_rows` from the ``[z, y]`` counts of dense pixels in each row (``n_x`` columns)."""
    n_y = counts.shape[1]
    radius = min(n_y, n_x) / 2.0
    offset = np.arange(n_y) - (n_y - 1) / 2.0
    chord = np.minimum(2.0 * np.sqrt(np.clip(radius**2 - offset**2, 0.0, None)), n_x)
    share = np.median(counts, axis=0) / np.maximum(chord, 1.0)
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
    labels: npt.NDArray[np.uint8], body: Mask, external_label: int | None, *, in_place: bool = False
) -> npt.NDArray[np.uint8]:
    """Labels with nothing outside ``body`` and every unlabelled body voxel ``external_label``.

    The External (the union of all labels in the RTSTRUCT) then equals the body
    outline; organ voxels outside the body are clipped. A model without an
    External label gets its labels clipped only. ``in_place``: ``labels`` itself
    is changed and returned (no second label map of the series).
    """
    out = labels if in_place else labels.copy()
    clipped = 0
    for z in range(0, out.shape[0], SLAB):  # the masks of a slab at a time
        part, inside = out[z : z + SLAB], body[z : z + SLAB]
        outside = ~inside
        clipped += int(np.count_nonzero(part[outside]))
        part[outside] = 0
        if external_label is not None:
            part[inside & (part == 0)] = external_label
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


def _keep_patient(mask: Mask, hu: npt.NDArray[Any], spacing: tuple[float, float, float]) -> None:
    """Keep (in place) the largest face-connected 3-D component of ``mask`` and every other that is
    a limb; nothing else.

    Labelled ``SLAB`` slices at a time, the pieces of neighbouring slabs joined where
    they touch across the border: no label array of the whole series (2-4 bytes a
    voxel: 0.8-1.6 GB for 1,500 slices of 512²). The same components as labelling
    the whole series at once; the largest is the first in scipy's order on a tie.
    """
    starts = list(range(0, mask.shape[0], SLAB))
    offsets: list[int] = []  # ids before each slab's label 1 (an id is 1-based over the series)
    slab_sizes: list[npt.NDArray[np.int64]] = []
    joins: list[npt.NDArray[np.int64]] = []  # pairs of ids that touch across a slab border
    total = 0
    below: npt.NDArray[np.int64] | None = None  # ids of the previous slab's last slice
    for z in starts:
        pieces, n = ndimage.label(mask[z : z + SLAB])
        offsets.append(total)
        slab_sizes.append(np.bincount(pieces.ravel(), minlength=n + 1)[1:].astype(np.int64))
        if below is not None:
            touching = (below > 0) & (pieces[0] > 0)
            if touching.any():  # each touching pair once: a pair is one 64-bit key (ids are < 2**32)
                keys = np.unique((below[touching] << 32) | (pieces[0][touching].astype(np.int64) + total))
                joins.append(np.stack((keys >> 32, keys & 0xFFFFFFFF), axis=1))
        below = np.where(pieces[-1] > 0, pieces[-1].astype(np.int64) + total, 0)
        total += int(n)
    if total == 0:
        return
    root = _roots(total, np.concatenate(joins) if joins else np.zeros((0, 2), np.int64))  # index: id - 1
    sizes = np.bincount(root, weights=np.concatenate(slab_sizes), minlength=total).astype(np.int64)
    largest = int(sizes.argmax())  # roots are the smallest id of their component: scipy's order
    voxel_ml = float(np.prod(spacing)) / 1000.0
    least = max(PART_ML / voxel_ml, PART_SHARE * sizes[largest])
    candidates = sorted(int(r) for r in np.nonzero(sizes >= least)[0] if r != largest)
    judged = np.isin(root, candidates)
    # the largest and the limb candidates stay for now; each candidate's box and one of its voxels
    lows = {r: np.array(mask.shape) for r in candidates}
    highs = {r: np.zeros(3, dtype=np.int64) for r in candidates}
    seeds: dict[int, tuple[int, int, int]] = {}
    for z, offset in zip(starts, offsets, strict=True):  # labelled again: the same labels, slab by slab
        pieces, n = ndimage.label(mask[z : z + SLAB])
        staying = (root[offset : offset + n] == largest) | judged[offset : offset + n]
        mask[z : z + SLAB] = np.concatenate(([False], staying))[pieces]
        if not judged[offset : offset + n].any():
            continue
        for local, box in enumerate(ndimage.find_objects(pieces, max_label=n)):
            if box is None or not judged[offset + local]:
                continue
            r = int(root[offset + local])
            start = (box[0].start + z, box[1].start, box[2].start)
            lows[r] = np.minimum(lows[r], start)
            highs[r] = np.maximum(highs[r], [box[0].stop + z, box[1].stop, box[2].stop])
            if r not in seeds:
                at = np.argwhere(pieces[box] == local + 1)[0]
                seeds[r] = (int(at[0]) + start[0], int(at[1]) + start[1], int(at[2]) + start[2])
    for r in candidates:  # an arm, a leg, a hand beside the trunk stays; the couch or a foam block goes
        box = tuple(slice(int(a), int(b)) for a, b in zip(lows[r], highs[r], strict=True))
        parts, _ = ndimage.label(mask[box])  # what stays is a subset of components: this one is whole
        part = parts == parts[tuple(c - b.start for c, b in zip(seeds[r], box, strict=True))]
        if not _is_limb(part, hu[box], spacing, BONE_ML / voxel_ml):
            mask[box][part] = False


def _roots(total: int, joins: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Per id ``1 … total`` (at index ``id - 1``): the index of the smallest id it is joined to."""
    parent = np.arange(total, dtype=np.int64)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = int(parent[a])
        return a

    for a, b in joins - 1:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(a) for a in range(total)], dtype=np.int64)


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
