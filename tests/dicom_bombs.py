"""Hostile DICOM instances (a Deflate bomb, a plain huge slice, deeply nested sequences) and the peak RSS.

All are CT Image Storage instances with a small, valid header (512 x 512, 16 bit).
The bombs have a Pixel Data element far larger than the header declares; they are
written straight to disk, never held whole in memory.
"""

from __future__ import annotations

import re
import struct
import zlib
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_BLOCK = b"\0" * (1 << 20)


def _header(sop: str, series: str) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = CT_IMAGE_STORAGE, sop, series
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1234.1"
    ds.Modality = "CT"
    ds.PatientName, ds.PatientID = "PHANTOM^BOMB", "RTSEG-A_BOMB"
    ds.Rows, ds.Columns = 512, 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _meta(sop: str, syntax: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = syntax
    buf = BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()


def _pixel_data_tag(n_bytes: int) -> bytes:
    return struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, n_bytes)


def write_deflate_bomb(path: Path, inflated_mb: int, sop: str, series: str) -> Path:
    """A Deflated Explicit VR Little Endian instance whose data set inflates to ``inflated_mb`` MiB."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)  # DICOM deflate: raw, no zlib header
    n_pixels = (inflated_mb << 20) - len(_header(sop, series)) - 12
    with path.open("wb") as out:
        out.write(_meta(sop, DeflatedExplicitVRLittleEndian))
        out.write(deflate.compress(_header(sop, series) + _pixel_data_tag(n_pixels)))
        for _ in range(n_pixels >> 20):
            out.write(deflate.compress(_BLOCK))
        out.write(deflate.compress(b"\0" * (n_pixels & ((1 << 20) - 1))))
        out.write(deflate.flush())
    return path


def write_plain_instance(path: Path, pixel_mb: int, sop: str, series: str) -> Path:
    """An Explicit VR Little Endian instance with ``pixel_mb`` MiB of Pixel Data."""
    with path.open("wb") as out:
        out.write(_meta(sop, ExplicitVRLittleEndian))
        out.write(_header(sop, series) + _pixel_data_tag(pixel_mb << 20))
        for _ in range(pixel_mb):
            out.write(_BLOCK)
    return path


def write_nested_sequences(path: Path, depth: int, sop: str, series: str) -> Path:
    """A small CT instance (3.6 MB at 100,000) whose Content Sequence nests ``depth`` deep.

    Undefined-length sequences in undefined-length items: a reader that recurses per level
    (pydicom does) meets Python's recursion limit long before any size bound.
    """
    sq = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    ends = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    with path.open("wb") as out:
        out.write(_meta(sop, ExplicitVRLittleEndian))
        out.write(_header(sop, series))  # (0008,0016) … (0028,0103); the sequence, (0040,A730), after them
        out.write((sq + item) * depth + ends * depth)
    return path


def damaged_deflate(ds: Dataset) -> bytes:
    """``ds`` (with file meta) in Deflated Explicit VR Little Endian, its compressed data set cut in
    half and ended with an invalid code: zlib raises on it, not pydicom."""
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    return data[: len(data) // 2] + b"\xff\x00\x13" * 64


def reset_peak_rss() -> None:
    """Linux: this process's peak RSS (VmHWM) starts again from the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM) in MB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024  # type: ignore[index]
