"""``rtseg http``: the HTTP API on its own; :func:`start_companion` runs it inside ``rtseg serve``."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtseg.errors import InputError
from rtseg.jobs import JobStore, state_db
from service.settings import HttpSettings

if TYPE_CHECKING:
    from rtseg.settings import Settings

Handler = Callable[[argparse.Namespace], int]
log = logging.getLogger(__name__)


def start_companion(
    settings: Settings,
    store: JobStore,
    pool: Any,
    data_dir: Path,
    model_dir: Path,
    association_observers: list[Callable[[str], None]] | None = None,
) -> Callable[[], None]:
    """Start the HTTP API in a thread next to the DICOM node (same store, same workers).

    Off when the configuration has no ``[http]`` table; returns the stop function.
    ``association_observers`` is the node's list: the API's metrics count DICOM
    associations by joining it.
    """
    from service.app import create_app
    from service.housekeeping import Janitor
    from service.server import HttpServer
    from service.telemetry import Telemetry

    if not settings.http:
        print("HTTP: off (no [http] table in the configuration)", flush=True)
        return lambda: None
    http = HttpSettings.from_mapping(settings.http)
    telemetry = Telemetry()
    if association_observers is not None:
        association_observers.append(lambda outcome: telemetry.dicom_associations.labels(outcome).inc())
    app = create_app(
        http,
        store,
        data_dir,
        model_dir,
        telemetry=telemetry,
        worker_alive=lambda: pool.alive() > 0,
        workers=pool,
    )
    server = HttpServer(app, http)
    janitor = Janitor(store, data_dir, http.job_expiry_s)
    server.start()
    janitor.start()
    print(f"HTTP: API on {server.url}/v1 ({len(http.token_sha256)} token(s)), {server.url}/openapi.json")

    def stop() -> None:
        janitor.stop()
        server.stop()

    return stop


def _cmd_http(args: argparse.Namespace) -> int:
    if args.new_token:
        from service.auth import new_token

        token, digest = new_token()
        print(f"token (give it to the client; it is not stored): {token}")
        # a key line, not a table header: it goes under the file's one [http] table
        print("# put the next line under [http] in the configuration file:")
        print(f'token_sha256 = ["{digest}"]')
        return 0
    from rtseg.privacy import start_log_file
    from rtseg.settings import load_settings

    settings = load_settings(args.config)
    table = settings.http
    if args.port is not None:
        table = table.overlaid("port", args.port, "--port")
    http = HttpSettings.from_mapping(table)
    if not http.token_sha256:
        raise InputError("no [http] token_sha256 configured: create one with `rtseg http --new-token`")
    log_file = start_log_file(settings.data_dir, settings.logging)  # before the workers start
    if log_file is not None:
        print(f"log: {log_file.resolve()}", flush=True)
    return _serve(settings, http)


def _serve(settings: Settings, http: HttpSettings) -> int:
    from rtseg.model.registry import serving_model_dir
    from rtseg.worker import WorkerPool
    from service.app import create_app
    from service.housekeeping import Janitor
    from service.server import HttpServer

    data_dir = Path(settings.data_dir).resolve()
    # model.path, else the registry's current model (workers follow promotions)
    model_dir = serving_model_dir(settings.model_path, settings.data_dir)
    store = JobStore(state_db(data_dir))
    pool = WorkerPool.from_settings(settings, store, data_dir, model_dir)
    app = create_app(http, store, data_dir, model_dir, worker_alive=lambda: pool.alive() > 0, workers=pool)
    server = HttpServer(app, http)
    janitor = Janitor(store, data_dir, http.job_expiry_s)
    pool.start()
    janitor.start()
    server.start()
    print(f"HTTP API on {server.url}/v1, docs {server.url}/openapi.json; data {data_dir}", flush=True)
    wait_for_signal()
    print("stopping ...", flush=True)
    server.stop()
    janitor.stop()
    pool.stop()
    store.close()
    print("stopped", flush=True)
    return 0


def wait_for_signal() -> None:
    """Say ready, then block until SIGTERM or SIGINT (the node and the HTTP service alike)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print("ready (SIGTERM or Ctrl-C stops)", flush=True)
    while not stop.wait(1.0):
        pass


def register(sub: Any, handlers: dict[str, Handler]) -> None:
    p = sub.add_parser("http", help="run the HTTP API (uploads → segmentation) with its own workers")
    p.add_argument("--config", type=Path, help="TOML settings file (the [http] table; RTSEG_* override)")
    p.add_argument("--port", type=int, help="override [http] port")
    p.add_argument(
        "--new-token", action="store_true", help="print a new bearer token and the line for the config"
    )
    handlers["http"] = _cmd_http
