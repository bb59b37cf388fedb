"""Expiry of HTTP jobs: finished jobs older than ``job_expiry_s`` go, with their files."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from rtseg.errors import RtsegError
from rtseg.jobs import FINAL, JobError, JobState, JobStore

log = logging.getLogger(__name__)
JOBS_FOLDER = "jobs"  # <data dir>/jobs/<id>/: upload (input/) and outputs, as the worker lays them out


def expire(store: JobStore, data_dir: Path, max_age_s: float, now: float | None = None) -> int:
    """Delete finished HTTP jobs (and uploads left ``received``) older than ``max_age_s``."""
    cutoff = (now if now is not None else time.time()) - max_age_s
    removed = 0
    for job in store.list(FINAL | {JobState.RECEIVED}, source="http", limit=100_000):
        if job.updated >= cutoff:
            continue
        if job.state == JobState.RECEIVED:
            try:  # an upload that never completed (the server stopped during it)
                store.transition(job.id, JobState.RECEIVED, JobState.FAILED, error="upload interrupted")
            except JobError:
                continue
        folder = data_dir / JOBS_FOLDER / job.id
        if folder.exists():
            shutil.rmtree(folder)
        store.delete(job.id)
        removed += 1
    if removed:
        log.info("expired %d HTTP job(s)", removed)
    return removed


class Janitor:
    """Runs :func:`expire` every ``interval_s`` in a daemon thread until stopped."""

    def __init__(self, store: JobStore, data_dir: Path, max_age_s: float, interval_s: float = 60.0) -> None:
        self.store, self.data_dir, self.max_age_s = store, data_dir, max_age_s
        self.interval_s = min(interval_s, max_age_s / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rtseg-http-expiry", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                expire(self.store, self.data_dir, self.max_age_s)
            except (OSError, RtsegError) as exc:  # try again next round; the service goes on
                log.warning("job expiry failed: %s", exc)
