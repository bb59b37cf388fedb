"""Does a CT series show the body region a model contours, and is each structure where it can be?

Measured on the image, never on DICOM tags (``BodyPartExamined`` is often
empty or wrong): per slice, the body section (the largest connected region
above -500 HU, holes filled, so the lungs count as inside) and the share of it
that is air (under -400 HU: lung, with some bowel gas). A model declares its
region by name in its manifest (``"region"``); :data:`REGIONS` holds each
region's rule. A stock nnU-Net folder declares none and is not checked.

After segmentation, :func:`impossible_structures` lists structures drawn where
they cannot be (outside the body, a lung without lung air), and :func:`order_flags` flags
structures in the wrong cranio-caudal order (a liver above the heart).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from rtseg.errors import RegionError
from rtseg.structures import EXTERNAL
from rtseg.volume import CTVolume

BODY_HU = -500.0  # above: tissue (the couch shell is thin and apart from the body)
AIR_HU = -400.0  # below, inside the body: lung air (or bowel gas)
# smaller body sections tell nothing (a skull vertex, feet, a partial slice: air between scalp and
# bone there reached 14 %); a 1-year-old's abdomen is about 110 cm²
MIN_SECTION_CM2 = 80.0
MAX_PIXELS = 256  # rows and columns beyond this are subsampled: the measures are areas and shares


@dataclass(frozen=True)
class RegionRule:
    """What a series must show to cover a model's region.

    ``min_lung_share``: a slice whose body section is at least this share lung air
    is thorax. ``min_below_mm``: body without lung air needed inferior to the
    lowest thorax slice (the abdomen under the lung bases).
    """

    name: str
    description: str
    min_lung_share: float = 0.15
    min_below_mm: float = 30.0


REGIONS: dict[str, RegionRule] = {
    "upper_abdomen": RegionRule("upper_abdomen", "the upper abdomen (thorax base to pelvis top)"),
}


@dataclass(frozen=True)
class SliceAnatomy:
    """One axial slice as the region check sees it."""

    z_mm: float  # patient z (superior +) of the slice
    section_cm2: float  # body cross-section
    lung_share: float  # share of the body section that is air


def slice_anatomy(volume: CTVolume) -> tuple[SliceAnatomy, ...]:
    """Body section and air share of every slice of ``volume``."""
    step = max(1, int(np.ceil(max(volume.shape[1:]) / MAX_PIXELS)))
    _, dy, dx = volume.spacing
    pixel_cm2 = dy * dx * step * step / 100.0
    out = []
    for k in range(volume.shape[0]):
        section = np.asarray(volume.hu[k, ::step, ::step], dtype=np.float32)
        body = _body(section)
        area = int(np.count_nonzero(body))
        air = int(np.count_nonzero(body & (section < AIR_HU)))
        z = float(volume.slice_z(k)[2])
        out.append(SliceAnatomy(z, area * pixel_cm2, air / area if area else 0.0))
    return tuple(out)


def _body(section: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    """The largest connected tissue region of a slice, holes (lungs, bowel gas) filled."""
    labels, n = ndimage.label(section > BODY_HU)
    if n == 0:
        return np.zeros(section.shape, bool)
    sizes = np.bincount(labels.ravel())[1:]
    return np.asarray(ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes))), bool)


def check_region(volume: CTVolume, rule: RegionRule) -> None:
    """Raise :class:`RegionError` when ``volume`` does not show ``rule``'s region.

    The region is covered when some slice is thorax (lung bases) and at least
    ``rule.min_below_mm`` of body without lung air lies inferior to the lowest
    such slice: a head, a neck, a pelvis or a thorax alone fail.
    """
    slices = [s for s in slice_anatomy(volume) if s.section_cm2 >= MIN_SECTION_CM2]
    thorax = [s for s in slices if s.lung_share >= rule.min_lung_share]
    refused = f"the series does not show the model's region, {rule.description}"
    if not thorax:
        most = max((s.lung_share for s in slices), default=0.0)
        raise RegionError(
            f"{refused}: no slice shows lung bases (lung air in at least {rule.min_lung_share:.0%} "
            f"of the body section; the most on any slice is {most:.0%})"
        )
    lowest = min(s.z_mm for s in thorax)
    below = sum(1 for s in slices if s.z_mm < lowest and s.lung_share < rule.min_lung_share)
    below_mm = below * volume.spacing[0]
    if below_mm < rule.min_below_mm:
        raise RegionError(
            f"{refused}: only {below_mm:.0f} mm of body without lung air lies below the lung bases "
            f"(at least {rule.min_below_mm:.0f} mm needed)"
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
    drawn = {n: lab for n, lab in label_of.items() if n != EXTERNAL and np.any(labels == lab)}
    if not drawn:
        return {}
    body = np.stack([_body(np.asarray(volume.hu[k], np.float32)) for k in range(volume.shape[0])])
    lung_air = body & (np.asarray(volume.hu) < AIR_HU)
    out: dict[str, str] = {}
    for name, label in drawn.items():
        mask = labels == label
        n = int(np.count_nonzero(mask))
        inside = np.count_nonzero(body[mask]) / n
        air = np.count_nonzero(lung_air[mask]) / n
        if inside < MIN_INSIDE:
            out[name] = f"only {inside:.0%} of it lies inside the body outline"
        elif name in LUNGS and air < MIN_LUNG_AIR:
            out[name] = (
                f"only {air:.0%} of it is lung air inside the body (at least {MIN_LUNG_AIR:.0%} expected)"
            )
    return out


def order_flags(volume: CTVolume, labels: npt.NDArray[np.uint8], label_of: dict[str, int]) -> dict[str, str]:
    """Flags for structures whose centre lies above one that must be above them."""
    z = {name: _centre_z(volume, labels == label) for name, label in label_of.items()}
    out: dict[str, str] = {}
    for upper, lower in ORDER:
        zu, zl = z.get(upper), z.get(lower)
        if zu is not None and zl is not None and zl > zu:
            out.setdefault(lower, f"centre lies above the {upper} centre: anatomically impossible")
    return out


def _centre_z(volume: CTVolume, mask: npt.NDArray[np.bool_]) -> float | None:
    per_slice = np.count_nonzero(mask, axis=(1, 2))
    total = int(per_slice.sum())
    if total == 0:
        return None
    k = float(np.dot(np.arange(per_slice.size), per_slice)) / total
    return float((volume.affine @ np.array([0.0, 0.0, k, 1.0]))[2])
