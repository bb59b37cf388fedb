"""The audit trail: who sent what, when, which model, where the result went.

A separate append-only JSON-lines file (``<data dir>/audit/audit.log``), one
fsync'd line per event. It names peers (AE title, address), series and
instances by their hashed keys (:func:`dicom_node.spool.uid_key`), models by
name and version: never a patient name, ID or birth date.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from rtseg.audit import read_entries


class AuditLog:
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
        return read_entries(self.path)  # the one reader, in the core: the web console reads it too
