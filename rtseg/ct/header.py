"""One file's parsed header and what is read from it before any pass: UIDs, numbers, the series summary."""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian

from rtseg.errors import InputError, TooLargeError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


_ENHANCED_CT_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"})


_NON_IMAGE_MODALITIES = frozenset(
    {"RTDOSE", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "KO", "PR", "SEG", "REG", "RWV", "DOC", "PLAN"}
)


_NON_IMAGE_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.481.", "1.2.840.10008.5.1.4.1.1.88.")


_DUPLICATE_MM = 0.01  # two slices closer than this are at the same position


_INFLATE_STEP = 1 << 20  # bytes inflated (and dropped) at a time while measuring a Deflate stream


# What pydicom raises on a damaged or truncated file (zlib: a damaged Deflate data set; recursion:
# sequences nested a few hundred deep, which pydicom reads one Python call per level;
# NotImplementedError: an unknown VR; OverflowError: kept from the DICOM node's own list).
READ_ERRORS = (
    InvalidDicomError,
    RecursionError,
    NotImplementedError,
    OverflowError,
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


def read_error_text(exc: BaseException) -> str:
    """What an error of :data:`READ_ERRORS` says about the file, for an :class:`InputError`."""
    if isinstance(exc, RecursionError):
        return "sequences nested deeper than a DICOM reader can follow (real data nests a few levels)"
    return "unreadable or truncated DICOM file"


# The data set's SOP UIDs, and the file meta elements that stand in for them where a
# writer (anonymisers, some PET/CT exports) left the data set's empty (PS3.10 7.1).
_META_FALLBACK = {"SOPClassUID": "MediaStorageSOPClassUID", "SOPInstanceUID": "MediaStorageSOPInstanceUID"}


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


# A Deflate file of a local folder (a CD a patient brings, an export) may inflate to this much: no CT
# instance does (an enhanced CT of 1,000 frames of 512x512 is 0.5 GB); a Deflate bomb does.
LOCAL_MAX_INFLATED = 1 << 30


def check_deflated_file(path: Path, max_bytes: int = LOCAL_MAX_INFLATED) -> None:
    """Refuse a Deflate DICOM file that inflates to more than ``max_bytes``, before pydicom reads it.

    pydicom inflates a Deflated Explicit VR Little Endian data set in one piece even
    to read its header: a few MB of a Deflate bomb grow to tens of GB of memory. The
    network paths bound every instance on arrival (``check_instance_size``); this is
    the same bound for the files of a local folder. Other files pass untouched (their
    reader says what they are); the file meta is read twice, a few hundred bytes.

    Raises
    ------
    TooLargeError
        ``inflated``: the Deflate data set grows beyond ``max_bytes``.
    zlib.error
        A damaged Deflate stream (one of :data:`READ_ERRORS`, as pydicom would raise).
    """
    with path.open("rb") as stream:
        try:
            read_preamble(stream, False)
            syntax = str(_read_file_meta_info(stream).get("TransferSyntaxUID", ""))
        except READ_ERRORS:  # not DICOM, no preamble, a damaged file meta: the reader decides
            return
        if syntax == DeflatedExplicitVRLittleEndian:
            _check_inflated(stream, max_bytes, str(path))


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


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / (1 << 20):g} MB"
