"""The public API: find the series of a source, load one, and check an instance's size before parsing it."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian

from rtseg.ct.geometry import _affine, _Geometry, _geometry, _series_info
from rtseg.ct.header import READ_ERRORS, SeriesSummary, _check_inflated, _mb, read_error_text
from rtseg.ct.pixels import _read_volume
from rtseg.ct.scan import _deduplicate, _groups, _scan, _select_series, _summary
from rtseg.errors import InputError, TooLargeError
from rtseg.privacy import uid_key
from rtseg.volume import CTVolume

logger = logging.getLogger(__name__)


_PIXEL_SIZE_KEYWORDS = ["Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated"]


# Fewest slices of a volume to segment: the node's default selection (Selection.slice_count)
# skips shorter series too; a shorter "series" is a partial send or a test scan, not a planning CT.
MIN_SLICES = 10


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
    started = time.perf_counter()
    geometry = _stack(source, series_uid, min_slices)
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


def check_stack(source: Path | Sequence[Path], *, min_slices: int = MIN_SLICES) -> int:
    """Check, from the headers alone, that ``source`` is one CT series :func:`load_series` accepts.

    The same checks as :func:`load_series` before it reads pixel data: one
    axial stack, untilted, evenly spaced, with no slice missing between the
    first and the last, and at least ``min_slices`` slices.

    Parameters
    ----------
    source
        A folder or an explicit list of files, as for :func:`load_series`.
    min_slices
        Fewest slices accepted (default :data:`MIN_SLICES`).

    Returns
    -------
    int
        The number of slices in the stack (copies of one instance counted once).

    Raises
    ------
    InputError
        As :func:`load_series` raises it for the series' headers.
    """
    return len(_stack(source, None, min_slices).slices)


def _stack(source: Path | Sequence[Path], series_uid: str | None, min_slices: int) -> _Geometry:
    """The checked geometry of the one series of ``source`` (headers only)."""
    if min_slices < 1:
        raise ValueError("min_slices must be at least 1")
    scan = _scan(source)
    headers = _select_series(scan, series_uid)
    return _geometry(_deduplicate(headers), min_slices, scan.label)


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
    except READ_ERRORS as exc:
        raise InputError(read_error_text(exc), source=source) from exc
    if pixels > max_bytes:
        raise TooLargeError(
            f"the pixel data decodes to {pixels} bytes, larger than the limit of {_mb(max_bytes)}",
            source=source,
        )


def read_head(stream: BinaryIO, *, source: str) -> Dataset:
    """The header of an instance too large to check, read in memory bounded by the stream's length.

    For the UIDs of an instance that :func:`check_instance_size` refused, from the
    head of it that was kept. A Deflate data set is not inflated: pydicom inflates
    it whole, and a few MB of it can grow to GBs. Its file meta (never deflated)
    is returned instead, in an otherwise empty data set; its Media Storage UIDs
    name the instance (:func:`~rtseg.ct.header.sop_uid_of` falls back to them).
    Other transfer syntaxes: every element before the pixel data.

    Raises
    ------
    InputError
        Not a readable DICOM header (a head cut inside an element, a damaged file meta).
    """
    try:
        stream.seek(0)
        read_preamble(stream, False)
        meta = _read_file_meta_info(stream)
        if str(meta.get("TransferSyntaxUID", "")) == DeflatedExplicitVRLittleEndian:
            head = Dataset()
            head.file_meta = FileMetaDataset(meta)
            return head
        stream.seek(0)
        return pydicom.dcmread(stream, stop_before_pixels=True)
    except READ_ERRORS as exc:
        raise InputError(read_error_text(exc), source=source) from exc


def _declared_pixel_bytes(ds: Dataset) -> int:
    values = [int(ds.get(k) or 1) for k in _PIXEL_SIZE_KEYWORDS[:4]]
    bits = int(ds.get("BitsAllocated") or 8)
    size = (bits + 7) // 8
    for value in values:
        size *= max(value, 1)
    return size if "Rows" in ds and "Columns" in ds else 0
