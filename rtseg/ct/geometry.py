"""The geometry of the chosen slices: one axial stack, evenly spaced, untilted; its affine and series info."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from rtseg.ct.header import _DUPLICATE_MM, _derived_uid, _floats, _Header, _position
from rtseg.errors import InputError
from rtseg.volume import PATIENT_STUDY_KEYWORDS, SeriesInfo, affine_from_geometry

# Geometry tolerances. DS values carry ~6 significant digits, so positions are
# good to ~0.005 mm and direction cosines to ~1e-6.
_COSINE_TOLERANCE = 1e-4  # |component| of an axis-aligned unit vector ≥ 1 - this (~0.8°)


_GAP_RELATIVE = 0.01  # slice gaps may differ by 1 % of the step ...


_GAP_ABSOLUTE_MM = 0.01  # ... or 0.01 mm, whichever is larger


_TILT_DEGREES = 0.01


# Patient position from the image column direction (towards the table): what ImageOrientationPatient
# tells; head- or feet-first it cannot tell, as scanners differ in the row direction they write.
_FACING = {
    (1, 1.0): ("S", "supine"),
    (1, -1.0): ("P", "prone"),
    (0, 1.0): ("DL", "decubitus left"),
    (0, -1.0): ("DR", "decubitus right"),
}


@dataclass(frozen=True)
class _Geometry:
    """A checked, sorted axial stack."""

    slices: tuple[_Header, ...]  # sorted ascending along the normal
    row_dir: npt.NDArray[np.float64]
    col_dir: npt.NDArray[np.float64]
    pixel_spacing: tuple[float, float]
    step: float
    rows: int
    columns: int


def _geometry(headers: list[_Header], min_slices: int, label: str) -> _Geometry:
    if len(headers) < min_slices:
        raise InputError(
            f"the CT series has {len(headers)} slice(s); at least {min_slices} are needed "
            "(send the complete series)",
            source=label,
        )
    first = _check_consistent(headers)
    _check_tilt(headers)
    row_dir, col_dir = _axial_directions(first)
    normal = np.cross(row_dir, col_dir)
    positions = np.array([_position(h) for h in headers])
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    positions, distance = positions[order], distance[order]
    slices = tuple(headers[k] for k in order)
    spacing = _floats(first, "PixelSpacing", 2)
    _check_collinear(positions, normal, float(min(spacing)), label)
    step = _slice_step(distance, slices, first, label)
    return _Geometry(
        slices=slices,
        row_dir=row_dir,
        col_dir=col_dir,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        step=step,
        rows=int(first.ds.Rows),
        columns=int(first.ds.Columns),
    )


def _check_consistent(headers: Sequence[_Header]) -> _Header:
    """Every slice shares frame of reference, orientation, spacing and matrix; returns a typical slice.

    The typical slice is one of the most common kind, so the odd one out is
    the slice named in the error.
    """
    signatures = [_signature(h) for h in headers]
    common = Counter(signatures).most_common(1)[0][0]
    reference = headers[signatures.index(common)]
    for header, signature in zip(headers, signatures, strict=True):
        if signature != common:
            raise InputError(_mismatch(header, reference), source=str(header.path))
    return reference


def _signature(header: _Header) -> tuple[object, ...]:
    """What must be equal between slices (also checks that each attribute is present)."""
    _position(header)
    rows, columns = (int(_floats(header, keyword, 1)[0]) for keyword in ("Rows", "Columns"))
    if rows < 1 or columns < 1:
        raise InputError(f"slice has an empty image ({rows}x{columns})", source=str(header.path))
    spacing = _floats(header, "PixelSpacing", 2)
    if np.any(spacing <= 0):
        raise InputError(f"PixelSpacing must be positive, got {_fmt(spacing)}", source=str(header.path))
    return (
        _frame_of_reference(header),
        rows,
        columns,
        tuple(np.round(_floats(header, "ImageOrientationPatient", 6), 4)),
        tuple(np.round(spacing, 4)),
    )


def _mismatch(header: _Header, reference: _Header) -> str:
    name = reference.path.name
    if _frame_of_reference(header) != _frame_of_reference(reference):
        return "the slices are in different frames of reference (FrameOfReferenceUID differs)"
    for keyword, count in (("ImageOrientationPatient", 6), ("PixelSpacing", 2)):
        here, there = _floats(header, keyword, count), _floats(reference, keyword, count)
        if not np.array_equal(np.round(here, 4), np.round(there, 4)):
            return f"{keyword} differs between slices ({_fmt(here)} here, {_fmt(there)} in {name})"
    return (
        f"image size differs between slices ({header.ds.Rows}x{header.ds.Columns} here, "
        f"{reference.ds.Rows}x{reference.ds.Columns} in {name})"
    )


def _frame_of_reference(header: _Header) -> str:
    frame = str(header.ds.get("FrameOfReferenceUID", "") or "")
    if not frame:
        raise InputError(
            "slice has no FrameOfReferenceUID: contours cannot be placed without it; send the series "
            "as the scanner or PACS exported it (an anonymiser may have removed it)",
            source=str(header.path),
        )
    return frame


def _check_tilt(headers: Sequence[_Header]) -> None:
    for header in headers:
        tilt = header.ds.get("GantryDetectorTilt")
        if tilt in (None, ""):
            continue
        try:
            degrees = float(tilt)
        except (TypeError, ValueError) as exc:
            raise InputError(f"GantryDetectorTilt is not numeric: {tilt!r}", source=str(header.path)) from exc
        if abs(degrees) > _TILT_DEGREES:
            raise InputError(_tilt_message(f"gantry tilt {degrees:g}°"), source=str(header.path))


def _tilt_message(what: str) -> str:
    return (
        f"tilted/sheared stack: {what}; rtseg needs an untilted axial series: resample the series "
        "to an axial stack (e.g. dcm2niix, which corrects gantry tilt) or send an untilted reconstruction"
    )


def _axial_directions(header: _Header) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Row and column directions, checked to be axis-aligned with a normal along patient z."""
    iop = _floats(header, "ImageOrientationPatient", 6)
    row, col = iop[:3], iop[3:]
    source = str(header.path)
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise InputError(
            f"ImageOrientationPatient {_fmt(iop)} is not two orthogonal unit vectors", source=source
        )
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    axis = int(np.argmax(np.abs(normal)))
    aligned = all(np.max(np.abs(v)) >= 1 - _COSINE_TOLERANCE for v in (row, col))
    tilt = _tilt_from_orientation(row, col)
    if tilt is not None:
        raise InputError(
            f"non-axial stack: the slices are tilted {tilt:.1f}° about the left-right axis (gantry tilt "
            f"or an oblique reconstruction; ImageOrientationPatient {_fmt(iop)}); resample the series to "
            "an axial stack (e.g. dcm2niix, which corrects gantry tilt) or send an untilted reconstruction",
            source=source,
        )
    if not aligned or abs(normal[axis]) < 1 - _COSINE_TOLERANCE:
        raise InputError(
            f"non-axial stack: the image orientation is oblique (ImageOrientationPatient {_fmt(iop)}); "
            "rtseg needs axial slices with rows and columns along the patient axes: "
            "send the axial reconstruction of the scan",
            source=source,
        )
    if axis != 2:
        plane = "sagittal" if axis == 0 else "coronal"
        raise InputError(
            f"non-axial stack: the slices are {plane} (ImageOrientationPatient {_fmt(iop)}); "
            "rtseg needs an axial CT series: send the axial reconstruction of the scan",
            source=source,
        )
    return row, col


def _tilt_from_orientation(row: npt.NDArray[np.float64], col: npt.NDArray[np.float64]) -> float | None:
    """The gantry tilt in degrees where the rows run along x and the columns lean out of the axial plane.

    A tilted gantry leaves the rows along the patient's x axis and turns the
    columns about it, so the column direction is (0, cos t, ±sin t).
    """
    if abs(abs(row[0]) - 1) > _COSINE_TOLERANCE or abs(col[0]) > _COSINE_TOLERANCE:
        return None
    degrees = float(np.degrees(np.arcsin(min(abs(col[2]), 1.0))))
    return degrees if _TILT_DEGREES < degrees < 45 else None


def _check_collinear(
    positions: npt.NDArray[np.float64], normal: npt.NDArray[np.float64], pixel: float, label: str
) -> None:
    """All slice origins lie on one line along the normal (no gantry tilt or shear)."""
    offsets = positions - positions[0]
    sideways = offsets - np.outer(offsets @ normal, normal)
    drift = float(np.max(np.linalg.norm(sideways, axis=1)))
    if drift > max(0.02, 0.02 * pixel):
        raise InputError(
            _tilt_message(
                f"slice positions shift sideways by up to {drift:.2f} mm across the series (gantry tilt?)"
            ),
            source=label,
        )


def _slice_step(
    distance: npt.NDArray[np.float64], slices: Sequence[_Header], first: _Header, label: str
) -> float:
    """The regular slice step; refuses duplicate, missing and unevenly spaced slices."""
    if len(distance) == 1:
        return _nominal_step(first)
    gaps = np.diff(distance)
    duplicates = np.flatnonzero(gaps < _DUPLICATE_MM)
    if duplicates.size:
        k = int(duplicates[0])
        raise InputError(
            f"duplicate slices: {slices[k].path.name} and {slices[k + 1].path.name} are different "
            f"images at the same position (z = {_z(slices[k])} mm); {duplicates.size} such pair(s)",
            source=label,
        )
    base = float(gaps.min())
    tolerance = max(_GAP_RELATIVE * base, _GAP_ABSOLUTE_MM)
    multiples = np.rint(gaps / base)
    regular = np.abs(gaps - multiples * base) <= tolerance
    missing = np.flatnonzero(regular & (multiples >= 2))
    uneven = np.flatnonzero(~regular)
    if uneven.size:
        k = int(uneven[0])
        raise InputError(
            f"uneven slice spacing: gap of {gaps[k]:.3f} mm between z = {_z(slices[k])} and "
            f"z = {_z(slices[k + 1])} mm, while the smallest gap is {base:.3f} mm "
            f"({uneven.size} irregular gap(s)); rtseg needs evenly spaced slices",
            source=label,
        )
    if missing.size:
        where = ", ".join(
            f"{int(multiples[k]) - 1} between z = {_z(slices[k])} and z = {_z(slices[k + 1])} mm"
            for k in missing[:5]
        )
        total = int(np.sum(multiples[missing] - 1))
        raise InputError(
            f"missing slices: {total} slice(s) missing at a regular step of {base:.3f} mm ({where})",
            source=label,
        )
    step = float(distance[-1] - distance[0]) / (len(distance) - 1)
    drift = float(np.max(np.abs(distance - distance[0] - step * np.arange(len(distance)))))
    if drift > tolerance:
        raise InputError(
            f"uneven slice spacing: slice positions deviate up to {drift:.3f} mm from a regular "
            f"{step:.3f} mm grid",
            source=label,
        )
    return step


def _nominal_step(header: _Header) -> float:
    """Slice step of a single-slice series: SpacingBetweenSlices, else SliceThickness, else 1 mm."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        if header.ds.get(keyword) not in (None, ""):
            value = float(_floats(header, keyword, 1)[0])
            if value > 0:
                return value
    return 1.0


def _affine(geometry: _Geometry) -> npt.NDArray[np.float64]:
    return affine_from_geometry(
        _position(geometry.slices[0]),
        geometry.row_dir,
        geometry.col_dir,
        geometry.pixel_spacing,
        geometry.step,
    )


def _series_info(geometry: _Geometry) -> SeriesInfo:
    first = geometry.slices[0].ds
    position, notes = _patient_position(geometry)
    study, study_notes = _study_uid(geometry.slices[0])
    return SeriesInfo(
        study_instance_uid=study,
        series_instance_uid=geometry.slices[0].series_uid,
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        sop_class_uid=geometry.slices[0].sop_class,
        sop_instance_uids=tuple(h.sop_uid for h in geometry.slices),
        patient_position=position,
        patient_study={kw: first.get(kw) for kw in PATIENT_STUDY_KEYWORDS if kw in first},
        series_description=str(first.get("SeriesDescription", "") or ""),
        modality=str(first.get("Modality", "CT") or "CT"),
        notes=(*notes, *study_notes, *_series_notes(geometry.slices[0])),
    )


def _study_uid(header: _Header) -> tuple[str, tuple[str, ...]]:
    """StudyInstanceUID, else one derived from the series (an RTSTRUCT must name a study), with a note."""
    study = str(header.ds.get("StudyInstanceUID", "") or "").strip()
    if study:
        return study, ()
    note = "StudyInstanceUID empty in the CT: the RTSTRUCT names a study derived from the series"
    return _derived_uid("study", header.series_uid), (note,)


def _series_notes(header: _Header) -> tuple[str, ...]:
    if str(header.ds.get("SeriesInstanceUID", "") or "").strip():
        return ()
    return (
        "SeriesInstanceUID empty in the CT: slices grouped by frame of reference and series number; "
        "the RTSTRUCT references a derived series UID, so a TPS may not link it to this CT",
    )


def _patient_position(geometry: _Geometry) -> tuple[str, tuple[str, ...]]:
    """PatientPosition as written, else from the column direction with head-first assumed, and a note.

    Only a label: rtseg's geometry comes from ImagePositionPatient and
    ImageOrientationPatient, so an assumed value changes no contour; the note
    tells the reviewer it was assumed.
    """
    stated = str(geometry.slices[0].ds.get("PatientPosition", "") or "").strip().upper()
    if stated:
        return stated, ()
    axis = int(np.argmax(np.abs(geometry.col_dir)))
    code, facing = _FACING[(axis, float(np.sign(geometry.col_dir[axis])))]
    position = f"HF{code}"
    note = (
        f"PatientPosition empty: {position} assumed ({facing} from ImageOrientationPatient, head-first "
        "assumed: feet-first cannot be told from it); the contours follow the image positions, not it"
    )
    return position, (note,)


def _z(header: _Header) -> str:
    return f"{float(_position(header)[2]):.2f}"


def _fmt(values: npt.NDArray[np.float64]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
