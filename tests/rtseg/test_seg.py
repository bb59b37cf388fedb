"""DICOM SEG output: validated by dciodvfy, read back by highdicom and by dcmqi, in every patient position.

A phantom CT is written in HFS, FFS, HFP and FFP with organs that tell left
from right and head from feet; its label map becomes a SEG, and each reader's
masks, put back on the CT grid by patient coordinates, must match the label
map with Dice >= 0.99 per structure (a mirrored or flipped reader would not).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import SimpleITK as sitk

from rtseg.errors import SegError
from rtseg.phantom.dicom_io import SeriesSpec, write_ct_series
from rtseg.rtstruct import ModelIdentity
from rtseg.seg import write_seg
from rtseg.structure_codes import STRUCTURE_CODES
from rtseg.structures import BY_NAME, STRUCTURES, Structure
from rtseg.volume import CTVolume, Orientation

POSITIONS = ("HFS", "FFS", "HFP", "FFP")
SHAPE = (24, 96, 112)  # canonical [z, y, x]
SPACING = (3.0, 1.5, 1.25)
ORIGIN = (-70.0, -72.0, -36.0)
MODEL = ModelIdentity("PedAbdomenOAR", "2.1.0+abc123", "federation round 4")
NOW = datetime(2026, 3, 4, 5, 6, 7)
PRESENT = ("External", "Liver", "Kidney_L", "Kidney_R", "Lung_R", "SpinalCord")
SEGIMAGE2ITKIMAGE = Path(sys.executable).parent / "segimage2itkimage"  # dcmqi, from PyPI (test extra)


@cache
def canonical_labels() -> npt.NDArray[np.uint8]:
    """Labels [z, y, x] (towards +S, +P, +L): asymmetric organs, so that a mirror or flip shows."""
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip(SHAPE, SPACING, strict=True)), indexing="ij")
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[(((y - 72) / 60) ** 2 + ((x - 70) / 66) ** 2 <= 1) & (z >= 3) & (z <= 66)] = 1
    organs = {
        "Liver": ((30, 70, 40), (15, 22, 18)),
        "Kidney_L": ((24, 95, 105), (9, 10, 8)),
        "Kidney_R": ((36, 95, 35), (9, 10, 8)),
        "Lung_R": ((58, 60, 38), (8, 18, 14)),
        "SpinalCord": ((33, 110, 70), (30, 4, 4)),
    }
    for name, (centre, radii) in organs.items():
        inside = sum(((a - c) / r) ** 2 for a, c, r in zip((z, y, x), centre, radii, strict=True)) <= 1
        labels[inside] = BY_NAME[name].label
    return labels


def expected(labels: npt.NDArray[np.integer], structure: Structure) -> npt.NDArray[np.bool_]:
    return labels != 0 if structure.rt_type == "EXTERNAL" else labels == structure.label


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return 2.0 * float(np.count_nonzero(a & b)) / float(np.count_nonzero(a) + np.count_nonzero(b))


@dataclass(frozen=True)
class Case:
    position: str
    ct_dir: Path
    seg_path: Path
    volume: CTVolume
    labels: npt.NDArray[np.uint8]  # volume layout [k, j, i]


def make_case(directory: Path, position: str) -> Case:
    hu = np.where(canonical_labels() > 0, 40, -1000).astype(np.int16)
    spec = SeriesSpec(uid_seed=f"seg-test-{position}", patient_position=position)
    volume = write_ct_series(hu, SPACING, ORIGIN, directory / "ct", spec)
    labels = Orientation.from_affine(volume.affine).from_canonical(canonical_labels())
    seg_path = directory / "seg.dcm"
    write_seg(volume, labels, STRUCTURES, MODEL, seg_path, uids=("2.25.11", "2.25.12"), now=NOW)
    return Case(position, directory / "ct", seg_path, volume, np.ascontiguousarray(labels))


@pytest.fixture(scope="module", params=POSITIONS)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    return make_case(tmp_path_factory.mktemp(request.param), request.param)


def on_volume_grid(image: sitk.Image, volume: CTVolume) -> npt.NDArray[np.bool_]:
    """``image`` resampled (nearest neighbour, by patient coordinates) onto the CT's ``[k, j, i]`` grid."""
    affine = volume.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    reference = sitk.Image(volume.shape[2], volume.shape[1], volume.shape[0], sitk.sitkUInt8)
    reference.SetSpacing(spacing.tolist())
    reference.SetOrigin(affine[:3, 3].tolist())
    reference.SetDirection((affine[:3, :3] / spacing).ravel().tolist())
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(resampled) > 0


# --- validation and independent readers -------------------------------------------------------------


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) is required")
def test_dciodvfy_reports_no_errors(case: Case) -> None:
    run = subprocess.run(["dciodvfy", str(case.seg_path)], capture_output=True, text=True)
    lines = (run.stdout + run.stderr).splitlines()
    warnings = [line for line in lines if "Warning" in line]
    print(f"{case.position}: dciodvfy warnings ({len(warnings)}):", *warnings, sep="\n  ")
    assert [line for line in lines if "Error" in line] == []
    assert "Segmentation" in lines


def test_highdicom_reads_every_segment_back_in_place(case: Case) -> None:
    seg = hd.seg.segread(case.seg_path)
    labels_by_number = {int(d.SegmentNumber): str(d.SegmentLabel) for d in seg.SegmentSequence}
    assert sorted(labels_by_number.values()) == sorted(PRESENT)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(case.volume.info.sop_instance_uids),
        segment_numbers=sorted(labels_by_number),
        assert_missing_frames_are_empty=True,
    )
    for n, number in enumerate(sorted(labels_by_number)):
        name = labels_by_number[number]
        assert dice(pixels[..., n] > 0, expected(case.labels, BY_NAME[name])) >= 0.99, name


@pytest.mark.skipif(not SEGIMAGE2ITKIMAGE.exists(), reason="dcmqi (segimage2itkimage) is required")
def test_dcmqi_reads_every_segment_back_in_place(case: Case, tmp_path: Path) -> None:
    out = tmp_path / "dcmqi"
    out.mkdir()
    cmd = [str(SEGIMAGE2ITKIMAGE), "--inputDICOM", str(case.seg_path), "--outputDirectory", str(out)]
    run = subprocess.run([*cmd, "-t", "nifti"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    seg = pydicom.dcmread(case.seg_path)
    names = {int(d.SegmentNumber): str(d.SegmentLabel) for d in seg.SegmentSequence}
    files = sorted(out.glob("*.nii.gz"))
    assert len(files) == len(names)
    for path in files:
        number = int(path.name.split(".")[0].split("-")[-1])
        mask = on_volume_grid(sitk.ReadImage(str(path)), case.volume)
        name = names[number]
        assert dice(mask, expected(case.labels, BY_NAME[name])) >= 0.99, (case.position, name)


# --- header: codes, algorithm, provenance, references ------------------------------------------------


def test_segments_are_snomed_coded_automatic_with_the_model_as_algorithm(case: Case) -> None:
    seg = pydicom.dcmread(case.seg_path)
    for item in seg.SegmentSequence:
        code = STRUCTURE_CODES[str(item.SegmentLabel)]
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("91723000", "SCT")
        assert (kind.CodeValue, kind.CodingSchemeDesignator) == (code.type.value, "SCT")
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == "PedAbdomenOAR"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("PedAbdomenOAR", "2.1.0+abc123")
        assert "federation round 4" in algorithm.AlgorithmParameters
        modifier = kind.get("SegmentedPropertyTypeModifierCodeSequence")
        side = {"Kidney_L": "7771000", "Kidney_R": "24028007", "Lung_R": "24028007"}.get(item.SegmentLabel)
        assert (modifier[0].CodeValue if modifier else None) == side


def test_same_study_new_series_referencing_every_ct_slice(case: Case) -> None:
    seg = pydicom.dcmread(case.seg_path)
    info = case.volume.info
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage
    assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID) == (
        info.study_instance_uid,
        info.frame_of_reference_uid,
    )
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == ("2.25.11", "2.25.12")
    assert seg.SeriesInstanceUID != info.series_instance_uid
    assert seg.SegmentationType == "BINARY"
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == info.series_instance_uid
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} == set(
        info.sop_instance_uids
    )
    assert "UNAPPROVED" in seg.SeriesDescription and "PedAbdomenOAR 2.1.0+abc123" in seg.SeriesDescription
    assert seg.ContentDescription == "PedAbdomenOAR 2.1.0+abc123, federation round 4"
    assert seg.ContentLabel == "AI_UNAPPROVED"
    assert "PedAbdomenOAR 2.1.0+abc123" in seg.SoftwareVersions
    # frames without their segment are omitted: far fewer than slices x segments
    assert int(seg.NumberOfFrames) < len(info.sop_instance_uids) * len(PRESENT)


# --- bad input ------------------------------------------------------------------------------------------


def test_wrong_label_shape_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    case = make_case(tmp_path, "HFS")
    with pytest.raises(SegError, match=r"label map has shape \(3, 4, 5\), the CT has"):
        write_seg(case.volume, np.zeros((3, 4, 5), np.uint8), STRUCTURES, MODEL, tmp_path / "x.dcm")
    empty = np.zeros(case.volume.shape, np.uint8)
    with pytest.raises(SegError, match="no structure has a voxel"):
        write_seg(case.volume, empty, STRUCTURES, MODEL, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


# --- the [[destinations]] formats setting -------------------------------------------------------------


def test_destination_formats_default_to_rtstruct_and_take_seg(tmp_path: Path) -> None:
    from rtseg.settings import load_settings

    config = tmp_path / "rtseg.toml"
    config.write_text(
        '[[destinations]]\nname = "tps"\nae_title = "TPS"\nhost = "10.0.0.7"\nport = 104\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "10.0.0.5"\nport = 104\n'
        'formats = ["RTSTRUCT", "seg"]\n'
    )
    tps, pacs = load_settings(config, environ={}).destinations
    assert (tps.formats, pacs.formats) == (("rtstruct",), ("rtstruct", "seg"))


@pytest.mark.parametrize("value", ['["nifti"]', "[]", '["seg", "seg"]', '["seg", 3]'])
def test_a_bad_destination_format_names_the_file_key_and_value(tmp_path: Path, value: str) -> None:
    from rtseg.errors import InputError
    from rtseg.settings import load_settings

    config = tmp_path / "rtseg.toml"
    config.write_text(
        f'[[destinations]]\nname = "t"\nae_title = "T"\nhost = "h"\nport = 104\nformats = {value}\n'
    )
    with pytest.raises(
        InputError, match=r"destinations\[0\]\.formats must be a non-empty list of 'rtstruct' and 'seg'"
    ):
        load_settings(config, environ={})
