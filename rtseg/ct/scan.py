"""Pass 1: find the files, read their headers (no pixel data), choose the one CT series."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from rtseg.ct.header import (
    _DUPLICATE_MM,
    _ENHANCED_CT_SOP_CLASSES,
    READ_ERRORS,
    SeriesSummary,
    _floats,
    _Header,
    _position,
    check_deflated_file,
    read_error_text,
    series_uid_of,
    sop_uid_of,
)
from rtseg.errors import InputError
from rtseg.volume import PATIENT_STUDY_KEYWORDS

logger = logging.getLogger(__name__)


_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


# Every attribute read from a header; converted while reading, so that a
# corrupt value is reported as an unreadable file instead of failing later.
_HEADER_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "ImageType",
    "SeriesNumber",
    "SeriesDescription",
    "PatientPosition",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "GantryDetectorTilt",
    "SpacingBetweenSlices",
    "SliceThickness",
    "RescaleSlope",
    "RescaleIntercept",
    *PATIENT_STUDY_KEYWORDS,
)


_META_KEYWORDS = ("TransferSyntaxUID", "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID")


@dataclass(frozen=True)
class _Scan:
    """All DICOM headers found in a source."""

    label: str  # the folder or a short description of the file list, for messages
    explicit: bool  # True when the caller listed the files
    headers: tuple[_Header, ...]


def _scan(source: Path | Sequence[Path]) -> _Scan:
    if isinstance(source, str | os.PathLike):
        root = Path(source)
        if root.is_dir():
            return _scan_folder(root)
        if not root.exists():
            raise InputError("no such file or folder", source=str(root))
        return _scan_files([root])
    return _scan_files([Path(p) for p in source])


def _scan_folder(root: Path) -> _Scan:
    headers: list[_Header] = []
    skipped = 0
    for path in _walk(root):
        ds = _read_header(path, strict=False)
        if ds is None or _is_dicomdir(ds):
            skipped += 1
            continue
        headers.append(_checked_header(path, ds))
    if not headers:
        raise InputError("no DICOM files found in this folder", source=str(root))
    logger.debug("scanned folder: %d DICOM files, %d other files skipped", len(headers), skipped)
    return _Scan(label=str(root), explicit=False, headers=tuple(headers))


def _walk(root: Path) -> list[Path]:
    """Regular files under ``root``, hidden files and folders excluded, in a stable order."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths = (Path(folder) / f for f in sorted(files) if not f.startswith("."))
        found.extend(p for p in paths if p.is_file())  # no sockets, FIFOs or dangling links
    return found


def _scan_files(paths: list[Path]) -> _Scan:
    if not paths:
        raise InputError("no files given")
    headers: list[_Header] = []
    for path in paths:
        if not path.is_file():
            raise InputError("not a file", source=str(path))
        ds = _read_header(path, strict=True)
        assert ds is not None  # strict reading raises instead
        if not _is_dicomdir(ds):
            headers.append(_checked_header(path, ds))
    label = str(paths[0].parent) if len(paths) == 1 else f"{len(paths)} files in {paths[0].parent}"
    return _Scan(label=label, explicit=True, headers=tuple(headers))


def _read_header(path: Path, *, strict: bool) -> Dataset | None:
    """The header of ``path`` without pixel data.

    A file without the DICOM preamble is skipped (``None``) in a folder scan
    and refused when listed explicitly; a file that claims to be DICOM but
    cannot be parsed is always refused.
    """
    try:
        check_deflated_file(path)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in _HEADER_KEYWORDS:
            ds.get(keyword)
        for keyword in _META_KEYWORDS:
            ds.file_meta.get(keyword)
        return ds
    except InvalidDicomError as exc:
        if not strict:
            return None
        raise InputError("not a DICOM file (no DICM preamble)", source=str(path)) from exc
    except OSError as exc:
        raise InputError(f"cannot read the file ({exc.strerror or exc})", source=str(path)) from exc
    except READ_ERRORS as exc:
        raise InputError(read_error_text(exc), source=str(path)) from exc


def _is_dicomdir(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    media_class = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
    return _DICOMDIR_SOP_CLASS in (media_class, str(ds.get("SOPClassUID", "")))


def _checked_header(path: Path, ds: Dataset) -> _Header:
    """A header with the identifiers grouping needs (a truncated file often lacks them)."""
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if not sop_uid_of(ds, keyword):
            raise InputError(
                f"incomplete or truncated DICOM file (no {keyword}, in the data set or the file meta)",
                source=str(path),
            )
    if not series_uid_of(ds):
        raise InputError(
            "incomplete or truncated DICOM file (no SeriesInstanceUID, and no FrameOfReferenceUID "
            "to group the slice by)",
            source=str(path),
        )
    return _Header(path, ds)


def _groups(scan: _Scan) -> dict[str, list[_Header]]:
    """Headers by SeriesInstanceUID, CT image series first, then by SeriesNumber."""
    groups: dict[str, list[_Header]] = {}
    for header in scan.headers:
        groups.setdefault(header.series_uid, []).append(header)

    def order(item: tuple[str, list[_Header]]) -> tuple[bool, float, str]:
        first = item[1][0]
        number = first.ds.get("SeriesNumber")
        try:
            series_number = float(number) if number not in (None, "") else float("inf")
        except (TypeError, ValueError):
            series_number = float("inf")
        return (not (first.is_image and first.is_ct), series_number, item[0])

    return dict(sorted(groups.items(), key=order))


def _summary(group: Sequence[_Header]) -> SeriesSummary:
    first = group[0]
    return SeriesSummary(
        series_uid=first.series_uid,
        modality=first.modality,
        description=str(first.ds.get("SeriesDescription", "") or ""),
        n_files=len(group),
        files=tuple(h.path for h in group),
        sop_class_uid=first.sop_class,
    )


def _select_series(scan: _Scan, series_uid: str | None) -> list[_Header]:
    """The image headers (scouts removed) of the one series to load."""
    groups = _groups(scan)
    images = {uid: [h for h in g if h.is_image and not h.is_localizer] for uid, g in groups.items()}
    images = {uid: g for uid, g in images.items() if g}
    if series_uid is not None:
        uid = _match_uid(series_uid, groups, scan.label)
        if uid not in images:
            what = "only scout images" if groups[uid][0].is_image else groups[uid][0].modality
            raise InputError(f"series {_short(uid)} holds {what}, not a CT image series", source=scan.label)
        chosen = images[uid]
    else:
        chosen = _only_ct_series(scan, groups, images)
    ct = [h for h in chosen if h.is_ct]
    if not ct:
        raise InputError(
            f"series {_short(chosen[0].series_uid)} is {chosen[0].modality}, not CT", source=scan.label
        )
    if len(ct) < len(chosen):
        logger.debug("ignored %d non-CT images inside the CT series", len(chosen) - len(ct))
    _check_single_frame(ct, scan.label)
    return ct


def _only_ct_series(
    scan: _Scan, groups: dict[str, list[_Header]], images: dict[str, list[_Header]]
) -> list[_Header]:
    if scan.explicit and len(images) > 1:
        raise InputError(
            f"the given files belong to {len(images)} different image series: "
            f"{_describe(images)}; pass the files of one series",
            source=scan.label,
        )
    ct = {uid: g for uid, g in images.items() if any(h.is_ct for h in g)}
    if len(ct) > 1:
        raise InputError(
            f"found {len(ct)} CT series: {_describe(ct)}; choose one with --series UID"
            " (the tail shown will do)",
            source=scan.label,
        )
    if ct:
        return next(iter(ct.values()))
    if len(images) == 1:
        return next(iter(images.values()))
    raise InputError(f"no CT image series found (found: {_inventory(groups)})", source=scan.label)


def _match_uid(series_uid: str, groups: dict[str, list[_Header]], label: str) -> str:
    """The full UID for ``series_uid``: exact, or a unique tail as printed by :func:`_short`."""
    if series_uid in groups:
        return series_uid
    tail = series_uid.lstrip("…").lstrip(".")
    matches = [uid for uid in groups if len(tail) >= 6 and uid.endswith(tail)]
    if len(matches) == 1:
        return matches[0]
    listing = "; ".join(f"{_short(uid)} ({g[0].modality}, {len(g)} files)" for uid, g in groups.items())
    raise InputError(f"series {series_uid} not found; available: {listing}", source=label)


def _check_single_frame(headers: Sequence[_Header], label: str) -> None:
    if any(h.sop_class in _ENHANCED_CT_SOP_CLASSES for h in headers):
        raise InputError(
            "enhanced (multi-frame) CT is not supported; export the series as CT Image Storage",
            source=label,
        )
    for header in headers:
        if header.ds.get("NumberOfFrames") not in (None, ""):
            frames = int(_floats(header, "NumberOfFrames", 1)[0])
            if frames > 1:
                raise InputError(
                    f"multi-frame image ({frames} frames) is not supported", source=str(header.path)
                )


def _deduplicate(headers: Sequence[_Header]) -> list[_Header]:
    """Drop extra copies of the same SOP instance (same SOPInstanceUID, same position)."""
    kept: dict[str, _Header] = {}
    for header in headers:
        uid = header.sop_uid
        if not uid:
            raise InputError("image has no SOPInstanceUID", source=str(header.path))
        other = kept.get(uid)
        if other is None:
            kept[uid] = header
        elif not np.allclose(_position(other), _position(header), atol=_DUPLICATE_MM):
            raise InputError(
                f"two files carry the same SOPInstanceUID at different positions: {other.path.name}, "
                f"{header.path.name}",
                source=str(header.path.parent),
            )
    if len(kept) < len(headers):
        logger.debug("ignored %d duplicate copies of slices", len(headers) - len(kept))
    return list(kept.values())


def _describe(groups: dict[str, list[_Header]]) -> str:
    return "; ".join(
        f"{_short(uid)} '{g[0].ds.get('SeriesDescription', '') or ''}' ({len(g)} files)"
        for uid, g in groups.items()
    )


def _inventory(groups: dict[str, list[_Header]]) -> str:
    counts: Counter[str] = Counter()
    for group in groups.values():
        scouts = sum(h.is_image and h.is_localizer for h in group)
        if scouts:
            counts[f"{group[0].modality} scout"] += 1
        if scouts < len(group):
            counts[group[0].modality] += 1
    return ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))


def _short(uid: str) -> str:
    return uid if len(uid) <= 14 else "…" + uid[-12:]
