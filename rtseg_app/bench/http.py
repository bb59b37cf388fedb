"""Benchmark (not a test): concurrent uploads while a segmentation runs.

``rtseg bench --section http [--uploads 20] [--segment-all]`` starts a
real waitress server with one worker process (one inference thread), starts one
segmentation, then sends ``--uploads`` zipped phantom series at once while a
poller asks ``/healthz`` every 50 ms. It reports whether every upload was
stored byte for byte and queued, whether the running segmentation finished
with a ``dciodvfy``-clean RTSTRUCT, upload and ``/healthz`` latencies, and the
peak memory of the server process and of the worker. ``--segment-all`` waits
for every queued upload to be segmented too (minutes per series on a CPU).
"""

from __future__ import annotations

import hashlib
import io
import os
import resource
import shutil
import subprocess
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from rtseg.jobs import FINAL, JobState, JobStore, state_db
from service.app import create_app
from service.auth import token_digest
from service.server import HttpServer
from service.settings import HttpSettings

TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Poller:
    """Asks ``/healthz`` every ``interval`` seconds in a thread and keeps the latencies."""

    url: str
    interval: float = 0.05
    latencies: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # when each request started (perf_counter)
    failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        session = requests.Session()
        while not self._stop.wait(self.interval):
            started = time.perf_counter()
            try:
                ok = session.get(self.url, timeout=10).status_code == 200
            except requests.RequestException:
                ok = False
            self.latencies.append(time.perf_counter() - started)
            self.times.append(started)
            self.failures += not ok

    def stop(self) -> None:
        self._stop.set()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return (
        ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")
    )


def phantom_zip(work: Path, matrix: int) -> tuple[bytes, list[str]]:
    from rtseg.phantom.cohort import case_id, write_case

    write_case("A", 3, 0, work / "case", matrix=matrix)
    ct = work / "case" / case_id("A", 3, 0) / "ct"
    buffer = io.BytesIO()
    digests = []
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(ct.iterdir()):
            archive.write(path, f"series/{path.name}")
            digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    return buffer.getvalue(), sorted(digests)


def stored_digests(folder: Path) -> list[str]:
    return sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir())


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_pids() -> list[int]:
    me = str(os.getpid())
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == me:
            found.append(int(status.parent.name))
    return found


def post(url: str, body: bytes) -> tuple[int, dict[str, Any], float]:
    started = time.perf_counter()
    headers = {**AUTH, "Content-Type": "application/zip"}
    response = requests.post(f"{url}/v1/segmentations", data=body, headers=headers, timeout=600)
    return response.status_code, response.json(), time.perf_counter() - started


def wait_state(store: JobStore, job_id: str, states: frozenset[JobState], timeout: float) -> JobState:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = store.get(job_id).state
        if state in states:
            return state
        time.sleep(0.5)
    return store.get(job_id).state


def dciodvfy_errors(path: Path) -> list[str] | None:
    if shutil.which("dciodvfy") is None:
        return None
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def run_bench(work: Path, uploads: int, matrix: int, segment_all: bool) -> dict[str, Any]:
    from rtseg.model.default import default_model_dir
    from rtseg.worker import WorkerPool

    body, digests = phantom_zip(work, matrix)
    data_dir = work / "data"
    store = JobStore(state_db(data_dir))
    settings = HttpSettings(port=0, token_sha256=(token_digest(TOKEN),), queue_max=uploads + 8)
    pool = WorkerPool(store, data_dir, default_model_dir(), workers=1, threads=1)
    server = HttpServer(
        create_app(settings, store, data_dir, worker_alive=lambda: pool.alive() > 0), settings
    )
    pool.start()
    server.start()
    try:
        return _measure(server.url, store, data_dir, body, digests, uploads, segment_all)
    finally:
        server.stop()
        pool.stop(timeout=10)
        store.close()


def _measure(
    url: str,
    store: JobStore,
    data_dir: Path,
    body: bytes,
    digests: list[str],
    uploads: int,
    segment_all: bool,
) -> dict[str, Any]:
    status, first, _ = post(url, body)
    if status != 202:
        raise RuntimeError(f"the first upload was refused: {status} {first}")
    first_state = wait_state(store, first["id"], frozenset({JobState.RUNNING}) | FINAL, 300)
    workers = child_pids()
    poller = Poller(f"{url}/healthz")
    thread = threading.Thread(target=poller.run, daemon=True)
    thread.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(uploads) as executor:
        results = list(executor.map(lambda _i: post(url, body), range(uploads)))
    upload_wall = time.perf_counter() - started
    window = [
        lat for t, lat in zip(poller.times, poller.latencies, strict=False) if t <= started + upload_wall
    ]
    during_state = store.get(first["id"]).state
    accepted = [r for s, r, _ in results if s == 202]
    intact = sum(stored_digests(data_dir / "jobs" / r["id"] / "input") == digests for r in accepted)
    final = wait_state(store, first["id"], FINAL, 1800)
    poller.stop()
    thread.join()
    first_job = store.get(first["id"])
    rtstruct = data_dir / (first_job.output_path or "missing")
    errors = dciodvfy_errors(rtstruct) if rtstruct.is_file() else ["no RTSTRUCT"]
    done_all = None
    if segment_all:
        states = [wait_state(store, r["id"], FINAL, 3600) for r in accepted]
        done_all = sum(s == JobState.DONE for s in states)
    worker_peak = max(
        (peak_rss_mb(pid) for pid in workers if Path(f"/proc/{pid}").exists()), default=float("nan")
    )
    latencies = [r[2] for r in results]
    return {
        "uploads": uploads,
        "upload_mb": round(len(body) / 2**20, 2),
        "accepted_202": len(accepted),
        "stored_intact": intact,
        "other_statuses": sorted({s for s, _, _ in results if s != 202}),
        "upload_wall_s": round(upload_wall, 2),
        "upload_latency_p50_s": round(percentile(latencies, 50), 2),
        "upload_latency_max_s": round(max(latencies), 2),
        "segmentation_state_when_uploads_started": str(first_state),
        "segmentation_state_when_uploads_ended": str(during_state),
        "segmentation_final": str(final),
        "segmentation_seconds": (first_job.result.get("timings") or {}).get("total_s"),
        "rtstruct_dciodvfy_errors": errors,
        "healthz_requests_during_uploads": len(window),
        "healthz_p50_ms_during_uploads": round(percentile(window, 50) * 1000, 1),
        "healthz_p99_ms_during_uploads": round(percentile(window, 99) * 1000, 1),
        "healthz_max_ms_during_uploads": round(max(window, default=float("nan")) * 1000, 1),
        "healthz_requests": len(poller.latencies),
        "healthz_failures": poller.failures,
        "healthz_p50_ms": round(percentile(poller.latencies, 50) * 1000, 1),
        "healthz_p99_ms": round(percentile(poller.latencies, 99) * 1000, 1),
        "healthz_max_ms": round(max(poller.latencies, default=float("nan")) * 1000, 1),
        "server_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "worker_peak_rss_mb": round(worker_peak, 1),
        "segmented_all_done": done_all,
    }
