"""What the web console asks of the core: cancel a queued job, read one job's audit trail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rtseg.audit import AUDIT_LOG, job_trail
from rtseg.jobs import JobError, JobState, JobStore


def _queued(store: JobStore) -> str:
    job = store.create("dicom", "k" * 24, "incoming/k")
    return store.transition(job.id, JobState.RECEIVED, JobState.QUEUED).id


def test_cancel_takes_a_queued_job_off_the_queue_with_the_reason(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "state.db")
    job_id = _queued(store)
    job = store.cancel(job_id)
    assert job.state == JobState.SKIPPED and job.error == "cancelled by operator"
    assert job.finished is not None
    assert store.explain(job).reason == "cancelled by operator"
    assert store.claim_next() is None  # no worker takes it any more


def test_cancel_refuses_a_job_that_is_not_queued(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "state.db")
    job_id = _queued(store)
    running = store.claim_next()
    assert running is not None and running.id == job_id
    with pytest.raises(JobError, match="only a queued job can be cancelled: this one is running"):
        store.cancel(job_id)
    assert store.get(job_id).state == JobState.RUNNING


def test_job_trail_has_the_job_events_and_its_series_events_only(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "state.db")
    job = store.get(_queued(store))
    log = tmp_path / AUDIT_LOG
    log.parent.mkdir(parents=True)
    lines = [
        {"time": "t1", "event": "association_accepted", "calling_ae": "PACS", "host": "127.0.0.1"},
        {"time": "t2", "event": "series_complete", "job": job.id, "series": job.series_key},
        {"time": "t3", "event": "instances_received", "series": job.series_key, "instances": 3},
        {"time": "t4", "event": "job_done", "job": "other", "series": "x" * 24},
    ]
    log.write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"time": "t5", "ev')  # a torn last line
    trail = job_trail(tmp_path, job)
    assert [e["event"] for e in trail] == ["series_complete", "instances_received"]
