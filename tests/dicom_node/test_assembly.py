"""Series assembly and selection, and the spool, on a real job store and a real file system."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from dicom_node.assembly import Assembler, LateInstance, Peer, SeriesHeader, select
from dicom_node.spool import Spool, uid_key
from rtseg.audit import AuditLog
from rtseg.jobs import JobState, JobStore
from rtseg.settings import Selection, load_settings

CT = SeriesHeader("CT", "Abdomen 2.0 B30f", "ABDOMEN", ("ORIGINAL", "PRIMARY", "AXIAL"), 2.0)
PEER = Peer("MODALITY", "127.0.0.1")


@pytest.mark.parametrize(
    ("selection", "header", "n", "reason"),
    [
        (Selection(), CT, 100, None),
        (Selection(), replace(CT, modality="MR"), 100, "modality MR is not selected"),
        (Selection(series_description_include="thorax"), CT, 100, "does not match the include"),
        (Selection(series_description_include="ABDOMEN"), CT, 100, None),  # case-insensitive
        (Selection(series_description_exclude="b30"), CT, 100, "matches the exclude"),
        (Selection(body_parts=("CHEST",)), CT, 100, "body part ABDOMEN is not selected"),
        (
            Selection(),
            replace(CT, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
            3,
            "LOCALIZER is excluded",
        ),
        (Selection(slice_thickness_mm=(0.5, 1.5)), CT, 100, "slice thickness 2 mm is outside"),
        (Selection(slice_count=(50, 60)), CT, 100, "100 slices is outside 50-60"),
        (Selection(), replace(CT, slice_thickness=None), 100, None),
    ],
)
def test_selection_rules(selection: Selection, header: SeriesHeader, n: int, reason: str | None) -> None:
    found = select(selection, header, n)
    assert (found is None) if reason is None else (found is not None and reason in found)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _assembler(tmp_path: Path, clock: Clock, **env: str) -> Assembler:
    settings = load_settings(
        environ={"RTSEG_NODE_QUIET_TIME_S": "10", "RTSEG_SELECTION_SLICE_COUNT": "2,100", **env}
    )
    store = JobStore(tmp_path / "state.db")
    return Assembler(store, Spool(tmp_path / "spool", 0), settings, AuditLog(tmp_path / "audit.log"), clock)


def _receive(a: Assembler, series: str, instance: str, header: SeriesHeader = CT) -> None:
    key = uid_key(series)
    assert a.begin(key, header, PEER, uid_key(instance))
    a.spool.write("ct", key, uid_key(instance), b"DICM" + instance.encode())
    a.end(key)


def test_series_completes_after_the_quiet_time_not_before(tmp_path: Path) -> None:
    clock = Clock()
    a = _assembler(tmp_path, clock)
    for i in range(3):
        _receive(a, "1.2.3", f"1.2.3.{i}")
        clock.now += 9
    assert a.tick() == []
    key = uid_key("1.2.3")
    assert a.begin(key, CT, PEER)  # a store in flight holds the series open however long it takes
    clock.now += 60
    assert a.tick() == []
    a.end(key)
    clock.now += 9.9
    assert a.tick() == []
    clock.now += 0.2
    (job_id,) = a.tick()
    job = a.store.get(job_id)
    assert job.state == JobState.QUEUED and job.meta["n_instances"] == 3
    assert job.input_dir == f"spool/ct/{key}" and job.series_key == key


def test_received_series_reopen_after_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    a = _assembler(tmp_path, clock)
    _receive(a, "1.2.4", "1.2.4.1")
    _receive(a, "1.2.4", "1.2.4.2")
    restarted = _assembler(tmp_path, clock)  # same database and spool, new process
    assert restarted.recover() == 1
    _receive(restarted, "1.2.4", "1.2.4.3")  # the modality resumes: same job
    clock.now += 11
    (job_id,) = restarted.tick()
    assert restarted.store.get(job_id).meta["n_instances"] == 3
    assert len(restarted.store.list()) == 1


def test_skipped_series_is_recorded_and_cleaned_up(tmp_path: Path) -> None:
    clock = Clock()
    a = _assembler(tmp_path, clock)
    scout = replace(CT, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    _receive(a, "1.2.5", "1.2.5.1", scout)
    _receive(a, "1.2.5", "1.2.5.2", scout)
    clock.now += 11
    (job_id,) = a.tick()
    job = a.store.get(job_id)
    assert job.state == JobState.SKIPPED and "LOCALIZER" in str(job.error)
    assert a.spool.instances("ct", uid_key("1.2.5")) == []
    assert [e["event"] for e in a.audit.entries()] == ["series_skipped"]


def test_late_instance_policies(tmp_path: Path) -> None:
    clock = Clock()
    a = _assembler(tmp_path / "supersede", clock)
    _receive(a, "1.2.6", "1.2.6.1")
    _receive(a, "1.2.6", "1.2.6.2")
    clock.now += 11
    (first,) = a.tick()
    assert a.begin(uid_key("1.2.6"), CT, PEER, uid_key("1.2.6.1")) is False  # sent again: kept once
    assert a.begin(uid_key("1.2.6"), CT, PEER, uid_key("1.2.6.3")) is True  # new: the next generation
    (second,) = a.store.list({JobState.RECEIVED})
    assert second.meta["supersedes"] == first and second.meta["generation"] == 2
    r = _assembler(tmp_path / "reject", clock, RTSEG_NODE_LATE_INSTANCE_POLICY="reject")
    _receive(r, "1.2.6", "1.2.6.1")
    _receive(r, "1.2.6", "1.2.6.2")
    clock.now += 11
    r.tick()
    with pytest.raises(LateInstance):
        r.begin(uid_key("1.2.6"), CT, PEER, uid_key("1.2.6.3"))


def test_a_late_instance_for_a_job_whose_outputs_retention_deleted_is_flagged_once(tmp_path: Path) -> None:
    """Before: amending the deleted RTSTRUCT raised, and the series was retried on every tick."""
    clock = Clock()
    a = _assembler(tmp_path, clock, RTSEG_NODE_LATE_INSTANCE_POLICY="flag")
    _receive(a, "1.2.8", "1.2.8.1")
    _receive(a, "1.2.8", "1.2.8.2")
    clock.now += 11
    (job_id,) = a.tick()
    a.store.transition(job_id, JobState.QUEUED, JobState.RUNNING)
    a.store.transition(job_id, JobState.RUNNING, JobState.DONE, output_path=f"jobs/{job_id}/rtstruct.dcm")
    _receive(a, "1.2.8", "1.2.8.3")  # no jobs/<id>/ any more: [node] results_retention_h
    for _ in range(3):
        clock.now += 11
        a.tick()
    assert a.store.get(job_id).meta["late_instances"] == 1
    assert a.audit.path.read_text().count("late_instances_flagged") == 1


def test_return_to_sender_uses_the_configured_port(tmp_path: Path) -> None:
    clock = Clock()
    env = {
        "RTSEG_DICOM_RETURN_TO_SENDER": "true",
        "RTSEG_DICOM_ALLOWED_CALLERS": "MODALITY@127.0.0.1:4242",
        "RTSEG_DESTINATIONS": "tps=TPS@10.0.0.7:104",
    }
    a = _assembler(tmp_path, clock, **env)
    _receive(a, "1.2.7", "1.2.7.1")
    _receive(a, "1.2.7", "1.2.7.2")
    clock.now += 11
    (job_id,) = a.tick()
    dests = a.store.get(job_id).meta["destinations"]
    assert [(d["name"], d["ae_title"], d["host"], d["port"]) for d in dests] == [
        ("tps", "TPS", "10.0.0.7", 104),
        ("sender", "MODALITY", "127.0.0.1", 4242),
    ]


def test_spool_writes_atomically_under_keys_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    path = spool.write("ct", uid_key("1.2"), uid_key("1.2.1"), b"x" * 1000)
    assert path.read_bytes() == b"x" * 1000 and path.parent.parent == tmp_path / "spool" / "ct"
    assert spool.write("ct", uid_key("1.2"), uid_key("1.2.1"), b"y") == path  # sent twice: replaced
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    for bad in ("../x", "a/b", "", ".."):
        with pytest.raises(ValueError):
            spool.write("ct", bad, "k", b"")
        with pytest.raises(ValueError):
            spool.write("ct", "k", bad, b"")
    (path.parent / ".half.abc.tmp").write_bytes(b"half")  # a crash between write and rename
    assert spool.clean_temporary() == 1
    assert spool.instances("ct", uid_key("1.2")) == [path]


def test_spool_has_space_follows_the_threshold(tmp_path: Path) -> None:
    free_mb = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize // 2**20
    assert Spool(tmp_path / "a", max(0, free_mb - 100)).has_space()
    assert not Spool(tmp_path / "b", free_mb + 10_000).has_space()


def test_a_skipped_series_sent_again_is_assessed_anew(tmp_path: Path) -> None:
    clock = Clock()
    a = _assembler(tmp_path, clock, RTSEG_SELECTION_SLICE_COUNT="3,100")
    _receive(a, "1.2.8", "1.2.8.1")
    _receive(a, "1.2.8", "1.2.8.2")
    clock.now += 11
    (partial,) = a.tick()
    assert a.store.get(partial).state == JobState.SKIPPED  # cut short: 2 of 3 slices
    for i in range(3):
        _receive(a, "1.2.8", f"1.2.8.{i}")
    clock.now += 11
    (complete,) = a.tick()
    assert complete != partial and a.store.get(complete).state == JobState.QUEUED
    assert a.store.get(complete).meta["n_instances"] == 3


def test_retention_deletes_the_ct_of_finished_jobs_only(tmp_path: Path) -> None:
    from dicom_node.node import Node

    settings = load_settings(
        environ={
            "RTSEG_DATA_DIR": str(tmp_path),
            "RTSEG_NODE_RETENTION_H": "0",
            "RTSEG_NODE_MIN_FREE_DISK_MB": "0",
        }
    )
    node = Node(settings, tmp_path / "model")  # not started: no SCP, no workers
    keys = {state: uid_key(f"1.2.9.{i}") for i, state in enumerate((JobState.DONE, JobState.SENDING))}
    for state, key in keys.items():
        node.spool.write("ct", key, uid_key("x"), b"ct")
        node.store.create("dicom", key, f"spool/ct/{key}", state=state)
    assert node.purge() == 1
    assert node.spool.instances("ct", keys[JobState.DONE]) == []
    assert len(node.spool.instances("ct", keys[JobState.SENDING])) == 1  # not delivered yet: kept
    assert node.purge() == 0  # done once
    (done,) = node.store.list({JobState.DONE})
    assert done.meta["purged"] is True


def test_the_rest_of_a_failed_series_opens_a_new_job_with_all_instances(tmp_path: Path) -> None:
    clock = Clock()
    a = _assembler(tmp_path, clock)
    _receive(a, "1.2.10", "1.2.10.1")
    _receive(a, "1.2.10", "1.2.10.2")
    clock.now += 11  # the sender paused longer than the quiet time
    (early,) = a.tick()
    a.store.transition(early, JobState.QUEUED, JobState.RUNNING)
    a.store.transition(early, JobState.RUNNING, JobState.FAILED, error="missing slices")
    _receive(a, "1.2.10", "1.2.10.3")  # the rest arrives
    clock.now += 11
    (rest,) = a.tick()
    assert rest != early and a.store.get(rest).meta["n_instances"] == 3
