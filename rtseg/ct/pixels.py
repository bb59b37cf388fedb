"""Pass 2: decode the chosen slices once each into a preallocated volume in Hounsfield units."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from rtseg.ct.geometry import _Geometry
from rtseg.ct.header import READ_ERRORS, _floats, _Header, read_error_text, sop_uid_of
from rtseg.errors import InputError

logger = logging.getLogger(__name__)


# What pydicom and its plugins raise for pixel data they cannot decode.
_DECODE_ERRORS = (*READ_ERRORS, RuntimeError, IndexError)


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
    except READ_ERRORS as exc:
        raise InputError(read_error_text(exc), source=path) from exc
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
