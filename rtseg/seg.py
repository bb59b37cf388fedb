"""DICOM Segmentation (SEG) of a label map, with highdicom: the second output format beside the RTSTRUCT.

A binary SEG in the CT's study and frame of reference, a new series that
references every CT slice. Each structure drawn is one segment, coded with
SNOMED CT (:mod:`rtseg.structure_codes`), algorithm type AUTOMATIC and the model
as the algorithm; the header carries the same provenance as the RTSTRUCT
(model name, version, federation round; "UNAPPROVED" in the series description).
Frames without a voxel of their segment are left out (``omit_empty_frames``).

The source images highdicom needs are built from the :class:`~rtseg.volume.CTVolume`
itself (identity, patient/study attributes and the geometry of every slice), so
the SEG lies on exactly the grid the labels were predicted on, in any patient
position, and references the same instances as the RTSTRUCT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from scipy import ndimage

from rtseg import __version__
from rtseg.errors import SegError
from rtseg.rtstruct import ModelIdentity, write_rtstruct
from rtseg.structure_codes import ANATOMICAL_STRUCTURE, Code, code_for
from rtseg.structures import Structure
from rtseg.volume import CTVolume

SERIES_NUMBER = 902  # the RTSTRUCT is 901
CONTENT_LABEL = "AI_UNAPPROVED"  # as the RTSTRUCT's structure set label


@dataclass(frozen=True)
class SegResult:
    """The SEG written and the structures in it (those without a voxel are ``omitted``)."""

    path: Path
    segments: tuple[str, ...]
    omitted: tuple[str, ...]


def write_seg(
    volume: CTVolume,
    labels: npt.NDArray[np.integer[Any]],
    structures: Sequence[Structure],
    model: ModelIdentity,
    out_path: Path,
    *,
    uids: tuple[str, str] | None = None,
    now: datetime | None = None,
) -> SegResult:
    """Write the binary DICOM SEG of ``labels`` (indexed ``[k, j, i]`` like ``volume.hu``) to ``out_path``.

    Parameters
    ----------
    volume
        The CT the labels were predicted on: study, frame of reference, slices referenced.
    labels
        Integer label map of ``volume.shape``; an EXTERNAL structure is every non-zero voxel.
    structures
        Segments in the order they are numbered; those without a voxel are left out.
    model
        Name, version and description (federation round) written as the algorithm and in the header.
    out_path
        Where the file is written (atomically).
    uids
        (SeriesInstanceUID, SOPInstanceUID), fixed so that a rerun writes the same instance.
    now
        Content date and time (default: now).

    Raises
    ------
    SegError
        The label map does not fit the CT, or no structure has a voxel.
    """
    import highdicom as hd

    masks, present, omitted = _masks(volume, labels, structures)
    series_uid, sop_uid = uids or (generate_uid(prefix=None), generate_uid(prefix=None))
    seg = hd.seg.Segmentation(
        source_images=source_images(volume),
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_description(n, s, model) for n, s in enumerate(present, start=1)],
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="rtseg",
        manufacturer_model_name=_lo(model.name),
        software_versions=_lo(f"rtseg {__version__}"),
        device_serial_number=_lo(model.version),  # Type 1: the device is the model, its weights' version
        content_description=_content_description(model),
        content_label=CONTENT_LABEL,
        content_creator_name="",
        omit_empty_frames=True,
    )
    _provenance(seg, model, now or datetime.now().astimezone())
    write_rtstruct(seg, out_path)  # the same atomic write (temporary file, fsync, rename)
    return SegResult(Path(out_path), tuple(s.name for s in present), omitted)


def _masks(
    volume: CTVolume, labels: npt.NDArray[np.integer[Any]], structures: Sequence[Structure]
) -> tuple[npt.NDArray[np.bool_], list[Structure], tuple[str, ...]]:
    """One boolean mask per structure drawn, as highdicom's ``(frames, rows, columns, segments)``.

    Stored segment-major (a view with the segment axis last): each mask is filled in its
    bounding box only, and highdicom's per-segment reads and overlap sum run on contiguous planes.
    """
    if labels.shape != volume.shape:
        raise SegError(
            f"label map has shape {labels.shape}, the CT has {volume.shape} (slices, rows, columns)"
        )
    labels = np.asarray(labels)
    boxes = ndimage.find_objects(labels.astype(np.int32, copy=False))
    drawn = [(s, box) for s in structures if (box := _box(boxes, s)) is not None]
    omitted = tuple(s.name for s in structures if _box(boxes, s) is None)
    if not drawn:
        raise SegError("the segmentation is empty: no structure has a voxel")
    masks = np.zeros((len(drawn), *volume.shape), dtype=np.bool_)
    for n, (structure, box) in enumerate(drawn):
        crop = labels[box]
        masks[n][box] = crop != 0 if structure.rt_type == "EXTERNAL" else crop == structure.label
    return np.moveaxis(masks, 0, -1), [s for s, _ in drawn], omitted


def _box(boxes: list[tuple[slice, ...] | None], structure: Structure) -> tuple[slice, ...] | None:
    """Bounding box of the structure's voxels (EXTERNAL: of every labelled voxel); None when it has none."""
    if structure.rt_type == "EXTERNAL":
        found = [b for b in boxes if b is not None]
        if not found:
            return None
        return tuple(slice(min(b[a].start for b in found), max(b[a].stop for b in found)) for a in range(3))
    return boxes[structure.label - 1] if 0 < structure.label <= len(boxes) else None


def source_images(volume: CTVolume) -> list[Dataset]:
    """The CT slice headers highdicom references, in volume order ``k``, built from the volume.

    Identity and patient/study attributes come from ``volume.info`` (with the UIDs the
    loader used, derived ones included), the geometry of slice ``k`` from the affine.
    """
    info, affine = volume.info, volume.affine
    row_step, column_step = np.linalg.norm(affine[:3, 1]), np.linalg.norm(affine[:3, 0])
    orientation = [*(affine[:3, 0] / column_step), *(affine[:3, 1] / row_step)]
    base = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime"):
        setattr(base, keyword, info.patient_study.get(keyword) or "")
    for keyword in ("ReferringPhysicianName", "StudyID", "AccessionNumber"):
        setattr(base, keyword, info.patient_study.get(keyword) or "")
    base.StudyInstanceUID = info.study_instance_uid
    base.SeriesInstanceUID = info.series_instance_uid
    base.FrameOfReferenceUID = info.frame_of_reference_uid
    base.SOPClassUID = info.sop_class_uid
    base.Modality = info.modality or "CT"
    base.Rows, base.Columns = volume.shape[1], volume.shape[2]
    base.PixelSpacing = [_ds(row_step), _ds(column_step)]
    base.SliceThickness = _ds(volume.spacing[0])
    base.ImageOrientationPatient = [_ds(v) for v in orientation]
    base.SamplesPerPixel, base.BitsAllocated, base.PhotometricInterpretation = 1, 16, "MONOCHROME2"
    out = []
    for k, uid in enumerate(info.sop_instance_uids):
        item = Dataset()
        item.update(base)
        item.SOPInstanceUID = uid
        item.ImagePositionPatient = [_ds(v) for v in volume.slice_z(k)]
        out.append(item)
    return out


def _description(number: int, structure: Structure, model: ModelIdentity) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    coding = code_for(structure.name)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_lo(model.name),
        family=codes.cid7162.ArtificialIntelligence,
        version=_lo(model.version),
        source="rtseg",
        parameters={"description": model.description} if model.description else None,
    )
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=_lo(structure.name),
        segmented_property_category=_concept(ANATOMICAL_STRUCTURE),
        segmented_property_type=_concept(coding.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*structure.color),
    )
    if coding.laterality is not None:  # nested in the type's item (PS3.3 Segment Description Macro)
        kind = description.SegmentedPropertyTypeCodeSequence[0]
        kind.SegmentedPropertyTypeModifierCodeSequence = [_concept(coding.laterality)]
    return description


def _concept(code: Code) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def _provenance(seg: Dataset, model: ModelIdentity, now: datetime) -> None:
    """What the RTSTRUCT says about its origin, in the SEG's header too."""
    seg.SeriesDescription = _lo(f"AI SEG UNAPPROVED - {model.name} {model.version}")
    seg.SoftwareVersions = [_lo(f"rtseg {__version__}"), _lo(f"{model.name} {model.version}")]
    seg.ContentDate = seg.SeriesDate = now.strftime("%Y%m%d")
    seg.ContentTime = seg.SeriesTime = now.strftime("%H%M%S")


def _content_description(model: ModelIdentity) -> str:
    """Model, version and federation round (e.g. "federation round 3"), as the RTSTRUCT says them."""
    text = f"{model.name} {model.version}"
    return _lo(f"{text}, {model.description}" if model.description else f"AI segmentation, {text}")


def _ds(value: float | np.floating[Any]) -> str:
    from rtseg.rtstruct.builder import format_ds

    return format_ds(float(value))


def _lo(text: str) -> str:
    """A LO value: no backslash, at most 64 characters."""
    return text.replace("\\", "/")[:64]
