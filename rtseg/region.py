"""Does a CT series show the body region a model contours, and is each structure where it can be?

Measured on the image, never on DICOM tags (``BodyPartExamined`` is often
empty or wrong). Per slice: the body section (the largest connected region
above -500 HU, holes filled, so the lungs count as inside); the share of it
that is air (under -400 HU: lung, with some bowel gas); the share that is bone
(over 300 HU: a skull ring or a pelvis is far more bone than an abdomen's
spine and ribs); and the largest solid organ, i.e. the largest soft-tissue
region (20-180 HU, lightly smoothed) left after shaving 8 mm off every edge,
which removes the body wall and thin muscles and keeps a liver, spleen or
kidney. That region counts as an organ only when it is compact (at least
``MIN_SOLIDITY`` of its convex hull): the thick ring of hip and thigh muscle
round a pelvis is as large as a liver but wraps round fat and bone. A model
declares its region by name in its manifest (``"region"``); :data:`REGIONS`
holds each region's rule. A stock nnU-Net folder declares none and is not
checked.

After segmentation, :func:`impossible_structures` lists structures drawn where
they cannot be (outside the body, a lung without lung air), and :func:`order_flags` flags
structures in the wrong cranio-caudal order (a liver above the heart).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from skimage.morphology import convex_hull_image

from rtseg.errors import RegionError
from rtseg.structures import EXTERNAL
from rtseg.volume import CTVolume

BODY_HU = -500.0  # above: tissue (the couch shell is thin and apart from the body)
AIR_HU = -400.0  # below, inside the body: lung air (or bowel gas)
BONE_HU = 300.0  # above: cortical and dense bone
SOLID_HU = (20.0, 180.0)  # parenchyma, unenhanced to portal venous; not fat, fluid or bone
# smaller body sections tell nothing (feet, a partial slice); a 1-year-old's abdomen is about 75 cm²
MIN_SECTION_CM2 = 40.0
MAX_PIXELS = 256  # rows and columns beyond this are subsampled: the measures are areas and shares
# area / convex hull area of the largest solid region: shaved livers, spleens and kidneys 0.68-0.91
# (phantoms; 0.83-0.91 on the Siemens abdomen), the muscle ring of a pelvis 0.34-0.45
MIN_SOLIDITY = 0.55


@dataclass(frozen=True)
class RegionRule:
    """What a series must show to cover a model's region: enough slices at its organs' level.

    A slice is at organ level when its body section is at most ``max_lung_share``
    lung air (not thorax), at most ``max_bone_share`` bone (not a skull or a
    pelvis) and its largest solid organ (after shaving ``shave_mm``) is at least
    ``min_organ_share`` of the section. The region is covered when such slices
    span at least ``min_extent_mm``.
    """

    name: str
    description: str
    max_lung_share: float = 0.15
    max_bone_share: float = 0.10
    min_organ_share: float = 0.15
    shave_mm: float = 8.0
    min_extent_mm: float = 15.0


REGIONS: dict[str, RegionRule] = {
    "upper_abdomen": RegionRule("upper_abdomen", "the upper abdomen (thorax base to pelvis top)"),
}


@dataclass(frozen=True)
class SliceAnatomy:
    """One axial slice as the region check sees it (shares of the body section)."""

    z_mm: float  # patient z (superior +) of the slice
    section_cm2: float  # body cross-section
    lung_share: float  # air inside the body
    bone_share: float
    organ_share: float  # the largest solid organ


def slice_anatomy(
    volume: CTVolume, shave_mm: float = 8.0, order: Iterable[int] | None = None
) -> Iterator[SliceAnatomy]:
    """Body section, air, bone and largest solid organ of each slice of ``volume``, measured as asked for.

    ``order``: the slice indices, in the order to measure them (default: every slice, bottom up).
    """
    step = max(1, int(np.ceil(max(volume.shape[1:]) / MAX_PIXELS)))
    _, dy, dx = volume.spacing
    pixel_cm2 = dy * dx * step * step / 100.0
    radius = max(1, round(shave_mm / (min(dy, dx) * step)))
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    disk = x * x + y * y <= radius * radius
    for k in range(volume.shape[0]) if order is None else order:
        section = np.asarray(volume.hu[k, ::step, ::step], np.float32)
        yield _slice(section, float(volume.slice_z(k)[2]), pixel_cm2, disk)


def spread_order(n: int) -> list[int]:
    """Every index ``0 … n - 1`` once, coarse to fine from the middle: the middle, then the points
    halfway between those taken, and so on. Any stretch of a series is sampled early."""
    order: list[int] = []
    taken = np.zeros(n, dtype=bool)
    step = 1 << max(n - 1, 0).bit_length()
    while step >= 1:
        for k in range((n // 2) % step, n, step):
            if not taken[k]:
                taken[k] = True
                order.append(k)
        step //= 2
    return order


def _slice(
    section: npt.NDArray[np.float32], z: float, pixel_cm2: float, disk: npt.NDArray[np.bool_]
) -> SliceAnatomy:
    body = _body(section)
    area = int(np.count_nonzero(body))
    if area == 0:
        return SliceAnatomy(z, 0.0, 0.0, 0.0, 0.0)
    smooth = ndimage.uniform_filter(section, 3)  # noise of sharp kernels would break organs apart
    solid = ndimage.binary_erosion(body & (smooth > SOLID_HU[0]) & (smooth < SOLID_HU[1]), disk)
    organ = _largest_compact(solid)
    air = int(np.count_nonzero(body & (section < AIR_HU)))
    bone = int(np.count_nonzero(body & (section > BONE_HU)))
    return SliceAnatomy(z, area * pixel_cm2, air / area, bone / area, organ / area)


def _largest_compact(solid: npt.NDArray[np.bool_]) -> int:
    """Pixels of the largest connected region of ``solid`` if it is compact (an organ), else 0."""
    pieces, n = ndimage.label(solid)
    if n == 0:
        return 0
    sizes = np.bincount(pieces.ravel())[1:]
    largest = pieces == 1 + int(np.argmax(sizes))
    hull = int(np.count_nonzero(convex_hull_image(largest)))
    return int(sizes.max()) if sizes.max() >= MIN_SOLIDITY * hull else 0


def _body(section: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    """The largest connected tissue region of a slice, holes (lungs, bowel gas) filled."""
    labels, n = ndimage.label(section > BODY_HU)
    if n == 0:
        return np.zeros(section.shape, bool)
    sizes = np.bincount(labels.ravel())[1:]
    return fill_holes(labels == 1 + int(np.argmax(sizes)))


def fill_holes(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """``scipy.ndimage.binary_fill_holes(mask)`` for a 2-D mask, the same pixels, several times faster.

    A hole is a background region (4-connected, scipy's default structure) that
    does not reach the image's edge; scipy finds them by dilating the edge into
    the background until nothing changes, here they are labelled at once.
    """
    background, n = ndimage.label(~mask)
    if n == 0:
        return mask.copy()
    outside = np.zeros(n + 1, dtype=bool)
    for edge in (background[0], background[-1], background[:, 0], background[:, -1]):
        outside[edge] = True
    outside[0] = False  # the mask itself
    filled: npt.NDArray[np.bool_] = ~outside[background]
    return filled


def check_region(volume: CTVolume, rule: RegionRule) -> None:
    """Raise :class:`RegionError` when ``volume`` does not show ``rule``'s region.

    The message counts what the slices show instead (lung air, bone), so that a
    head, a neck, a thorax or a pelvis is recognisable from it.
    """
    # The slices are measured spread out over the series, and the check stops as soon as enough of them
    # are at organ level: the same answer as measuring every slice (the count only grows), a few dozen
    # slices instead of hundreds for a series that shows the region. A refusal measures every slice.
    slices: list[SliceAnatomy] = []
    at_level = 0
    for s in slice_anatomy(volume, rule.shave_mm, spread_order(volume.shape[0])):
        if s.section_cm2 < MIN_SECTION_CM2:
            continue
        slices.append(s)
        if _at_organ_level(s, rule):
            at_level += 1
            if at_level * volume.spacing[0] >= rule.min_extent_mm:
                return
    thorax = sum(s.lung_share > rule.max_lung_share for s in slices)
    bony = sum(s.bone_share > rule.max_bone_share for s in slices)
    extent = at_level * volume.spacing[0]
    raise RegionError(
        f"the series does not show the model's region, {rule.description}: {extent:.0f} mm at the level "
        f"of its organs (at least {rule.min_extent_mm:.0f} mm needed: a compact solid organ of "
        f"{rule.min_organ_share:.0%} of the body section, under {rule.max_lung_share:.0%} lung air "
        f"and under {rule.max_bone_share:.0%} bone); of {len(slices)} slices, {thorax} are mostly "
        f"lung (thorax) and {bony} mostly bone (skull or pelvis)"
    )


def _at_organ_level(s: SliceAnatomy, rule: RegionRule) -> bool:
    return (
        s.lung_share <= rule.max_lung_share
        and s.bone_share <= rule.max_bone_share
        and s.organ_share >= rule.min_organ_share
    )


def region_rule(name: str) -> RegionRule | None:
    """The rule of a manifest's ``region`` ("" or unknown names: none, nothing is checked)."""
    return REGIONS.get(name)


# -- per structure, on the prediction -----------------------------------------------------------

LUNGS = ("Lung_L", "Lung_R")
MIN_LUNG_AIR = 0.5  # share of a lung contour that must be air inside the body
MIN_INSIDE = 0.5  # share of any organ that must lie inside the body outline
# (superior, inferior): the centre of the first lies above the centre of the second in every patient
ORDER: tuple[tuple[str, str], ...] = (
    ("Lung_L", "Liver"),
    ("Lung_R", "Liver"),
    ("Heart", "Liver"),
    ("Heart", "Kidney_L"),
    ("Heart", "Kidney_R"),
    ("Liver", "Kidney_R"),
    ("Lung_L", "Spleen"),
)


def label_counts(
    labels: npt.NDArray[np.integer], minlength: int = 256, slab: int = 16
) -> npt.NDArray[np.int64]:
    """Voxels of each label value ``0 … minlength - 1`` (every value must be below ``minlength``) of a
    ``[z, y, x]`` label map, counted ``slab`` slices at a time: ``np.bincount`` casts its input to 64
    bits, 8 bytes a voxel of a whole long series at once."""
    counts = np.zeros(minlength, dtype=np.int64)
    for z in range(0, labels.shape[0], slab):
        counts += np.bincount(labels[z : z + slab].ravel(), minlength=minlength)
    return counts


def impossible_structures(
    volume: CTVolume, labels: npt.NDArray[np.uint8], label_of: dict[str, int]
) -> dict[str, str]:
    """Structures drawn where they cannot be, with the reason.

    An organ mostly outside the body outline, or a lung that is not mostly air
    inside the body (the air around a head is not lung).
    """
    counts = label_counts(labels)
    drawn = {n: lab for n, lab in label_of.items() if n != EXTERNAL and counts[lab]}
    if not drawn:
        return {}
    step = max(1, int(np.ceil(max(volume.shape[1:]) / MAX_PIXELS)))  # shares: a subsample will do
    judged = np.zeros(256, dtype=bool)
    judged[list(drawn.values())] = True
    total, inside, air = (np.zeros(256, dtype=np.int64) for _ in range(3))
    for k in range(labels.shape[0]):  # a slice at a time: no whole-series copies (or 64-bit counts)
        sampled = labels[k, ::step, ::step]
        if not judged[sampled].any():
            continue  # nothing judged here: the body of this slice changes no count
        hu = np.asarray(volume.hu[k, ::step, ::step], np.float32)
        body = _body(hu)
        total += np.bincount(sampled.ravel(), minlength=256)
        inside += np.bincount(sampled[body], minlength=256)
        air += np.bincount(sampled[body & (hu < AIR_HU)], minlength=256)
    out: dict[str, str] = {}
    for name, label in drawn.items():
        n = int(total[label])
        if n == 0:  # a structure of a few voxels between the samples: nothing to judge
            continue
        if inside[label] / n < MIN_INSIDE:
            out[name] = f"only {inside[label] / n:.0%} of it lies inside the body outline"
        elif name in LUNGS and air[label] / n < MIN_LUNG_AIR:
            out[name] = (
                f"only {air[label] / n:.0%} of it is lung air inside the body "
                f"(at least {MIN_LUNG_AIR:.0%} expected)"
            )
    return out


def order_flags(volume: CTVolume, labels: npt.NDArray[np.uint8], label_of: dict[str, int]) -> dict[str, str]:
    """Flags for structures whose centre lies above one that must be above them."""
    per_slice = np.stack([np.bincount(labels[k].ravel(), minlength=256) for k in range(labels.shape[0])])
    z = {name: _centre_z(volume, per_slice[:, label]) for name, label in label_of.items()}
    out: dict[str, str] = {}
    for upper, lower in ORDER:
        zu, zl = z.get(upper), z.get(lower)
        if zu is not None and zl is not None and zl > zu:
            out.setdefault(lower, f"centre lies above the {upper} centre: anatomically impossible")
    return out


def _centre_z(volume: CTVolume, per_slice: npt.NDArray[np.intp]) -> float | None:
    """Patient z of the centre of a structure with ``per_slice`` voxels on each slice.

    None when it is absent or cut by the first or last slice: the centre of a structure the
    scan cuts off is not its centre (a scan starting at the diaphragm shows the heart's apex
    below the liver's dome), so the order check would flag a normal scan.
    """
    total = int(per_slice.sum())
    if total == 0 or per_slice[0] > 0 or per_slice[-1] > 0:
        return None
    k = float(np.dot(np.arange(per_slice.size), per_slice)) / total
    return float((volume.affine @ np.array([0.0, 0.0, k, 1.0]))[2])


# -- one organ, one piece, at its level ----------------------------------------------------------

# Organs that are one piece in every patient (not tubes, bowel or bone, which a scan shows in pieces;
# not the lungs: a model that misses a thin bridge of a lung base leaves a true piece apart, and lung
# drawn where there is no lung air is dropped whole by :func:`impossible_structures`).
UNDER_LIVER = ("Spleen", "Kidney_L", "Kidney_R", "Pancreas", "Gallbladder", "Stomach")
ONE_PIECE = ("Liver", *UNDER_LIVER, "Heart")
MIN_PIECE_ML = 1.0  # smaller pieces are noise, not a second organ (specks under 0.2 ml are gone already)
# the stomach's gas and folds part off small true pieces (2-3 ml in phantoms' reference labels)
MIN_PIECE_ML_OF = {"Stomach": 5.0}
APART_MM = 20.0  # a piece this far from the organ's main part is not the organ (nearer: a fragment of it)
DISTANCE_MM = 3.0  # grid of the distance measure, about the default model's own in-plane spacing
LUNG_BASE_MM = 40.0  # the liver's top lies under the diaphragm: at most this far below the lung bases
BELOW_LIVER = 0.75  # the other organs' centres lie at most this share of the liver's height below it
ABOVE_LIVER_MM = 20.0  # ... and never above its dome
MIN_LIVER_MM = 60.0  # the liver's height used when the scan shows less of it (a 1-year-old's is ~70 mm)


_Boxes = list[tuple[slice, slice, slice] | None]  # ndimage.find_objects: label n's box at n - 1


@dataclass(frozen=True)
class _Pieces:
    """The connected pieces of one structure, in the box that holds them (piece ``n`` is ``n - 1`` here)."""

    labelled: npt.NDArray[np.int32]
    box: tuple[slice, slice, slice]
    voxels: npt.NDArray[np.intp]
    bottom: npt.NDArray[np.float64]  # patient z (superior +) of each piece's lowest slice
    centre: npt.NDArray[np.float64]
    top: npt.NDArray[np.float64]
    cut_below: npt.NDArray[np.bool_]  # on the scan's most inferior slice: its lower end is not seen
    cut_above: npt.NDArray[np.bool_]


def settle_organs(
    volume: CTVolume, labels: npt.NDArray[np.uint8], label_of: dict[str, int]
) -> tuple[npt.NDArray[np.uint8], dict[str, tuple[str, ...]]]:
    """Keep each one-piece organ's part at its level; remove pieces far from it; flag the rest.

    A model that learnt the upper abdomen draws "livers" and "kidneys" in the pelvis and the upper
    thorax of a long scan, apart from the real ones and sometimes larger. The level is read from
    the image's own anatomy (never an atlas): the liver's top lies under the lung bases, the heart's
    centre above them, and the other upper abdominal organs between the liver's dome and a little
    below its lower edge (scaled by the liver's height: a 1-year-old and an adult alike). Each
    organ's main part is its largest piece at that level (its largest piece, flagged, when none
    is); pieces more than :data:`APART_MM` from the main part are removed (they become body).
    Returns the new label map and, per structure, what a reviewer should read.
    """
    z = np.array([volume.slice_z(k)[2] for k in range(labels.shape[0])])
    boxes = ndimage.find_objects(labels)  # one pass: each label's box (removals only shrink them)
    base = _lung_base(labels, label_of, boxes, z)
    body = label_of.get(EXTERNAL, 0)
    out = labels.copy()
    notes: dict[str, tuple[str, ...]] = {}
    liver = None
    for name in ONE_PIECE:
        pieces = _pieces(out, label_of.get(name), boxes, z)
        if pieces is None:
            continue
        allowed, why = _level(name, pieces, base, liver)
        main = _main(pieces, allowed)
        said = [] if allowed[main - 1] else [why(main)]
        far = _far(pieces, main, volume, MIN_PIECE_ML_OF.get(name, MIN_PIECE_ML))
        if far:
            region = out[pieces.box]
            gone = np.zeros(pieces.voxels.size + 1, bool)
            gone[[n for n, _ in far]] = True
            region[gone[pieces.labelled]] = body
            said.append(_removed(pieces, far, volume))
        if name == "Liver":
            liver = _Liver(pieces, main - 1)
        if said:
            notes[name] = tuple(said)
    return out, notes


@dataclass(frozen=True)
class _Liver:
    """The liver's main part: the level the other upper abdominal organs are judged by."""

    pieces: _Pieces
    index: int  # of the main part in ``pieces``

    def band(self) -> tuple[float, float, float]:
        """(lowest, highest centre allowed, the liver's height used)."""
        p, i = self.pieces, self.index
        height = max(float(p.top[i] - p.bottom[i]), MIN_LIVER_MM)
        lowest = -np.inf if p.cut_below[i] else float(p.bottom[i]) - BELOW_LIVER * height
        highest = np.inf if p.cut_above[i] else float(p.top[i]) + ABOVE_LIVER_MM
        return lowest, highest, height

    def off_level(self, centre: float) -> str:
        """What to say about an organ whose centre lies outside :meth:`band`."""
        lowest, _, height = self.band()
        bottom, top = float(self.pieces.bottom[self.index]), float(self.pieces.top[self.index])
        if centre < lowest:
            where = (
                f"{bottom - centre:.0f} mm below the liver's lower edge (at most "
                f"{BELOW_LIVER * height:.0f} mm expected): check whether it is in the pelvis"
            )
        else:
            where = f"{centre - top:.0f} mm above the liver's dome: check whether it is in the thorax"
        return f"no part of it lies at the liver's level: its centre lies {where}"


def _level(
    name: str, pieces: _Pieces, base: float | None, liver: _Liver | None
) -> tuple[npt.NDArray[np.bool_], Callable[[int], str]]:
    """Which pieces lie where ``name`` can be, and what to say when the main part (1-based) does not."""
    if name == "Liver" and base is not None:
        return pieces.top >= base - LUNG_BASE_MM, lambda n: _under_diaphragm(base - pieces.top[n - 1])
    if name == "Heart" and base is not None:
        return (
            pieces.centre > base,
            lambda n: (
                f"its centre lies {base - pieces.centre[n - 1]:.0f} mm below the lung bases: "
                "the heart lies above them"
            ),
        )
    if name in UNDER_LIVER and liver is not None:
        lowest, highest, height = liver.band()
        allowed = (pieces.centre >= lowest) & (pieces.centre <= highest)
        return allowed, lambda n: liver.off_level(float(pieces.centre[n - 1]))
    return np.ones(pieces.voxels.size, bool), lambda n: ""


def _under_diaphragm(gap: float) -> str:
    return (
        f"no part of it reaches up to the lung bases (its top lies {gap:.0f} mm below them; the liver "
        "lies under the diaphragm): check whether it is in the pelvis"
    )


def _main(pieces: _Pieces, allowed: npt.NDArray[np.bool_]) -> int:
    """The main part: the largest allowed piece, else the largest (1-based, as in ``labelled``)."""
    sizes = np.where(allowed, pieces.voxels, -1) if allowed.any() else pieces.voxels
    return 1 + int(np.argmax(sizes))


def _far(pieces: _Pieces, main: int, volume: CTVolume, min_ml: float) -> list[tuple[int, float]]:
    """(piece, distance mm) of pieces of at least ``min_ml`` over :data:`APART_MM` from ``main``.

    A piece on the same end of the scan as the main part may join it outside the scan (the lung
    bases at the top of an abdominal scan, parted by the liver's dome): never far.
    """
    big = np.flatnonzero(pieces.voxels * volume.voxel_volume_ml >= min_ml) + 1
    big = big[big != main]
    if big.size == 0:
        return []
    dz, dy, dx = volume.spacing
    step = max(1, int(DISTANCE_MM // min(dy, dx)))
    coarse = pieces.labelled[:, ::step, ::step]
    away = ndimage.distance_transform_edt(coarse != main, sampling=(dz, dy * step, dx * step))
    m = main - 1
    out = []
    for n in big:
        if (pieces.cut_below[n - 1] and pieces.cut_below[m]) or (
            pieces.cut_above[n - 1] and pieces.cut_above[m]
        ):
            continue
        at = coarse == n
        # a piece thinner than the coarse grid: its nearest coarse cell will do
        gap = float(away[at].min()) if at.any() else _nearest(pieces.labelled == n, away, step)
        if gap > APART_MM:
            out.append((int(n), gap))
    return out


def _nearest(piece: npt.NDArray[np.bool_], away: npt.NDArray[np.float64], step: int) -> float:
    k, j, i = np.nonzero(piece)
    return float(away[k, j // step, i // step].min())


def _removed(pieces: _Pieces, far: list[tuple[int, float]], volume: CTVolume) -> str:
    ml = float(sum(pieces.voxels[n - 1] for n, _ in far)) * volume.voxel_volume_ml
    what = "a separate piece" if len(far) == 1 else f"{len(far)} separate pieces"
    gap = min(g for _, g in far)
    return f"{what} ({ml:.1f} ml) {gap:.0f} mm or more from its main part removed: one organ is one piece"


def _pieces(
    labels: npt.NDArray[np.uint8], label: int | None, boxes: _Boxes, z: npt.NDArray[np.float64]
) -> _Pieces | None:
    """The connected pieces of ``label`` (slices at patient ``z``), or None when there are none."""
    box = boxes[label - 1] if label is not None and 0 < label <= len(boxes) else None
    if box is None:
        return None
    labelled, n = ndimage.label(labels[box] == label)
    if n == 0:
        return None
    counts = np.stack([np.bincount(s.ravel(), minlength=n + 1)[1:] for s in labelled])  # [slice, piece]
    zs = z[box[0]]
    present = counts > 0
    below, above = int(np.argmin(z)) - box[0].start, int(np.argmax(z)) - box[0].start
    edge = np.zeros(n, bool)
    return _Pieces(
        labelled=np.asarray(labelled, np.int32),
        box=box,
        voxels=counts.sum(axis=0),
        bottom=np.array([zs[present[:, p]].min() for p in range(n)]),
        centre=zs @ counts / counts.sum(axis=0),
        top=np.array([zs[present[:, p]].max() for p in range(n)]),
        cut_below=present[below] if 0 <= below < zs.size else edge,
        cut_above=present[above] if 0 <= above < zs.size else edge,
    )


def _lung_base(
    labels: npt.NDArray[np.uint8], label_of: dict[str, int], boxes: _Boxes, z: npt.NDArray[np.float64]
) -> float | None:
    """Patient z of the lowest slice of the lungs' main parts (None: no lungs, or the scan cuts them)."""
    bottoms = []
    for name in LUNGS:
        pieces = _pieces(labels, label_of.get(name), boxes, z)
        if pieces is None:
            continue
        main = int(np.argmax(pieces.voxels))
        if pieces.cut_below[main]:
            return None
        bottoms.append(float(pieces.bottom[main]))
    return min(bottoms) if bottoms else None
