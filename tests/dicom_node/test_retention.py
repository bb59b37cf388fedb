"""Patient data on the node: retention (CTs, dead letters, RT spool, quarantine) and duplicate instances."""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path

import pydicom
from node_helpers import storescu
from pynetdicom.sop_class import RTStructureSetStorage  # type: ignore[attr-defined]
from test_scp import _dataset

from dicom_node.node import Node
from dicom_node.scp import start_scp
from dicom_node.spool import uid_key
from rtseg.jobs import JobState
from rtseg.settings import load_settings


def _node(data_dir: Path, retention_h: str, **env: str) -> Node:
    settings = load_settings(
        environ={
            "RTSEG_DATA_DIR": str(data_dir),
            "RTSEG_NODE_RETENTION_H": retention_h,
            "RTSEG_NODE_MIN_FREE_DISK_MB": "0",
            **env,
        }
    )
    return Node(settings, data_dir / "model")  # not started: no SCP, no workers


def _age(node: Node, job_id: str, hours: float) -> None:
    """The job last changed (and, if it is finished, finished) ``hours`` ago."""
    then = time.time() - hours * 3600
    with sqlite3.connect(node.store.db_path) as db:
        db.execute("UPDATE jobs SET updated = ? WHERE id = ?", (then, job_id))
        db.execute("UPDATE jobs SET finished = ? WHERE id = ? AND finished IS NOT NULL", (then, job_id))


def _purged(node: Node) -> list[dict[str, object]]:
    return [e for e in node.audit.entries() if e["event"] == "retention_purged"]


def test_dead_letters_rt_spool_and_quarantine_are_purged_after_retention(tmp_path: Path) -> None:
    node = _node(tmp_path, "2")
    keys = {"dead": uid_key("1.2.9.1"), "fresh": uid_key("1.2.9.2")}
    jobs = {}
    for name, key in keys.items():
        node.spool.write("ct", key, uid_key(f"{name}.1"), b"ct")
        job = node.store.create("dicom", key, f"spool/ct/{key}", state=JobState.SENDING)
        jobs[name] = node.store.transition(job.id, JobState.SENDING, JobState.DEAD_LETTER, error="x")
    _age(node, jobs["dead"].id, 3)  # dead-lettered 3 h ago, retention 2 h
    old_rt = node.spool.write("rtstruct", uid_key("1.2.9.3"), uid_key("1.2.9.3.1"), b"rt")
    new_rt = node.spool.write("rtstruct", uid_key("1.2.9.4"), uid_key("1.2.9.4.1"), b"rt")
    quarantined = tmp_path / "quarantine" / "rtstruct" / uid_key("1.2.9.5") / f"{uid_key('1.2.9.5.1')}.dcm"
    quarantined.parent.mkdir(parents=True)
    quarantined.write_bytes(b"rt")
    three_hours_ago = time.time() - 3 * 3600
    for path in (old_rt, quarantined):
        os.utime(path, (three_hours_ago, three_hours_ago))

    assert node.purge() == 3
    assert node.spool.instances("ct", keys["dead"]) == []
    assert len(node.spool.instances("ct", keys["fresh"])) == 1  # dead-lettered just now: kept
    assert not old_rt.exists() and not quarantined.exists() and new_rt.exists()
    assert node.store.get(jobs["dead"].id).meta["purged"] is True
    events = {(e["kind"], e["series"]) for e in _purged(node)}
    assert events == {
        ("ct", keys["dead"]),
        ("rtstruct", uid_key("1.2.9.3")),
        ("rtstruct", uid_key("1.2.9.5")),
    }
    assert node.purge() == 0  # done once
    assert "1.2.9" not in node.audit.path.read_text()  # hashed keys only


def test_duplicate_sop_instance_with_other_content_is_audited(tmp_path: Path) -> None:
    node = _node(tmp_path / "data", "24", RTSEG_DICOM_PORT="0", RTSEG_DICOM_HOST="127.0.0.1")
    server = start_scp(node.settings.dicom, node.receiver, node.audit)
    port = int(server.server_address[1])
    ds = _dataset(RTStructureSetStorage, "1.2.3.4.70", "1.2.3.71")
    ds.Modality, ds.StructureSetLabel = "RTSTRUCT", "FIRST"
    ds.save_as(tmp_path / "first.dcm", enforce_file_format=True)
    shutil.copy(tmp_path / "first.dcm", tmp_path / "again.dcm")
    ds.StructureSetLabel = "CHANGED"  # same SOP Instance UID, other content
    ds.save_as(tmp_path / "changed.dcm", enforce_file_format=True)
    try:
        codes = [storescu([tmp_path / name], port) for name in ("first.dcm", "again.dcm")]
        assert [e for e in node.audit.entries() if e["event"] == "duplicate_instance_differs"] == []
        codes.append(storescu([tmp_path / "changed.dcm"], port))
    finally:
        server.shutdown()
    assert codes == [0, 0, 0]
    (event,) = [e for e in node.audit.entries() if e["event"] == "duplicate_instance_differs"]
    assert (event["kind"], event["series"]) == ("rtstruct", uid_key("1.2.3.71"))
    assert event["instance"] == uid_key("1.2.3.4.70") and event["action"] == "replaced"
    (kept,) = node.spool.instances("rtstruct", uid_key("1.2.3.71"))
    assert pydicom.dcmread(kept).StructureSetLabel == "CHANGED"
    assert "1.2.3.4.70" not in node.audit.path.read_text()  # hashed keys only


def test_a_series_sent_again_keeps_its_ct_while_the_new_job_needs_it(tmp_path: Path) -> None:
    node = _node(tmp_path, "1")
    key = uid_key("1.2.9.8")
    node.spool.write("ct", key, uid_key("1.2.9.8.1"), b"ct")
    old = node.store.create("dicom", key, f"spool/ct/{key}", state=JobState.RECEIVED)
    old = node.store.transition(old.id, JobState.RECEIVED, JobState.FAILED, error="missing slices")
    _age(node, old.id, 5)  # failed long ago; the rest of the series came later and opened a new job
    node.store.create("dicom", key, f"spool/ct/{key}", state=JobState.QUEUED)
    assert node.purge() == 0
    assert len(node.spool.instances("ct", key)) == 1


def test_each_failed_job_is_audited_once_and_later_scans_read_only_recent_changes(tmp_path: Path) -> None:
    node = _node(tmp_path, "24")
    old = node.store.create("dicom", uid_key("1.2.9.20"), "spool/ct/x", state=JobState.RUNNING)
    node.store.transition(old.id, JobState.RUNNING, JobState.FAILED, error="missing slices")
    assert node.audit_failures() == 1 and node.audit_failures() == 0  # once
    new = node.store.create("dicom", uid_key("1.2.9.21"), "spool/ct/y", state=JobState.RUNNING)
    node.store.transition(new.id, JobState.RUNNING, JobState.FAILED, error="not the model's region")
    _age(node, old.id, 5)  # old history: the next scan does not read it again
    reads: list[float | None] = []
    listed = node.store.list
    node.store.list = lambda *a, **k: reads.append(k.get("updated_since")) or listed(*a, **k)  # type: ignore[method-assign]
    assert node.audit_failures() == 1
    (since,) = reads
    assert since is not None and node.store.get(old.id).updated < since
    events = [e["job"] for e in node.audit.entries() if e["event"] == "job_failed"]
    assert events == [old.id, new.id]


def test_job_outputs_are_purged_after_results_retention_but_not_a_dead_letters(tmp_path: Path) -> None:
    """Before: ``jobs/<id>/`` (RTSTRUCT, SEG, labels, preview: patient data) stayed forever."""
    node = _node(tmp_path, "2", RTSEG_NODE_RESULTS_RETENTION_H="48")
    jobs = {}
    for name, end in (("old", JobState.DONE), ("recent", JobState.DONE), ("dead", JobState.DEAD_LETTER)):
        job = node.store.create("dicom", uid_key(f"1.2.7.{name}"), "spool/ct/x", state=JobState.SENDING)
        jobs[name] = node.store.transition(
            job.id, JobState.SENDING, end, output_path=f"jobs/{job.id}/rtstruct.dcm"
        )
        (tmp_path / "jobs" / job.id).mkdir(parents=True)
        (tmp_path / "jobs" / job.id / "rtstruct.dcm").write_bytes(b"rt")
        _age(node, job.id, 72 if name != "recent" else 24)
    node.purge()  # the CTs (retention 2 h) go first: that changes the jobs, not their results' clock
    assert not (tmp_path / "jobs" / jobs["old"].id).exists()
    assert (tmp_path / "jobs" / jobs["recent"].id / "rtstruct.dcm").is_file()  # 24 h < 48 h
    assert (tmp_path / "jobs" / jobs["dead"].id / "rtstruct.dcm").is_file()  # waits for `node retry`
    assert node.store.get(jobs["old"].id).meta["results_purged"] is True
    results = [e for e in _purged(node) if e["kind"] == "results"]
    assert [e["job"] for e in results] == [jobs["old"].id]
    node.purge()
    assert [e for e in _purged(node) if e["kind"] == "results"] == results  # once
