"""A small, seeded mutation engine for DICOM fuzz tests (no third-party fuzzer).

A valid CT instance is split into its encoded top-level elements (explicit VR
little endian); a mutation rewrites elements (value, VR, length field), deletes
them, changes the transfer syntax the instance claims, or damages the encoded
bytes (bit flips in the header region, truncation). Every case is reproducible
from ``(seed, index)``: the case label names the mutations applied.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

PIXEL_DATA = 0x7FE00010
# VRs whose length field is 4 bytes (after 2 reserved bytes) in explicit VR encoding
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_VRS = [
    b"US",
    b"UL",
    b"SS",
    b"DS",
    b"IS",
    b"CS",
    b"OB",
    b"OW",
    b"SQ",
    b"UN",
    b"FD",
    b"FL",
    b"UT",
    b"AT",
    b"\0\0",
    b"zz",
]
KEY_TAGS = {
    "Rows": 0x00280010,
    "Columns": 0x00280011,
    "BitsAllocated": 0x00280100,
    "PixelSpacing": 0x00280030,
    "ImagePositionPatient": 0x00200032,
    "ImageOrientationPatient": 0x00200037,
    "RescaleSlope": 0x00281053,
}
REQUIRED_TAGS = {
    **KEY_TAGS,
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "SeriesInstanceUID": 0x0020000E,
    "FrameOfReferenceUID": 0x00200052,
    "Modality": 0x00080060,
    "BitsStored": 0x00280101,
    "HighBit": 0x00280102,
    "PixelRepresentation": 0x00280103,
    "SamplesPerPixel": 0x00280002,
    "PhotometricInterpretation": 0x00280004,
    "RescaleIntercept": 0x00281052,
    "PixelData": PIXEL_DATA,
}
DS_TAGS = {
    "PixelSpacing": 0x00280030,
    "ImagePositionPatient": 0x00200032,
    "ImageOrientationPatient": 0x00200037,
    "RescaleSlope": 0x00281053,
    "RescaleIntercept": 0x00281052,
    "SliceThickness": 0x00180050,
}
CS_TAGS = {"Modality": 0x00080060, "ImageType": 0x00080008, "PhotometricInterpretation": 0x00280004}
CLAIMED_SYNTAXES = [
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000,
    RLELossless,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
]
_NON_FINITE = [b"nan", b"NaN", b"inf", b"-inf", b"1e999", b"-1e999", b"Infinity", b"nan\\1", b"1\\inf"]
_NON_ASCII = [b"\xff\xfe", "é".encode(), "\u00e9".encode("latin-1"), "日本".encode(), b"1\xa0", b"\x80\x81"]


@dataclass(frozen=True)
class Instance:
    """An encoded instance: the transfer syntax it claims and its top-level elements."""

    transfer_syntax: str
    sop_class: str
    sop_instance: str
    elements: tuple[tuple[int, bytes], ...]  # (tag, the element as encoded, header included)
    cut: int | None = None  # truncate the encoded dataset here
    flips: tuple[tuple[int, int], ...] = ()  # (offset, xor mask) in the encoded dataset

    def body(self) -> bytes:
        """The encoded dataset, damaged as the case says."""
        data = bytearray(b"".join(chunk for _, chunk in self.elements))
        for offset, mask in self.flips:
            if offset < len(data):
                data[offset] ^= mask
        return bytes(data[: self.cut] if self.cut is not None else data)

    def file_bytes(self) -> bytes:
        """The instance in the DICOM file format (preamble, file meta, dataset)."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = self.sop_class
        meta.MediaStorageSOPInstanceUID = self.sop_instance
        meta.TransferSyntaxUID = self.transfer_syntax
        buf = BytesIO()
        buf.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(buf, meta, enforce_standard=True)
        return buf.getvalue() + self.body()

    def write(self, path: Path) -> Path:
        path.write_bytes(self.file_bytes())
        return path

    def header_end(self) -> int:
        """Offset of the pixel data element in the encoded dataset (the end of the header region)."""
        offset = 0
        for tag, chunk in self.elements:
            if tag == PIXEL_DATA:
                return offset
            offset += len(chunk)
        return offset


def load_instance(path: Path) -> Instance:
    """Split a valid file into encoded elements, re-encoded as explicit VR little endian."""
    ds = pydicom.dcmread(path)
    elements = []
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem)
        elements.append((int(elem.tag), fp.getvalue()))
    return Instance(ExplicitVRLittleEndian, str(ds.SOPClassUID), str(ds.SOPInstanceUID), tuple(elements))


def encode_element(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """An explicit VR little endian element; ``length`` overrides the true value length."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    n = len(value) if length is None else length
    if vr in _LONG_VRS:
        return head + b"\0\0" + struct.pack("<L", n & 0xFFFFFFFF) + value
    return head + struct.pack("<H", n & 0xFFFF) + value


def _split(chunk: bytes) -> tuple[bytes, bytes]:
    """(VR, value) of an encoded element."""
    vr = chunk[4:6]
    return vr, chunk[12:] if vr in _LONG_VRS else chunk[8:]


def _even(value: bytes, pad: bytes = b" ") -> bytes:
    return value + pad if len(value) % 2 else value


def set_element(case: Instance, tag: int, vr: bytes, value: bytes, length: int | None = None) -> Instance:
    """Replace (or add, in tag order) one element."""
    chunk = encode_element(tag, vr, value, length)
    kept = [(t, c) for t, c in case.elements if t != tag]
    kept.append((tag, chunk))
    return replace(case, elements=tuple(sorted(kept, key=lambda item: item[0])))


# -- mutations: each takes (rng, case) and returns (label, mutated case) ----------------------
Mutation = Callable[[random.Random, Instance], tuple[str, Instance]]


def flip_header_bytes(rng: random.Random, case: Instance) -> tuple[str, Instance]:
    end = max(case.header_end(), 1)
    flips = tuple((rng.randrange(end), 1 << rng.randrange(8)) for _ in range(rng.randint(1, 8)))
    return f"flip{len(flips)}", replace(case, flips=case.flips + flips)


def truncate(rng: random.Random, case: Instance) -> tuple[str, Instance]:
    size = len(case.body())
    cut = rng.randrange(size) if rng.random() < 0.7 else rng.randrange(case.header_end() or 1)
    return f"truncate@{cut}", replace(case, cut=cut)


def bad_length(rng: random.Random, case: Instance) -> tuple[str, Instance]:
    index = rng.randrange(len(case.elements))
    tag, chunk = case.elements[index]
    vr, value = _split(chunk)
    wide = vr in _LONG_VRS
    choices = [0, 1, len(value) + 1, max(len(value) - 1, 0), len(value) * 2 + 2]
    choices += [0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFFE] if wide else [0xFFFF, 0xFFFE, 0x7FFF]
    length = rng.choice(choices)
    elements = list(case.elements)
    elements[index] = (tag, encode_element(tag, vr, value, length))
    return f"length({tag:08X}={length:#x})", replace(case, elements=tuple(elements))


def change_vr(rng: random.Random, case: Instance) -> tuple[str, Instance]:
    name, tag = rng.choice(sorted(KEY_TAGS.items()))
    present = dict(case.elements)
    if tag not in present:
        return f"vr({name} absent)", case
    vr = rng.choice(_VRS)
    _, value = _split(present[tag])
    return f"vr({name}={vr!r})", set_element(case, tag, vr, _even(value, b"\0"))


def delete_required(rng: random.Random, case: Instance) -> tuple[str, Instance]:
    name, tag = rng.choice(sorted(REQUIRED_TAGS.items()))
    return f"delete({name})", replace(case, elements=tuple((t, c) for t, c in case.elements if t != tag))


def claim_syntax(rng: random.Random, case: Instance) -> tuple[str, Instance]:
    syntax = rng.choice([*CLAIMED_SYNTAXES, "1.2.3.4", "1.2.840.10008.1.2.4.999"])
    return f"syntax({syntax})", replace(case, transfer_syntax=syntax)


def pixel_length(rng: random.Random, case: Instance) -> tuple[str, Instance]:
    present = dict(case.elements)
    if PIXEL_DATA not in present:
        return "pixels(absent)", case
    vr, value = _split(present[PIXEL_DATA])
    n = len(value)
    new = rng.choice([0, 2, n // 2, n - 2, n + 2, n * 2, n - 1, n + 1, n * 3])
    data = (value * 4)[:new]
    return f"pixels({n}->{new})", set_element(case, PIXEL_DATA, vr, data)


def bits_allocated(rng: random.Random, case: Instance) -> tuple[str, Instance]:
    bits = rng.choice([1, 8, 12, 32, 64, 0, 255])
    case = set_element(case, 0x00280100, b"US", struct.pack("<H", bits))
    if rng.random() < 0.5:  # a coherent header claiming these bits
        case = set_element(case, 0x00280101, b"US", struct.pack("<H", bits))
        case = set_element(case, 0x00280102, b"US", struct.pack("<H", max(bits - 1, 0)))
    return f"bits({bits})", case


def samples_per_pixel(rng: random.Random, case: Instance) -> tuple[str, Instance]:
    samples = rng.choice([3, 4, 0, 2])
    case = set_element(case, 0x00280002, b"US", struct.pack("<H", samples))
    if rng.random() < 0.5:
        case = set_element(case, 0x00280004, b"CS", b"RGB ")
        case = set_element(case, 0x00280006, b"US", struct.pack("<H", rng.choice([0, 1])))
    return f"samples({samples})", case


def number_of_frames(rng: random.Random, case: Instance) -> tuple[str, Instance]:
    frames = rng.choice([b"2 ", b"3 ", b"100 ", b"0 ", b"-1", b"1e9", b"x ", b"99999999"])
    return f"frames({frames!r})", set_element(case, 0x00280008, b"IS", frames)


def non_finite_ds(rng: random.Random, case: Instance) -> tuple[str, Instance]:
    name, tag = rng.choice(sorted(DS_TAGS.items()))
    value = rng.choice(_NON_FINITE)
    if name == "ImageOrientationPatient":
        value = b"1\\0\\0\\0\\1\\" + value
    elif name in ("ImagePositionPatient",):
        value = b"0\\0\\" + value
    elif name == "PixelSpacing" and b"\\" not in value:
        value = value + b"\\" + value
    return f"ds({name}={value!r})", set_element(case, tag, b"DS", _even(value))


def non_ascii(rng: random.Random, case: Instance) -> tuple[str, Instance]:
    tags = {**CS_TAGS, **DS_TAGS}
    name, tag = rng.choice(sorted(tags.items()))
    vr = b"DS" if name in DS_TAGS else b"CS"
    value = rng.choice(_NON_ASCII)
    return f"nonascii({name}={value!r})", set_element(case, tag, vr, _even(value))


def odd_matrix(rng: random.Random, case: Instance) -> tuple[str, Instance]:
    name = rng.choice(["Rows", "Columns"])
    value = rng.choice([0, 1, 95, 97, 192, 65535])
    return f"matrix({name}={value})", set_element(case, KEY_TAGS[name], b"US", struct.pack("<H", value))


MUTATIONS: tuple[Mutation, ...] = (
    flip_header_bytes,
    truncate,
    bad_length,
    change_vr,
    delete_required,
    claim_syntax,
    pixel_length,
    bits_allocated,
    samples_per_pixel,
    number_of_frames,
    non_finite_ds,
    non_ascii,
    odd_matrix,
)


def mutate(rng: random.Random, case: Instance) -> tuple[str, Instance]:
    """One to three mutations of ``case``; the label names them in order."""
    labels = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        label, case = rng.choice(MUTATIONS)(rng, case)
        labels.append(label)
    return "+".join(labels), case


def file_damage(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """Damage to the file itself (preamble and file meta included), for readers of files."""
    if rng.random() < 0.5:
        cut = rng.randrange(min(len(data), 400))
        return f"file-truncate@{cut}", data[:cut]
    buf = bytearray(data)
    offsets = [rng.randrange(128, min(len(buf), 400)) for _ in range(rng.randint(1, 4))]
    for offset in offsets:
        buf[offset] ^= 1 << rng.randrange(8)
    return f"meta-flip{offsets}", bytes(buf)
