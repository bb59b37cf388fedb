"""Safe intake of an uploaded CT: DICOM files, one zip of them, or one NIfTI image.

Everything is written into the job's own ``input`` folder under names made
here (``00001.dcm`` …, ``ct.nii.gz``); a client's file or entry names are used
only in error messages back to that client, never as paths and never in logs.
Zip archives are checked before anything is unpacked (entry count, declared
sizes, compression ratio, ``..``/absolute names, symlinks) and the bytes really
unpacked are counted again while copying. A DICOM upload must hold exactly one
CT image series with no missing slice: every file's size (as sent, inflated and
decoded) is checked, its headers scanned and the series loaded once here, all
one upload at a time (see ``validate``), so the client learns at once what is wrong.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import re
import shutil
import stat
import threading
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rtseg.ct import SeriesSummary, check_instance_size, find_series, load_series
from rtseg.errors import InputError, TooLargeError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_SKIPPED_NAMES = re.compile(r"(^|/)(__MACOSX/|\.[^/]*$|Thumbs\.db$|desktop\.ini$)", re.IGNORECASE)
_NIFTI_MAGIC = (b"n+1\0", b"ni1\0", b"n+2\0", b"ni2\0")


class UploadError(InputError):
    """An upload the service refuses; ``status`` and ``slug`` go into the problem response."""

    def __init__(self, message: str, *, status: int = 422, slug: str = "invalid-upload") -> None:
        super().__init__(message)
        self.status = status
        self.slug = slug


@dataclass(frozen=True)
class UploadLimits:
    max_files: int
    max_uncompressed_bytes: int
    max_zip_ratio: float
    max_instance_bytes: int = 64 << 20


@dataclass(frozen=True)
class Intake:
    """What was accepted: the kind of input and its size (no patient data)."""

    kind: str  # "dicom" or "nifti"
    n_files: int
    n_slices: int
    series_key: str  # SHA-256 of the SeriesInstanceUID, or of the NIfTI file


@dataclass(frozen=True)
class Part:
    """One uploaded file: a seekable stream and the client's name for it (messages only)."""

    stream: IO[bytes]
    name: str


def sniff(head: bytes) -> str:
    """``zip``, ``dicom``, ``nifti`` or ``unknown`` from the first 352 bytes of a file."""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x1f\x8b") or head[344:348] in _NIFTI_MAGIC:
        return "nifti"
    return "unknown"


def _head(stream: IO[bytes]) -> bytes:
    stream.seek(0)
    head = stream.read(352)
    stream.seek(0)
    return head


def receive(parts: list[Part], dest: Path, limits: UploadLimits, validate: threading.Semaphore) -> Intake:
    """Write ``parts`` into ``dest`` (created) and check them; raises :class:`UploadError`."""
    if not parts:
        raise UploadError("the request holds no file: send DICOM files, one zip or one NIfTI", status=400)
    kinds = [sniff(_head(p.stream)) for p in parts]
    dest.mkdir(parents=True, exist_ok=True)
    if len(parts) == 1 and kinds[0] == "zip":
        names = _unzip(parts[0], dest, limits)
    elif len(parts) == 1 and kinds[0] == "nifti":
        return _receive_nifti(parts[0], dest, limits)
    else:
        names = _store_dicom_parts(parts, kinds, dest, limits)
    return _check_dicom(dest, names, limits, validate)


# -- DICOM files sent as multipart parts ------------------------------------------------------


def _store_dicom_parts(
    parts: list[Part], kinds: list[str], dest: Path, limits: UploadLimits
) -> dict[str, str]:
    if len(parts) > limits.max_files:
        raise UploadError(f"{len(parts)} files; the limit is {limits.max_files}", status=413, slug="too-many")
    names: dict[str, str] = {}
    for index, (part, kind) in enumerate(zip(parts, kinds, strict=True), start=1):
        if kind != "dicom":
            what = {"zip": "a zip (send one zip alone)", "nifti": "a NIfTI image (send it alone)"}
            raise UploadError(
                f"file {index} ({part.name!r}) is {what.get(kind, 'not a DICOM file (no DICM preamble)')}",
                slug="not-dicom",
            )
        target = dest / f"{index:05d}.dcm"
        with target.open("wb") as out:
            shutil.copyfileobj(part.stream, out, _CHUNK)
        names[target.name] = part.name
    return names


# -- one zip ----------------------------------------------------------------------------------


def _unzip(part: Part, dest: Path, limits: UploadLimits) -> dict[str, str]:
    try:
        with zipfile.ZipFile(part.stream) as archive:
            entries = _checked_entries(archive, part.stream, limits)
            return _extract(archive, entries, dest, limits)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError) as exc:
        raise UploadError(f"the zip is damaged ({exc})", status=400, slug="bad-zip") from exc
    except NotImplementedError as exc:  # encrypted entries, unknown compression methods
        raise UploadError(f"the zip uses an unsupported feature ({exc})", status=400, slug="bad-zip") from exc


def _checked_entries(
    archive: zipfile.ZipFile, stream: IO[bytes], limits: UploadLimits
) -> list[zipfile.ZipInfo]:
    for info in archive.infolist():  # every name, hidden or not, before anything is skipped
        _check_entry_name(info)
    entries = [i for i in archive.infolist() if not i.is_dir() and not _SKIPPED_NAMES.search(i.filename)]
    if not entries:
        raise UploadError("the zip holds no files", slug="empty")
    if len(entries) > limits.max_files:
        raise UploadError(
            f"the zip holds {len(entries)} files; the limit is {limits.max_files}",
            status=413,
            slug="too-many",
        )
    total = sum(i.file_size for i in entries)
    if total > limits.max_uncompressed_bytes:
        raise UploadError(
            f"the zip unpacks to {total} bytes; the limit is {limits.max_uncompressed_bytes}",
            status=413,
            slug="zip-bomb",
        )
    stream.seek(0, 2)
    ratio = total / max(stream.tell(), 1)
    worst = max(entries, key=lambda i: i.file_size / max(i.compress_size, 1))
    if ratio > limits.max_zip_ratio or worst.file_size / max(worst.compress_size, 1) > limits.max_zip_ratio:
        raise UploadError(
            f"the zip is compressed more than {limits.max_zip_ratio:g}:1 (a zip bomb?); "
            "CT images never compress that well",
            status=413,
            slug="zip-bomb",
        )
    return entries


def _check_entry_name(info: zipfile.ZipInfo) -> None:
    name = info.filename
    parts = re.split(r"[\\/]", name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\0" in name:
        raise UploadError(f"zip entry {name!r} has an absolute path", status=400, slug="unsafe-path")
    if ".." in parts:
        raise UploadError(
            f"zip entry {name!r} points outside the archive (..)", status=400, slug="unsafe-path"
        )
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UploadError(f"zip entry {name!r} is a symbolic link", status=400, slug="symlink")


def _extract(
    archive: zipfile.ZipFile, entries: Iterable[zipfile.ZipInfo], dest: Path, limits: UploadLimits
) -> dict[str, str]:
    names: dict[str, str] = {}
    budget = limits.max_uncompressed_bytes
    for index, info in enumerate(entries, start=1):
        target = dest / f"{index:05d}.dcm"
        with archive.open(info) as src, target.open("wb") as out:
            head = src.read(352)
            if sniff(head) != "dicom":
                raise UploadError(
                    f"zip entry {info.filename!r} is not a DICOM file (no DICM preamble)", slug="not-dicom"
                )
            out.write(head)
            budget -= len(head) + _copy_bounded(src, out, budget - len(head), info.file_size - len(head))
        names[target.name] = info.filename
    return names


def _copy_bounded(src: IO[bytes], out: IO[bytes], budget: int, declared: int) -> int:
    """Copy, refusing more bytes than the budget or than the entry declared."""
    copied = 0
    while block := src.read(_CHUNK):
        copied += len(block)
        if copied > budget or copied > declared:
            raise UploadError("a zip entry unpacks to more than it declares", status=413, slug="zip-bomb")
        out.write(block)
    return copied


# -- DICOM series check -----------------------------------------------------------------------


def _check_dicom(
    dest: Path, names: dict[str, str], limits: UploadLimits, validate: threading.Semaphore
) -> Intake:
    try:
        with validate:  # one upload read at a time: a burst of uploads waits instead of filling memory
            for name in names:
                with (dest / name).open("rb") as stream:
                    check_instance_size(stream, limits.max_instance_bytes, source=str(dest / name))
            _check_one_ct_series(find_series(dest))
            volume = load_series(dest)
    except UploadError:
        raise
    except TooLargeError as exc:
        raise UploadError(_client_message(exc, dest, names), status=413, slug="too-large") from exc
    except InputError as exc:
        raise UploadError(_client_message(exc, dest, names), slug="invalid-series") from exc
    key = hashlib.sha256(volume.info.series_instance_uid.encode()).hexdigest()
    return Intake("dicom", len(names), int(volume.shape[0]), key)


def _check_one_ct_series(series: list[SeriesSummary]) -> None:
    images = [s for s in series if _is_image(s.modality)]
    if len(images) != 1:
        listing = ", ".join(f"{s.modality} ({s.n_files} files)" for s in images) or "none"
        raise UploadError(f"the upload must hold exactly one CT series; found {len(images)}: {listing}")
    if images[0].modality != "CT":
        raise UploadError(f"the series is {images[0].modality}, not CT", slug="not-ct")


def _is_image(modality: str) -> bool:
    return modality not in {"RTDOSE", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "KO", "PR", "SEG", "REG"}


def _client_message(exc: InputError, dest: Path, names: dict[str, str]) -> str:
    """The core's message with our file names replaced by the client's (no server paths)."""
    message = exc.message
    for ours, theirs in names.items():
        message = message.replace(str(dest / ours), repr(theirs)).replace(ours, repr(theirs))
    message = message.replace(str(dest), "the upload")
    source = Path(exc.source) if exc.source else None
    if source is not None and source.name in names:
        return f"{names[source.name]!r}: {message}"
    return message


# -- NIfTI ------------------------------------------------------------------------------------


def _receive_nifti(part: Part, dest: Path, limits: UploadLimits) -> Intake:
    """Store as ``ct.nii.gz`` (compressing if needed), counting the unpacked bytes on the way."""
    target = dest / "ct.nii.gz"
    digest = hashlib.sha256()
    part.stream.seek(0)
    compressed = _head(part.stream).startswith(b"\x1f\x8b")
    with target.open("wb") as out:
        if compressed:
            shutil.copyfileobj(part.stream, out, _CHUNK)
        else:
            with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as gz:
                shutil.copyfileobj(part.stream, gz, _CHUNK)
    try:
        size = _gunzip_size(target, digest, limits.max_uncompressed_bytes)
    except (OSError, EOFError, zlib.error) as exc:
        raise UploadError(f"the NIfTI file is damaged ({exc})", status=400, slug="bad-nifti") from exc
    shape = _nifti_shape(target, size)
    return Intake("nifti", 1, shape[2] if len(shape) > 2 else 1, digest.hexdigest())


def _gunzip_size(path: Path, digest: hashlib._Hash, limit: int) -> int:
    size = 0
    with gzip.open(path, "rb") as src:
        while block := src.read(_CHUNK):
            size += len(block)
            digest.update(block)
            if size > limit:
                raise UploadError(
                    f"the NIfTI image unpacks to more than {limit} bytes", status=413, slug="zip-bomb"
                )
    return size


def _nifti_shape(path: Path, size: int) -> tuple[int, ...]:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        image: Any = nib.load(str(path))
    except (ImageFileError, ValueError, OSError, EOFError) as exc:
        raise UploadError(f"not a NIfTI image ({exc})", slug="bad-nifti") from exc
    header = image.header
    shape = tuple(int(n) for n in image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 1:
        raise UploadError(f"the NIfTI image has shape {image.shape}; a 3-D CT is needed", slug="bad-nifti")
    needed = int(header.get_data_offset()) + int(header.get_data_dtype().itemsize) * int(
        shape[0] * shape[1] * shape[2]
    )
    if size < needed:
        raise UploadError(f"the NIfTI image is truncated ({size} of {needed} bytes)", slug="bad-nifti")
    if min(float(z) for z in header.get_zooms()[:3]) <= 0:
        raise UploadError("the NIfTI image has a voxel size of 0", slug="bad-nifti")
    return shape
