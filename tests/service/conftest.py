"""Fixtures of the HTTP service tests: real waitress servers on loopback, phantom uploads."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from svc_helpers import Running, make_settings, zip_folder

from rtseg.jobs import JobStore
from service.app import create_app
from service.server import HttpServer


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Start servers (no worker pool) with settings overrides; all stopped at teardown."""
    started: list[Running] = []

    def start(worker_alive: Callable[[], bool] | None = None, **overrides: Any) -> Running:
        data_dir = tmp_path / f"data{len(started)}"
        data_dir.mkdir()
        store = JobStore(data_dir / "state.db")
        settings = make_settings(**overrides)
        app = create_app(settings, store, data_dir, worker_alive=worker_alive)
        server = HttpServer(app, settings, port=0)
        server.start()
        running = Running(server, store, data_dir, settings)
        started.append(running)
        return running

    yield start
    for running in started:
        running.server.stop()
        running.store.close()


@pytest.fixture(scope="session")
def phantom_zip(phantom_ct96: Path) -> bytes:
    return zip_folder(phantom_ct96)
