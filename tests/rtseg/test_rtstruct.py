"""RTSTRUCT writer: validated by dciodvfy, read back by plastimatch, rt-utils and our rasterizer.

The phantom is asymmetric (liver on the patient's right, kidney on the left,
a ring-shaped stomach with a hole), written as a real CT series in HFS, FFS,
HFP and FFP. Mirrored or rotated contours, lost holes, off-plane contours and
broken references are what planning systems show their users; each test
checks one of them with an independent reader where one exists.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataelem import RawDataElement
from rt_utils import RTStructBuilder

from rtseg import __version__
from rtseg.errors import RTStructError
from rtseg.phantom.dicom_io import SeriesSpec, write_ct_series
from rtseg.rtstruct import (
    ModelIdentity,
    RTStructResult,
    build_rtstruct,
    rasterize_rtstruct,
    write_rtstruct,
)
from rtseg.rtstruct.contours import trace_mask
from rtseg.structures import BY_NAME, STRUCTURES, Structure
from rtseg.volume import CTVolume, Orientation

POSITIONS = ("HFS", "FFS", "HFP", "FFP")
SHAPE = (28, 256, 256)  # canonical [z, y, x]
SPACING = (2.5, 0.5, 0.5)  # mm
ORIGIN = (-64.0, -70.0, -30.0)  # LPS of canonical voxel [0, 0, 0]
MODEL = ModelIdentity("PedAbdomenOAR", "2.1.0", "federated nnU-Net")
NOW = datetime(2026, 3, 4, 5, 6, 7)
PRESENT = ("External", "Liver", "Kidney_L", "Stomach", "Gallbladder")
CONTOUR_DATA = 0x30060050

needs_tools = pytest.mark.skipif(
    shutil.which("dciodvfy") is None or shutil.which("plastimatch") is None,
    reason="dicom3tools (dciodvfy) and plastimatch are required",
)


@cache
def canonical_phantom() -> npt.NDArray[np.uint8]:
    """Labels [z, y, x] (towards +S, +P, +L) with smooth, asymmetric organs in mm."""
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip(SHAPE, SPACING, strict=True)), indexing="ij")
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[(((y - 64) / 48) ** 2 + ((x - 64) / 58) ** 2 <= 1) & (z >= 5) & (z <= 62)] = 1
    labels[((z - 35) / 20) ** 2 + ((y - 58) / 22) ** 2 + ((x - 38) / 18) ** 2 <= 1] = BY_NAME["Liver"].label
    labels[((z - 30) / 18) ** 2 + ((y - 84) / 16) ** 2 + ((x - 98) / 12) ** 2 <= 1] = BY_NAME[
        "Kidney_L"
    ].label
    # A torus around a cranio-caudal axis: every axial slice through it is a ring.
    ring = (np.hypot(y - 46, x - 90) - 16) ** 2 + (z - 40) ** 2 <= 8**2
    labels[ring] = BY_NAME["Stomach"].label
    tiny = ((z - 35) / 1.5) ** 2 + ((y - 75) / 2) ** 2 + ((x - 60) / 2) ** 2 <= 1
    labels[tiny] = BY_NAME["Gallbladder"].label  # well under 5 ml; Spleen stays empty
    return labels


def expected_mask(labels: npt.NDArray[np.integer], structure: Structure) -> npt.NDArray[np.bool_]:
    return labels != 0 if structure.rt_type == "EXTERNAL" else labels == structure.label


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return 2.0 * float(np.count_nonzero(a & b)) / float(np.count_nonzero(a) + np.count_nonzero(b))


@dataclass(frozen=True)
class Case:
    position: str
    ct_dir: Path
    rs_path: Path
    volume: CTVolume
    labels: npt.NDArray[np.uint8]  # volume layout [k, j, i]
    result: RTStructResult

    def expected(self, name: str) -> npt.NDArray[np.bool_]:
        return expected_mask(self.labels, BY_NAME[name])

    def mirrored(self, name: str) -> npt.NDArray[np.bool_]:
        """The structure mirrored left-right in the patient (what a flipped reader would see)."""
        orientation = Orientation.from_affine(self.volume.affine)
        canonical = orientation.to_canonical(self.expected(name))
        return orientation.from_canonical(np.flip(canonical, axis=2))

    def large(self) -> list[str]:
        return [s.name for s in self.result.included if s.volume_ml > 5.0]


def make_case(directory: Path, position: str) -> Case:
    hu = np.where(canonical_phantom() > 0, 40, -1000).astype(np.int16)
    spec = SeriesSpec(uid_seed=f"rtstruct-test-{position}", patient_position=position)
    volume = write_ct_series(hu, SPACING, ORIGIN, directory / "ct", spec)
    labels = Orientation.from_affine(volume.affine).from_canonical(canonical_phantom())
    result = build_rtstruct(volume, labels, STRUCTURES, MODEL, now=NOW)
    rs_path = directory / "rtstruct.dcm"
    write_rtstruct(result.dataset, rs_path)
    return Case(position, directory / "ct", rs_path, volume, labels, result)


@pytest.fixture(scope="module", params=POSITIONS)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    return make_case(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def plastimatch_read(case: Case) -> dict[str, npt.NDArray[np.bool_]]:
    return plastimatch_masks(case)


@pytest.fixture(scope="module")
def rt_utils_read(case: Case) -> dict[str, npt.NDArray[np.bool_]]:
    return rt_utils_masks(case)


def plastimatch_masks(case: Case, *, xor: bool = True) -> dict[str, npt.NDArray[np.bool_]]:
    """plastimatch's rasterisation of every ROI, mapped onto the CT grid by physical geometry."""
    out = case.rs_path.parent / ("plastimatch_xor" if xor else "plastimatch_or")
    command = ["plastimatch", "convert", "--input", str(case.rs_path), "--referenced-ct", str(case.ct_dir)]
    command += ["--output-prefix", str(out), "--prefix-format", "nrrd"]
    # plastimatch ORs the contours of a plane unless told otherwise; planning systems XOR them.
    command += ["--xor-contours"] if xor else []
    subprocess.run(command, check=True, capture_output=True, text=True)
    return {path.stem: on_ct_grid(sitk.ReadImage(str(path)), case.volume) for path in out.glob("*.nrrd")}


def on_ct_grid(image: sitk.Image, volume: CTVolume) -> npt.NDArray[np.bool_]:
    """Resample an ITK image (LPS) onto the CT's [k, j, i] grid; the grids must coincide."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    to_physical = np.eye(4)
    to_physical[:3, :3] = direction * np.array(image.GetSpacing())
    to_physical[:3, 3] = image.GetOrigin()
    ct_to_image = np.linalg.inv(to_physical) @ volume.affine  # CT (i, j, k) → image (a, b, c)
    rotation = np.rint(ct_to_image[:3, :3])
    offset = np.rint(ct_to_image[:3, 3])
    assert np.allclose(ct_to_image[:3, :3], rotation, atol=1e-4), "grids are not aligned"
    assert np.allclose(ct_to_image[:3, 3], offset, atol=1e-3), "grids are shifted by a fraction of a voxel"
    array = sitk.GetArrayFromImage(image)  # array axes (c, b, a)
    index: list[npt.NDArray[np.int64]] = [np.zeros(0, dtype=np.int64)] * 3
    ct_axis = [0, 0, 0]
    for m in range(3):  # image index axis m ← CT index axis n
        n = int(np.argmax(np.abs(rotation[m])))
        index[2 - m] = (rotation[m, n] * np.arange(volume.shape[2 - n]) + offset[m]).astype(np.int64)
        ct_axis[2 - m] = 2 - n
    for axis, values in enumerate(index):
        assert values.min() >= 0 and values.max() < array.shape[axis], "image does not cover the CT"
    sampled = array[np.ix_(*index)] > 0
    return np.transpose(sampled, [ct_axis.index(p) for p in range(3)])


def rt_utils_masks(case: Case) -> dict[str, npt.NDArray[np.bool_]]:
    """rt-utils' masks, re-ordered onto the CT grid by SOP instance."""
    rtstruct = RTStructBuilder.create_from(
        dicom_series_path=str(case.ct_dir), rt_struct_path=str(case.rs_path)
    )
    k_of = {uid: k for k, uid in enumerate(case.volume.info.sop_instance_uids)}
    assert sorted(k_of[s.SOPInstanceUID] for s in rtstruct.series_data) == list(range(case.volume.shape[0]))
    masks = {}
    for name in rtstruct.get_roi_names():
        mask = rtstruct.get_roi_mask_by_name(name)  # [row, column, rt-utils slice] for square slices
        volume_mask = np.zeros(case.volume.shape, dtype=bool)
        for s, image in enumerate(rtstruct.series_data):
            volume_mask[k_of[image.SOPInstanceUID]] = mask[:, :, s]
        masks[name] = volume_mask
    return masks


def contour_items(dataset: pydicom.Dataset, name: str | None = None) -> list[pydicom.Dataset]:
    numbers = {int(r.ROINumber): str(r.ROIName) for r in dataset.StructureSetROISequence}
    return [
        contour
        for roi in dataset.ROIContourSequence
        if name is None or numbers[int(roi.ReferencedROINumber)] == name
        for contour in roi.ContourSequence
    ]


def stored_length(contour: pydicom.Dataset) -> int:
    """Encoded length of ContourData as written (the element is raw until decoded)."""
    element = contour.get_item(CONTOUR_DATA)
    assert isinstance(element, RawDataElement)
    return element.length


def dciodvfy(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return (run.stdout + run.stderr).splitlines()


# --- validation and independent readers ------------------------------------------------------------


@needs_tools
def test_dciodvfy_reports_no_errors_or_warnings(case: Case) -> None:
    lines = dciodvfy(case.rs_path)
    assert [line for line in lines if "Error" in line] == []
    assert [line for line in lines if "Warning" in line] == []
    assert "RTStructureSet" in lines


@needs_tools
def test_plastimatch_reads_every_large_structure_back_unflipped(
    case: Case, plastimatch_read: dict[str, npt.NDArray[np.bool_]]
) -> None:
    masks = plastimatch_read
    assert sorted(masks) == sorted(PRESENT)
    assert case.large() == ["External", "Liver", "Kidney_L", "Stomach"]
    for name in case.large():
        assert dice(masks[name], case.expected(name)) >= 0.97, name
    # The check would catch a left-right flip: the liver lies on one side only.
    assert dice(masks["Liver"], case.mirrored("Liver")) < 0.3


def test_rt_utils_reads_every_large_structure_back_unflipped(
    case: Case, rt_utils_read: dict[str, npt.NDArray[np.bool_]]
) -> None:
    masks = rt_utils_read
    assert sorted(masks) == sorted(PRESENT)
    for name in case.large():
        assert dice(masks[name], case.expected(name)) >= 0.97, name
    assert dice(masks["Liver"], case.mirrored("Liver")) < 0.3


def test_rasterize_rtstruct_gives_the_labels_back_exactly(case: Case) -> None:
    masks = rasterize_rtstruct(pydicom.dcmread(case.rs_path), case.volume)
    assert list(masks) == list(PRESENT)
    for name in PRESENT:
        assert np.array_equal(masks[name], case.expected(name)), name


@needs_tools
def test_ring_keeps_its_hole(
    case: Case,
    plastimatch_read: dict[str, npt.NDArray[np.bool_]],
    rt_utils_read: dict[str, npt.NDArray[np.bool_]],
) -> None:
    ring = case.expected("Stomach")
    k = int(np.argmax(ring.sum(axis=(1, 2))))
    # The ring's axis, placed in canonical mm by canonical_phantom(), on the ring's widest slice.
    z = case.volume.slice_z(k)[2]
    centre = np.linalg.inv(case.volume.affine) @ np.array([ORIGIN[0] + 90, ORIGIN[1] + 46, z, 1.0])
    i, j = int(round(centre[0])), int(round(centre[1]))
    assert ring[k].any() and not ring[k, j, i]
    readers = {
        "rtseg": rasterize_rtstruct(case.result.dataset, case.volume)["Stomach"],
        "plastimatch": plastimatch_read["Stomach"],
        "rt-utils": rt_utils_read["Stomach"],
    }
    for reader, mask in readers.items():
        assert mask[k].any() and not mask[k, j, i], reader
    on_slice = [
        c for c in contour_items(case.result.dataset, "Stomach") if abs(float(c.ContourData[2]) - z) < 1e-6
    ]
    assert len(on_slice) == 2  # outer and inner boundary, separate contours


# --- encoding limits and references ------------------------------------------------------------------


def test_contour_values_fit_their_value_representations(case: Case) -> None:
    dataset = pydicom.dcmread(case.rs_path)
    contours = contour_items(dataset)
    assert len(contours) == sum(s.n_contours for s in case.result.included)
    for contour in contours:
        element = contour.get_item(CONTOUR_DATA)
        assert isinstance(element, RawDataElement)
        assert element.length < 65_534
        values = element.value.decode("ascii").rstrip(" ").split("\\")
        assert max(len(v) for v in values) <= 16
        assert len(values) % 3 == 0 and len(values) // 3 >= 3
        assert int(contour.NumberOfContourPoints) == len(values) // 3
        assert contour.ContourGeometricType == "CLOSED_PLANAR"


def test_references_and_planes_match_the_ct(case: Case) -> None:
    dataset = pydicom.dcmread(case.rs_path)
    ct = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(case.ct_dir.iterdir())]
    z_of = {s.SOPInstanceUID: float(s.ImagePositionPatient[2]) for s in ct}
    frame = ct[0].FrameOfReferenceUID
    assert dataset.FrameOfReferenceUID == frame
    assert dataset.StudyInstanceUID == ct[0].StudyInstanceUID
    assert dataset.SeriesInstanceUID != ct[0].SeriesInstanceUID
    referenced_frame = dataset.ReferencedFrameOfReferenceSequence[0]
    assert referenced_frame.FrameOfReferenceUID == frame
    study = referenced_frame.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == ct[0].StudyInstanceUID
    series = study.RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == ct[0].SeriesInstanceUID
    listed = [image.ReferencedSOPInstanceUID for image in series.ContourImageSequence]
    assert sorted(listed) == sorted(z_of) and len(listed) == len(ct)
    assert {image.ReferencedSOPClassUID for image in series.ContourImageSequence} == {ct[0].SOPClassUID}
    assert {r.ReferencedFrameOfReferenceUID for r in dataset.StructureSetROISequence} == {frame}
    for contour in contour_items(dataset):
        (image,) = contour.ContourImageSequence
        assert image.ReferencedSOPClassUID == ct[0].SOPClassUID
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        assert np.abs(points[:, 2] - z_of[image.ReferencedSOPInstanceUID]).max() < 1e-6


def test_header_states_provenance_names_and_colours(case: Case) -> None:
    dataset = pydicom.dcmread(case.rs_path)
    wanted = [s for s in STRUCTURES if s.name in PRESENT]  # order of the structure table
    rois = dataset.StructureSetROISequence
    assert [r.ROIName for r in rois] == [s.name for s in wanted]
    assert [int(r.ROINumber) for r in rois] == list(range(1, len(wanted) + 1))
    assert {r.ROIGenerationAlgorithm for r in rois} == {"AUTOMATIC"}
    assert all(f"{MODEL.name} {MODEL.version}" in r.ROIGenerationDescription for r in rois)
    colours = {
        int(c.ReferencedROINumber): [int(v) for v in c.ROIDisplayColor] for c in dataset.ROIContourSequence
    }
    assert [colours[n] for n in range(1, len(wanted) + 1)] == [list(s.color) for s in wanted]
    observations = dataset.RTROIObservationsSequence
    assert [o.RTROIInterpretedType for o in observations] == [s.rt_type for s in wanted]
    assert observations[0].RTROIInterpretedType == "EXTERNAL"
    assert dataset.ApprovalStatus == "UNAPPROVED"
    assert dataset.StructureSetLabel == "AI_UNAPPROVED"
    assert (
        "AI-generated" in dataset.StructureSetDescription and MODEL.version in dataset.StructureSetDescription
    )
    assert "AI" in dataset.SeriesDescription and "UNAPPROVED" in dataset.SeriesDescription
    assert dataset.Modality == "RTSTRUCT"
    assert dataset.Manufacturer == "rtseg" and dataset.ManufacturerModelName == MODEL.name
    assert list(dataset.SoftwareVersions) == [f"rtseg {__version__}", f"{MODEL.name} {MODEL.version}"]
    assert (dataset.StructureSetDate, dataset.StructureSetTime) == ("20260304", "050607")
    assert (dataset.InstanceCreationDate, dataset.InstanceCreationTime) == ("20260304", "050607")
    ct = pydicom.dcmread(next(case.ct_dir.iterdir()), stop_before_pixels=True)
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyID",
        "AccessionNumber",
    ):
        assert dataset[keyword].value == ct[keyword].value, keyword


def test_empty_structures_are_reported_not_written(case: Case) -> None:
    result = case.result
    assert [s.name for s in result.included] == list(PRESENT)
    assert set(result.omitted) == {s.name for s in STRUCTURES} - set(PRESENT)
    assert "Spleen" in result.omitted
    for report in result.included:
        voxels = np.count_nonzero(case.expected(report.name))
        assert report.volume_ml == pytest.approx(voxels * case.volume.voxel_volume_ml)
        assert report.label == BY_NAME[report.name].label
    tiny = next(s for s in result.included if s.name == "Gallbladder")
    assert tiny.volume_ml < 0.1 and tiny.n_contours >= 1


# --- API behaviour -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hfs(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return make_case(tmp_path_factory.mktemp("hfs-api"), "HFS")


@needs_tools
def test_plastimatch_without_xor_fills_the_ring(hfs: Case) -> None:
    """Documents the reader: holes survive only where contours are XORed (plastimatch needs a flag)."""
    ored = plastimatch_masks(hfs, xor=False)["Stomach"]
    assert np.count_nonzero(ored & ~hfs.expected("Stomach")) > 0


def test_wrong_label_shape_is_refused_with_a_clear_message(hfs: Case) -> None:
    with pytest.raises(RTStructError, match=r"label map has shape \(28, 256, 10\)"):
        build_rtstruct(hfs.volume, hfs.labels[:, :, :10], STRUCTURES, MODEL)


def test_rasterize_refuses_another_frame_of_reference(hfs: Case) -> None:
    dataset = pydicom.dcmread(hfs.rs_path)
    for roi in dataset.StructureSetROISequence:
        roi.ReferencedFrameOfReferenceUID = "1.2.3.4"
    with pytest.raises(RTStructError, match="frame of reference"):
        rasterize_rtstruct(dataset, hfs.volume)


def test_fixed_uids_make_a_resend_the_same_instance(hfs: Case, tmp_path: Path) -> None:
    uids = {"series_instance_uid": "2.25.1234", "sop_instance_uid": "2.25.5678"}
    paths = []
    for n in range(2):
        result = build_rtstruct(hfs.volume, hfs.labels, STRUCTURES, MODEL, now=NOW, **uids)
        paths.append(tmp_path / f"rs{n}.dcm")
        write_rtstruct(result.dataset, paths[-1])
    assert paths[0].read_bytes() == paths[1].read_bytes()
    dataset = pydicom.dcmread(paths[0])
    assert (dataset.SeriesInstanceUID, dataset.SOPInstanceUID) == ("2.25.1234", "2.25.5678")
    assert dataset.file_meta.MediaStorageSOPInstanceUID == "2.25.5678"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rs0.dcm", "rs1.dcm"]  # no temporary files left


def test_the_contours_are_written_as_encoded_with_the_same_bytes_as_pydicoms_full_pass(
    hfs: Case, tmp_path: Path
) -> None:
    """The pre-encoded contour items go to the file as they are, not decoded and encoded again by
    pydicom's ambiguous-VR pass (most of the writing time of a large structure set): same bytes."""
    uids = {"series_instance_uid": "2.25.1234", "sop_instance_uid": "2.25.5678"}
    fast = build_rtstruct(hfs.volume, hfs.labels, STRUCTURES, MODEL, now=NOW, **uids).dataset
    write_rtstruct(fast, tmp_path / "fast.dcm")
    contours = [item.get_item(0x30060040) for item in fast.ROIContourSequence]
    assert contours and all(isinstance(c, RawDataElement) for c in contours)  # never decoded

    full = build_rtstruct(hfs.volume, hfs.labels, STRUCTURES, MODEL, now=NOW, **uids).dataset
    full.set_original_encoding(None, None, None)  # what pydicom assumes of a dataset built in memory
    write_rtstruct(full, tmp_path / "full.dcm")
    assert not isinstance(full.ROIContourSequence[0].get_item(0x30060040), RawDataElement)  # it decoded
    assert (tmp_path / "fast.dcm").read_bytes() == (tmp_path / "full.dcm").read_bytes()


def test_tracing_in_slabs_and_threads_writes_the_same_file(
    hfs: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Structures are traced two at a time, a slab of slices at a time (memory of a long series):
    the same contours in the same order as one structure, all slices, at a time."""
    from rtseg.rtstruct import builder

    uids = {"series_instance_uid": "2.25.1234", "sop_instance_uid": "2.25.5678"}
    files = []
    for slab, threads in ((10_000, 1), (3, 2), (1, 2)):
        monkeypatch.setattr(builder, "TRACE_SLAB", slab)
        monkeypatch.setattr(builder, "TRACE_THREADS", threads)
        result = build_rtstruct(hfs.volume, hfs.labels, STRUCTURES, MODEL, now=NOW, **uids)
        write_rtstruct(result.dataset, tmp_path / f"rs-{slab}.dcm")
        files.append((tmp_path / f"rs-{slab}.dcm").read_bytes())
    assert files[0] == files[1] == files[2]


def small_ct(directory: Path, shape: tuple[int, int, int], position: str = "HFS") -> CTVolume:
    spec = SeriesSpec(uid_seed=f"small-{shape}-{position}", patient_position=position)
    return write_ct_series(
        np.zeros(shape, dtype=np.int16), (3.0, 0.9765625, 0.9765625), (-250.0, -250.0, -90.0), directory, spec
    )


@pytest.mark.parametrize("position", POSITIONS)
def test_speckle_with_holes_islands_and_diagonal_touches_round_trips_exactly(
    tmp_path: Path, position: str
) -> None:
    rng = np.random.default_rng(7)
    volume = small_ct(tmp_path / "ct", (4, 40, 48), position)
    labels = np.where(rng.random(volume.shape) < 0.45, BY_NAME["Liver"].label, 0).astype(np.uint8)
    result = build_rtstruct(volume, labels, [BY_NAME["Liver"]], MODEL)
    write_rtstruct(result.dataset, tmp_path / "rs.dcm")
    masks = rasterize_rtstruct(pydicom.dcmread(tmp_path / "rs.dcm"), volume)
    assert np.array_equal(masks["Liver"], labels > 0)
    assert all(int(c.NumberOfContourPoints) >= 3 for c in contour_items(result.dataset))


def body_outline(teeth: int = 0, slots: bool = False) -> npt.NDArray[np.uint8]:
    """A 512 × 512 body outline on 3 slices.

    ``teeth`` > 0 cuts 4-voxel steps into the edge by angle (the contour gets
    too long for one element but simplifies within 0.5 voxel). ``slots`` cuts
    deep slots lined with 1-voxel teeth into the body: a ~17,000-point outline
    that no 0.5-voxel simplification brings under one element, so it must be split.
    """
    y, x = np.mgrid[0:512, 0:512]
    radius = np.hypot((y - 256) / 200, (x - 256) / 245)
    if teeth:
        sector = np.floor((np.arctan2(y - 256, x - 256) + np.pi) / (2 * np.pi) * teeth).astype(int)
        radius = radius + (sector % 2) * 4 / 200
    body = radius <= 1
    if slots:
        for left in range(96, 420, 40):
            slot = (x >= left) & (x < left + 12) & (y < 380)
            tooth = slot & (y % 2 == 0) & ((x < left + 4) | (x >= left + 8))
            body &= ~slot | tooth
    return np.repeat(body[None], 3, axis=0).astype(np.uint8)


def test_512_body_outline_is_one_exact_contour_per_slice(tmp_path: Path) -> None:
    volume = small_ct(tmp_path / "ct", (3, 512, 512))
    labels = Orientation.from_affine(volume.affine).from_canonical(body_outline())
    result = build_rtstruct(volume, labels, [BY_NAME["External"]], MODEL)
    contours = contour_items(result.dataset)
    assert len(contours) == 3
    assert all(stored_length(c) < 65_534 for c in contours)
    assert np.array_equal(rasterize_rtstruct(result.dataset, volume)["External"], labels > 0)


@needs_tools
@pytest.mark.parametrize("outline", ["simplified", "split"])
def test_512_jagged_outline_stays_below_the_element_limit(tmp_path: Path, outline: str) -> None:
    volume = small_ct(tmp_path / "ct", (3, 512, 512))
    canonical = body_outline(teeth=900) if outline == "simplified" else body_outline(slots=True)
    labels = Orientation.from_affine(volume.affine).from_canonical(canonical)
    traced = trace_mask(labels > 0)
    assert max(len(c.points) for c in traced) * 3 * 7 > 65_534  # too long for one element as traced
    result = build_rtstruct(volume, labels, [BY_NAME["External"]], MODEL)
    rs_path = tmp_path / "rs.dcm"
    write_rtstruct(result.dataset, rs_path)
    contours = contour_items(pydicom.dcmread(rs_path))
    assert all(stored_length(c) < 65_534 for c in contours)
    if outline == "simplified":
        assert len(contours) == len(traced)
        longest = max(len(c.points) for c in traced)
        assert max(int(c.NumberOfContourPoints) for c in contours) < longest
    else:
        assert len(contours) > len(traced)
    assert [line for line in dciodvfy(rs_path) if "Error" in line] == []
    expected = labels > 0
    assert dice(rasterize_rtstruct(result.dataset, volume)["External"], expected) >= 0.99
    case = Case("HFS", tmp_path / "ct", rs_path, volume, labels, result)
    assert dice(plastimatch_masks(case)["External"], expected) >= 0.99


@needs_tools
@pytest.mark.parametrize(("name", "charset"), [("Müller^Zoë", "ISO_IR 100"), ("山田^太郎", "ISO_IR 192")])
def test_patient_names_keep_their_characters(hfs: Case, tmp_path: Path, name: str, charset: str) -> None:
    info = dataclasses.replace(
        hfs.volume.info, patient_study={**hfs.volume.info.patient_study, "PatientName": name}
    )
    volume = dataclasses.replace(hfs.volume, info=info)
    result = build_rtstruct(volume, hfs.labels, STRUCTURES, MODEL)
    write_rtstruct(result.dataset, tmp_path / "rs.dcm")
    assert [line for line in dciodvfy(tmp_path / "rs.dcm") if "Error" in line] == []
    dataset = pydicom.dcmread(tmp_path / "rs.dcm")
    assert dataset.SpecificCharacterSet == charset
    assert str(dataset.PatientName) == name


def test_non_axial_slices_are_refused(hfs: Case) -> None:
    sagittal = hfs.volume.affine[:, [2, 1, 0, 3]]  # slices stacked along patient x
    volume = dataclasses.replace(hfs.volume, affine=sagittal)
    with pytest.raises(RTStructError, match="not axial"):
        build_rtstruct(volume, hfs.labels, STRUCTURES, MODEL)


@needs_tools
def test_review_flags_are_written_with_the_flagged_roi(hfs: Case, tmp_path: Path) -> None:
    """The reviewer sees rtseg's flags in the TPS, on the ROI and in the structure set's description."""
    from rtseg.rtstruct import add_review_notes

    result = build_rtstruct(hfs.volume, hfs.labels, STRUCTURES, MODEL, now=NOW)
    flagged, clean = result.included[1].name, result.included[2].name
    flag = "volume 0.4 ml outside the expected 2\u20131000 ml"
    add_review_notes(result.dataset, {flagged: (flag, "second flag"), clean: ()})
    path = tmp_path / "flagged.dcm"
    write_rtstruct(result.dataset, path)

    ds = pydicom.dcmread(path)
    names = {roi.ROINumber: roi.ROIName for roi in ds.StructureSetROISequence}
    observations = ds.RTROIObservationsSequence
    notes = {names[o.ReferencedROINumber]: o.get("ROIObservationDescription") for o in observations}
    assert notes[flagged] == "rtseg review: volume 0.4 ml outside the expected 2-1000 ml; second flag"
    assert all(note is None for name, note in notes.items() if name != flagged)
    assert ds.StructureSetDescription.endswith(f"- check flagged: {flagged}")
    assert ds.StructureSetDescription.startswith("AI-generated contours for clinical review")
    assert [line for line in dciodvfy(path) if "Error" in line or "Warning" in line] == []
