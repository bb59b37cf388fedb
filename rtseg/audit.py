"""Reading the node's audit trail (``<data dir>/audit/audit.log``, JSON lines).

The DICOM node writes it (``dicom_node.audit.AuditLog``); the HTTP face shows
one job's part of it in the web console, so the reader lives in the core. The
records name jobs, hashed series keys, AE titles and models, never a patient.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rtseg.jobs import Job

log = logging.getLogger(__name__)

AUDIT_LOG = Path("audit") / "audit.log"  # relative to the data directory


def read_entries(path: Path) -> list[dict[str, Any]]:
    """Every record of the audit log at ``path``, oldest first (none when there is no file yet).

    A line that is not a JSON object (the last one torn by a crash mid-write) is
    left out and counted in a warning, so that one bad line never hides the rest.
    """
    if not path.is_file():
        return []
    entries, torn = [], 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
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

    return [e for e in read_entries(Path(data_dir) / AUDIT_LOG) if ours(e)]
