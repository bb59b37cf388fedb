"""Auth, queue limit, job resource, model, health, metrics and OpenAPI on a real server (no worker)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from svc_helpers import AUTH, TOKEN, Running, make_settings

from rtseg.errors import InputError
from rtseg.jobs import JobState
from rtseg.settings import Table
from rtseg.worker import PoolStatus
from service.app import create_app
from service.auth import token_digest, token_matches
from service.housekeeping import expire
from service.openapi import describe_api
from service.settings import HttpSettings

PROBLEM = "application/problem+json"


@pytest.mark.parametrize(
    "path",
    ["/v1/model", "/v1/segmentations/abc", "/v1/segmentations/abc/rtstruct", "/v1/segmentations/abc/labels"],
)
@pytest.mark.parametrize("header", [None, "Bearer wrong-token", "Basic dXNlcjpwYXNz", "Bearer "])
def test_v1_needs_a_valid_token(serve: Callable[..., Running], path: str, header: str | None) -> None:
    running = serve()
    headers = {"Authorization": header} if header is not None else {}
    response = requests.get(f"{running.url}{path}", headers=headers, timeout=10)
    assert response.status_code == 401
    assert response.headers["Content-Type"] == PROBLEM
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="rtseg"')
    assert response.json()["type"] == "urn:rtseg:problem:unauthorized"


def test_upload_without_token_writes_nothing(serve: Callable[..., Running], phantom_zip: bytes) -> None:
    running = serve()
    url = f"{running.url}/v1/segmentations"
    response = requests.post(url, data=phantom_zip, headers={"Content-Type": "application/zip"}, timeout=30)
    assert response.status_code == 401
    assert running.job_dirs() == [] and running.store.counts()["queued"] == 0


def test_token_digest_comparison() -> None:
    digests = (token_digest("a"), token_digest(TOKEN))
    assert token_matches(TOKEN, digests)
    assert not token_matches(TOKEN + "x", digests)
    assert not token_matches(TOKEN, ())


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json"])
def test_open_endpoints_need_no_token(serve: Callable[..., Running], path: str) -> None:
    running = serve(worker_alive=lambda: True)
    assert requests.get(f"{running.url}{path}", timeout=10).status_code == 200


def test_readyz_reports_each_check(serve: Callable[..., Running]) -> None:
    alive = {"value": False}
    running = serve(worker_alive=lambda: alive["value"])
    response = requests.get(f"{running.url}/readyz", timeout=30)
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["worker"]["ok"] is False and checks["model"]["ok"] is True and checks["disk"]["ok"] is True
    alive["value"] = True
    assert requests.get(f"{running.url}/readyz", timeout=30).json()["status"] == "ready"


def test_readyz_fails_on_low_disk_and_missing_model(serve: Callable[..., Running], tmp_path: Path) -> None:
    running = serve(worker_alive=lambda: True, min_free_bytes=1 << 60)
    response = requests.get(f"{running.url}/readyz", timeout=30)
    body = response.json()
    assert response.headers["Content-Type"] == PROBLEM and body["status"] == 503
    assert body["checks"]["disk"]["ok"] is False and body["detail"].startswith("disk: ")
    app = create_app(
        make_settings(), running.store, running.data_dir, tmp_path / "no-model", worker_alive=bool
    )
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["checks"]["model"]["ok"] is False
    missing = app.test_client().get("/v1/model", headers=AUTH)
    assert missing.status_code == 503 and missing.content_type == PROBLEM


class _Pool:
    """Stands in for a supervised WorkerPool (the real one is killed and restarted in test_node)."""

    def __init__(self) -> None:
        self.now = PoolStatus(configured=2, ready=1, missing=("rtseg-worker-1",), restarts=1)

    def status(self) -> PoolStatus:
        return self.now


def test_readyz_names_missing_workers_and_metrics_count_them(serve: Callable[..., Running]) -> None:
    running = serve()
    pool = _Pool()
    client = create_app(make_settings(), running.store, running.data_dir, workers=pool).test_client()
    response = client.get("/readyz")
    assert response.status_code == 503 and response.content_type == PROBLEM
    assert response.get_json()["detail"] == "worker: 1 of 2 workers running; missing: rtseg-worker-1"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "rtseg_workers_configured 2.0" in metrics and "rtseg_workers_live 1.0" in metrics
    assert "rtseg_worker_restarts_total 1.0" in metrics
    pool.now = PoolStatus(configured=2, ready=2, missing=(), restarts=1)
    assert client.get("/readyz").status_code == 200


def test_model_describes_structures_and_provenance(serve: Callable[..., Running]) -> None:
    model = serve().get("/v1/model").json()
    assert model["name"] and model["version"] and len(model["hash"]) == 12
    names = [s["name"] for s in model["structures"]]
    assert "Liver" in names and "External" in names
    liver = next(s for s in model["structures"] if s["name"] == "Liver")
    assert liver["color"] == [160, 82, 45]
    assert "federation_round" in model and "rtseg_version" in model["provenance"]


def test_queue_maximum_answers_429_with_retry_after(
    serve: Callable[..., Running], phantom_zip: bytes
) -> None:
    running = serve(queue_max=2)
    assert [running.post(phantom_zip).status_code for _ in range(2)] == [202, 202]
    response = running.post(phantom_zip)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    assert response.json()["type"] == "urn:rtseg:problem:queue-full"
    assert len(running.job_dirs()) == 2


def test_job_resource_and_delete(serve: Callable[..., Running], phantom_zip: bytes) -> None:
    running = serve()
    job = running.post(phantom_zip).json()
    path = f"/v1/segmentations/{job['id']}"
    got = running.get(path).json()
    assert got["state"] == "queued" and got["links"] == {"self": path}
    early = running.get(path + "/rtstruct")
    assert early.status_code == 409 and early.json()["type"] == "urn:rtseg:problem:job-not-done"
    assert (running.data_dir / "jobs" / job["id"] / "input").is_dir()
    deleted = requests.delete(f"{running.url}{path}", headers=AUTH, timeout=10)
    assert deleted.status_code == 204
    assert not (running.data_dir / "jobs" / job["id"]).exists()
    assert running.get(path).status_code == 404
    assert requests.delete(f"{running.url}{path}", headers=AUTH, timeout=10).status_code == 404


def test_running_job_cannot_be_deleted(serve: Callable[..., Running], phantom_zip: bytes) -> None:
    running = serve()
    job = running.post(phantom_zip).json()
    claimed = running.store.claim_next()
    assert claimed is not None and claimed.id == job["id"]
    response = requests.delete(f"{running.url}/v1/segmentations/{job['id']}", headers=AUTH, timeout=10)
    assert response.status_code == 409
    assert (running.data_dir / "jobs" / job["id"] / "input").is_dir()


def test_failed_job_shows_its_error(serve: Callable[..., Running], phantom_zip: bytes) -> None:
    running = serve()
    job = running.post(phantom_zip).json()
    running.store.claim_next()
    running.store.transition(job["id"], JobState.RUNNING, JobState.FAILED, error="the model failed")
    got = running.get(f"/v1/segmentations/{job['id']}").json()
    assert got["state"] == "failed" and got["error"] == "the model failed"
    download = running.get(f"/v1/segmentations/{job['id']}/rtstruct")
    assert download.status_code == 409 and "the model failed" in download.json()["detail"]


def test_dicom_jobs_are_not_visible_over_http(serve: Callable[..., Running]) -> None:
    running = serve()
    job = running.store.create("dicom", "k", "spool/x")
    assert running.get(f"/v1/segmentations/{job.id}").status_code == 404


def test_wait_returns_202_when_the_job_does_not_finish(
    serve: Callable[..., Running], phantom_zip: bytes
) -> None:
    running = serve()
    started = time.monotonic()
    response = running.post(phantom_zip, params={"wait": "1"})
    assert response.status_code == 202 and response.json()["state"] == "queued"
    assert time.monotonic() - started >= 1.0


@pytest.mark.parametrize("params", [{"wait": "-1"}, {"wait": "abc"}, {"wait": "100000"}, {"labels": "maybe"}])
def test_bad_parameters(serve: Callable[..., Running], params: dict[str, str]) -> None:
    running = serve()
    response = running.post(b"PK", params=params)
    assert response.status_code == 400 and response.json()["type"] == "urn:rtseg:problem:bad-parameter"
    assert running.job_dirs() == []


def test_unknown_route_and_method_are_problems(serve: Callable[..., Running]) -> None:
    running = serve()
    missing = requests.get(f"{running.url}/nothing", timeout=10)
    assert missing.status_code == 404 and missing.headers["Content-Type"] == PROBLEM
    wrong = requests.put(f"{running.url}/healthz", timeout=10)
    assert wrong.status_code == 405 and "GET" in wrong.headers["Allow"]


def test_metrics_count_jobs_requests_and_associations(
    serve: Callable[..., Running], phantom_zip: bytes
) -> None:
    running = serve()
    running.post(phantom_zip)
    text = requests.get(f"{running.url}/metrics", timeout=10).text
    assert 'rtseg_jobs{state="queued"} 1.0' in text
    assert "rtseg_queue_depth 1.0" in text
    assert 'rtseg_http_requests_total{method="POST",route="/v1/segmentations",status="202"} 1.0' in text
    assert "# TYPE rtseg_dicom_associations_total counter" in text
    assert "# TYPE rtseg_job_duration_seconds histogram" in text


def test_expiry_removes_old_finished_jobs_with_their_files(
    serve: Callable[..., Running], phantom_zip: bytes
) -> None:
    running = serve()
    old, fresh = (running.post(phantom_zip).json()["id"] for _ in range(2))
    for job_id in (old, fresh):
        running.store.claim_next()
        running.store.transition(job_id, JobState.RUNNING, JobState.DONE)
    assert expire(running.store, running.data_dir, 3600.0, now=time.time()) == 0
    running.store.update(old)
    assert expire(running.store, running.data_dir, 3600.0, now=time.time() + 7200) == 2
    assert running.job_dirs() == [] and running.store.find(old) is None


def test_openapi_lists_exactly_the_routes() -> None:
    app = create_app(make_settings(), _store(), Path("/nonexistent"))
    spec = describe_api(make_settings())
    documented = {
        (path, method.upper())
        for path, ops in spec["paths"].items()
        for method in ops
        if method != "parameters"
    }
    served = {
        (re.sub(r"<(\w+)>", r"{\1}", rule.rule), method)
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static" and not rule.endpoint.startswith("console.")  # HTML pages, not API
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert served == documented
    assert spec["openapi"] == "3.1.0"


def _store() -> object:
    import tempfile

    from rtseg.jobs import JobStore

    return JobStore(Path(tempfile.mkdtemp()) / "state.db")


def test_settings_from_the_http_table() -> None:
    digest = token_digest("t")
    table = Table("http", {"port": 9000, "max_body_mb": 1, "token_sha256": digest})
    settings = HttpSettings.from_mapping(table)
    assert settings.port == 9000 and settings.max_body_bytes == 1 << 20 and settings.token_sha256 == (digest,)
    assert HttpSettings.from_mapping({}).host == "127.0.0.1"
    with pytest.raises(InputError, match="unknown"):
        HttpSettings.from_mapping({"prot": 1})
    with pytest.raises(InputError, match="SHA-256"):
        HttpSettings.from_mapping({"token_sha256": ["plaintext-token"]})
    with pytest.raises(InputError, match="port"):
        HttpSettings.from_mapping({"port": "eighty"})


def test_rtseg_http_refuses_to_start_without_tokens(tmp_path: Path) -> None:
    config = tmp_path / "rtseg.toml"
    config.write_text(f'[paths]\ndata_dir = "{tmp_path / "data"}"\n[http]\nport = 0\n')
    run = subprocess.run(
        [sys.executable, "-m", "rtseg_app", "http", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "--new-token" in run.stderr


def test_uploads_beyond_the_thread_budget_get_429(tmp_path: Path, phantom_zip: bytes) -> None:
    from rtseg.jobs import JobStore

    app = create_app(make_settings(threads=5), JobStore(tmp_path / "state.db"), tmp_path)
    slots = app.extensions["rtseg"].uploads
    assert slots.acquire(blocking=False)  # the one upload slot of 5 threads (4 stay reserved)
    client = app.test_client()
    response = client.post(
        "/v1/segmentations", data=phantom_zip, content_type="application/zip", headers=AUTH
    )
    assert response.status_code == 429 and response.headers["Retry-After"] == "7"
    assert response.get_json()["type"] == "urn:rtseg:problem:busy"
    assert client.get("/healthz").status_code == 200
    slots.release()
    accepted = client.post(
        "/v1/segmentations", data=phantom_zip, content_type="application/zip", headers=AUTH
    )
    assert accepted.status_code == 202
