"""The application factory: one Flask app per process, one blueprint per resource."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from flask import Blueprint, Flask, Response, g, request

from rtseg.jobs import JobStore
from service import console, health, metrics, model, openapi, segmentations, stow
from service.auth import require_token
from service.context import ServiceContext, UploadRequest, Workers
from service.problems import register_problem_handlers
from service.settings import HttpSettings
from service.telemetry import Telemetry


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
    app.register_blueprint(stow.bp)  # /dicomweb: STOW-RS, its own token check
    for module in (health, metrics, openapi, console):
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
