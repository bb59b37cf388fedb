"""Durable storage of received instances: atomic, fsync'd, under hashed names.

A received instance is written as the raw bytes the peer sent (file meta +
encoded dataset, never decoded and re-encoded) to a temporary file, fsync'd,
renamed into place and the directory fsync'd: only then may the SCP answer
Success. Paths come from hashes of UIDs (:func:`uid_key`), never from a raw UID
or a patient field, so a crafted UID cannot name a path. An instance received
again with the same bytes is left as it is; with other bytes it replaces the
first copy and the audit log records it (``duplicate_instance_differs``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from rtseg.privacy import uid_key

if TYPE_CHECKING:
    from rtseg.audit import AuditLog

__all__ = ["Spool", "uid_key"]

log = logging.getLogger(__name__)


class Spool:
    """Instances under ``root/<kind>/<series key>/<instance key>.dcm``.

    Parameters
    ----------
    root
        The spool folder (inside the data directory).
    min_free_mb
        Below this much free disk space :meth:`has_space` is false.
    audit
        Told when an instance is received again with different content.
    """

    def __init__(self, root: Path, min_free_mb: int, audit: AuditLog | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.min_free = min_free_mb * 1024 * 1024
        self.audit = audit

    def has_space(self) -> bool:
        return shutil.disk_usage(self.root).free >= self.min_free

    def series_dir(self, kind: str, series_key: str) -> Path:
        _check_key(kind)
        _check_key(series_key)
        return self.root / kind / series_key

    def write(self, kind: str, series_key: str, instance_key: str, data: bytes) -> Path:
        """Write ``data`` durably; an instance sent again with other content replaces it, audited."""
        _check_key(instance_key)
        folder = self.series_dir(kind, series_key)
        final = folder / f"{instance_key}.dcm"
        if final.is_file() and self.same_as_stored(kind, series_key, instance_key, data, "replaced"):
            return final
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            _fsync_dir(folder.parent)
            _fsync_dir(folder.parent.parent)
        tmp = folder / f".{instance_key}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(folder)
        return final

    def same_as_stored(self, kind: str, series_key: str, instance_key: str, data: bytes, action: str) -> bool:
        """Whether the stored instance holds ``data``; if not, the difference is audited with ``action``.

        ``action`` says what the node does with the other content: ``replaced`` (the series
        is still open), ``ignored`` (it was segmented already; the stored copy is kept).
        """
        final = self.series_dir(kind, series_key) / f"{instance_key}.dcm"
        old = final.read_bytes()
        if old == data:
            return True
        log.warning(
            "%s instance %s of series %s received again with different content",
            kind,
            instance_key,
            series_key,
        )
        if self.audit is not None:
            self.audit.record(
                "duplicate_instance_differs",
                kind=kind,
                series=series_key,
                instance=instance_key,
                old_sha256=hashlib.sha256(old).hexdigest(),
                new_sha256=hashlib.sha256(data).hexdigest(),
                action=action,
            )
        return False

    def instances(self, kind: str, series_key: str) -> list[Path]:
        folder = self.series_dir(kind, series_key)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix == ".dcm" and not p.name.startswith("."))

    def remove_series(self, kind: str, series_key: str) -> None:
        shutil.rmtree(self.series_dir(kind, series_key), ignore_errors=True)

    def clean_temporary(self) -> int:
        """Delete half-written files left by a crash (never acknowledged); returns how many."""
        stale = list(self.root.glob("*/*/.*.tmp"))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)


def _check_key(key: str) -> None:
    if not key or not all(c.isalnum() or c in "-_" for c in key):
        raise ValueError(f"not a spool key: {key!r}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
