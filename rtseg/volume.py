"""Typed CT volumes and their geometry.

Conventions (used everywhere in rtseg):

* ``CTVolume.hu`` is indexed ``[k, j, i]``: slice ``k`` (sorted ascending along
  the slice normal), row ``j``, column ``i`` -- the order of the DICOM pixel
  data, stacked.
* ``CTVolume.affine`` maps the homogeneous index ``(i, j, k, 1)`` to patient
  coordinates in mm, DICOM LPS (+x patient left, +y posterior, +z head).
* The *canonical* orientation is what models see: an array indexed
  ``[z, y, x]`` whose axes run towards +S, +P and +L (a head-first-supine
  series sorted by ascending z). Every patient position (HFS, FFS, HFP, FFP,
  decubitus) maps to it by axis permutation and flips only, so geometry is
  exact and invertible.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from rtseg.errors import InputError

# Patient/study attributes a derived object (RTSTRUCT) copies from its CT.
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "StudyDescription",
    "AccessionNumber",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class SeriesInfo:
    """Identity of a CT series: what a derived RTSTRUCT must reference."""

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    sop_instance_uids: tuple[str, ...]  # in volume slice order k
    patient_position: str
    patient_study: Mapping[str, Any] = field(default_factory=dict)  # PATIENT_STUDY_KEYWORDS → value
    series_description: str = ""
    modality: str = "CT"
    # What the reviewer must know about how the series was read (e.g. an assumed PatientPosition):
    # carried into the RTSTRUCT's description and the job's flags.
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class CTVolume:
    """A CT series as one volume in Hounsfield units with its patient-space affine."""

    hu: npt.NDArray[np.floating[Any] | np.integer[Any]]
    affine: npt.NDArray[np.float64]
    info: SeriesInfo

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns)."""
        s = self.hu.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (slice, row, column) index axes."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)  # along i, j, k
        return (float(norms[2]), float(norms[1]), float(norms[0]))

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def slice_z(self, k: int) -> npt.NDArray[np.float64]:
        """Patient-space position of pixel (0, 0) of slice ``k``."""
        return np.asarray(self.affine @ np.array([0.0, 0.0, float(k), 1.0]))[:3]


@dataclass(frozen=True)
class Orientation:
    """Maps a volume's ``[k, j, i]`` array to canonical ``[z, y, x]`` and back.

    ``perm[a]`` is the volume array axis that becomes canonical axis ``a``;
    ``flip[a]`` says whether that axis is reversed.
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @classmethod
    def from_affine(cls, affine: npt.NDArray[np.float64], tolerance: float = 1e-3) -> Orientation:
        """Orientation of an axis-aligned affine; oblique geometry is refused."""
        direction = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
        # index axis i, j, k → array axis 2, 1, 0
        perm = [0, 0, 0]
        flip = [False, False, False]
        used: set[int] = set()
        for index_axis in range(3):
            column = direction[:, index_axis]
            patient_axis = int(np.argmax(np.abs(column)))
            if abs(abs(column[patient_axis]) - 1.0) > tolerance or patient_axis in used:
                raise InputError(
                    "image axes are not aligned with the patient axes (oblique or tilted geometry)"
                )
            used.add(patient_axis)
            canonical_axis = 2 - patient_axis  # patient x, y, z → canonical axis 2, 1, 0
            perm[canonical_axis] = 2 - index_axis
            flip[canonical_axis] = bool(column[patient_axis] < 0)
        return cls((perm[0], perm[1], perm[2]), (flip[0], flip[1], flip[2]))

    def to_canonical(self, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        out = np.transpose(array, self.perm)
        for axis, flipped in enumerate(self.flip):
            if flipped:
                out = np.flip(out, axis=axis)
        return np.ascontiguousarray(out)

    def from_canonical(self, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        out = array
        for axis, flipped in enumerate(self.flip):
            if flipped:
                out = np.flip(out, axis=axis)
        return np.ascontiguousarray(np.transpose(out, np.argsort(self.perm)))

    def canonical_spacing(self, volume_spacing: tuple[float, float, float]) -> tuple[float, float, float]:
        """Spacing (z, y, x) of the canonical array from the volume's (k, j, i) spacing."""
        return (
            volume_spacing[self.perm[0]],
            volume_spacing[self.perm[1]],
            volume_spacing[self.perm[2]],
        )


def affine_from_geometry(
    origin: npt.ArrayLike,
    row_direction: npt.ArrayLike,
    column_direction: npt.ArrayLike,
    pixel_spacing: tuple[float, float],
    slice_step: float,
) -> npt.NDArray[np.float64]:
    """Affine for index ``(i, j, k)`` from DICOM geometry.

    ``row_direction``/``column_direction`` are the two halves of
    ImageOrientationPatient; ``pixel_spacing`` is (row spacing, column spacing)
    as in PixelSpacing; ``slice_step`` is the signed distance between sorted
    slices along ``row × column``.
    """
    r = np.asarray(row_direction, dtype=np.float64)
    c = np.asarray(column_direction, dtype=np.float64)
    n = np.cross(r, c)
    affine = np.eye(4)
    affine[:3, 0] = r * float(pixel_spacing[1])
    affine[:3, 1] = c * float(pixel_spacing[0])
    affine[:3, 2] = n * float(slice_step)
    affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    return affine
