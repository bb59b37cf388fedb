"""An upload that does not show the model's region is answered 422, with the reason (issue 16, point 2).

A real waitress server and the real default model, run by a JobRunner in a thread (as a worker
process runs it); the upload is the inferior third of a phantom (lower abdomen, no liver level).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from svc_helpers import Running, zip_folder

from rtseg.model.default import default_model_dir
from rtseg.model.segmenter import NnunetSegmenter
from rtseg.pipeline import model_identity
from rtseg.worker import JobRunner


@pytest.fixture(scope="module")
def lower_third_zip(phantom_ct96: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    datasets = [pydicom.dcmread(p) for p in sorted(phantom_ct96.glob("*.dcm"))]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    out = tmp_path_factory.mktemp("lower")
    for i, ds in enumerate(datasets[: len(datasets) // 3]):
        ds.save_as(out / f"slice{i:03d}.dcm", enforce_file_format=True)
    return zip_folder(out)


@pytest.fixture(scope="module")
def segmenter() -> NnunetSegmenter:
    return NnunetSegmenter(default_model_dir(), threads=1)


@pytest.fixture
def worked(serve: Callable[..., Running], segmenter: NnunetSegmenter) -> Iterator[Running]:
    """A server whose queued jobs a JobRunner thread runs."""
    running = serve()
    runner = JobRunner(running.store, running.data_dir, segmenter, model_identity(segmenter.manifest))
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            job = running.store.claim_next()
            if job is None:
                stop.wait(0.1)
            else:
                runner.run(job)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield running
    stop.set()
    thread.join(30)


def test_an_upload_outside_the_region_is_answered_422_with_the_reason(
    worked: Running, lower_third_zip: bytes
) -> None:
    response = worked.post(lower_third_zip, params={"wait": "120"}, timeout=180)
    assert response.status_code == 422, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 422 and problem["type"].endswith("invalid-input")
    assert "does not show the model's region, the upper abdomen" in problem["detail"]
    assert "0 mm at the level of its organs" in problem["detail"]
    jobs = worked.store.list(source="http")
    assert len(jobs) == 1 and str(jobs[0].state) == "failed"
    job = worked.get(f"/v1/segmentations/{jobs[0].id}").json()
    assert job["state"] == "failed" and job["error"].startswith("the series does not show the model's region")
    download = worked.get(f"/v1/segmentations/{jobs[0].id}/rtstruct")
    assert download.status_code == 422 and "does not show the model's region" in download.json()["detail"]
    assert not (worked.data_dir / "jobs" / jobs[0].id / "rtstruct.dcm").exists()
