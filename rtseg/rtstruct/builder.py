"""Build an RT Structure Set that planning systems accept, from a label map.

The dataset is assembled with pydicom module by module (Patient, General
Study, RT Series, General Equipment, Frame of Reference, Structure Set, ROI
Contour, RT ROI Observations, Approval, SOP Common). Contours come from
:mod:`rtseg.rtstruct.contours` and trace the voxel boundary.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    RTStructureSetStorage,
    generate_uid,
)
from scipy import ndimage

from rtseg import __version__
from rtseg.errors import RTStructError
from rtseg.rtstruct.contours import (
    MAX_ELEMENT_BYTES,
    SIMPLIFY_TOLERANCES,
    SliceContour,
    significance,
    simplify,
    split_fan,
    trace_mask,
)
from rtseg.structures import Structure
from rtseg.volume import CTVolume

_CONTOUR_DATA = Tag(0x3006, 0x0050)
_CONTOUR_SEQUENCE = Tag(0x3006, 0x0040)
_CONTOUR_IMAGE_SEQUENCE = Tag(0x3006, 0x0016)
_CONTOUR_GEOMETRIC_TYPE = Tag(0x3006, 0x0042)
_NUMBER_OF_CONTOUR_POINTS = Tag(0x3006, 0x0046)
_CONTOUR_NUMBER = Tag(0x3006, 0x0048)
_REFERENCED_SOP_CLASS = Tag(0x0008, 0x1150)
_REFERENCED_SOP_INSTANCE = Tag(0x0008, 0x1155)
# Retired Detached Study Management SOP Class: what PS3.3 C.8.8.5 names for
# RT Referenced Study Sequence and what planning systems expect there.
_STUDY_COMPONENT_CLASS = "1.2.840.10008.3.1.2.3.1"
STRUCTURE_SET_LABEL = "AI_UNAPPROVED"
SERIES_NUMBER = 901
# Largest coordinate magnitude (mm) whose "%.3f" text stays within a 16-byte DS.
_MAX_COORDINATE = 1e11
_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})
TRACE_SLAB = 64  # slices of a structure traced at once (a 1,500-slice External: no whole-series masks)
TRACE_THREADS = 2


@dataclass(frozen=True)
class ModelIdentity:
    """The model that produced the segmentation, written into the header."""

    name: str
    version: str
    description: str = ""


@dataclass(frozen=True)
class StructureReport:
    """One ROI written to the structure set."""

    name: str
    label: int
    volume_ml: float
    n_contours: int


@dataclass(frozen=True)
class RTStructResult:
    """The structure set and what went into it (empty structures are ``omitted``)."""

    dataset: pydicom.Dataset
    included: tuple[StructureReport, ...]
    omitted: tuple[str, ...]


@dataclass(frozen=True)
class _Contour:
    k: int
    data: bytes  # ContourData value, even length
    n_points: int


def build_rtstruct(
    volume: CTVolume,
    labels: npt.NDArray[np.integer],
    structures: Sequence[Structure],
    model: ModelIdentity,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    now: datetime | None = None,
) -> RTStructResult:
    """RT Structure Set of ``labels`` (indexed ``[k, j, i]`` like ``volume.hu``).

    Parameters
    ----------
    volume
        The CT the labels were predicted on; the structure set references its
        study, series, slices and frame of reference.
    labels
        Integer label map of ``volume.shape``. A structure of type EXTERNAL is
        the union of all non-zero labels; any other is ``labels == label``.
    structures
        ROIs in the order they are written; structures without a voxel are
        left out and listed in :attr:`RTStructResult.omitted`.
    model
        Name and version written into the header and every ROI.
    series_instance_uid, sop_instance_uid
        Fixed UIDs so that a resend of the same job is the same instance.
    now
        Creation time (default: the current local time).

    Raises
    ------
    RTStructError
        If the label map does not fit the CT or the CT is not axial.
    """
    _check_inputs(volume, labels, structures)
    if labels.dtype == np.bool_:  # a single-structure mask: label 1
        labels = labels.view(np.uint8)
    now = now or datetime.now().astimezone()
    boxes = ndimage.find_objects(np.asarray(labels))

    def traced(structure: Structure) -> tuple[list[_Contour], int] | None:
        box = _bounding_box(boxes, structure)
        if box is None:  # find_objects boxes are tight: a box means at least one voxel
            return None
        contours: list[_Contour] = []
        count = 0
        # contours are per slice: a slab at a time gives the same ones, with the masks of a slab only
        for z in range(box[0].start, box[0].stop, TRACE_SLAB):
            slab = (slice(z, min(z + TRACE_SLAB, box[0].stop)), box[1], box[2])
            mask = _structure_mask(labels, slab, structure)
            offset = (z, box[1].start, box[2].start)
            contours += _encode_contours(trace_mask(mask, padded=True), offset, volume.affine)
            count += int(np.count_nonzero(mask))
        return contours, count

    # the structures are traced two at a time (numpy's work runs outside the GIL), in their order
    with ThreadPoolExecutor(TRACE_THREADS, thread_name_prefix="rtseg-trace") as pool:
        outcomes = list(pool.map(traced, structures))
    rois: list[tuple[Structure, list[_Contour], int]] = []
    omitted = []
    for structure, outcome in zip(structures, outcomes, strict=True):
        if outcome is None:
            omitted.append(structure.name)
        else:
            rois.append((structure, *outcome))
    uids = (series_instance_uid or generate_uid(prefix=None), sop_instance_uid or generate_uid(prefix=None))
    dataset = _dataset(volume, model, rois, uids, now)
    included = tuple(
        StructureReport(s.name, s.label, count * volume.voxel_volume_ml, len(contours))
        for s, contours, count in rois
    )
    return RTStructResult(dataset, included, tuple(omitted))


def add_review_notes(dataset: pydicom.Dataset, notes: Mapping[str, Sequence[str]]) -> None:
    """Put each structure's review flags where the reviewer's software shows them with the ROI.

    ``notes``: structure name → flags (e.g. :func:`rtseg.pipeline.plausibility`'s).
    A flagged ROI's observation gets ``ROIObservationDescription`` ("rtseg review:
    …"), and the structure set's description names the flagged structures. Text
    is kept to ASCII so that it fits the character set already chosen.
    """
    names = {int(roi.ROINumber): str(roi.ROIName) for roi in dataset.StructureSetROISequence}
    flagged = []
    for observation in dataset.RTROIObservationsSequence:
        name = names.get(int(observation.ReferencedROINumber), "")
        flags = notes.get(name, ())
        if flags:
            observation.ROIObservationDescription = _st("rtseg review: " + "; ".join(flags))
            flagged.append(name)
    if flagged:
        description = f"{dataset.StructureSetDescription} - check flagged: {', '.join(flagged)}"
        dataset.StructureSetDescription = _st(description)


NOTE_SEPARATOR = " -- rtseg: "


def add_description_note(dataset: pydicom.Dataset, note: str) -> None:
    """End the structure set description with ``note`` (replacing an earlier note), where a TPS shows it.

    Used for what the reviewer must know about the whole structure set: that it
    supersedes an earlier RTSTRUCT, or that its series was incomplete.
    """
    base = str(dataset.get("StructureSetDescription", "")).split(NOTE_SEPARATOR)[0]
    dataset.StructureSetDescription = _st(f"{base}{NOTE_SEPARATOR}{note}")


def amend_description(path: Path, note: str) -> None:
    """Rewrite the RTSTRUCT file at ``path`` with ``note`` in its description (atomically)."""
    dataset = pydicom.dcmread(path)
    add_description_note(dataset, note)
    write_rtstruct(dataset, path)


def _st(text: str) -> str:
    """An ST value of ASCII text: at most 1024 characters."""
    ascii_text = text.replace("\u2013", "-").encode("ascii", "replace").decode("ascii")
    return ascii_text[:1024]


def write_rtstruct(dataset: pydicom.Dataset, path: Path) -> None:
    """Write ``dataset`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=".rtstruct-", suffix=".tmp", delete=False)
    tmp = Path(handle.name)
    try:
        with handle:
            dataset.save_as(handle, enforce_file_format=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _check_inputs(volume: CTVolume, labels: npt.NDArray[np.integer], structures: Sequence[Structure]) -> None:
    if labels.shape != volume.shape:
        raise RTStructError(
            f"label map has shape {labels.shape}, the CT has {volume.shape} (slices, rows, columns)"
        )
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise RTStructError(f"label map must hold integer labels, not {labels.dtype}")
    names = [s.name for s in structures]
    if len(set(names)) != len(names):
        raise RTStructError(f"structure names are not unique: {names}")
    affine = volume.affine
    in_plane_z = np.abs(affine[2, :2]).max()
    if in_plane_z > 1e-6 * np.abs(affine[:3, :2]).max():
        raise RTStructError("the CT slices are not axial; contours must lie in planes of constant z")


def _bounding_box(boxes: list[tuple[slice, ...] | None], structure: Structure) -> tuple[slice, ...] | None:
    if structure.rt_type == "EXTERNAL":
        present = [b for b in boxes if b is not None]
        if not present:
            return None
        return tuple(
            slice(min(b[a].start for b in present), max(b[a].stop for b in present)) for a in range(3)
        )
    if 0 < structure.label <= len(boxes):
        return boxes[structure.label - 1]
    return None


def _structure_mask(
    labels: npt.NDArray[np.integer], box: tuple[slice, ...], structure: Structure
) -> npt.NDArray[np.bool_]:
    """The structure in its bounding box with a one-voxel empty border in rows and columns.

    The border comes from the label map where the box is inside the image
    (no copy for padding), and from zero padding at the image edge.
    """
    rows, columns = labels.shape[1], labels.shape[2]
    j, i = box[1], box[2]
    j_lo, j_hi = max(j.start - 1, 0), min(j.stop + 1, rows)
    i_lo, i_hi = max(i.start - 1, 0), min(i.stop + 1, columns)
    crop = labels[box[0], j_lo:j_hi, i_lo:i_hi]
    mask = crop != 0 if structure.rt_type == "EXTERNAL" else crop == structure.label
    pad = ((0, 0), (1 - (j.start - j_lo), 1 - (j_hi - j.stop)), (1 - (i.start - i_lo), 1 - (i_hi - i.stop)))
    return np.pad(mask, pad) if any(any(side) for side in pad) else mask


def _encode_contours(
    contours: list[SliceContour], offset: tuple[int, int, int], affine: npt.NDArray[np.float64]
) -> list[_Contour]:
    out = []
    for contour in contours:
        k = contour.k + offset[0]
        points = contour.points + np.array([offset[2], offset[1]], dtype=np.float64)
        out.extend(_fit_element(k, points, affine))
    return out


def _fit_element(k: int, points: npt.NDArray[np.float64], affine: npt.NDArray[np.float64]) -> list[_Contour]:
    """The contour as one or more ContourData values, each within one element.

    Only a contour too long for one element is simplified (Douglas-Peucker,
    tolerance raised stepwise up to 0.5 voxel), and split if still too long.
    """
    data = _contour_data(k, points, affine)
    if len(data) <= MAX_ELEMENT_BYTES:
        return [_Contour(k, data, len(points))]
    sig = significance(points)
    for tolerance in SIMPLIFY_TOLERANCES:
        reduced = simplify(points, tolerance, sig)
        data = _contour_data(k, reduced, affine)
        if len(data) <= MAX_ELEMENT_BYTES:
            return [_Contour(k, data, len(reduced))]
    pieces = math.ceil(len(data) / MAX_ELEMENT_BYTES) + 1
    while True:
        parts = split_fan(reduced, pieces)
        encoded = [_contour_data(k, part, affine) for part in parts]
        if all(len(d) <= MAX_ELEMENT_BYTES for d in encoded):
            return [_Contour(k, d, len(p)) for d, p in zip(encoded, parts, strict=True)]
        pieces += 1


def _contour_data(k: int, points: npt.NDArray[np.float64], affine: npt.NDArray[np.float64]) -> bytes:
    """ContourData text: x, y with 3 decimals, z as the slice plane's own value."""
    xy = points @ affine[:2, :2].T + (affine[:2, 2] * k + affine[:2, 3])
    if np.abs(xy).max() >= _MAX_COORDINATE:
        raise RTStructError("contour coordinates too large for a DS value")
    z = format_ds(float(affine[2, 2] * k + affine[2, 3]))
    text = (("%.3f\\%.3f\\" + z + "\\") * len(points)) % tuple(xy.ravel().tolist())
    data = text[:-1].encode("ascii")
    return data + b" " if len(data) % 2 else data


def format_ds(value: float) -> str:
    """Shortest text of ``value`` with up to 6 decimals, at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    text = "0" if text in ("-0", "") else text
    if len(text) > 16:
        raise RTStructError(f"value {value} does not fit a 16-character DS")
    return text


# --- dataset assembly -----------------------------------------------------------------


def _dataset(
    volume: CTVolume,
    model: ModelIdentity,
    rois: list[tuple[Structure, list[_Contour], int]],
    uids: tuple[str, str],
    now: datetime,
) -> Dataset:
    ds = Dataset()
    _patient_study(ds, volume)
    _series_equipment(ds, volume, model, uids[0], now)
    _structure_set(ds, volume, rois, model)
    ds.ApprovalStatus = "UNAPPROVED"
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = uids[1]
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.SpecificCharacterSet = _character_set(ds, [structure.name for structure, _, _ in rois])
    ds.file_meta = _file_meta(uids[1])
    # Nothing here has an ambiguous VR and the contours are encoded already: declared as explicit VR
    # little endian (the file's transfer syntax), the dataset is written as it is. Otherwise pydicom's
    # ambiguous-VR pass decodes every pre-encoded contour item only to encode it again (0.6 s for
    # the 2,400 contours of a 512² × 200 CT, half the time the RTSTRUCT takes to build).
    ds.set_original_encoding(False, True, convert_encodings(ds.SpecificCharacterSet))
    return ds


def _patient_study(ds: Dataset, volume: CTVolume) -> None:
    copied = dict(volume.info.patient_study)
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
    ):  # type 2: present, possibly empty
        setattr(ds, keyword, copied.pop(keyword, None) or "")
    for keyword, value in copied.items():
        if value is not None and value != "":
            setattr(ds, keyword, value)
    ds.StudyInstanceUID = volume.info.study_instance_uid


def _series_equipment(
    ds: Dataset, volume: CTVolume, model: ModelIdentity, series_uid: str, now: datetime
) -> None:
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = SERIES_NUMBER
    ds.SeriesDate = now.strftime("%Y%m%d")
    ds.SeriesTime = now.strftime("%H%M%S")
    ds.SeriesDescription = _lo(f"AI contours UNAPPROVED - {model.name} {model.version}")
    ds.OperatorsName = ""
    ds.Manufacturer = "rtseg"
    ds.ManufacturerModelName = _lo(model.name)
    ds.SoftwareVersions = [_lo(f"rtseg {__version__}"), _lo(f"{model.name} {model.version}")]
    ds.FrameOfReferenceUID = volume.info.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""


def _structure_set(
    ds: Dataset, volume: CTVolume, rois: list[tuple[Structure, list[_Contour], int]], model: ModelIdentity
) -> None:
    ds.StructureSetLabel = STRUCTURE_SET_LABEL
    ds.StructureSetName = _lo(f"AI {model.name}")
    description = f"AI-generated contours for clinical review - rtseg {model.name} {model.version}"
    if model.description:
        description += f" ({model.description})"
    if volume.info.notes:  # how the CT was read, e.g. an assumed PatientPosition
        description += " - " + "; ".join(volume.info.notes)
    ds.StructureSetDescription = description[:1024]
    ds.InstanceNumber = 1
    ds.StructureSetDate = ds.SeriesDate
    ds.StructureSetTime = ds.SeriesTime
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_referenced_frame(volume)])
    frame = volume.info.frame_of_reference_uid
    algorithm = _lo(f"rtseg {__version__}, model {model.name} {model.version}")
    ds.StructureSetROISequence = DicomSequence(
        _item(
            ROINumber=number,
            ReferencedFrameOfReferenceUID=frame,
            ROIName=structure.name,
            ROIGenerationAlgorithm="AUTOMATIC",
            ROIGenerationDescription=algorithm,
        )
        for number, (structure, _, _) in enumerate(rois, start=1)
    )
    sop_class = volume.info.sop_class_uid
    slice_uids = volume.info.sop_instance_uids
    ds.ROIContourSequence = DicomSequence(
        _roi_contour_item(number, structure, _contour_sequence(contours, sop_class, slice_uids))
        for number, (structure, contours, _) in enumerate(rois, start=1)
    )
    ds.RTROIObservationsSequence = DicomSequence(
        _item(
            ObservationNumber=number,
            ReferencedROINumber=number,
            ROIObservationLabel=structure.name,
            RTROIInterpretedType=structure.rt_type,
            ROIInterpreter="",
        )
        for number, (structure, _, _) in enumerate(rois, start=1)
    )


def _referenced_frame(volume: CTVolume) -> Dataset:
    images = DicomSequence(
        _item(ReferencedSOPClassUID=volume.info.sop_class_uid, ReferencedSOPInstanceUID=uid)
        for uid in volume.info.sop_instance_uids
    )
    series = _item(SeriesInstanceUID=volume.info.series_instance_uid, ContourImageSequence=images)
    study = _item(
        ReferencedSOPClassUID=_STUDY_COMPONENT_CLASS,
        ReferencedSOPInstanceUID=volume.info.study_instance_uid,
        RTReferencedSeriesSequence=DicomSequence([series]),
    )
    return _item(
        FrameOfReferenceUID=volume.info.frame_of_reference_uid,
        RTReferencedStudySequence=DicomSequence([study]),
    )


def _contour_sequence(contours: list[_Contour], sop_class: str, slice_uids: Sequence[str]) -> RawDataElement:
    """ContourSequence encoded directly (explicit VR little endian, defined lengths).

    A CT gives thousands of contours: building a pydicom Dataset per contour
    and one DS object per coordinate would cost more than tracing them. The
    element is raw, as if read from a file: pydicom writes it as it is and
    decodes it only when someone reads it.
    """
    class_value = _text_value(sop_class, b"\0")
    items = []
    for number, contour in enumerate(contours, start=1):
        image = _short(_REFERENCED_SOP_CLASS, b"UI", class_value) + _short(
            _REFERENCED_SOP_INSTANCE, b"UI", _text_value(slice_uids[contour.k], b"\0")
        )
        body = b"".join(
            (
                _sequence(_CONTOUR_IMAGE_SEQUENCE, [_item_bytes(image)]),
                _short(_CONTOUR_GEOMETRIC_TYPE, b"CS", b"CLOSED_PLANAR "),
                _short(_NUMBER_OF_CONTOUR_POINTS, b"IS", _text_value(str(contour.n_points), b" ")),
                _short(_CONTOUR_NUMBER, b"IS", _text_value(str(number), b" ")),
                _short(_CONTOUR_DATA, b"DS", contour.data),
            )
        )
        items.append(_item_bytes(body))
    value = b"".join(items)
    return RawDataElement(_CONTOUR_SEQUENCE, "SQ", len(value), value, 0, False, True)


def _text_value(text: str, pad: bytes) -> bytes:
    value = text.encode("ascii")
    return value + pad if len(value) % 2 else value


def _short(tag: BaseTag, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", tag.group, tag.element) + vr + struct.pack("<H", len(value)) + value


def _sequence(tag: BaseTag, items: list[bytes]) -> bytes:
    value = b"".join(items)
    return struct.pack("<HH", tag.group, tag.element) + b"SQ\0\0" + struct.pack("<I", len(value)) + value


def _item_bytes(body: bytes) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


def _roi_contour_item(number: int, structure: Structure, contour_sequence: RawDataElement) -> Dataset:
    item = _item(ReferencedROINumber=number, ROIDisplayColor=list(structure.color))
    item[_CONTOUR_SEQUENCE] = contour_sequence
    # Items are created here, never decoded, so pydicom's default charset is theirs;
    # declaring it as their original encoding lets pydicom write the raw sequence as is.
    item.set_original_encoding(False, True, default_encoding)
    return item


def _item(**elements: object) -> Dataset:
    item = Dataset()
    for keyword, value in elements.items():
        setattr(item, keyword, value)
    return item


def _lo(text: str) -> str:
    """A LO value: no backslash, at most 64 characters."""
    return text.replace("\\", "/")[:64]


def _character_set(ds: Dataset, roi_names: list[str]) -> str:
    """ISO_IR 100 (Latin-1) when every text fits it, UTF-8 otherwise.

    Only top-level elements and ROI names can hold free text; nested contour
    items are not visited (that would decode every ContourData value).
    """
    texts = [str(e.value) for e in ds if e.VR in _TEXT_VRS] + roi_names
    try:
        "".join(texts).encode("latin-1")
    except UnicodeEncodeError:
        return "ISO_IR 192"
    return "ISO_IR 100"


def _file_meta(sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTStructureSetStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta
