"""Load a DICOM CT series (a folder or a list of files) into a :class:`~rtseg.volume.CTVolume`.

Two passes keep a 300-800 slice series fast and small in memory:

1. every candidate file's header is parsed once, without its pixel data; the files
   are grouped by SeriesInstanceUID, non-image objects (RTDOSE, RTSTRUCT, SR ...)
   and scouts are set aside, one CT series is chosen and its geometry checked;
2. the chosen slices are read in sorted order, decoded once each (native or
   compressed, through pydicom's pixel handlers) and written into a
   preallocated volume in Hounsfield units.

Every problem with the input is raised as :class:`~rtseg.errors.InputError`
naming the file or folder. Logs carry counts, shortened UIDs and timings only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from rtseg.errors import InputError, TooLargeError
from rtseg.privacy import uid_key
from rtseg.volume import PATIENT_STUDY_KEYWORDS, CTVolume, SeriesInfo, affine_from_geometry

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_ENHANCED_CT_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"})
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_NON_IMAGE_MODALITIES = frozenset(
    {"RTDOSE", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "KO", "PR", "SEG", "REG", "RWV", "DOC", "PLAN"}
)
_NON_IMAGE_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.481.", "1.2.840.10008.5.1.4.1.1.88.")

# Geometry tolerances. DS values carry ~6 significant digits, so positions are
# good to ~0.005 mm and direction cosines to ~1e-6.
_COSINE_TOLERANCE = 1e-4  # |component| of an axis-aligned unit vector ≥ 1 - this (~0.8°)
_GAP_RELATIVE = 0.01  # slice gaps may differ by 1 % of the step ...
_GAP_ABSOLUTE_MM = 0.01  # ... or 0.01 mm, whichever is larger
_DUPLICATE_MM = 0.01  # two slices closer than this are at the same position
_TILT_DEGREES = 0.01
_READ_ERRORS = (
    InvalidDicomError,
    NotImplementedError,
    OSError,
    EOFError,
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    struct.error,
    zlib.error,
    BytesLengthException,
)
# What pydicom and its plugins raise for pixel data they cannot decode.
_DECODE_ERRORS = (*_READ_ERRORS, RuntimeError, IndexError)
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
_PIXEL_SIZE_KEYWORDS = ["Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated"]
_INFLATE_STEP = 1 << 20  # bytes inflated (and dropped) at a time while measuring a Deflate stream
# Fewest slices of a volume to segment: the node's default selection (Selection.slice_count)
# skips shorter series too; a shorter "series" is a partial send or a test scan, not a planning CT.
MIN_SLICES = 10
# The data set's SOP UIDs, and the file meta elements that stand in for them where a
# writer (anonymisers, some PET/CT exports) left the data set's empty (PS3.10 7.1).
_META_FALLBACK = {"SOPClassUID": "MediaStorageSOPClassUID", "SOPInstanceUID": "MediaStorageSOPInstanceUID"}
# Patient position from the image column direction (towards the table): what ImageOrientationPatient
# tells; head- or feet-first it cannot tell, as scanners differ in the row direction they write.
_FACING = {
    (1, 1.0): ("S", "supine"),
    (1, -1.0): ("P", "prone"),
    (0, 1.0): ("DL", "decubitus left"),
    (0, -1.0): ("DR", "decubitus right"),
}


@dataclass(frozen=True)
class SeriesSummary:
    """One series found in a folder or file list (no patient data)."""

    series_uid: str
    modality: str
    description: str
    n_files: int
    files: tuple[Path, ...]
    sop_class_uid: str


@dataclass(frozen=True)
class _Header:
    """The parsed header (no pixel data) of one file."""

    path: Path
    ds: Dataset

    @property
    def series_uid(self) -> str:
        return series_uid_of(self.ds)

    @property
    def sop_uid(self) -> str:
        return sop_uid_of(self.ds, "SOPInstanceUID")

    @property
    def modality(self) -> str:
        return str(self.ds.get("Modality", "") or "").upper() or "unknown modality"

    @property
    def sop_class(self) -> str:
        return sop_uid_of(self.ds, "SOPClassUID")

    @property
    def is_image(self) -> bool:
        """True for image objects (CT, MR, PT, ...), False for RTDOSE, RTSTRUCT, SR and the like."""
        if self.modality in _NON_IMAGE_MODALITIES or self.sop_class.startswith(_NON_IMAGE_SOP_PREFIXES):
            return False
        return self.is_ct or ("Rows" in self.ds and "Columns" in self.ds)

    @property
    def is_ct(self) -> bool:
        return self.sop_class == CT_IMAGE_STORAGE or self.sop_class in _ENHANCED_CT_SOP_CLASSES

    @property
    def is_localizer(self) -> bool:
        image_type = self.ds.get("ImageType", [])
        values = [image_type] if isinstance(image_type, str) else list(image_type or [])
        return any(str(v).strip().upper() == "LOCALIZER" for v in values)


@dataclass(frozen=True)
class _Scan:
    """All DICOM headers found in a source."""

    label: str  # the folder or a short description of the file list, for messages
    explicit: bool  # True when the caller listed the files
    headers: tuple[_Header, ...]


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


# ---------------------------------------------------------------------------
# public API


def find_series(source: Path | Sequence[Path]) -> list[SeriesSummary]:
    """Group the DICOM files of a folder or file list by SeriesInstanceUID.

    Parameters
    ----------
    source
        A folder (searched recursively; hidden files and files that are not
        DICOM are skipped) or an explicit list of DICOM files.

    Returns
    -------
    list[SeriesSummary]
        Every series found, image or not (RTDOSE, RTSTRUCT, ...), CT first,
        then by SeriesNumber.

    Raises
    ------
    InputError
        The source does not exist, holds no DICOM file, or a listed file is
        not a readable DICOM file.
    """
    return [_summary(group) for group in _groups(_scan(source)).values()]


def load_series(
    source: Path | Sequence[Path],
    *,
    series_uid: str | None = None,
    min_slices: int = MIN_SLICES,
) -> CTVolume:
    """Load one axial CT series as a volume in Hounsfield units.

    Parameters
    ----------
    source
        A folder (searched recursively) or an explicit list of files of one series.
        Non-image objects (RTDOSE, RTSTRUCT, RTPLAN, SR, ...) and scouts
        (ImageType LOCALIZER) are ignored.
    series_uid
        The SeriesInstanceUID to load (or a unique tail of it, as shown in error
        messages); required when the source holds more than one CT series.
    min_slices
        Fewest slices accepted (default :data:`MIN_SLICES`).

    Returns
    -------
    CTVolume
        ``hu[k, j, i]`` with slices sorted ascending along the slice normal
        (int16 when every slope is 1 and every intercept integral, else
        float32), the affine of that layout and the series identity. An empty
        or missing PatientPosition is taken from ImageOrientationPatient
        (supine, prone or decubitus; head-first assumed) and noted in
        ``info.notes`` for the reviewer; geometry never depends on it.

    Raises
    ------
    InputError
        With a message saying what is wrong and ``source`` naming the file or
        folder: no or several CT series, a non-CT series, unreadable files,
        inconsistent, tilted, non-axial, duplicated, missing or unevenly
        spaced slices, too few slices, undecodable pixel data.
    """
    if min_slices < 1:
        raise ValueError("min_slices must be at least 1")
    started = time.perf_counter()
    scan = _scan(source)
    headers = _select_series(scan, series_uid)
    geometry = _geometry(_deduplicate(headers), min_slices, scan.label)
    scanned = time.perf_counter()
    hu = _read_volume(geometry)
    volume = CTVolume(hu=hu, affine=_affine(geometry), info=_series_info(geometry))
    logger.info(
        "loaded CT series key %s: %d slices of %dx%d, %s, headers %.2f s, pixels %.2f s",
        uid_key(volume.info.series_instance_uid),
        volume.shape[0],
        geometry.rows,
        geometry.columns,
        hu.dtype,
        scanned - started,
        time.perf_counter() - scanned,
    )
    return volume


def sop_uid_of(ds: Dataset, keyword: str) -> str:
    """The data set's SOPClassUID or SOPInstanceUID, else the file meta's Media Storage one.

    Real exports (anonymisers, PET/CT consoles) may leave the data set's UID
    empty while the file meta keeps it; DICOM readers (dcm2niix, GDCM, Slicer)
    and senders (pynetdicom, dcmtk) then use the file meta's, and so does rtseg.

    Parameters
    ----------
    ds
        A data set, with or without ``file_meta``.
    keyword
        ``"SOPClassUID"`` or ``"SOPInstanceUID"``.

    Returns
    -------
    str
        The UID, or ``""`` where neither has one.
    """
    value = str(ds.get(keyword, "") or "").strip()
    meta = getattr(ds, "file_meta", None)
    if value or meta is None:
        return value
    return str(meta.get(_META_FALLBACK[keyword], "") or "").strip()


def series_uid_of(ds: Dataset) -> str:
    """The data set's SeriesInstanceUID, else one derived from its frame of reference and series number.

    Anonymised exports may empty SeriesInstanceUID; their slices still share
    FrameOfReferenceUID, SeriesNumber and Modality, which group them as
    dcm2niix does. The derived UID (``2.25.<hash>``) is the same for every
    slice and every reader of the series, so the node and the loader agree.

    Returns
    -------
    str
        The UID, or ``""`` where the data set has neither a SeriesInstanceUID
        nor a FrameOfReferenceUID.
    """
    value = str(ds.get("SeriesInstanceUID", "") or "").strip()
    frame = str(ds.get("FrameOfReferenceUID", "") or "").strip()
    if value or not frame:
        return value
    key = "|".join((frame, str(ds.get("SeriesNumber", "") or ""), str(ds.get("Modality", "") or "")))
    return _derived_uid("series", key)


def _derived_uid(kind: str, key: str) -> str:
    return "2.25." + str(int.from_bytes(hashlib.sha256(f"rtseg/{kind}/{key}".encode()).digest()[:16], "big"))


def check_instance_size(stream: BinaryIO, max_bytes: int, *, source: str) -> None:
    """Refuse one DICOM instance that is, inflates or decodes to more than ``max_bytes``.

    Checked without holding the instance in memory: the stream's length, a
    Deflate data set inflated in 1 MiB steps that are counted and dropped, and
    the pixel data size its header declares (rows x columns x frames x samples
    x bytes per sample), read with every other element skipped.

    Parameters
    ----------
    stream
        A seekable DICOM file (preamble and file meta) at any position.
    max_bytes
        The bound on the encoded, the inflated and the decoded size.
    source
        Names the instance in the error.

    Raises
    ------
    TooLargeError
        Over the bound; ``inflated`` is true for a Deflate stream that grows beyond it.
    InputError
        Not a readable DICOM file, or a damaged Deflate stream.
    """
    size = stream.seek(0, os.SEEK_END)
    if size > max_bytes:
        raise TooLargeError(
            f"the instance is {size} bytes, larger than the limit of {_mb(max_bytes)}", source=source
        )
    stream.seek(0)
    try:
        read_preamble(stream, False)
        syntax = str(_read_file_meta_info(stream).get("TransferSyntaxUID", ""))
        if syntax == DeflatedExplicitVRLittleEndian:
            _check_inflated(stream, max_bytes, source)
        stream.seek(0)
        ds = pydicom.dcmread(stream, stop_before_pixels=True, specific_tags=_PIXEL_SIZE_KEYWORDS)
        pixels = _declared_pixel_bytes(ds)
    except _READ_ERRORS as exc:
        raise InputError("unreadable or truncated DICOM file", source=source) from exc
    if pixels > max_bytes:
        raise TooLargeError(
            f"the pixel data decodes to {pixels} bytes, larger than the limit of {_mb(max_bytes)}",
            source=source,
        )


def _check_inflated(stream: BinaryIO, max_bytes: int, source: str) -> None:
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)  # DICOM Deflate: raw, no zlib header
    total = 0
    while chunk := stream.read(_INFLATE_STEP):
        while chunk:
            total += len(inflate.decompress(chunk, _INFLATE_STEP))
            if total > max_bytes:
                raise TooLargeError(
                    f"the Deflate data set inflates to more than {_mb(max_bytes)}",
                    source=source,
                    inflated=True,
                )
            chunk = inflate.unconsumed_tail
    if total + len(inflate.flush()) > max_bytes:  # at most the rest of one match
        raise TooLargeError(
            f"the Deflate data set inflates to more than {_mb(max_bytes)}", source=source, inflated=True
        )


def _declared_pixel_bytes(ds: Dataset) -> int:
    values = [int(ds.get(k) or 1) for k in _PIXEL_SIZE_KEYWORDS[:4]]
    bits = int(ds.get("BitsAllocated") or 8)
    size = (bits + 7) // 8
    for value in values:
        size *= max(value, 1)
    return size if "Rows" in ds and "Columns" in ds else 0


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / (1 << 20):g} MB"


# ---------------------------------------------------------------------------
# pass 1: find files, read headers, choose the series


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
    except _READ_ERRORS as exc:
        raise InputError("unreadable or truncated DICOM file", source=str(path)) from exc


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
            f"found {len(ct)} CT series: {_describe(ct)}; choose one with series_uid",
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


# ---------------------------------------------------------------------------
# geometry


def _floats(header: _Header, keyword: str, count: int) -> npt.NDArray[np.float64]:
    value = header.ds.get(keyword)
    if value is None or value == "":
        raise InputError(f"slice has no {keyword}", source=str(header.path))
    values = (
        list(value) if isinstance(value, Sequence | np.ndarray) and not isinstance(value, str) else [value]
    )
    try:
        array = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{keyword} is not numeric: {value!r}", source=str(header.path)) from exc
    if array.shape != (count,) or not np.all(np.isfinite(array)):
        raise InputError(f"{keyword} must hold {count} numbers, got {value!r}", source=str(header.path))
    return array


def _position(header: _Header) -> npt.NDArray[np.float64]:
    return _floats(header, "ImagePositionPatient", 3)


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


# ---------------------------------------------------------------------------
# pass 2: pixels


def _rescale(header: _Header) -> tuple[float, float]:
    """(slope, intercept) of a slice; identity when absent."""
    slope = header.ds.get("RescaleSlope")
    intercept = header.ds.get("RescaleIntercept")
    s = 1.0 if slope in (None, "") else float(_floats(header, "RescaleSlope", 1)[0])
    b = 0.0 if intercept in (None, "") else float(_floats(header, "RescaleIntercept", 1)[0])
    return s, b


def _read_volume(geometry: _Geometry) -> npt.NDArray[np.int16] | npt.NDArray[np.float32]:
    rescales = [_rescale(h) for h in geometry.slices]
    integral = all(s == 1.0 and b.is_integer() for s, b in rescales)
    shape = (len(geometry.slices), geometry.rows, geometry.columns)
    volume: npt.NDArray[Any] = np.empty(shape, dtype=np.int16 if integral else np.float32)
    _check_decoders(geometry.slices)
    for k, (header, (slope, intercept)) in enumerate(zip(geometry.slices, rescales, strict=True)):
        stored = _decode(header, geometry.rows, geometry.columns)
        if volume.dtype == np.int16:
            offset = int(intercept)
            if int(stored.min()) + offset >= -32768 and int(stored.max()) + offset <= 32767:
                # exact: the range check above guarantees the int16 result
                np.add(stored, np.int32(offset), out=volume[k], casting="unsafe")
                continue
            logger.debug("HU values exceed int16 at slice %d; using float32", k)
            volume = volume.astype(np.float32)
        volume[k] = stored.astype(np.float64) * slope + intercept
    return volume


def _check_decoders(slices: Sequence[_Header]) -> None:
    """Refuse transfer syntaxes no installed pixel handler can decode, before decoding anything."""
    seen: set[str] = set()
    for header in slices:
        syntax = str(header.ds.file_meta.get("TransferSyntaxUID", "") or "")
        if syntax in seen:
            continue
        seen.add(syntax)
        uid = UID(syntax)
        try:
            available = get_decoder(uid).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise InputError(
                f"pixel data in transfer syntax {_syntax_name(uid)} cannot be decoded "
                "(no decoder available for it)",
                source=str(header.path),
            )


def _decode(header: _Header, rows: int, columns: int) -> npt.NDArray[Any]:
    """Stored pixel values of one slice (before rescale)."""
    path = str(header.path)
    try:
        ds = pydicom.dcmread(header.path)
        sop_uid = sop_uid_of(ds, "SOPInstanceUID")
    except _READ_ERRORS as exc:
        raise InputError("unreadable or truncated DICOM file", source=path) from exc
    if sop_uid != header.sop_uid:
        raise InputError(
            "the file could not be read completely (truncated, or changed while loading)", source=path
        )
    if "PixelData" not in ds:
        raise InputError("slice has no pixel data (truncated file?)", source=path)
    syntax = _syntax_name(UID(str(ds.file_meta.get("TransferSyntaxUID", ""))))
    try:
        pixels = ds.pixel_array
    except _DECODE_ERRORS as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:300]
        raise InputError(
            f"pixel data in transfer syntax {syntax} cannot be decoded: {detail}", source=path
        ) from exc
    if pixels.shape != (rows, columns):
        raise InputError(
            f"decoded pixel data has shape {pixels.shape}, expected {rows}x{columns} ({syntax})",
            source=path,
        )
    return pixels


def _syntax_name(uid: UID) -> str:
    name = uid.name if uid.is_transfer_syntax else ""
    return f"{name} ({uid})" if name and name != str(uid) else f"'{uid}'"
