"""The audit trail file: a job's records are found without parsing every line of a never-rotated log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from rtseg.audit import AUDIT_LOG, AuditLog, job_trail, read_entries
from rtseg.jobs import JobState, JobStore


def test_a_jobs_trail_holds_its_events_and_its_series_events_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = JobStore(tmp_path / "state.db")
    mine = store.create("dicom", "a" * 24, "spool/ct/a", state=JobState.QUEUED)
    other = store.create("dicom", "b" * 24, "spool/ct/b", state=JobState.QUEUED)
    audit = AuditLog(tmp_path / AUDIT_LOG)
    audit.record("series_received", series=mine.series_key, instances=3)
    audit.record("job_failed", job=other.id, series=other.series_key, reason="x")
    with open(audit.path, "a", encoding="utf-8") as fh:
        fh.write('{"event": "torn, another job\n')  # a crash mid-write, elsewhere in the log
    audit.record("job_cancelled", job=mine.id, by="console")
    audit.record("series_received", series=other.series_key, instances=5)
    with caplog.at_level(logging.WARNING):
        trail = job_trail(tmp_path, mine)
    assert [e["event"] for e in trail] == ["series_received", "job_cancelled"]
    assert "not JSON records" not in caplog.text  # the torn line does not mention this job: not parsed
    assert len(read_entries(audit.path)) == 4 and "1 line(s) are not JSON records" in caplog.text
