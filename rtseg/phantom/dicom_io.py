"""Write a canonical CT array as a DICOM CT Image series in any patient position.

The array is given in rtseg's canonical orientation (``[z, y, x]`` towards +S,
+P, +L; see :mod:`rtseg.volume`). The writer lays it out as a scanner would for
the chosen PatientPosition (HFS, FFS, HFP, FFP): ImageOrientationPatient,
ImagePositionPatient and the pixel order are derived from one table, so the
patient-space geometry is identical whatever the position.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian

from rtseg.volume import PATIENT_STUDY_KEYWORDS, CTVolume, Orientation, SeriesInfo, affine_from_geometry

# Row direction (increasing column index) and column direction (increasing row
# index) in patient LPS for each supported position, as scanners write them.
POSITION_AXES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "HFS": ((1, 0, 0), (0, 1, 0)),
    "FFS": ((-1, 0, 0), (0, 1, 0)),
    "HFP": ((-1, 0, 0), (0, -1, 0)),
    "FFP": ((1, 0, 0), (0, -1, 0)),
}


def deterministic_uid(*parts: object) -> str:
    """A UID under the 2.25 root derived from ``parts`` (same parts, same UID)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


@dataclass(frozen=True)
class SeriesSpec:
    """What identifies and describes a written series (everything but pixels)."""

    uid_seed: str
    patient_position: str = "HFS"
    patient_name: str = "PHANTOM^CASE"
    patient_id: str = "PHANTOM-0"
    patient_birth_date: str = "20150101"
    patient_sex: str = "O"
    patient_age: str = "010Y"
    study_date: str = "20260101"
    study_time: str = "090000"
    series_description: str = "Abdomen 3.0 phantom"
    manufacturer: str = "rtseg phantom"
    convolution_kernel: str = "STANDARD"
    kvp: float = 100.0
    slice_thickness: float | None = None  # defaults to the slice spacing
    rescale_intercept: float = -1024.0
    signed_pixels: bool = False
    descending_acquisition: bool = True  # InstanceNumber runs head → feet
    extra: Mapping[str, Any] = field(default_factory=dict)  # keyword → value added to every slice


def _uids(spec: SeriesSpec) -> dict[str, str]:
    return {
        "study": deterministic_uid(spec.uid_seed, "study"),
        "series": deterministic_uid(spec.uid_seed, "series"),
        "frame": deterministic_uid(spec.uid_seed, "frame"),
    }


def _slice_layout(
    shape_zyx: tuple[int, int, int],
    spacing_zyx: tuple[float, float, float],
    origin_lps: npt.ArrayLike,
    position: str,
) -> tuple[Orientation, npt.NDArray[np.float64]]:
    """Orientation and affine of the stored volume (loader convention) for ``position``."""
    if position not in POSITION_AXES:
        raise ValueError(f"unsupported patient position {position!r}")
    row_dir, col_dir = (np.array(a, dtype=float) for a in POSITION_AXES[position])
    normal = np.cross(row_dir, col_dir)
    nz, ny, nx = shape_zyx
    sz, sy, sx = spacing_zyx
    origin = np.asarray(origin_lps, dtype=float)
    extent = np.array([(nx - 1) * sx, (ny - 1) * sy, (nz - 1) * sz])
    # The first stored pixel sits at the canonical corner the directions start from.
    corner = origin.copy()
    for axis, direction in ((0, row_dir), (1, col_dir), (2, normal)):
        if direction[axis] < 0:
            corner[axis] += extent[axis]
    pixel_spacing = (sy, sx)  # rows step along y, columns along x for all four positions
    affine = affine_from_geometry(corner, row_dir, col_dir, pixel_spacing, sz)
    return Orientation.from_affine(affine), affine


def write_ct_series(
    hu_zyx: npt.NDArray[Any],
    spacing_zyx: tuple[float, float, float],
    origin_lps: npt.ArrayLike,
    out_dir: Path,
    spec: SeriesSpec,
) -> CTVolume:
    """Write ``hu_zyx`` (canonical) as one DICOM file per slice into ``out_dir``.

    Returns the :class:`CTVolume` a correct loader must produce from the files:
    array ``[k, j, i]`` sorted ascending along the slice normal and its affine.
    ``origin_lps`` is the patient position of canonical voxel ``[0, 0, 0]``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    orientation, affine = _slice_layout(hu_zyx.shape, spacing_zyx, origin_lps, spec.patient_position)
    stored = orientation.from_canonical(np.asarray(hu_zyx))
    uids = _uids(spec)
    n_slices = stored.shape[0]
    sop_uids = tuple(deterministic_uid(spec.uid_seed, "slice", k) for k in range(n_slices))
    base = _base_dataset(spec, uids, affine, stored.shape, spacing_zyx)
    order = list(range(n_slices))
    # Acquisition order: InstanceNumber follows table travel, not the sort order.
    z_of = [float((affine @ np.array([0, 0, k, 1.0]))[2]) for k in order]
    order.sort(key=lambda k: z_of[k], reverse=spec.descending_acquisition)
    for instance, k in enumerate(order, start=1):
        ds = _slice_dataset(base, spec, stored[k], affine, k, instance, sop_uids[k])
        # File names are opaque and deliberately not in slice order.
        name = hashlib.sha256(sop_uids[k].encode()).hexdigest()[:16] + ".dcm"
        ds.save_as(out_dir / name, enforce_file_format=True)
    info = SeriesInfo(
        study_instance_uid=uids["study"],
        series_instance_uid=uids["series"],
        frame_of_reference_uid=uids["frame"],
        sop_class_uid=str(CTImageStorage),
        sop_instance_uids=sop_uids,
        patient_position=spec.patient_position,
        patient_study={kw: base.get(kw) for kw in PATIENT_STUDY_KEYWORDS if kw in base},
        series_description=spec.series_description,
    )
    return CTVolume(hu=representable_hu(stored, spec), affine=affine, info=info)


def representable_hu(hu: npt.NDArray[Any], spec: SeriesSpec) -> npt.NDArray[np.int16]:
    """The HU a reader gets back: rounded and clipped to what the stored pixel type can hold."""
    info = np.iinfo(np.int16 if spec.signed_pixels else np.uint16)
    stored = np.clip(np.rint(np.asarray(hu, dtype=np.float64) - spec.rescale_intercept), info.min, info.max)
    return (stored + spec.rescale_intercept).astype(np.int16)


def _base_dataset(
    spec: SeriesSpec,
    uids: Mapping[str, str],
    affine: npt.NDArray[np.float64],
    shape: tuple[int, ...],
    spacing_zyx: tuple[float, float, float],
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = spec.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = spec.study_time
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = spec.manufacturer
    ds.InstitutionName = "rtseg synthetic cohort"
    ds.ReferringPhysicianName = ""
    ds.StationName = "PHANTOM"
    ds.StudyDescription = "Pediatric abdomen (synthetic)"
    ds.SeriesDescription = spec.series_description
    ds.ManufacturerModelName = "rtseg-phantom"
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.patient_birth_date
    ds.PatientSex = spec.patient_sex
    ds.PatientAge = spec.patient_age
    ds.BodyPartExamined = "ABDOMEN"
    ds.SliceThickness = _ds(spec.slice_thickness or spacing_zyx[0])
    ds.KVP = _ds(spec.kvp)
    ds.ConvolutionKernel = spec.convolution_kernel
    ds.PatientPosition = spec.patient_position
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = ""
    row_dir = affine[:3, 0] / np.linalg.norm(affine[:3, 0])
    col_dir = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
    ds.PixelSpacing = [_ds(spacing_zyx[1]), _ds(spacing_zyx[2])]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(shape[1]), int(shape[2])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if spec.signed_pixels else 0
    ds.RescaleIntercept = _ds(spec.rescale_intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    for keyword, value in spec.extra.items():
        setattr(ds, keyword, value)
    return ds


def _slice_dataset(
    base: Dataset,
    spec: SeriesSpec,
    pixels_hu: npt.NDArray[Any],
    affine: npt.NDArray[np.float64],
    k: int,
    instance: int,
    sop_uid: str,
) -> Dataset:
    ds = Dataset()
    ds.update(base)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance
    position = (affine @ np.array([0.0, 0.0, float(k), 1.0]))[:3]
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.SliceLocation = _ds(position[2])
    dtype = np.int16 if spec.signed_pixels else np.uint16
    stored = representable_hu(pixels_hu, spec).astype(np.int32) - int(spec.rescale_intercept)
    ds.PixelData = stored.astype(dtype).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def _ds(value: float) -> str:
    """A DS string of at most 16 characters."""
    text = f"{float(value):.6g}"
    return text if len(text) <= 16 else f"{float(value):.8e}"[:16]
