"""The application factory: one Flask app per process, one blueprint per resource."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from flask import Blueprint, Flask, Request, Response, current_app, g, request

from rtseg.jobs import JobStore
from rtseg.worker import PoolStatus
from service.auth import require_token
from service.housekeeping import JOBS_FOLDER
from service.problems import register_problem_handlers
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


def create_app(
    settings: HttpSettings,
    store: JobStore,
    data_dir: Path,
    model_dir: Path | None = None,
    *,
    telemetry: Telemetry | None = None,
    worker_alive: Callable[[], bool] | None = None,
    workers: Workers | None = None,
) -> Flask:
    """Build the HTTP face.

    Parameters
    ----------
    settings
        The parsed ``[http]`` table.
    store
        The job store shared with the workers (and the DICOM node in ``rtseg serve``).
    data_dir
        The data folder job paths are relative to; HTTP jobs use ``<data_dir>/http/``.
    model_dir
        The model the workers run (default: the embedded model), for ``/v1/model`` and ``/readyz``.
    telemetry
        Metrics registry shared with the DICOM node; a fresh one by default.
    worker_alive
        Tells ``/readyz`` whether the worker pool runs.
    workers
        The supervised pool: ``/readyz`` names missing workers, ``/metrics`` counts them and their restarts.
    """
    from service import health, metrics, model, openapi, segmentations

    app = Flask(__name__)
    app.request_class = UploadRequest
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        MAX_FORM_MEMORY_SIZE=1 << 20,  # also bounds werkzeug's parse buffer: keep ≥ 500 kB
        MAX_FORM_PARTS=settings.max_files + 16,
    )
    ctx = ServiceContext(
        settings, store, Path(data_dir), model_dir, telemetry or Telemetry(), worker_alive, workers
    )
    ctx.telemetry.watch_jobs(store)
    if workers is not None:
        ctx.telemetry.watch_workers(workers.status)
    app.extensions["rtseg"] = ctx
    v1 = Blueprint("v1", __name__, url_prefix="/v1")
    v1.before_request(lambda: require_token(ctx.settings.token_sha256))
    v1.register_blueprint(segmentations.bp)
    v1.register_blueprint(model.bp)
    app.register_blueprint(v1)
    for module in (health, metrics, openapi):
        app.register_blueprint(module.bp)
    register_problem_handlers(app)
    _measure_requests(app, ctx.telemetry)
    return app


def _measure_requests(app: Flask, telemetry: Telemetry) -> None:
    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unmatched"
        telemetry.http_requests.labels(request.method, route, str(response.status_code)).inc()
        if "started" in g:
            telemetry.http_latency.labels(route).observe(time.perf_counter() - g.started)
        return response
