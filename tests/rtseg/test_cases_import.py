"""``rtseg cases import``: a department's messy export → de-identified labelled cases."""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from case_helpers import small_case
from pydicom.uid import generate_uid

from rtseg.cases import LabelledCase, load_case
from rtseg.ct import load_series
from rtseg.metrics import dice
from rtseg.phantom.cohort import case_id, write_case
from rtseg.rtstruct import ModelIdentity, build_rtstruct, write_rtstruct
from rtseg.site_import import (
    BAD_CONTOURS,
    BAD_CT,
    IMPORTED,
    NO_CT,
    NO_ROI,
    NOT_APPROVED,
    PRESENT,
    SKIPPED,
    import_folder,
    index_path,
)
from rtseg.structures import STRUCTURES

LABEL = {s.name: s.label for s in STRUCTURES}
ACCESSION = "ACC-778899"
# the department's names: a case variant, Dutch laterality, a PRV, a PTV, and two ROIs on the spleen
CLINICAL = {
    "Liver": "LIVER",
    "Kidney_L": "Nier li",
    "Kidney_R": "Kidney Rt",
    "SpinalCord": "z_PRV_Cord",
    "Colon": "PTV_45",
    "Spleen": "Milt",
    "Stomach": "Spleen",
    "External": "BODY",
}
SECOND = {"Liver": "Lever", "Kidney_R": "Nier re", "External": "Body"}


def _copy_series(truth: LabelledCase, target: Path, *, fresh: bool, ext: str = "") -> LabelledCase:
    """The truth's CT slices under ``target`` (file names without ``ext``), with new UIDs if ``fresh``."""
    target.mkdir(parents=True)
    new = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    uids = []
    for k, uid in enumerate(truth.volume.info.sop_instance_uids):
        ds = pydicom.dcmread(next(p for p in _ct_files(truth) if _sop(p) == uid))
        if fresh:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = new["study"], new["series"]
            ds.FrameOfReferenceUID = new["frame"]
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.AccessionNumber = ACCESSION
        ds.add_new(0x00090010, "LO", "ACME")
        ds.add_new(0x00091001, "LO", str(ds.PatientName))  # a private copy of the name
        ds.save_as(target / f"IM{k:04d}{ext}")
        uids.append(str(ds.SOPInstanceUID))
    info = dataclasses.replace(
        truth.volume.info,
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        frame_of_reference_uid=str(ds.FrameOfReferenceUID),
        sop_instance_uids=tuple(uids),
    )
    return LabelledCase(truth.case_id, dataclasses.replace(truth.volume, info=info), truth.labels)


_FILES: dict[str, list[Path]] = {}


def _ct_files(truth: LabelledCase) -> list[Path]:
    return _FILES[truth.case_id]


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _structure_set(
    case: LabelledCase, out: Path, names: dict[str, str], *, status: str = "APPROVED", label: str = "PLAN"
) -> pydicom.Dataset:
    ds = build_rtstruct(case.volume, case.labels, STRUCTURES, ModelIdentity("TPS", "1")).dataset
    for roi in ds.StructureSetROISequence:
        roi.ROIName = names.get(str(roi.ROIName), str(roi.ROIName))
    ds.ApprovalStatus, ds.StructureSetLabel = status, label
    out.parent.mkdir(parents=True, exist_ok=True)
    write_rtstruct(ds, out)
    return ds


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A department's export: two patients' CTs, good and bad structure sets, other modalities."""
    root = tmp_path_factory.mktemp("site")
    write_case("A", 5, 0, root / "gen", matrix=96)
    truth = load_case(small_case(root / "gen" / case_id("A", 5, 0), root / "truth", 16))
    _FILES[truth.case_id] = sorted((root / "truth" / "ct").glob("*.dcm"))
    src = root / "export"
    one = _copy_series(truth, src / "PAT1" / "CT" / "1", fresh=False)
    two = _copy_series(truth, src / "PAT2" / "x" / "y", fresh=True, ext=".dcm")
    _structure_set(one, src / "PAT1" / "RS" / "RS1", CLINICAL)
    _structure_set(two, src / "PAT2" / "RS2.dcm", SECOND)
    _structure_set(one, src / "PAT1" / "RS" / "draft", CLINICAL, status="UNAPPROVED", label="draft")
    _structure_set(
        one,
        src / "misc" / "targets",
        {"Liver": "PTV_Liver", "External": "z_opt"}
        | {s.name: f"CTV_{s.label}" for s in STRUCTURES if s.name not in ("Liver", "External")},
    )
    gone = _copy_series(truth, root / "elsewhere", fresh=True)  # its CT never reaches the export
    _structure_set(gone, src / "PAT3" / "RS3", SECOND)
    _off_plane(_copy_series(truth, src / "PAT5" / "CT", fresh=True), src / "PAT5" / "shifted")
    _broken_ct(truth, src)
    _other_modalities(src / "PAT1" / "CT" / "1" / "IM0000", src / "misc")
    return {"root": root, "src": src, "truth": truth, "one": one, "two": two}


def _off_plane(case: LabelledCase, out: Path) -> None:
    """An approved set whose contours lie half a slice off the CT's planes."""
    ds = _structure_set(case, out, SECOND)
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            points[:, 2] += 1.3
            contour.ContourData = [f"{v:.3f}" for v in points.ravel()]
    write_rtstruct(ds, out)


def _broken_ct(truth: LabelledCase, src: Path) -> None:
    """A patient whose CT misses a slice in the middle: load_series refuses it."""
    case = _copy_series(truth, src / "PAT4" / "CT", fresh=True)
    _structure_set(case, src / "PAT4" / "RS4", SECOND)
    (src / "PAT4" / "CT" / "IM0008").unlink()


def _other_modalities(ct_file: Path, out: Path) -> None:
    """An MR slice and a PET slice (other series) and a text file: indexed, never paired."""
    out.mkdir(parents=True, exist_ok=True)
    for modality, sop_class in (("MR", "1.2.840.10008.5.1.4.1.1.4"), ("PT", "1.2.840.10008.5.1.4.1.1.128")):
        ds = pydicom.dcmread(ct_file)
        ds.Modality, ds.SOPClassUID, ds.SeriesInstanceUID = modality, sop_class, generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.save_as(out / modality.lower())
    (out / "README.txt").write_text("export of 2026-03-02\n")


def _by_source(report: object) -> dict[str, object]:
    return {i.source: i for i in report.items}  # type: ignore[attr-defined]


def test_a_messy_export_becomes_labelled_cases_and_bad_items_are_skipped_with_reasons(
    export: dict[str, object], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, truth = export["src"], export["truth"]
    assert isinstance(src, Path) and isinstance(truth, LabelledCase)
    out = tmp_path / "cases"
    with caplog.at_level(logging.DEBUG):
        report = import_folder(src, out)
    for secret in ("PHANTOM", "RTSEG-", ACCESSION, truth.volume.info.series_instance_uid):
        assert secret not in caplog.text
    assert all(uid not in i.detail for i in report.items for uid in truth.volume.info.sop_instance_uids)
    items = _by_source(report)
    assert {s: (i.status, i.reason) for s, i in items.items()} == {  # type: ignore[attr-defined]
        "PAT1/RS/RS1": (IMPORTED, ""),
        "PAT2/RS2.dcm": (IMPORTED, ""),
        "PAT1/RS/draft": (SKIPPED, NOT_APPROVED),
        "misc/targets": (SKIPPED, NO_ROI),
        "PAT3/RS3": (SKIPPED, NO_CT),
        "PAT5/shifted": (SKIPPED, BAD_CONTOURS),
        "PAT4/RS4": (SKIPPED, BAD_CT),
    }
    assert report.skipped() == {NOT_APPROVED: 1, NO_ROI: 1, NO_CT: 1, BAD_CONTOURS: 1, BAD_CT: 1}
    assert "missing" in items["PAT4/RS4"].detail  # type: ignore[attr-defined]
    first = items["PAT1/RS/RS1"]
    assert first.case_id == "site-0001" and items["PAT2/RS2.dcm"].case_id == "site-0002"  # type: ignore[attr-defined]
    # the ambiguous pair is left out and said so; PRV and PTV are rejected
    assert {n.split(":")[0] for n in first.left_out} == {"Milt", "Spleen"}  # type: ignore[attr-defined]
    contoured = {s.name for s in STRUCTURES if (truth.labels == s.label).any()} | {"External"}
    left_out = {"Spleen", "Stomach", "Colon", "SpinalCord"}
    assert set(first.structures) == contoured - left_out  # type: ignore[attr-defined]
    _check_labels(load_case(out / "site-0001"), truth, contoured - left_out)
    _check_labels(load_case(out / "site-0002"), truth, contoured)  # TG-263 names map as they are
    record = json.loads((out / "site-0001" / "case.json").read_text())
    assert record["structures"]["Liver"] == "contoured" and record["structures"]["Spleen"] == "unknown"
    assert record["structures"]["Gallbladder"] == ("contoured" if "Gallbladder" in contoured else "unknown")
    assert record["counts"] == {
        "contoured": len(contoured - left_out),
        "unknown": 19 - len(contoured - left_out),
    }
    assert sorted(p.name for p in out.iterdir()) == [".rtseg-import", "site-0001", "site-0002"]


def _check_labels(case: LabelledCase, truth: LabelledCase, structures: set[str]) -> None:
    """Dice ≥ 0.97 against the phantom truth for every mapped structure; nothing else labelled."""
    for name in structures:
        imported = case.labels > 0 if name == "External" else case.labels == LABEL[name]
        reference = truth.labels > 0 if name == "External" else truth.labels == LABEL[name]
        assert (dice(imported, reference) or 0.0) >= 0.97, name
    present = {s.name for s in STRUCTURES if (case.labels == s.label).any()}
    assert present <= structures


def test_damaged_and_hostile_files_in_the_export_are_passed_over_not_fatal(
    export: dict[str, object], tmp_path: Path
) -> None:
    """A damaged Deflate file and one with sequences nested 100,000 deep: pydicom raised zlib.error and
    RecursionError, which stopped the whole import with a traceback; a Deflate bomb, which pydicom
    inflated whole (1.1 GB here), is passed over in bounded memory."""
    from dicom_bombs import (
        damaged_deflate,
        peak_rss_mb,
        reset_peak_rss,
        write_deflate_bomb,
        write_nested_sequences,
    )

    src = tmp_path / "export"
    shutil.copytree(export["src"], src)  # type: ignore[arg-type]
    (src / "misc" / "deflated").write_bytes(
        damaged_deflate(pydicom.dcmread(src / "PAT1" / "CT" / "1" / "IM0000"))
    )
    write_nested_sequences(src / "misc" / "nested", 100_000, "1.2.826.0.1.3680043.10.1234.5.5", "1.2.3.17")
    write_deflate_bomb(src / "misc" / "bomb", 1100, "1.2.826.0.1.3680043.10.1234.4.11", "1.2.3.22")
    reset_peak_rss()
    before = peak_rss_mb()
    report = import_folder(src, tmp_path / "cases")
    grown = peak_rss_mb() - before
    items = _by_source(report)
    assert items["PAT1/RS/RS1"].status == IMPORTED and items["PAT2/RS2.dcm"].status == IMPORTED  # type: ignore[attr-defined]
    assert "misc/deflated" not in items and "misc/nested" not in items  # not structure sets: passed over
    assert "misc/bomb" not in items and grown < 300, f"peak memory grew by {grown:.0f} MB"


def test_a_rerun_adds_only_new_cases_and_keeps_pseudonyms_and_uids(
    export: dict[str, object], tmp_path: Path
) -> None:
    src = export["src"]
    assert isinstance(src, Path)
    out = tmp_path / "cases"
    import_folder(src, out)
    uid_before = str(pydicom.dcmread(out / "site-0002" / "ct" / "00000.dcm").SeriesInstanceUID)
    again = import_folder(src, out)
    assert again.counts()[IMPORTED] == 0 and again.counts()[PRESENT] == 2
    shutil.rmtree(out / "site-0002")  # lost (or an interrupted run): the same case comes back
    third = import_folder(src, out)
    assert [(i.status, i.case_id) for i in third.items if i.status != SKIPPED] == [
        (PRESENT, "site-0001"),
        (IMPORTED, "site-0002"),
    ]
    assert str(pydicom.dcmread(out / "site-0002" / "ct" / "00000.dcm").SeriesInstanceUID) == uid_before


def test_imported_cases_hold_no_identifiers_and_keep_the_geometry(
    export: dict[str, object], tmp_path: Path
) -> None:
    src, one, two = export["src"], export["one"], export["two"]
    assert isinstance(src, Path) and isinstance(one, LabelledCase) and isinstance(two, LabelledCase)
    out = tmp_path / "cases"
    import_folder(src, out)
    for case_dir, source, ct in (
        (out / "site-0001", one, src / "PAT1" / "CT" / "1"),
        (out / "site-0002", two, src / "PAT2"),
    ):
        header = pydicom.dcmread(next(ct.rglob("IM0000*")))
        secrets = {
            str(header.PatientName),
            str(header.PatientID),
            str(header.PatientBirthDate),
            ACCESSION,
            source.volume.info.study_instance_uid,
            source.volume.info.series_instance_uid,
            source.volume.info.frame_of_reference_uid,
            *source.volume.info.sop_instance_uids,
        }
        rtstruct = pydicom.dcmread(next(src.rglob("RS1" if case_dir.name == "site-0001" else "RS2.dcm")))
        secrets.add(str(rtstruct.SOPInstanceUID))
        files = [p for p in case_dir.rglob("*") if p.is_file()]
        assert len(files) == 16 + 2
        for path in files:
            data = path.read_bytes()
            data = gzip.decompress(data) if path.suffix == ".gz" else data  # labels.nii.gz: its header too
            found = [s for s in secrets if s.encode() in data]
            assert not found, (path.name, found)
        imported = load_series(case_dir / "ct")
        original = load_series(ct)
        assert np.allclose(imported.affine, original.affine)
        assert imported.spacing == original.spacing
        assert np.array_equal(imported.hu, original.hu)
        # one new study, series and frame of reference for all slices; the node's profile recorded
        slices = [pydicom.dcmread(p) for p in sorted((case_dir / "ct").iterdir())]
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PatientID"):
            assert len({str(ds.get(keyword)) for ds in slices}) == 1, keyword
        assert slices[0].PatientID == case_dir.name and slices[0].PatientIdentityRemoved == "YES"
        assert slices[0].PatientBirthDate == ""
        assert "113100" in {c.CodeValue for c in slices[0].DeidentificationMethodCodeSequence}
        assert all(ds.ImageOrientationPatient == header.ImageOrientationPatient for ds in slices)
        assert all(ds.PatientPosition == header.PatientPosition for ds in slices)
    index = index_path(out)
    assert index.is_file() and oct(index.stat().st_mode & 0o777) == "0o600"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [sys.executable, "-m", "rtseg_app", "cases", "import", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_cases_import_command_end_to_end(export: dict[str, object], tmp_path: Path) -> None:
    src = export["src"]
    assert isinstance(src, Path)
    out = tmp_path / "cases"
    done = _cli("--from", str(src), "--out", str(out))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("[1/7] ") for line in lines) and any(
        line.startswith("[7/7] ") for line in lines
    )
    assert any("PAT1/RS/RS1: → site-0001 (" in line for line in lines)
    assert any("PAT3/RS3: skipped: referenced CT not in the folder" in line for line in lines)
    assert any("left out: Milt: ambiguous" in line for line in lines)
    assert any(line.split() == ["imported", "2"] for line in lines)
    assert any(line.split() == ["skipped", "5"] for line in lines)
    again = _cli("--from", str(src), "--out", str(out), "--any-approval")
    assert again.returncode == 0, again.stderr
    assert any(line.split() == ["already", "present", "2"] for line in again.stdout.splitlines())
    # the draft is approved enough now, but its CT is a case already: not a second copy
    assert any(line.split() == ["imported", "0"] for line in again.stdout.splitlines())
    draft = "PAT1/RS/draft: skipped: CT already imported with another structure set (as site-0001)"
    assert any(line.endswith(draft) for line in again.stdout.splitlines()), again.stdout
    missing = _cli("--from", str(tmp_path / "nowhere"), "--out", str(out))
    assert missing.returncode == 2
    assert missing.stderr.strip().endswith("nowhere: not a folder") and "Traceback" not in missing.stderr
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder\n")
    unwritable = _cli("--from", str(src), "--out", str(blocked / "cases"))
    assert unwritable.returncode == 2 and "Traceback" not in unwritable.stderr
    assert "cannot write the cases folder" in unwritable.stderr and len(unwritable.stderr.splitlines()) == 1


def test_without_series_references_the_contour_images_pair_the_ct(
    export: dict[str, object], tmp_path: Path
) -> None:
    src, two, truth = export["src"], export["two"], export["truth"]
    assert isinstance(src, Path) and isinstance(two, LabelledCase) and isinstance(truth, LabelledCase)
    folder = tmp_path / "export"
    shutil.copytree(src / "PAT2" / "x", folder / "ct")
    ds = _structure_set(two, folder / "rs", SECOND)
    for frame in ds.ReferencedFrameOfReferenceSequence:  # some planning systems write only the slices
        del frame.RTReferencedStudySequence
    write_rtstruct(ds, folder / "rs")
    (item,) = import_folder(folder, tmp_path / "cases").items
    assert item.status == IMPORTED, item.detail
    _check_labels(load_case(tmp_path / "cases" / "site-0001"), truth, set(item.structures))


def test_a_slice_that_cannot_be_de_identified_skips_its_case_not_the_run(
    export: dict[str, object], tmp_path: Path
) -> None:
    src, two = export["src"], export["two"]
    assert isinstance(src, Path) and isinstance(two, LabelledCase)
    folder = tmp_path / "export"
    shutil.copytree(src / "PAT2", folder / "PAT2")
    shutil.copytree(src / "PAT1", folder / "PAT1", ignore=shutil.ignore_patterns("draft"))
    bad = folder / "PAT2" / "x" / "y" / "IM0003.dcm"
    ds = pydicom.dcmread(bad)
    ds.AcquisitionDate = "20260231"  # no such day: the date shift cannot parse it
    ds.save_as(bad)
    report = import_folder(folder, tmp_path / "cases")
    items = _by_source(report)
    assert items["PAT1/RS/RS1"].status == IMPORTED  # type: ignore[attr-defined]
    skipped = items["PAT2/RS2.dcm"]
    assert (skipped.status, skipped.reason) == (SKIPPED, BAD_CT)  # type: ignore[attr-defined]
    assert skipped.detail == "a slice cannot be de-identified (ValueError)"  # type: ignore[attr-defined]
    assert not [p for p in (tmp_path / "cases").iterdir() if p.name.startswith(".incoming")]
