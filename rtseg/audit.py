"""The audit trail: who sent what, when, which model, where the result went.

A separate append-only JSON-lines file (``<data dir>/audit/audit.log``), one
fsync'd line per event. It names peers (AE title, address), series and
instances by their hashed keys (:func:`rtseg.privacy.uid_key`), models by
name and version: never a patient name, ID or birth date. The DICOM node
writes most of it; the web console reads a job's part and records its buttons.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from rtseg.jobs import Job

log = logging.getLogger(__name__)

AUDIT_LOG = Path("audit") / "audit.log"  # relative to the data directory


class AuditLog:
    """The append-only audit file at ``path``: :meth:`record` one event, :meth:`entries` all of them."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def record(self, event: str, **fields: Any) -> None:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **fields}
        line = json.dumps(entry, sort_keys=False, default=str) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def entries(self) -> list[dict[str, Any]]:
        return read_entries(self.path)


def read_entries(path: Path, mentioning: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every record of the audit log at ``path``, oldest first (none when there is no file yet).

    With ``mentioning``, only lines holding one of those strings are parsed (the log is never
    rotated: a job's page reads a year of it by a substring test, not a JSON parse per line).
    A line that is not a JSON object (the last one torn by a crash mid-write) is
    left out and counted in a warning, so that one bad line never hides the rest.
    """
    if not path.is_file():
        return []
    entries, torn = [], 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip() or (mentioning and not any(m in line for m in mentioning)):
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                torn += 1
                continue
            if isinstance(entry, dict):
                entries.append(entry)
            else:
                torn += 1
    if torn:
        log.warning("audit log: %d line(s) are not JSON records and were left out", torn)
    return entries


def job_trail(data_dir: Path, job: Job) -> list[dict[str, Any]]:
    """The audit records of ``job``: its own events and, for a DICOM job, its series' events without a job."""

    def ours(entry: dict[str, Any]) -> bool:
        if "job" in entry:
            return bool(entry["job"] == job.id)
        return job.source == "dicom" and entry.get("series") == job.series_key

    keys = (job.id, job.series_key) if job.source == "dicom" else (job.id,)
    return [e for e in read_entries(Path(data_dir) / AUDIT_LOG, keys) if ours(e)]
