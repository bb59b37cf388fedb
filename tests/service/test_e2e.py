"""Happy path end to end: real waitress server, real worker process, real model, dciodvfy.

A zipped phantom series goes in with a token, the RTSTRUCT and the label map
come out and pass a strict reader; `rtseg http` starts, answers and stops.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from svc_helpers import AUTH, TOKEN, Running, make_settings

from rtseg.jobs import JobStore
from rtseg.model.default import default_model_dir
from rtseg.worker import WorkerPool
from service.app import create_app
from service.auth import token_digest
from service.server import HttpServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def with_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    data_dir = tmp_path_factory.mktemp("e2e")
    store = JobStore(data_dir / "state.db")
    pool = WorkerPool(store, data_dir, default_model_dir(), workers=1, threads=1)
    settings = make_settings()
    app = create_app(settings, store, data_dir, worker_alive=lambda: pool.alive() > 0)
    server = HttpServer(app, settings, port=0)
    pool.start()
    server.start()
    yield Running(server, store, data_dir, settings)
    server.stop()
    pool.stop(timeout=10)
    store.close()


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is required")
def test_zip_in_rtstruct_and_labels_out(with_worker: Running, phantom_zip: bytes, tmp_path: Path) -> None:
    running = with_worker
    assert requests.get(f"{running.url}/readyz", timeout=30).json()["status"] == "ready"
    response = running.post(phantom_zip, params={"wait": "300", "labels": "true"}, timeout=360)
    assert response.status_code in (201, 202), response.text
    job = _poll(running, response.json(), timeout=900)
    assert job["state"] == "done", job
    assert job["model_version"] and job["timings"]["total_s"] > 0
    names = {s["name"] for s in job["structures"]}
    assert "External" in names
    assert all("volume_ml" in s and "flags" in s for s in job["structures"])

    rtstruct = running.get(job["links"]["rtstruct"])
    assert rtstruct.status_code == 200
    assert rtstruct.headers["Content-Type"] == "application/dicom"
    path = tmp_path / "rtstruct.dcm"
    path.write_bytes(rtstruct.content)
    ds = pydicom.dcmread(path)
    assert ds.Modality == "RTSTRUCT" and ds.ApprovalStatus == "UNAPPROVED"
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    assert errors == []

    labels = running.get(job["links"]["labels"])
    assert labels.status_code == 200
    nifti = tmp_path / "labels.nii.gz"
    nifti.write_bytes(labels.content)
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(nifti)))
    assert array.shape[0] == 116 and np.any(array > 0)

    metrics = requests.get(f"{running.url}/metrics", timeout=10).text
    assert 'rtseg_job_duration_seconds_count{source="http"} 1.0' in metrics
    deleted = requests.delete(f"{running.url}{job['links']['self']}", headers=AUTH, timeout=10)
    assert deleted.status_code == 204 and not (running.data_dir / "jobs" / job["id"]).exists()


def test_rtseg_http_command_serves_and_stops(tmp_path: Path, free_port: int) -> None:
    config = tmp_path / "rtseg.toml"
    port = free_port
    config.write_text(
        f'[paths]\ndata_dir = "{tmp_path / "data"}"\n[node]\ninference_threads = 1\n'
        f'[http]\nport = {port}\ntoken_sha256 = ["{token_digest(TOKEN)}"]\n'
    )
    rtseg = [sys.executable, "-m", "rtseg_app"]  # this checkout's command line, not an installed script
    proc = subprocess.Popen([*rtseg, "http", "--config", str(config)], stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_up(f"{url}/healthz")
        assert requests.get(f"{url}/v1/model", timeout=30).status_code == 401
        assert requests.get(f"{url}/v1/model", headers=AUTH, timeout=30).status_code == 200
        # ready once the worker has loaded its model (a few seconds after the server answers)
        deadline = time.monotonic() + 120
        while requests.get(f"{url}/readyz", timeout=30).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert requests.get(f"{url}/readyz", timeout=30).json()["checks"]["worker"]["ok"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "stopped" in out


def _poll(running: Running, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """GET the job until it is finished (a CPU under load may need longer than one ?wait)."""
    deadline = time.monotonic() + timeout
    while job["state"] not in ("done", "failed") and time.monotonic() < deadline:
        time.sleep(2)
        job = running.get(job["links"]["self"]).json()
    return job


def _wait_until_up(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not come up in {timeout:g} s")
