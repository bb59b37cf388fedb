"""What the blueprints share: the :class:`ServiceContext` of the running app and its accessor.

Blueprints import this module, never the application factory in :mod:`service.app`.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from flask import Request, current_app

from rtseg.jobs import JobStore
from rtseg.worker import PoolStatus
from service.housekeeping import JOBS_FOLDER
from service.settings import HttpSettings
from service.telemetry import Telemetry
from service.uploads import UploadLimits

RESERVED_THREADS = 4  # server threads never taken by uploads


class Workers(Protocol):
    """A supervised worker pool as ``/readyz`` and ``/metrics`` see it."""

    def status(self) -> PoolStatus: ...


class UploadRequest(Request):
    """Spools multipart files into ``spool_dir`` (inside the job folder) instead of the system temp."""

    spool_dir: Path | None = None

    def _get_file_stream(
        self,
        total_content_length: int | None,
        content_type: str | None,
        filename: str | None = None,
        content_length: int | None = None,
    ) -> IO[bytes]:
        if self.spool_dir is None:
            return super()._get_file_stream(total_content_length, content_type, filename, content_length)
        return tempfile.TemporaryFile(dir=self.spool_dir)


@dataclass
class ServiceContext:
    """What the views share: settings, the job store, folders, metrics and two limits on threads."""

    settings: HttpSettings
    store: JobStore
    data_dir: Path
    model_dir: Path | None
    telemetry: Telemetry
    worker_alive: Callable[[], bool] | None = None
    workers: Workers | None = None
    validate: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(1))
    admit: threading.Lock = field(default_factory=threading.Lock)
    uploads: threading.BoundedSemaphore = field(init=False)
    waiters: threading.BoundedSemaphore = field(init=False)
    cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # An upload holds a server thread while it is checked (and during ?wait): bound both,
        # so that a burst never takes the threads /healthz, /readyz and GETs need.
        threads = self.settings.threads
        self.uploads = threading.BoundedSemaphore(max(1, threads - RESERVED_THREADS))
        self.waiters = threading.BoundedSemaphore(max(1, threads // 2))

    @property
    def limits(self) -> UploadLimits:
        s = self.settings
        return UploadLimits(s.max_files, s.max_uncompressed_bytes, s.max_zip_ratio, s.max_instance_bytes)

    def job_dir(self, job_id: str) -> Path:
        return self.data_dir / JOBS_FOLDER / job_id

    def relative(self, path: Path) -> str:
        return path.relative_to(self.data_dir).as_posix()

    def remove_files(self, job_id: str) -> None:
        folder = self.job_dir(job_id)
        if folder.exists():
            shutil.rmtree(folder)


def service() -> ServiceContext:
    """The context of the running app (inside a request)."""
    ctx: ServiceContext = current_app.extensions["rtseg"]
    return ctx
