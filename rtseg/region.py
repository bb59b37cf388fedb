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


def slice_anatomy(volume: CTVolume, shave_mm: float = 8.0) -> tuple[SliceAnatomy, ...]:
    """Body section, air, bone and largest solid organ of every slice of ``volume``."""
    step = max(1, int(np.ceil(max(volume.shape[1:]) / MAX_PIXELS)))
    _, dy, dx = volume.spacing
    pixel_cm2 = dy * dx * step * step / 100.0
    radius = max(1, round(shave_mm / (min(dy, dx) * step)))
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    disk = x * x + y * y <= radius * radius
    return tuple(
        _slice(
            np.asarray(volume.hu[k, ::step, ::step], np.float32), float(volume.slice_z(k)[2]), pixel_cm2, disk
        )
        for k in range(volume.shape[0])
    )


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
    return np.asarray(ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes))), bool)


def check_region(volume: CTVolume, rule: RegionRule) -> None:
    """Raise :class:`RegionError` when ``volume`` does not show ``rule``'s region.

    The message counts what the slices show instead (lung air, bone), so that a
    head, a neck, a thorax or a pelvis is recognisable from it.
    """
    slices = [s for s in slice_anatomy(volume, rule.shave_mm) if s.section_cm2 >= MIN_SECTION_CM2]
    thorax = sum(s.lung_share > rule.max_lung_share for s in slices)
    bony = sum(s.bone_share > rule.max_bone_share for s in slices)
    level = [
        s
        for s in slices
        if s.lung_share <= rule.max_lung_share
        and s.bone_share <= rule.max_bone_share
        and s.organ_share >= rule.min_organ_share
    ]
    extent = len(level) * volume.spacing[0]
    if extent >= rule.min_extent_mm:
        return
    raise RegionError(
        f"the series does not show the model's region, {rule.description}: {extent:.0f} mm at the level "
        f"of its organs (at least {rule.min_extent_mm:.0f} mm needed: a compact solid organ of "
        f"{rule.min_organ_share:.0%} of the body section, under {rule.max_lung_share:.0%} lung air "
        f"and under {rule.max_bone_share:.0%} bone); of {len(slices)} slices, {thorax} are mostly "
        f"lung (thorax) and {bony} mostly bone (skull or pelvis)"
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


def impossible_structures(
    volume: CTVolume, labels: npt.NDArray[np.uint8], label_of: dict[str, int]
) -> dict[str, str]:
    """Structures drawn where they cannot be, with the reason.

    An organ mostly outside the body outline, or a lung that is not mostly air
    inside the body (the air around a head is not lung).
    """
    counts = np.bincount(labels.ravel(), minlength=256)
    drawn = {n: lab for n, lab in label_of.items() if n != EXTERNAL and counts[lab]}
    if not drawn:
        return {}
    step = max(1, int(np.ceil(max(volume.shape[1:]) / MAX_PIXELS)))  # shares: a subsample will do
    hu = np.asarray(volume.hu[:, ::step, ::step], np.float32)
    sampled = labels[:, ::step, ::step]
    body = np.stack([_body(hu[k]) for k in range(hu.shape[0])])
    total = np.bincount(sampled.ravel(), minlength=256)
    inside = np.bincount(sampled[body], minlength=256)
    air = np.bincount(sampled[body & (hu < AIR_HU)], minlength=256)
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
