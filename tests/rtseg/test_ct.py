"""Tests for rtseg.ct: DICOM CT series → CTVolume.

Series are written with :func:`rtseg.phantom.dicom_io.write_ct_series`, which
returns the volume a correct loader must produce; compressed variants are made
with dcmtk and pydicom's encoders and must decode to exactly the same HU.
"""

from __future__ import annotations

import ast
import copy
import functools
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import (
    MPEG2MPML,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    RTDoseStorage,
    RTStructureSetStorage,
)

from rtseg import ct
from rtseg.ct import CT_IMAGE_STORAGE, MIN_SLICES, SeriesSummary, find_series
from rtseg.errors import InputError, TooLargeError
from rtseg.phantom.dicom_io import SeriesSpec, deterministic_uid, write_ct_series
from rtseg.privacy import redact_uids, uid_key
from rtseg.volume import CTVolume, Orientation, SeriesInfo, affine_from_geometry

SPACING = (2.5, 0.8, 0.9)  # z, y, x: all different so swapped axes are caught
ORIGIN = (-20.0, -15.5, 100.0)
PATIENT = ("PHANTOM^CASE", "PHANTOM-0", "20150101")  # SeriesSpec defaults: must never be logged
# These tests read small synthetic stacks (6 slices) to test geometry, decoding and refusals;
# the default minimum (MIN_SLICES) is tested in test_too_few_slices.
load_series = functools.partial(ct.load_series, min_slices=3)


def _canonical(shape: tuple[int, int, int] = (12, 40, 48)) -> npt.NDArray[np.int16]:
    """An asymmetric HU pattern: random texture plus ramps along every axis."""
    rng = np.random.default_rng(7)
    z, y, x = np.indices(shape)
    hu = rng.integers(-1000, 1500, shape) + 10 * z - 3 * y + 2 * x
    clipped: npt.NDArray[np.int16] = np.clip(hu, -1024, 3000).astype(np.int16)
    return clipped  # stored unsigned with intercept -1024


@pytest.fixture(scope="module")
def canonical() -> npt.NDArray[np.int16]:
    return _canonical()


def _write(
    out: Path, hu: npt.NDArray[Any] | None = None, position: str = "HFS", seed: str = "ct", **spec: Any
) -> CTVolume:
    data = _canonical((6, 20, 24)) if hu is None else hu
    return write_ct_series(
        data, SPACING, ORIGIN, out, SeriesSpec(uid_seed=seed, patient_position=position, **spec)
    )


def _files_in_order(folder: Path, expected: CTVolume) -> list[Path]:
    """The series files in volume slice order k."""
    by_uid = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in folder.glob("*.dcm")
    }
    return [by_uid[uid] for uid in expected.info.sop_instance_uids]


def _edit(path: Path, change: Callable[[Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


def _assert_loaded(volume: CTVolume, expected: CTVolume) -> None:
    assert volume.hu.dtype == np.int16
    np.testing.assert_array_equal(volume.hu, expected.hu)
    np.testing.assert_allclose(volume.affine, expected.affine, atol=1e-4)
    assert volume.info == expected.info


def _error(source: Any, *needles: str, **kwargs: Any) -> InputError:
    with pytest.raises(InputError) as caught:
        load_series(source, **kwargs)
    message = str(caught.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    for private in PATIENT:
        assert private not in message
    return caught.value


# ---------------------------------------------------------------------------
# geometry and HU


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
def test_loads_every_patient_position(
    tmp_path: Path, canonical: npt.NDArray[np.int16], position: str
) -> None:
    expected = write_ct_series(canonical, SPACING, ORIGIN, tmp_path, SeriesSpec("pos" + position, position))
    volume = load_series(tmp_path)
    _assert_loaded(volume, expected)
    # Independent of the writer's own answer: the loaded geometry maps back to the canonical array.
    orientation = Orientation.from_affine(volume.affine)
    np.testing.assert_array_equal(orientation.to_canonical(volume.hu), canonical)
    assert volume.info.patient_position == position
    assert volume.info.patient_study["PatientID"] == "PHANTOM-0"
    assert volume.spacing == pytest.approx(SPACING)


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP", "decubitus"])
def test_agrees_with_simpleitk(tmp_path: Path, canonical: npt.NDArray[np.int16], position: str) -> None:
    """An independent reader (ITK's GDCM series reader) sees the same voxels and geometry."""
    sitk = pytest.importorskip("SimpleITK")
    if position == "decubitus":
        _write_oriented(tmp_path, canonical[:6], (0, -1, 0), (1, 0, 0))
    else:
        write_ct_series(canonical[:6], SPACING, ORIGIN, tmp_path, SeriesSpec("itk" + position, position))
    ENCODERS["jpeg-ls/dcmcjpls"][0](sorted(tmp_path.glob("*.dcm"))[0])  # one compressed slice
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    image = reader.Execute()
    affine = np.eye(4)
    affine[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    volume = load_series(tmp_path)
    np.testing.assert_array_equal(volume.hu, sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)


def _write_oriented(
    out: Path, canonical: npt.NDArray[np.int16], row: tuple[int, int, int], col: tuple[int, int, int]
) -> CTVolume:
    """Write ``canonical`` with any axis-aligned orientation (e.g. decubitus) from an HFS template."""
    template = _files_in_order(out / "template", _write(out / "template", canonical, seed="tpl"))[0]
    base = pydicom.dcmread(template)
    shutil.rmtree(out / "template")
    row_dir, col_dir = np.array(row, float), np.array(col, float)
    normal = np.cross(row_dir, col_dir)
    axes = [int(np.argmax(np.abs(v))) for v in (row_dir, col_dir, normal)]
    spacing_lps = (SPACING[2], SPACING[1], SPACING[0])
    extent = np.array([(n - 1) * s for n, s in zip(canonical.shape[::-1], spacing_lps, strict=True)])
    corner = np.array(ORIGIN, float)
    for axis, direction in zip(axes, (row_dir, col_dir, normal), strict=True):
        if direction[axis] < 0:
            corner[axis] += extent[axis]
    pixel_spacing = (spacing_lps[axes[1]], spacing_lps[axes[0]])
    affine = affine_from_geometry(corner, row_dir, col_dir, pixel_spacing, spacing_lps[axes[2]])
    stored = Orientation.from_affine(affine).from_canonical(canonical)
    uids = []
    for k in range(stored.shape[0]):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(deterministic_uid(row, col, k))
        ds.ImageOrientationPatient = [*row, *col]
        ds.PatientPosition = "HFDL"
        ds.ImagePositionPatient = [f"{v:.6g}" for v in (affine @ [0, 0, k, 1])[:3]]
        ds.PixelSpacing = list(pixel_spacing)
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.PixelData = (stored[k].astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(out / f"slice{(7 * k) % stored.shape[0]:03d}.dcm", enforce_file_format=True)
        uids.append(str(ds.SOPInstanceUID))
    info = SeriesInfo(
        study_instance_uid=str(base.StudyInstanceUID),
        series_instance_uid=str(base.SeriesInstanceUID),
        frame_of_reference_uid=str(base.FrameOfReferenceUID),
        sop_class_uid=CT_IMAGE_STORAGE,
        sop_instance_uids=tuple(uids),
        patient_position="HFDL",
    )
    return CTVolume(stored, affine, info)


@pytest.mark.parametrize(
    ("row", "col"),
    [
        ((0, -1, 0), (1, 0, 0)),  # decubitus, normal +z
        ((0, 1, 0), (-1, 0, 0)),  # the other decubitus, normal +z
        ((0, 1, 0), (1, 0, 0)),  # normal -z (feet first)
    ],
)
def test_loads_decubitus_orientations(
    tmp_path: Path, canonical: npt.NDArray[np.int16], row: tuple[int, int, int], col: tuple[int, int, int]
) -> None:
    expected = _write_oriented(tmp_path, canonical, row, col)
    volume = load_series(tmp_path)
    np.testing.assert_array_equal(volume.hu, expected.hu)
    np.testing.assert_allclose(volume.affine, expected.affine, atol=1e-4)
    assert volume.info.sop_instance_uids == expected.info.sop_instance_uids
    assert volume.info.patient_position == "HFDL"
    np.testing.assert_array_equal(Orientation.from_affine(volume.affine).to_canonical(volume.hu), canonical)


def test_order_ignores_file_names_instance_numbers_and_slice_location(tmp_path: Path) -> None:
    expected = _write(tmp_path / "in", seed="shuffle")
    files = _files_in_order(tmp_path / "in", expected)
    rng = np.random.default_rng(3)
    numbers = rng.permutation(len(files)) + 1
    (tmp_path / "out").mkdir()
    for k, path in enumerate(files):
        target = tmp_path / "out" / f"IM{len(files) - k:04d}"  # names in reverse order, no suffix

        def scramble(ds: Dataset, k: int = k) -> None:
            ds.InstanceNumber = int(numbers[k])
            ds.SliceLocation = str(float(numbers[k]))

        shutil.copy(path, target)
        _edit(target, scramble)
    _assert_loaded(load_series(tmp_path / "out"), expected)
    # An explicit file list in any order gives the same volume.
    listed = [sorted((tmp_path / "out").iterdir())[i] for i in rng.permutation(len(files))]
    _assert_loaded(load_series(listed), expected)


def test_per_slice_integer_rescale_stays_int16(tmp_path: Path) -> None:
    expected = _write(tmp_path, seed="rescale")
    for k, path in enumerate(_files_in_order(tmp_path, expected)):
        intercept = -1024 - 5 * k  # differs per slice

        def rescale(ds: Dataset, intercept: int = intercept, k: int = k) -> None:
            stored = expected.hu[k].astype(np.int32) - intercept
            ds.RescaleIntercept = str(intercept)
            ds.PixelData = stored.astype(np.uint16).tobytes()

        _edit(path, rescale)
    _assert_loaded(load_series(tmp_path), expected)


def test_float_slope_gives_float32(tmp_path: Path) -> None:
    expected = _write(tmp_path, seed="slope")
    files = _files_in_order(tmp_path, expected)
    raw = [pydicom.dcmread(p).pixel_array.astype(np.float64) for p in files]
    _edit(files[2], lambda ds: setattr(ds, "RescaleSlope", "0.5"))
    _edit(files[3], lambda ds: setattr(ds, "RescaleIntercept", "-1000.25"))
    volume = load_series(tmp_path)
    assert volume.hu.dtype == np.float32
    want = np.stack(raw) - 1024.0
    want[2] = raw[2] * 0.5 - 1024.0
    want[3] = raw[3] - 1000.25
    np.testing.assert_array_equal(volume.hu, want.astype(np.float32))


def test_values_beyond_int16_give_float32(tmp_path: Path) -> None:
    hu = _canonical((6, 20, 24)).astype(np.int32)
    expected = _write(tmp_path, hu=np.clip(hu, -1024, 2000), seed="wide")
    path = _files_in_order(tmp_path, expected)[1]
    _edit(path, lambda ds: setattr(ds, "RescaleIntercept", "31000"))  # stored up to 3024 → 34024 HU
    volume = load_series(tmp_path)
    assert volume.hu.dtype == np.float32
    np.testing.assert_array_equal(volume.hu[1], expected.hu[1].astype(np.float32) + 1024 + 31000)
    np.testing.assert_array_equal(volume.hu[0], expected.hu[0])


def test_signed_pixel_representation(tmp_path: Path, canonical: npt.NDArray[np.int16]) -> None:
    expected = write_ct_series(
        canonical,
        SPACING,
        ORIGIN,
        tmp_path,
        SeriesSpec("signed", "FFS", signed_pixels=True, rescale_intercept=0),
    )
    _assert_loaded(load_series(tmp_path), expected)


# ---------------------------------------------------------------------------
# compressed transfer syntaxes


def _dcmtk(*command: str) -> Callable[[Path], None]:
    def convert(path: Path) -> None:
        if shutil.which(command[0]) is None:
            pytest.skip(f"{command[0]} (dcmtk) not installed")
        out = path.with_suffix(".tmp")
        subprocess.run([*command, str(path), str(out)], check=True, capture_output=True)
        out.replace(path)

    return convert


def _pydicom(syntax: str) -> Callable[[Path], None]:
    def convert(path: Path) -> None:
        ds = pydicom.dcmread(path)
        ds.compress(syntax, generate_instance_uid=False)  # keep the SOP instance
        ds.save_as(path, enforce_file_format=True)

    return convert


def _deflate_pydicom(path: Path) -> None:
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


ENCODERS = {
    "jpeg-lossless-sv1/dcmcjpeg": (_dcmtk("dcmcjpeg", "+e1"), JPEGLosslessSV1),
    "jpeg-ls/dcmcjpls": (_dcmtk("dcmcjpls", "+el"), JPEGLSLossless),
    "jpeg-ls/pyjpegls": (_pydicom(JPEGLSLossless), JPEGLSLossless),
    "jpeg2000/openjpeg": (_pydicom(JPEG2000Lossless), JPEG2000Lossless),
    "rle/dcmcrle": (_dcmtk("dcmcrle"), RLELossless),
    "rle/pydicom": (_pydicom(RLELossless), RLELossless),
    "deflate/dcmconv": (_dcmtk("dcmconv", "+td"), DeflatedExplicitVRLittleEndian),
    "deflate/pydicom": (_deflate_pydicom, DeflatedExplicitVRLittleEndian),
}


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_compressed_series_decode_exactly(
    tmp_path: Path, canonical: npt.NDArray[np.int16], encoder: str, signed: bool
) -> None:
    convert, syntax = ENCODERS[encoder]
    spec = SeriesSpec(
        "codec" + encoder, "HFP", signed_pixels=signed, rescale_intercept=0 if signed else -1024
    )
    expected = write_ct_series(canonical[:5], SPACING, ORIGIN, tmp_path, spec)
    for path in sorted(tmp_path.glob("*.dcm")):
        convert(path)
        assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    _assert_loaded(load_series(tmp_path), expected)


def test_undecodable_pixel_data_names_the_transfer_syntax(tmp_path: Path) -> None:
    expected = _write(tmp_path, seed="undecodable")
    path = _files_in_order(tmp_path, expected)[2]
    _dcmtk("dcmcjpls", "+el")(path)
    # JPEG-LS bytes labelled as JPEG 2000: the decoder must fail, with a clear message.
    _edit(path, lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", JPEG2000Lossless))
    error = _error(tmp_path, "cannot be decoded", "JPEG 2000")
    assert error.source == str(path)


def test_transfer_syntax_without_decoder(tmp_path: Path) -> None:
    expected = _write(tmp_path, seed="nodecoder")
    path = _files_in_order(tmp_path, expected)[0]
    _dcmtk("dcmcjpls", "+el")(path)
    # Labelled as MPEG2 video, for which no pixel handler exists.
    _edit(path, lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", MPEG2MPML))
    error = _error(tmp_path, "cannot be decoded", "MPEG2", "no decoder")
    assert error.source == str(path)


# ---------------------------------------------------------------------------
# folders with other objects


def _write_rtdose(folder: Path, like: CTVolume) -> Path:
    ds = Dataset()
    ds.SOPClassUID = RTDoseStorage
    ds.SOPInstanceUID = deterministic_uid("dose")
    ds.Modality = "RTDOSE"
    ds.StudyInstanceUID = like.info.study_instance_uid
    ds.SeriesInstanceUID = deterministic_uid("dose-series")
    ds.FrameOfReferenceUID = like.info.frame_of_reference_uid
    ds.PatientName, ds.PatientID = PATIENT[:2]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [3, 3]
    ds.GridFrameOffsetVector = [0, 3, 6]
    ds.NumberOfFrames = 3
    ds.Rows, ds.Columns = 4, 5
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
    ds.DoseGridScaling = 1e-4
    ds.PixelData = np.arange(60, dtype=np.uint32).tobytes()
    return _save(ds, folder / "RD.dose.dcm")


def _save(ds: Dataset, path: Path) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def _write_scout(folder: Path, template: Path, series_uid: str, name: str) -> Path:
    ds = pydicom.dcmread(template)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(deterministic_uid("scout", name))
    ds.SeriesInstanceUID = series_uid
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    ds.ImagePositionPatient = [-30, 0, 120]
    ds.save_as(folder / name, enforce_file_format=True)
    return folder / name


def test_dose_structure_scouts_and_clutter_are_ignored(
    tmp_path: Path, canonical: npt.NDArray[np.int16]
) -> None:
    expected = write_ct_series(canonical, SPACING, ORIGIN, tmp_path / "ct", SeriesSpec("busy", "HFS"))
    first = _files_in_order(tmp_path / "ct", expected)[0]
    _write_rtdose(tmp_path, expected)
    rtstruct = Dataset()
    rtstruct.SOPClassUID, rtstruct.SOPInstanceUID = RTStructureSetStorage, deterministic_uid("rs")
    rtstruct.Modality, rtstruct.SeriesInstanceUID = "RTSTRUCT", deterministic_uid("rs-series")
    _save(rtstruct, tmp_path / "RS.dcm")
    # A scout inside the CT series itself, and one in a series of its own.
    _write_scout(tmp_path / "ct", first, expected.info.series_instance_uid, "scout-same-series.dcm")
    _write_scout(tmp_path, first, deterministic_uid("scout-series"), "scout-own-series.dcm")
    # A dose-report screen capture filed in the CT series (no geometry).
    report = pydicom.dcmread(first)
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    report.SOPInstanceUID = report.file_meta.MediaStorageSOPInstanceUID = UID(deterministic_uid("report"))
    del report.ImagePositionPatient, report.ImageOrientationPatient
    report.save_as(tmp_path / "ct" / "dose-report.dcm", enforce_file_format=True)
    # A DICOMDIR file set holding exact copies of the slices, and non-DICOM clutter.
    fileset = FileSet()
    for path in _files_in_order(tmp_path / "ct", expected):
        fileset.add(pydicom.dcmread(path))
    fileset.write(tmp_path / "media")
    (tmp_path / "README").write_text("exported by a PACS\n")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    os.mkfifo(tmp_path / "pipe")  # reading it would block forever
    (tmp_path / "dangling.dcm").symlink_to(tmp_path / "gone.dcm")
    (tmp_path / ".hidden").mkdir()
    _write(tmp_path / ".hidden", seed="hidden-series")  # would be a second CT series if not skipped
    _assert_loaded(load_series(str(tmp_path)), expected)  # type: ignore[arg-type]  # str works too

    summaries = {
        s.modality + (" scout" if "scout" in s.files[0].name else ""): s for s in find_series(tmp_path)
    }
    assert set(summaries) == {"CT", "RTDOSE", "RTSTRUCT", "CT scout"}
    ct = summaries["CT"]
    assert isinstance(ct, SeriesSummary)
    assert ct.series_uid == expected.info.series_instance_uid
    assert ct.n_files == 2 * 12 + 2 == len(ct.files)  # originals, DICOMDIR copies, scout, report
    assert ct.sop_class_uid == CT_IMAGE_STORAGE and ct.description == "Abdomen 3.0 phantom"


def test_only_non_image_objects(tmp_path: Path) -> None:
    _write_rtdose(tmp_path, _write(tmp_path / "elsewhere", seed="dose-only"))
    shutil.rmtree(tmp_path / "elsewhere")
    _error(tmp_path, "no CT image series found", "1 RTDOSE")


def test_only_scouts(tmp_path: Path) -> None:
    expected = _write(tmp_path / "ct", seed="scout-only")
    first = _files_in_order(tmp_path / "ct", expected)[0]
    _write_scout(tmp_path, first, "1.2.3.4", "a.dcm")
    shutil.rmtree(tmp_path / "ct")
    _error(tmp_path, "no CT image series found", "1 CT scout")


def test_several_ct_series_need_a_choice(tmp_path: Path) -> None:
    first = _write(tmp_path / "a", seed="first", series_description="Abdomen 3.0 venous")
    second = _write(
        tmp_path / "b", hu=_canonical((4, 20, 24)), seed="second", series_description="Abdomen 1.0"
    )
    error = _error(tmp_path, "found 2 CT series", "Abdomen 3.0 venous", "Abdomen 1.0", "6 files", "4 files")
    assert "--series" in error.message and error.source == str(tmp_path)
    assert first.info.series_instance_uid[-12:] in error.message
    _assert_loaded(load_series(tmp_path, series_uid=first.info.series_instance_uid), first)
    # The shortened UID printed in the message selects the series too.
    short = "…" + second.info.series_instance_uid[-12:]
    assert short in error.message
    _assert_loaded(load_series(tmp_path, series_uid=short), second)
    _error(tmp_path, "series 9.9.9 not found", series_uid="9.9.9")


def test_explicit_files_from_two_series(tmp_path: Path) -> None:
    _write(tmp_path / "a", seed="mix-a")
    _write(tmp_path / "b", seed="mix-b")
    files = sorted((tmp_path / "a").glob("*.dcm"))[:3] + sorted((tmp_path / "b").glob("*.dcm"))[:3]
    _error(files, "belong to 2 different image series", "pass the files of one series")
    assert [s.n_files for s in find_series(files)] == [3, 3]


def _as_mr(ds: Dataset) -> None:
    ds.Modality = "MR"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.4")


def test_mr_series_is_refused(tmp_path: Path) -> None:
    expected = _write(tmp_path / "mr", seed="mr")
    for path in (tmp_path / "mr").glob("*.dcm"):
        _edit(path, _as_mr)
    _error(tmp_path, "is MR, not CT")
    # Next to a CT series the MR is ignored, unless asked for.
    ct = _write(tmp_path / "ct", seed="ct-next-to-mr")
    _assert_loaded(load_series(tmp_path), ct)
    _error(tmp_path, "is MR, not CT", series_uid=expected.info.series_instance_uid)


def test_dose_series_asked_for_by_uid(tmp_path: Path) -> None:
    _write_rtdose(tmp_path, _write(tmp_path / "ct", seed="asked"))
    _error(tmp_path, "RTDOSE, not a CT image series", series_uid=deterministic_uid("dose-series"))


# ---------------------------------------------------------------------------
# unreadable input


def test_missing_and_empty_sources(tmp_path: Path) -> None:
    _error(tmp_path / "nope", "no such file or folder")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("nothing here")
    _error(tmp_path / "empty", "no DICOM files found")
    _error([], "no files given")


def test_listed_file_that_is_not_dicom(tmp_path: Path) -> None:
    _write(tmp_path, seed="notdicom")
    readme = tmp_path / "README.txt"
    readme.write_text("not an image")
    error = _error([*sorted(tmp_path.glob("*.dcm")), readme], "not a DICOM file")
    assert error.source == str(readme)


def test_truncated_file_is_named(tmp_path: Path) -> None:
    expected = _write(tmp_path, seed="truncated")
    files = _files_in_order(tmp_path, expected)
    files[1].write_bytes(files[1].read_bytes()[:700])  # cut inside the header
    error = _error(tmp_path)
    assert error.source == str(files[1]) and "truncated" in error.message
    files = _files_in_order(tmp_path / "x", _write(tmp_path / "x", seed="truncated-pixels"))
    files[4].write_bytes(files[4].read_bytes()[:-100])  # cut inside the pixel data
    error = _error(tmp_path / "x", "cannot be decoded", "Explicit VR Little Endian")
    assert error.source == str(files[4])


def test_sequences_nested_past_the_recursion_limit_are_named(tmp_path: Path) -> None:
    from dicom_bombs import write_nested_sequences

    _write(tmp_path, seed="nested")
    nested = write_nested_sequences(
        tmp_path / "zz.dcm", 100_000, "1.2.826.0.1.3680043.10.1234.5.4", "1.2.3.16"
    )
    error = _error(tmp_path, "sequences nested deeper than a DICOM reader can follow")
    assert error.source == str(nested)


def test_a_deflate_bomb_in_a_local_folder_is_named_in_bounded_memory(tmp_path: Path) -> None:
    """A CD brought from elsewhere is a peer's data: pydicom inflated a Deflate file whole for its header."""
    from dicom_bombs import peak_rss_mb, reset_peak_rss, write_deflate_bomb

    expected = _write(tmp_path, seed="bomb")
    bomb = write_deflate_bomb(tmp_path / "zz.dcm", 1100, "1.2.826.0.1.3680043.10.1234.4.9", "1.2.3.20")
    reset_peak_rss()
    before = peak_rss_mb()
    error = _error(tmp_path, "the Deflate data set inflates to more than 1024 MB")
    grown = peak_rss_mb() - before
    assert error.source == str(bomb) and isinstance(error, TooLargeError) and error.inflated
    assert grown < 64, f"peak memory grew by {grown:.0f} MB reading a folder with a Deflate bomb"
    bomb.unlink()
    assert load_series(tmp_path).hu.shape == expected.hu.shape  # the series itself is fine


def test_truncated_compressed_file_is_named(tmp_path: Path) -> None:
    expected = _write(tmp_path, seed="truncated-rle")
    path = _files_in_order(tmp_path, expected)[3]
    _dcmtk("dcmcrle")(path)
    path.write_bytes(path.read_bytes()[:-200])
    assert _error(tmp_path, "truncated").source == str(path)


@pytest.mark.parametrize("encoder", [None, "rle/dcmcrle", "deflate/dcmconv", "jpeg-ls/dcmcjpls"])
def test_corrupted_bytes_raise_only_input_error(tmp_path: Path, encoder: str | None) -> None:
    """Random byte damage in one slice: loading succeeds or raises InputError, nothing else."""
    expected = _write(tmp_path / "clean", hu=_canonical((4, 20, 24)), seed="fuzz")
    victim = _files_in_order(tmp_path / "clean", expected)[1]
    if encoder is not None:
        ENCODERS[encoder][0](victim)
    clean = victim.read_bytes()
    rng = np.random.default_rng(11)
    for trial in range(15):
        folder = tmp_path / f"t{trial}"
        shutil.copytree(tmp_path / "clean", folder)
        damaged = bytearray(clean)
        end = len(damaged) if trial % 2 else min(len(damaged), 1200)  # header only, or anywhere
        for position in rng.integers(128, end, size=int(rng.integers(1, 4))):
            damaged[int(position)] = int(rng.integers(0, 256))
        (folder / victim.name).write_bytes(bytes(damaged))
        try:
            find_series(folder)
            load_series(folder)
        except InputError:
            pass


# ---------------------------------------------------------------------------
# inconsistent or incomplete series


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        (lambda ds: setattr(ds, "FrameOfReferenceUID", "1.2.3.4.5"), ("different frames of reference",)),
        (lambda ds: setattr(ds, "PixelSpacing", ["0.8", "0.95"]), ("PixelSpacing differs between slices",)),
        (
            lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0.9998, 0.02]),
            ("ImageOrientationPatient differs between slices",),
        ),
        (lambda ds: delattr(ds, "ImagePositionPatient"), ("slice has no ImagePositionPatient",)),
        (lambda ds: delattr(ds, "ImageOrientationPatient"), ("slice has no ImageOrientationPatient",)),
        (lambda ds: delattr(ds, "PixelSpacing"), ("slice has no PixelSpacing",)),
        (lambda ds: delattr(ds, "PixelData"), ("slice has no pixel data",)),
        (lambda ds: setattr(ds, "ImagePositionPatient", ["1", "2"]), ("ImagePositionPatient must hold 3",)),
        (lambda ds: setattr(ds, "PixelSpacing", ["0", "0.9"]), ("PixelSpacing must be positive",)),
        (lambda ds: setattr(ds, "GantryDetectorTilt", "12.5"), ("tilted/sheared stack", "12.5")),
        (lambda ds: setattr(ds, "NumberOfFrames", "2"), ("multi-frame",)),
    ],
    ids=[
        "frame-of-reference",
        "pixel-spacing",
        "orientation",
        "no-position",
        "no-orientation",
        "no-spacing",
        "no-pixels",
        "short-position",
        "zero-spacing",
        "gantry-tilt",
        "multi-frame",
    ],
)
def test_inconsistent_slice_is_refused(
    tmp_path: Path, change: Callable[[Dataset], None], needles: tuple[str, ...]
) -> None:
    expected = _write(tmp_path, seed="inconsistent")
    path = _files_in_order(tmp_path, expected)[3]
    _edit(path, change)
    error = _error(tmp_path, *needles)
    assert error.source in (str(path), str(tmp_path))


def test_different_matrix_is_refused(tmp_path: Path) -> None:
    expected = _write(tmp_path, seed="matrix")
    path = _files_in_order(tmp_path, expected)[2]

    def shrink(ds: Dataset) -> None:
        ds.Columns = 20
        ds.PixelData = np.zeros((20, 20), np.uint16).tobytes()

    _edit(path, shrink)
    error = _error(tmp_path, "image size differs between slices", "20x20")
    assert error.source == str(path)


def test_duplicate_and_copied_slices(tmp_path: Path) -> None:
    expected = _write(tmp_path, seed="dup")
    files = _files_in_order(tmp_path, expected)
    (tmp_path / "copy").mkdir()
    shutil.copy(files[2], tmp_path / "copy" / "same-instance.dcm")  # an exact copy: silently ignored
    _assert_loaded(load_series(tmp_path), expected)
    other = tmp_path / "copy" / "other-instance.dcm"
    shutil.copy(files[2], other)
    _edit(other, lambda ds: setattr(ds, "SOPInstanceUID", "1.2.3.999"))
    _error(tmp_path, "duplicate slices", "same position", "z = ")


def test_same_instance_at_two_positions(tmp_path: Path) -> None:
    expected = _write(tmp_path, seed="dup-pos")
    files = _files_in_order(tmp_path, expected)
    shutil.copy(files[2], tmp_path / "moved.dcm")
    _edit(tmp_path / "moved.dcm", lambda ds: setattr(ds, "ImagePositionPatient", [-20, -15.5, 500]))
    _error(tmp_path, "same SOPInstanceUID at different positions")


def test_missing_slices_are_reported_with_position(tmp_path: Path) -> None:
    expected = _write(tmp_path, hu=_canonical((10, 20, 24)), seed="gap")
    files = _files_in_order(tmp_path, expected)
    files[4].unlink()
    files[5].unlink()
    files[8].unlink()
    z = [float(expected.slice_z(k)[2]) for k in range(10)]
    _error(
        tmp_path,
        "missing slices: 3 slice(s) missing",
        "2.500 mm",
        f"2 between z = {z[3]:.2f} and z = {z[6]:.2f} mm",
        f"1 between z = {z[7]:.2f} and z = {z[9]:.2f} mm",
    )


def test_check_stack_counts_a_whole_stack_and_refuses_a_gap_as_the_loader_does(tmp_path: Path) -> None:
    """The node completes a series on release only when its headers pass the loader's own check."""
    expected = _write(tmp_path, hu=_canonical((12, 20, 24)), seed="stack")
    files = _files_in_order(tmp_path, expected)
    assert ct.check_stack(files) == 12 and ct.check_stack(tmp_path) == 12
    files[5].unlink()
    with pytest.raises(InputError, match="missing slices: 1 slice"):
        ct.check_stack([f for f in files if f.exists()])
    with pytest.raises(InputError, match="at least 20 are needed"):
        ct.check_stack(files[6:], min_slices=20)


def _shift(ds: Dataset, dy: float = 0.0, dz: float = 0.0) -> None:
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [f"{x:.6g}", f"{y + dy:.6g}", f"{z + dz:.6g}"]


def test_uneven_spacing(tmp_path: Path) -> None:
    expected = _write(tmp_path, seed="uneven")
    files = _files_in_order(tmp_path, expected)
    for k in (4, 5):
        _edit(files[k], lambda ds: _shift(ds, dz=0.4))
    _error(tmp_path, "uneven slice spacing", "2.900 mm")


def test_small_position_jitter_is_accepted(tmp_path: Path) -> None:
    expected = _write(tmp_path, seed="jitter")
    path = _files_in_order(tmp_path, expected)[3]
    _edit(path, lambda ds: _shift(ds, dz=0.004))
    volume = load_series(tmp_path)
    np.testing.assert_array_equal(volume.hu, expected.hu)


def test_sheared_stack(tmp_path: Path) -> None:
    expected = _write(tmp_path, seed="shear")
    for k, path in enumerate(_files_in_order(tmp_path, expected)):
        _edit(path, functools.partial(_shift, dy=0.5 * k))
    _error(tmp_path, "tilted/sheared stack", "sideways")


@pytest.mark.parametrize(
    ("iop", "needle"),
    [
        ([0, 1, 0, 0, 0, -1], "sagittal"),
        ([1, 0, 0, 0, 0, -1], "coronal"),
        ([1, 0, 0, 0, 0.96592583, -0.25881905], "oblique"),  # 15° about x
        ([0.8660254, 0.5, 0, -0.5, 0.8660254, 0], "oblique"),  # axial, rotated 30° in plane
    ],
    ids=["sagittal", "coronal", "oblique", "rotated-in-plane"],
)
def test_non_axial_stacks(tmp_path: Path, iop: list[float], needle: str) -> None:
    expected = _write(tmp_path, seed="nonaxial" + needle)
    for k, path in enumerate(_files_in_order(tmp_path, expected)):
        normal = np.cross(iop[:3], iop[3:])

        def reorient(ds: Dataset, k: int = k, normal: Any = normal) -> None:
            ds.ImageOrientationPatient = [f"{v:.8g}" for v in iop]
            ds.ImagePositionPatient = [f"{v:.6g}" for v in np.array(ORIGIN) + 2.5 * k * normal]

        _edit(path, reorient)
    _error(tmp_path, "non-axial stack", needle)


def test_invalid_orientation_vectors(tmp_path: Path) -> None:
    expected = _write(tmp_path, seed="badiop")
    for path in _files_in_order(tmp_path, expected):
        _edit(path, lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 1, 0, 0]))
    _error(tmp_path, "not two orthogonal unit vectors")


def test_too_few_slices(tmp_path: Path) -> None:
    six = tmp_path / "six"
    _write(six, seed="six")
    with pytest.raises(InputError, match=rf"has 6 slice\(s\); at least {MIN_SLICES} are needed"):
        ct.load_series(six)  # the default minimum
    two = tmp_path / "two"
    expected = _write(two, hu=_canonical((2, 20, 24)), seed="few")
    _error(two, "has 2 slice(s); at least 3 are needed", "send the complete series")
    assert load_series(two, min_slices=2).shape == (2, 20, 24)
    single = _files_in_order(two, expected)[:1]
    volume = load_series(single, min_slices=1)
    assert volume.spacing == pytest.approx(SPACING)  # from SliceThickness


# ---------------------------------------------------------------------------
# privacy


def test_logs_hold_no_patient_data(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="rtseg")
    expected = _write(tmp_path, seed="private")
    _write_rtdose(tmp_path, expected)
    (tmp_path / "README").write_text("x")
    load_series(tmp_path)
    _error(tmp_path / "nope")
    rtseg_records = [r.getMessage() for r in caplog.records if r.name.startswith("rtseg")]
    key = uid_key(expected.info.series_instance_uid)  # the key the node's spool and audit use
    assert any(f"loaded CT series key {key}: 6 slices" in m for m in rtseg_records)
    uids = (expected.info.series_instance_uid, expected.info.study_instance_uid)
    for message in rtseg_records:
        for private in (*PATIENT, *uids, *(uid[-12:] for uid in uids)):
            assert private not in message


def test_error_messages_name_series_the_user_can_ask_for_but_logs_redact_them(tmp_path: Path) -> None:
    """The CLI user needs the UID tail (``--series``); the node logs the message through redact_uids."""
    expected = _write(tmp_path / "mr", seed="mr-redact")
    for path in (tmp_path / "mr").glob("*.dcm"):
        _edit(path, _as_mr)
    uid = expected.info.series_instance_uid
    message = str(_error(tmp_path, "is MR, not CT", uid[-12:]))
    logged = redact_uids(message)
    assert uid[-12:] not in logged and "series <uid> is MR, not CT" in logged
    assert redact_uids(f"series {uid} not found; slice 2.5 mm, rtseg 0.5.0") == (
        "series <uid> not found; slice 2.5 mm, rtseg 0.5.0"
    )


def test_rtseg_log_output_redacts_uids_in_messages_and_tracebacks() -> None:
    """What the CLI, the node's workers and the federation write to their logs carries no UID.

    A fresh interpreter, as ``rtseg`` starts one: its logging goes through
    configure_logging; an unexpected error whose message holds a UID is logged
    with ``log.exception`` (traceback included), as the worker does.
    """
    uid = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    script = (
        "import logging\n"
        "from rtseg.privacy import configure_logging\n"
        "configure_logging(logging.INFO)\n"
        "log = logging.getLogger('rtseg.worker')\n"
        f"log.info('series %s received, 2.5 mm', {uid!r})\n"
        "try:\n"
        f"    raise KeyError('no such series {uid}')\n"
        "except KeyError:\n"
        "    log.exception('job %s: internal error', 7)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert uid not in done.stderr
    assert "series <uid> received, 2.5 mm" in done.stderr
    assert "job 7: internal error" in done.stderr
    assert "KeyError: 'no such series <uid>'" in done.stderr  # the traceback is kept, the UID is not


# ---------------------------------------------------------------------------
# real scanners' quirks on synthetic series (the real series: tests/rtseg/test_realct.py)


@pytest.mark.parametrize(
    ("position", "expected", "facing"),
    [("HFS", "HFS", "supine"), ("FFS", "HFS", "supine"), ("HFP", "HFP", "prone"), ("FFP", "HFP", "prone")],
)
def test_empty_patient_position_is_taken_from_the_orientation(
    tmp_path: Path, position: str, expected: str, facing: str
) -> None:
    """Supine/prone from the column direction; head- or feet-first is assumed (FFS reads as HFS), noted."""
    written = _write(tmp_path, position=position, seed=f"nopos-{position}")
    for path in tmp_path.iterdir():
        _edit(path, lambda ds: setattr(ds, "PatientPosition", ""))
    volume = load_series(tmp_path)
    np.testing.assert_array_equal(volume.hu, written.hu)  # the geometry does not depend on it
    np.testing.assert_allclose(volume.affine, written.affine, atol=1e-4)
    assert volume.info.patient_position == expected
    (note,) = volume.info.notes
    assert f"PatientPosition empty: {expected} assumed ({facing} from ImageOrientationPatient" in note


def test_decubitus_without_patient_position(tmp_path: Path, canonical: npt.NDArray[np.int16]) -> None:
    _write_oriented(tmp_path, canonical, (0, -1, 0), (1, 0, 0))
    for path in tmp_path.iterdir():
        _edit(path, lambda ds: ds.__delattr__("PatientPosition"))
    volume = load_series(tmp_path)
    assert volume.info.patient_position == "HFDL" and "decubitus left" in volume.info.notes[0]


def test_empty_sop_uids_fall_back_to_the_file_meta(tmp_path: Path) -> None:
    written = _write(tmp_path, seed="anonymised")
    for path in tmp_path.iterdir():
        _edit(path, lambda ds: (setattr(ds, "SOPInstanceUID", ""), setattr(ds, "SOPClassUID", "")))
    volume = load_series(tmp_path)
    _assert_loaded(volume, written)
    assert volume.info.sop_instance_uids == written.info.sop_instance_uids
    assert volume.info.sop_class_uid == CT_IMAGE_STORAGE and volume.info.notes == ()


def test_missing_sop_uid_everywhere_names_both_places(tmp_path: Path) -> None:
    _write(tmp_path, seed="no-uid")
    path = next(tmp_path.iterdir())
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ""
    del ds.file_meta.MediaStorageSOPInstanceUID
    ds.save_as(path, enforce_file_format=False)
    _error(tmp_path, path.name, "no SOPInstanceUID, in the data set or the file meta")


def test_empty_series_uid_is_derived_from_the_frame_of_reference(tmp_path: Path) -> None:
    written = _write(tmp_path, seed="no-series")
    for path in tmp_path.iterdir():
        _edit(path, lambda ds: setattr(ds, "SeriesInstanceUID", ""))
    volume = load_series(tmp_path)
    np.testing.assert_array_equal(volume.hu, written.hu)
    assert volume.info.series_instance_uid.startswith("2.25.")
    assert volume.info.series_instance_uid == load_series(sorted(tmp_path.iterdir())).info.series_instance_uid
    (note,) = volume.info.notes
    assert note.startswith("SeriesInstanceUID empty in the CT")


def test_slice_thickness_other_than_the_spacing_is_not_used(tmp_path: Path) -> None:
    written = _write(tmp_path, seed="thick")
    for path in tmp_path.iterdir():
        _edit(path, lambda ds: setattr(ds, "SliceThickness", "5.0"))
    assert load_series(tmp_path).spacing == pytest.approx(written.spacing)


def test_no_frame_of_reference_says_what_to_do(tmp_path: Path) -> None:
    _write(tmp_path, seed="no-frame")
    for path in tmp_path.iterdir():
        _edit(path, lambda ds: ds.__delattr__("FrameOfReferenceUID"))
    _error(tmp_path, "no FrameOfReferenceUID", "send the series as the scanner or PACS exported it")


def test_ct_package_modules_import_in_layers() -> None:
    """rtseg.ct is a package whose modules import only the layers below them (no cycle)."""
    layers = ["header", "geometry", "scan", "pixels", "load"]
    package = Path(ct.__file__).parent
    assert sorted(p.stem for p in package.glob("*.py")) == sorted([*layers, "__init__"])
    for index, layer in enumerate(layers):
        tree = ast.parse((package / f"{layer}.py").read_text())
        imported = {
            node.module.removeprefix("rtseg.ct.")
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rtseg.ct.")
        }
        assert imported <= set(layers[:index]), f"rtseg.ct.{layer} imports {sorted(imported)}"
    assert ct.load_series.__module__ == "rtseg.ct.load"
