"""``GET /v1/segmentations/{id}/preview.png`` on a real waitress server, jobs run by the real worker code.

A job is segmented by :class:`JobRunner` (the worker's code, inline, default
model) on a phantom series uploaded into its folder; the server answers the
preview as a PNG, renders it once and keeps it in the job folder, and answers
problems for unknown, unfinished and label-map-only jobs. With
``[node] write_preview`` the worker writes it itself after the RTSTRUCT.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from PIL import Image
from svc_helpers import Running

from rtseg.jobs import Job, JobState
from rtseg.model.default import default_model_dir
from rtseg.model.segmenter import NnunetSegmenter
from rtseg.pipeline import model_identity
from rtseg.preview import PANEL_IN
from rtseg.settings import load_settings
from rtseg.worker import JobRunner, WorkerPool

PROBLEM = "application/problem+json"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def segmenter() -> NnunetSegmenter:
    return NnunetSegmenter(default_model_dir(), threads=1)


def _queue(running: Running, ct: Path | None, **meta: object) -> Job:
    job_id = uuid.uuid4().hex
    folder = running.data_dir / "jobs" / job_id
    if ct is not None:
        shutil.copytree(ct, folder / "input")
    else:
        (folder / "input").mkdir(parents=True)
    key = hashlib.sha256(job_id.encode()).hexdigest()
    return running.store.create(
        "http", key, f"jobs/{job_id}/input", state=JobState.QUEUED, meta=meta, job_id=job_id
    )


def _segment(running: Running, segmenter: NnunetSegmenter, ct: Path, *, write_preview: bool = False) -> Job:
    job = _queue(running, ct, input_kind="dicom")
    claimed = running.store.claim_next()
    assert claimed is not None and claimed.id == job.id
    identity = model_identity(segmenter.manifest, segmenter.model_dir)
    runner = JobRunner(running.store, running.data_dir, segmenter, identity, write_preview=write_preview)
    done = runner.run(claimed)
    assert done.state == JobState.DONE, done.error
    return done


def _problem(response: requests.Response, status: int, slug: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == PROBLEM
    body: dict[str, object] = response.json()
    assert body["type"] == f"urn:rtseg:problem:{slug}" and body["status"] == status
    return body


def test_preview_of_a_done_job_is_rendered_once_and_kept(
    serve: Callable[..., Running], segmenter: NnunetSegmenter, phantom_ct96: Path
) -> None:
    running = serve()
    job = _segment(running, segmenter, phantom_ct96)
    cached = running.data_dir / "jobs" / job.id / "preview.png"
    assert not cached.exists()  # [node] write_preview is off by default
    link = running.get(f"/v1/segmentations/{job.id}").json()["links"]["preview"]
    assert link == f"/v1/segmentations/{job.id}/preview.png"

    first = running.get(link)
    assert first.status_code == 200 and first.headers["Content-Type"] == "image/png"
    assert first.content[:8] == PNG and cached.read_bytes() == first.content
    with Image.open(cached) as image:
        width, height = image.size
    panel_px = round(PANEL_IN * 100)
    assert width == 4 * panel_px and (height - 90) % panel_px == 0  # whole rows of panels below a header
    stamp = cached.stat().st_mtime_ns
    again = running.get(link)
    assert again.status_code == 200 and again.content == first.content
    assert cached.stat().st_mtime_ns == stamp  # served from the job folder, not drawn again


def test_preview_problems(serve: Callable[..., Running], phantom_ct96: Path) -> None:
    running = serve()
    _problem(running.get("/v1/segmentations/nope/preview.png"), 404, "no-such-job")
    queued = _queue(running, phantom_ct96, input_kind="dicom")
    waiting = running.get(f"/v1/segmentations/{queued.id}/preview.png")
    assert "queued" in str(_problem(waiting, 409, "job-not-done")["detail"])
    assert waiting.headers["Retry-After"] == "5"
    failed = _queue(running, None, input_kind="dicom")
    running.store.transition(failed.id, JobState.QUEUED, JobState.FAILED, error="the model failed")
    _problem(running.get(f"/v1/segmentations/{failed.id}/preview.png"), 409, "job-failed")
    nifti = _queue(running, None, input_kind="nifti")
    running.store.transition(nifti.id, JobState.QUEUED, JobState.RUNNING)
    running.store.transition(nifti.id, JobState.RUNNING, JobState.DONE, result={"files": {}})
    _problem(running.get(f"/v1/segmentations/{nifti.id}/preview.png"), 404, "no-preview")
    for header in ({}, {"Authorization": "Bearer wrong-token"}):
        response = requests.get(
            f"{running.url}/v1/segmentations/{queued.id}/preview.png", headers=header, timeout=30
        )
        _problem(response, 401, "unauthorized")


def test_worker_writes_the_preview_when_configured(
    serve: Callable[..., Running], segmenter: NnunetSegmenter, phantom_ct96: Path, tmp_path: Path
) -> None:
    config = tmp_path / "rtseg.toml"
    config.write_text("[node]\nwrite_preview = true\n")
    settings = load_settings(config, environ={})
    assert settings.node.write_preview and not load_settings(None, environ={}).node.write_preview
    running = serve()
    pool = WorkerPool.from_settings(settings, running.store, running.data_dir, default_model_dir())
    assert pool.config.write_preview

    job = _segment(running, segmenter, phantom_ct96, write_preview=pool.config.write_preview)
    written = running.data_dir / "jobs" / job.id / "preview.png"
    assert written.read_bytes()[:8] == PNG  # there before anyone asked
    stamp = written.stat().st_mtime_ns
    response = running.get(f"/v1/segmentations/{job.id}/preview.png")
    assert response.status_code == 200 and response.content == written.read_bytes()
    assert written.stat().st_mtime_ns == stamp
