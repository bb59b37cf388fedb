"""Closed loop: an approved RTSTRUCT back from the TPS → edit metrics and a new labelled site case."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from case_helpers import small_case
from pydicom.uid import generate_uid

from rtseg.cases import load_case
from rtseg.closed_loop import ClosedLoop, ClosedLoopConfig, config_from_settings, handle_rtstruct, recorded
from rtseg.errors import InputError
from rtseg.jobs import JobState, JobStore
from rtseg.metrics import dice
from rtseg.model.default import default_model_dir
from rtseg.model.segmenter import NnunetSegmenter
from rtseg.phantom.cohort import case_id, read_label_image, write_case
from rtseg.pipeline import model_identity
from rtseg.rtstruct import ModelIdentity, build_rtstruct, write_rtstruct
from rtseg.structures import STRUCTURES
from rtseg.worker import JobRunner

RENAMED = {"Liver": "LIVER", "Colon": "zz_Ring"}  # a case variant of a TG-263 name; a helper structure
LABEL = {s.name: s.label for s in STRUCTURES}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A node data directory with one DICOM job segmented by the default model, and its ground truth."""
    root = tmp_path_factory.mktemp("closed_loop")
    write_case("B", 31, 0, root / "full", matrix=96)
    truth = load_case(small_case(root / "full" / case_id("B", 31, 0), root / "truth", 16))
    data = root / "data"
    shutil.copytree(root / "truth" / "ct", data / "spool" / "ct" / "series1")
    store = JobStore(data / "state.db")
    job = store.create(
        "dicom", "series1", "spool/ct/series1", state=JobState.QUEUED, meta={"write_labels": True}
    )
    segmenter = NnunetSegmenter(default_model_dir(), device="cpu", threads=1)
    runner = JobRunner(store, data, segmenter, model_identity(segmenter.manifest, default_model_dir()))
    claimed = store.claim_next()
    assert claimed is not None and claimed.id == job.id
    done = runner.run(claimed)
    assert done.state == JobState.DONE, done.error
    predicted, _ = read_label_image(data / done.result["files"]["labels"])
    return {"root": root, "data": data, "store": store, "job": done, "truth": truth, "predicted": predicted}


def approved_rtstruct(
    truth: object,
    out: Path,
    *,
    status: str = "APPROVED",
    label: str = "APPROVED",
    renamed: dict[str, str] = RENAMED,
) -> Path:
    """The clinician's structure set: the ground truth contours, ROIs ``renamed``, approved."""
    result = build_rtstruct(truth.volume, truth.labels, STRUCTURES, ModelIdentity("TPS", "1"))  # type: ignore[attr-defined]
    ds = result.dataset
    for roi in ds.StructureSetROISequence:
        roi.ROIName = renamed.get(str(roi.ROIName), str(roi.ROIName))
    ds.ApprovalStatus = status
    ds.StructureSetLabel = label
    if status == "APPROVED":
        ds.ReviewDate, ds.ReviewTime, ds.ReviewerName = "20260303", "101500", "Doe^Jane"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_rtstruct(ds, out)
    return out


def test_approved_rtstruct_is_scored_and_becomes_a_site_case(
    node: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    data, store, job, truth = node["data"], node["store"], node["job"], node["truth"]
    assert isinstance(data, Path) and isinstance(store, JobStore)
    approved_rtstruct(truth, data / "spool" / "rtstruct" / "s" / "approved.dcm")
    loop = ClosedLoop(data, store, ClosedLoopConfig(add_cases=True))
    with caplog.at_level(logging.INFO):
        (outcome,) = loop.run_once()
    assert outcome.status == "recorded", outcome.message
    assert outcome.job_id == job.id and outcome.model_version == job.model_version  # type: ignore[attr-defined]
    assert outcome.unknown_rois == ("zz_Ring",)
    # the node's contours against the approved ones = prediction against ground truth
    predicted, labels = node["predicted"], truth.labels  # type: ignore[attr-defined]
    contoured = {s.name for s in STRUCTURES if (labels == s.label).any()} | {"External"}
    assert set(outcome.metrics) == contoured - {"Colon"}  # what the clinician's set holds, by model name
    for name, m in outcome.metrics.items():
        external = name == "External"
        p = predicted > 0 if external else predicted == LABEL[name]
        t = labels > 0 if external else labels == LABEL[name]
        expected = dice(p, t)
        assert m["dice"] is not None and expected is not None
        assert abs(m["dice"] - expected) <= 0.01, name
        if p.any() and t.any():
            assert m["hd95_mm"] is not None and m["hd95_mm"] >= 0.0
    assert outcome.metrics["External"]["dice"] > 0.5  # type: ignore[operator]
    # stored next to the job and in the node's database
    stored = json.loads((data / "jobs" / job.id / "edit-metrics.json").read_text())  # type: ignore[attr-defined]
    assert stored["metrics"]["Liver"]["dice"] == outcome.metrics["Liver"]["dice"]
    (row,) = recorded(store, job.id)  # type: ignore[attr-defined]
    assert row["status"] == "recorded" and row["case_id"] == outcome.case_id
    # the site's training data grew by a loadable case whose labels are the approved contours
    assert outcome.case_id is not None
    case = load_case(data / "site-data" / outcome.case_id)
    expected_labels = labels.copy()
    expected_labels[labels == LABEL["Colon"]] = LABEL["External"]  # "zz_Ring" is not a model structure
    assert case.labels.shape == expected_labels.shape
    assert np.mean(case.labels == expected_labels) > 0.999  # contour round trip: voxel edges → centres
    assert np.array_equal(case.volume.hu, truth.volume.hu)  # type: ignore[attr-defined]
    # processed once; no patient data in what was logged
    assert loop.run_once() == []
    assert "PHANTOM" not in caplog.text and "RTSEG-" not in caplog.text and "Doe" not in caplog.text


def test_unapproved_and_unknown_ct_are_reported_not_crashed(node: dict[str, object], tmp_path: Path) -> None:
    data, store, job, truth = node["data"], node["store"], node["job"], node["truth"]
    assert isinstance(data, Path) and isinstance(store, JobStore)
    before = sorted((data / "site-data").glob("*")) if (data / "site-data").exists() else []
    config = ClosedLoopConfig(add_cases=True)

    own = data / job.output_path  # type: ignore[attr-defined]  # the node's own AI_UNAPPROVED RTSTRUCT
    outcome = handle_rtstruct(own, data, store, config)
    assert (outcome.status, outcome.message) == ("ignored", "not approved (UNAPPROVED)")

    other = approved_rtstruct(truth, tmp_path / "other.dcm")
    ds = pydicom.dcmread(other)
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    frame.FrameOfReferenceUID = generate_uid()
    frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID = generate_uid()
    for roi in ds.StructureSetROISequence:
        roi.ReferencedFrameOfReferenceUID = frame.FrameOfReferenceUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(other)
    outcome = handle_rtstruct(other, data, store, config)
    assert outcome.status == "unpaired" and "no segmentation job" in outcome.message

    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not DICOM at all")
    assert handle_rtstruct(garbage, data, store, config).status == "failed"
    after = sorted((data / "site-data").glob("*")) if (data / "site-data").exists() else []
    assert after == before  # none of them added a case
    statuses = [r["status"] for r in recorded(store)]
    assert statuses.count("ignored") >= 1 and statuses.count("unpaired") == 1 and "failed" in statuses


def test_configured_label_counts_as_approved_and_cases_stay_off_by_default(
    node: dict[str, object], tmp_path: Path
) -> None:
    data, store, truth = node["data"], node["store"], node["truth"]
    assert isinstance(data, Path) and isinstance(store, JobStore)
    path = approved_rtstruct(truth, tmp_path / "label.dcm", status="UNAPPROVED", label="CLINICAL")
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path)
    assert handle_rtstruct(path, data, store).status == "ignored"
    config = config_from_settings({"closed_loop": {"approved_labels": ["CLINICAL"]}})
    outcome = handle_rtstruct(path, data, store, config)
    assert outcome.status == "recorded" and outcome.case_id is None  # add_cases is off by default
    with pytest.raises(InputError, match="unknown setting federation.closed_loop.add_case"):
        config_from_settings({"closed_loop": {"add_case": True}})


# the department's own names: Dutch, laterality forms, Eclipse's BODY, a site-file name, a target
CLINICAL = {
    "Liver": "LIVER",
    "Kidney_R": "Nier re",
    "Lung_L": "Lt Lung",
    "Lung_R": "Long_R_lokal",
    "Spleen": "Milt",
    "External": "BODY",
    "SpinalCord": "Spinal Cord",
    "Colon": "PTV_45",
}


def test_clinical_roi_names_are_mapped_to_tg263_and_the_reasons_recorded(
    node: dict[str, object], tmp_path: Path
) -> None:
    data, store, truth = node["data"], node["store"], node["truth"]
    assert isinstance(data, Path) and isinstance(store, JobStore)
    site_file = tmp_path / "roi-names.toml"
    site_file.write_text('[roi_names]\n"Long_R_lokal" = "Lung_R"\n')
    config = config_from_settings(
        {"closed_loop": {"add_cases": True, "site_data": str(tmp_path / "site"), "roi_names": str(site_file)}}
    )
    path = approved_rtstruct(truth, tmp_path / "clinical.dcm", renamed=CLINICAL)
    outcome = handle_rtstruct(path, data, store, config)
    assert outcome.status == "recorded", outcome.message
    labels = truth.labels  # type: ignore[attr-defined]
    contoured = {s.name for s in STRUCTURES if (labels == s.label).any()} | {"External"}
    assert {"Liver", "Kidney_R", "Lung_L", "Lung_R", "Spleen", "SpinalCord"} <= contoured
    assert set(outcome.metrics) == contoured - {"Colon"}
    assert outcome.unknown_rois == ("PTV_45",)
    assert outcome.roi_mapping["Nier re"] == "Kidney_R: synonym 'nier re' → Kidney_R"
    assert outcome.roi_mapping["Long_R_lokal"].startswith("Lung_R: site mapping file")
    assert outcome.roi_mapping["PTV_45"] == "rejected: derived: contains 'PTV'"
    stored = json.loads((data / "jobs" / outcome.job_id / "edit-metrics.json").read_text())  # type: ignore[operator]
    assert stored["roi_mapping"]["BODY"] == "External: synonym 'body' → External"
    # the site case carries the clinician's contours under the model's labels
    assert outcome.case_id is not None
    case = load_case(tmp_path / "site" / outcome.case_id)
    for name in ("Kidney_R", "Lung_L", "Liver"):
        assert dice(case.labels == LABEL[name], labels == LABEL[name]) > 0.95, name  # type: ignore[operator]


def test_a_bad_roi_mapping_setting_is_refused_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "roi-names.toml"
    with pytest.raises(InputError, match="cannot read the ROI mapping file") as info:
        config_from_settings({"closed_loop": {"roi_names": str(missing)}})
    assert info.value.source == str(missing)
    missing.write_text('[roi_names]\n"Nier li" = "Kidney_Left"\n')
    with pytest.raises(InputError, match="'Nier li' = 'Kidney_Left': not a structure"):
        config_from_settings({"closed_loop": {"roi_names": str(missing)}})
    with pytest.raises(InputError, match="roi_names must be the path of a TOML file"):
        config_from_settings({"closed_loop": {"roi_names": ["a.toml"]}})


def _counting_ct_loads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the closed loop's CT loads (the real loader still runs)."""
    import rtseg.closed_loop as closed_loop

    loads: list[int] = []
    real = closed_loop.load_series

    def load_series(*args: object, **kwargs: object) -> object:
        loads.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(closed_loop, "load_series", load_series)
    return loads


def test_malformed_approved_rtstruct_is_quarantined_and_the_next_one_processed(
    node: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_node.node import Loop
    from rtseg.audit import AuditLog

    data, store, truth = node["data"], node["store"], node["truth"]
    assert isinstance(data, Path) and isinstance(store, JobStore)
    spool = data / "spool" / "rtstruct"
    bad = approved_rtstruct(truth, spool / "0-bad" / "0.dcm")  # sorted first: met first every cycle
    ds = pydicom.dcmread(bad)
    del ds.ROIContourSequence[0].ReferencedROINumber
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(bad)
    good = approved_rtstruct(truth, spool / "1-good" / "1.dcm")
    ds = pydicom.dcmread(good)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(good)
    loads = _counting_ct_loads(monkeypatch)
    audit = AuditLog(tmp_path / "audit.log")
    loop = Loop("closed-loop-test", ClosedLoop(data, store, audit=audit.record).run_once, 0.05)
    loop.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(str(good) == r["source"] for r in recorded(store)):
            time.sleep(0.1)
        time.sleep(0.5)  # several more cycles: the bad one must not come back
    finally:
        loop.stop()
    rows = {r["source"]: r for r in recorded(store)}
    assert rows.get(str(good), {}).get("status") == "recorded", "the valid RTSTRUCT was never processed"
    quarantined = rows[str(bad)]
    assert quarantined["status"] == "quarantined"
    assert "ReferencedROINumber" in quarantined["detail"]["message"]
    assert not bad.exists()
    kept = data / quarantined["detail"]["quarantine"]
    assert kept.is_file() and kept.is_relative_to(data / "quarantine")
    assert len(loads) == 2  # one CT load per structure set, not one per cycle
    (event,) = [e for e in audit.entries() if e["event"] == "rtstruct_quarantined"]
    assert event["instance"] == quarantined["instance_key"] and "ReferencedROINumber" in event["reason"]


def test_a_structure_set_nested_past_the_stack_is_quarantined_not_raised(tmp_path: Path) -> None:
    """The node refuses such an instance (check_instance_size); a file that reached the spool
    another way must not stop the loop with a RecursionError either."""
    from dicom_bombs import write_nested_sequences

    data = tmp_path / "data"
    spool = data / "spool" / "rtstruct" / "s1"
    spool.mkdir(parents=True)
    nested = write_nested_sequences(spool / "1.dcm", 100_000, "1.2.826.0.1.3680043.10.1234.5.6", "1.2.3.18")
    store = JobStore(data / "state.db")
    try:
        outcome = handle_rtstruct(nested, data, store, quarantine=data / "quarantine" / "rtstruct")
    finally:
        store.close()
    assert outcome.status == "quarantined" and "RecursionError" in outcome.message
    assert not nested.exists() and (data / "quarantine" / "rtstruct" / "s1" / "1.dcm").is_file()


def test_late_approval_is_paired_within_the_window_after_retention(
    node: dict[str, object], tmp_path: Path
) -> None:
    import sqlite3
    import time as clock
    from dataclasses import replace as with_values
    from types import MappingProxyType

    from dicom_node.node import Node
    from rtseg.settings import load_settings

    data = tmp_path / "data"
    shutil.copytree(node["data"], data, ignore=shutil.ignore_patterns("rtstruct", "quarantine"))  # type: ignore[arg-type]
    job = node["job"]
    settings = load_settings(
        environ={
            "RTSEG_DATA_DIR": str(data),
            "RTSEG_NODE_RETENTION_H": "1",
            "RTSEG_NODE_MIN_FREE_DISK_MB": "0",
        }
    )
    settings = with_values(settings, federation=MappingProxyType({"closed_loop": {"window_h": 48}}))
    janitor = Node(settings, tmp_path / "model")  # not started: the retention janitor and the closed loop

    def finished_hours_ago(hours: float) -> None:
        with sqlite3.connect(data / "state.db") as db:
            db.execute("UPDATE jobs SET updated = ? WHERE id = ?", (clock.time() - hours * 3600, job.id))  # type: ignore[attr-defined]

    finished_hours_ago(30)  # past retention_h (1 h), within the closed-loop window (48 h)
    janitor.purge()
    approved = approved_rtstruct(node["truth"], data / "spool" / "rtstruct" / "late" / "late.dcm")
    (outcome,) = janitor.closed_loop.run_once()
    assert outcome.status == "recorded", outcome.message
    assert outcome.job_id == job.id  # type: ignore[attr-defined]
    assert approved.exists()

    finished_hours_ago(49)  # the window is over: the CT goes
    janitor.purge()
    assert not (data / job.input_dir).exists()  # type: ignore[attr-defined]
    assert [e["job"] for e in janitor.audit.entries() if e["event"] == "retention_purged"] == [job.id]  # type: ignore[attr-defined]


def test_pairing_opens_only_the_rtstructs_of_jobs_for_the_referenced_ct(
    node: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TPS may send back every approved structure set: each must not cost a read of every RTSTRUCT."""
    from rtseg import closed_loop
    from rtseg.closed_loop import find_job, referenced_series
    from rtseg.privacy import uid_key

    data = tmp_path / "data"
    shutil.copytree(node["data"], data)  # type: ignore[arg-type]
    store, job, truth = JobStore(data / "state.db"), node["job"], node["truth"]
    info = truth.volume.info  # type: ignore[attr-defined]
    recorded = job.result["references"]  # type: ignore[attr-defined]
    assert recorded["series"] == uid_key(info.series_instance_uid)
    assert recorded["frame"] == uid_key(info.frame_of_reference_uid)

    def segmented(references: dict[str, str] | None) -> str:
        """A newer job of the store whose RTSTRUCT file is the node's own (it references the same CT)."""
        other = store.create("dicom", uuid_like(), "spool/ct/other", state=JobState.RUNNING)
        output = f"jobs/{other.id}/rtstruct.dcm"
        (data / output).parent.mkdir(parents=True)
        shutil.copyfile(data / job.output_path, data / output)  # type: ignore[attr-defined]
        result = {"references": references} if references is not None else {}
        store.transition(other.id, JobState.RUNNING, JobState.DONE, output_path=output, result=result)
        return other.id

    for i in range(40):  # CTs of other patients, by what each job recorded
        segmented({"series": uid_key(f"1.2.826.0.1.{i}"), "frame": uid_key(f"1.2.826.0.2.{i}")})
    opened: list[Path] = []
    read = pydicom.dcmread

    def counting(path: Path, *args: object, **kwargs: object) -> pydicom.Dataset:
        opened.append(Path(path))
        return read(path, *args, **kwargs)

    monkeypatch.setattr(closed_loop.pydicom, "dcmread", counting)
    approved = approved_rtstruct(truth, tmp_path / "approved.dcm")
    series, frames = referenced_series(pydicom.dcmread(approved))
    opened.clear()
    found = find_job(store, data, series, frames)
    assert found is not None and found.id == job.id  # type: ignore[attr-defined]
    assert opened == [data / job.output_path]  # type: ignore[attr-defined]
    opened.clear()
    assert find_job(store, data, set(), frames).id == job.id  # type: ignore[attr-defined, union-attr]
    assert opened == [data / job.output_path]  # type: ignore[attr-defined]

    # a job segmented before jobs recorded their references: its RTSTRUCT is opened and decides
    older = segmented(None)
    found = find_job(store, data, series, frames)
    assert found is not None and found.id == older


def uuid_like() -> str:
    return generate_uid(prefix=None).replace(".", "")[:24]
