"""``?format=seg``: an upload that asks for a DICOM SEG gets one at ``…/seg``; the default is unchanged.

The end-to-end case runs a real waitress server and a real worker process with
the default model on a 24-slice phantom series.
"""

from __future__ import annotations

import io
import subprocess
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from svc_helpers import Running, make_settings

from rtseg.jobs import JobStore
from rtseg.model.default import default_model_dir
from rtseg.worker import WorkerPool
from service.app import create_app
from service.server import HttpServer


def middle_slices_zip(ct_dir: Path, n: int) -> bytes:
    """The ``n`` middle slices of a series (contiguous, a valid smaller series), zipped."""
    paths = sorted(ct_dir.glob("*.dcm"), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    start = max(0, (len(paths) - n) // 2)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in paths[start : start + n]:
            archive.write(path, f"series/{path.name}")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def with_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    data_dir = tmp_path_factory.mktemp("seg-http")
    store = JobStore(data_dir / "state.db")
    pool = WorkerPool(store, data_dir, default_model_dir(), workers=1, threads=1)
    settings = make_settings()
    server = HttpServer(
        create_app(settings, store, data_dir, worker_alive=lambda: pool.alive() > 0), settings
    )
    pool.start()
    server.start()
    yield Running(server, store, data_dir, settings)
    server.stop()
    pool.stop(timeout=10)
    store.close()


def _poll(running: Running, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while job["state"] not in ("done", "failed") and time.monotonic() < deadline:
        time.sleep(0.5)
        job = running.get(job["links"]["self"]).json()
    return job


@pytest.mark.slow  # a real worker segments a series: minutes on a loaded 2-core machine
def test_format_seg_gives_rtstruct_and_seg(with_worker: Running, phantom_ct96: Path, tmp_path: Path) -> None:
    running = with_worker
    response = running.post(middle_slices_zip(phantom_ct96, 24), params={"format": "seg", "wait": "300"})
    assert response.status_code in (201, 202), response.text
    job = _poll(running, response.json(), timeout=600)
    assert job["state"] == "done", job
    assert set(job["links"]) == {"self", "rtstruct", "seg", "preview"}
    download = running.get(job["links"]["seg"])
    assert download.status_code == 200 and download.headers["Content-Type"] == "application/dicom"
    path = tmp_path / "seg.dcm"
    path.write_bytes(download.content)
    seg = pydicom.dcmread(path)
    rtstruct = pydicom.dcmread(io.BytesIO(running.get(job["links"]["rtstruct"]).content))
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == rtstruct.StudyInstanceUID
    assert job["model_version"] in seg.SeriesDescription
    assert {s["name"] for s in job["structures"]} == {str(s.SegmentLabel) for s in seg.SegmentSequence}
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    assert [line for line in (check.stdout + check.stderr).splitlines() if "Error" in line] == []


@pytest.mark.parametrize("value", ["nrrd", "SEG;drop", ""])
def test_a_bad_format_is_a_400_problem_and_stores_nothing(serve: Callable[..., Running], value: str) -> None:
    running = serve()
    response = running.post(b"PK", params={"format": value})
    assert response.status_code == 400
    problem = response.json()
    assert problem["type"] == "urn:rtseg:problem:bad-parameter"
    assert "format must be rtstruct or seg" in problem["detail"]
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert running.job_dirs() == []


def test_the_default_is_rtstruct_only_and_seg_is_404_without_it(
    serve: Callable[..., Running], phantom_ct96: Path
) -> None:
    running = serve()
    plain = running.post(middle_slices_zip(phantom_ct96, 12)).json()
    asked = running.post(middle_slices_zip(phantom_ct96, 12), params={"format": "seg"}).json()
    assert running.store.get(plain["id"]).meta["formats"] == ["rtstruct"]
    assert running.store.get(asked["id"]).meta["formats"] == ["rtstruct", "seg"]
    missing = running.get(f"/v1/segmentations/{plain['id']}/seg")
    assert missing.status_code == 409  # not done yet (no worker here); a finished job without SEG is 404
    assert missing.json()["type"] == "urn:rtseg:problem:job-not-done"


def test_format_seg_of_a_nifti_upload_is_a_400_problem(serve: Callable[..., Running], tmp_path: Path) -> None:
    import numpy as np
    import SimpleITK as sitk

    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((12, 16, 16), np.int16)), str(path))
    running = serve()
    files = {"file": ("ct.nii.gz", path.read_bytes(), "application/gzip")}
    response = running.post(files=files, params={"format": "seg"})
    assert response.status_code == 400, response.text
    assert "format=seg needs a DICOM CT series" in response.json()["detail"]
    assert running.job_dirs() == []
