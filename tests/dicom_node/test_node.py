"""`rtseg serve` as a real process with the real default model, real dcmtk peers and SIGKILL.

The fault test kills the node while receiving, while segmenting and while
sending, restarts it each time, and checks that the destination ends up with
exactly one RTSTRUCT for the series, dciodvfy-clean, in the CT's study.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest
from node_helpers import (
    Storescp,
    echoscu,
    no_patient_data,
    storescu,
    subset_series,
    wait_for,
    worker_pids,
)

from dicom_node.dcmtk import require_dcmtk_tool
from dicom_node.scu import echo
from rtseg.settings import TlsSettings
from rtseg.worker import rtstruct_uids

SLICES = 24


@pytest.fixture(scope="module")
def series(phantom_ct96: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return subset_series(phantom_ct96, tmp_path_factory.mktemp("series") / "ct", SLICES)


@pytest.fixture(scope="module")
def long_series(phantom_ct96: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole phantom series (235 slices), whose segmentation lasts long enough to measure the SCP
    during it: the 24-slice series segments in under a second on these cores, shorter than five C-ECHOs
    and a C-STORE of 12 instances."""
    return subset_series(phantom_ct96, tmp_path_factory.mktemp("long") / "ct", 10_000)


@pytest.fixture(scope="module")
def scout(phantom_ct96: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another series (new UIDs) that the selection rules exclude by its description."""
    out = tmp_path_factory.mktemp("scout") / "ct"
    return subset_series(phantom_ct96, out, 12, description="SKIPME topogram", uid_tag="scout")


@pytest.fixture(scope="module")
def poison(phantom_ct96: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another series (new UIDs) whose worker the test kills every time it runs."""
    return subset_series(phantom_ct96, tmp_path_factory.mktemp("poison") / "ct", 16, uid_tag="poison")


def dciodvfy_problems(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    lines = (out.stdout + out.stderr).splitlines()
    return [line for line in lines if line.startswith(("Error", "Warning"))]


def check_rtstruct(path: Path, ct_dir: Path, job_id: str) -> None:
    rs = pydicom.dcmread(path)
    ct = pydicom.dcmread(next(ct_dir.iterdir()))
    assert rs.Modality == "RTSTRUCT" and rs.SOPInstanceUID == rtstruct_uids(job_id)[1]
    assert rs.StudyInstanceUID == ct.StudyInstanceUID
    ref = rs.ReferencedFrameOfReferenceSequence[0]
    assert ref.FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert (
        ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID
        == ct.SeriesInstanceUID
    )
    assert dciodvfy_problems(path) == []


def echo_ms(port: int) -> float:
    ok, seconds = echo("MODALITY", {"ae_title": "RTSEG", "host": "127.0.0.1", "port": port}, TlsSettings())
    assert ok
    return seconds * 1000


def one_job(node: Any) -> Any:
    store = node.store()
    try:
        jobs = store.list(source="dicom")
        assert (
            len([j for j in jobs if j.meta.get("header", {}).get("description", "") != "SKIPME topogram"])
            <= 1
        )
        return next(j for j in jobs if "SKIPME" not in j.meta.get("header", {}).get("description", ""))
    finally:
        store.close()


def state_of(node: Any, job_id: str) -> str:
    store = node.store()
    try:
        return str(store.get(job_id).state)
    finally:
        store.close()


@pytest.mark.slow  # > 60 s: several segmentations and restarts
def test_sigkill_while_receiving_segmenting_and_sending_gives_exactly_one_rtstruct(
    running_node: Any, long_series: Path, scout: Path, tmp_path: Path
) -> None:
    series = long_series
    dest = Storescp(tmp_path / "dest")  # not started yet: the destination is down at first
    destination = {"name": "tps", "ae_title": dest.ae_title, "host": "127.0.0.1", "port": dest.port}
    node = running_node(
        [destination],
        # quiet time longer than a restart: the resent series continues the recovered one
        node={"quiet_time_s": 15, "retry_limit": 1000, "retry_backoff_s": 0.5, "retry_backoff_max_s": 2},
        selection={"series_description_exclude": "SKIPME"},
    )

    # 1. kill -9 while receiving: some instances acknowledged, the association cut off
    modality = subprocess.Popen(
        [
            require_dcmtk_tool("storescu"),
            "-aec",
            "RTSEG",
            "-aet",
            "MODALITY",
            "127.0.0.1",
            str(node.port),
            "+sd",
            str(series),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    spool = node.data_dir / "spool" / "ct"
    wait_for(lambda: spool.is_dir() and sum(1 for _ in spool.rglob("*.dcm")) >= 5, 60, "first instances")
    node.kill()
    modality.wait(30)
    assert node.states() == ["received"]
    node.start()
    assert storescu(series, node.port) == 0  # the modality sends the series again
    job = wait_for(lambda: one_job(node), 30, "the job")

    # 2. kill -9 while segmenting
    wait_for(lambda: state_of(node, job.id) == "running", 120, "segmentation to start")
    node.kill()
    assert state_of(node, job.id) == "running"
    node.start()
    wait_for(lambda: state_of(node, job.id) == "running", 60, "segmentation to restart")
    # the SCP stays responsive while a worker segments: a C-STORE starts, and C-ECHOs are timed for as
    # long as the job is still segmenting (at least 3 of them: a few tenths of a second)
    with ThreadPoolExecutor(1) as pool:
        store = pool.submit(storescu, scout, node.port)
        latencies: list[float] = []
        while state_of(node, job.id) == "running":
            latencies.append(echo_ms(node.port))
        assert store.result() == 0
    assert len(latencies) >= 3, f"only {len(latencies)} C-ECHO(s) while segmenting: the series is too short"
    print(
        f"{len(latencies)} C-ECHOs while segmenting: median {statistics.median(latencies):.0f} ms,"
        f" max {max(latencies):.0f} ms"
    )
    assert statistics.median(latencies) < 100

    # 3. kill -9 while sending (the destination is still down: tries are failing)
    wait_for(lambda: state_of(node, job.id) == "sending", 900, "segmentation to finish")
    wait_for(lambda: "delivery to tps failed" in node.log(), 30, "a failed delivery")
    node.kill()
    dest.start()
    try:
        node.start()
        wait_for(lambda: state_of(node, job.id) == "done", 120, "delivery")
        # the scout's quiet time restarts with the node: it may still be waiting here
        wait_for(lambda: sorted(node.states()) == ["done", "skipped"], 60, "the scout to be skipped")
        node.stop()
    finally:
        dest.stop()

    received = [p for p in dest.out.iterdir() if p.is_file()]
    assert len(received) == 1, received
    check_rtstruct(received[0], series, job.id)
    states = node.states()
    assert sorted(states) == ["done", "skipped"]
    assert [p.name for p in spool.iterdir()] == [job.series_key]  # the skipped series was cleaned up
    assert no_patient_data(node.log()) == [] and no_patient_data(node.audit_text()) == []
    events = [e["event"] for e in node.audit()]
    assert events.count("rtstruct_delivered") == 1 and "series_skipped" in events


def complete_job_id(node: Any) -> str:
    """The job that segmented the whole series (the one that superseded another)."""
    store = node.store()
    try:
        return next(j.id for j in store.list() if j.meta.get("supersedes"))
    finally:
        store.close()


def _contoured_slices(rs: pydicom.Dataset) -> set[str]:
    series = (
        rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    )
    return {str(item.ReferencedSOPInstanceUID) for item in series.ContourImageSequence}


def test_the_rest_of_a_series_after_its_rtstruct_makes_a_superseding_one(
    running_node: Any, series: Path, tmp_path: Path
) -> None:
    dest = Storescp(tmp_path / "dest").start()
    try:
        node = running_node(
            [{"name": "tps", "ae_title": dest.ae_title, "host": "127.0.0.1", "port": dest.port}]
        )
        files = sorted(series.iterdir())
        assert storescu(files[:12], node.port) == 0  # the modality pauses past the quiet time
        first = wait_for(lambda: one_job(node), 30, "the job")
        wait_for(lambda: state_of(node, first.id) == "done", 900, "the first delivery")
        assert storescu(files[12:], node.port) == 0  # the rest of the series
        wait_for(lambda: node.states() == ["done", "done"], 900, "the superseding job")
        assert storescu(series, node.port) == 0  # the whole series again: nothing new, recorded
        wait_for(lambda: node.states() == ["done", "done", "skipped"], 30, "the duplicate's record")
        assert echoscu(node.port) == 0
        status = subprocess.run(
            [*_rtseg(), "node", "status", "--config", str(node.config)], capture_output=True, text=True
        )
        assert node.stop() == 0
    finally:
        dest.stop()
    assert node.states() == ["done", "done", "skipped"] and "done 2" in status.stdout
    assert f"superseded by job {complete_job_id(node)}" in status.stdout
    assert f"duplicate of job {complete_job_id(node)}" in status.stdout
    early, complete = sorted(dest.received(), key=lambda rs: len(_contoured_slices(rs)))
    every_slice = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    assert len(_contoured_slices(early)) == 12 and _contoured_slices(complete) == every_slice
    assert (
        f"SUPERSEDES RTSTRUCT {early.SOPInstanceUID} (rtseg job {first.id})"
        in complete.StructureSetDescription
    )
    (event,) = [e for e in node.audit() if e["event"] == "series_superseded"]
    assert event["supersedes"] == first.id and (event["instances"], event["earlier_instances"]) == (24, 12)
    assert no_patient_data(status.stdout + node.log() + node.audit_text()) == []


@pytest.mark.slow  # ~40 s: a segmentation on 2 cores
def test_the_rest_of_a_series_under_policy_flag_marks_the_job_and_rtstruct(
    running_node: Any, series: Path
) -> None:
    node = running_node(node={"late_instance_policy": "flag"})
    files = sorted(series.iterdir())
    assert storescu(files[:12], node.port) == 0
    job = wait_for(lambda: one_job(node), 30, "the job")
    wait_for(lambda: state_of(node, job.id) == "done", 900, "segmentation")
    assert storescu(files[12:], node.port) == 0
    wait_for(lambda: "late_instances_flagged" in node.audit_text(), 30, "the flag")
    status = subprocess.run(
        [*_rtseg(), "node", "status", "--config", str(node.config)], capture_output=True, text=True
    )
    node.stop()
    (flagged,) = node.store().list()
    assert flagged.state == "done" and flagged.meta["late_instances"] == 12
    rs = pydicom.dcmread(node.data_dir / flagged.output_path)
    assert "INCOMPLETE SERIES: 12 instance(s) arrived after segmentation" in rs.StructureSetDescription
    assert f"job {job.id}: 12 instance(s) arrived after segmentation" in status.stdout
    assert len(list((node.data_dir / "spool" / "ct").rglob("*.dcm"))) == 24  # kept, not lost


def test_unreachable_destination_is_dead_lettered(running_node: Any, series: Path, free_port: int) -> None:
    port = free_port  # nothing listens here
    node = running_node(
        [{"name": "nowhere", "ae_title": "NOWHERE", "host": "127.0.0.1", "port": port}],
        node={"retry_limit": 2, "retry_backoff_s": 0.2},
    )
    assert storescu(series, node.port) == 0
    job = wait_for(lambda: one_job(node), 30, "the job")
    wait_for(lambda: state_of(node, job.id) == "dead_letter", 900, "the dead letter")
    status = subprocess.run(
        [*_rtseg(), "node", "status", "--config", str(node.config)], capture_output=True, text=True
    )
    node.stop()
    assert "dead letters: 1" in status.stdout and "nowhere: 2 tries" in status.stdout
    assert (node.data_dir / "jobs" / job.id / "rtstruct.dcm").is_file()  # kept: nobody acknowledged it
    assert "dead after 2 tries" in node.log()


def _http(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def _running_on(node: Any, job_id: str, not_on: set[int]) -> int | None:
    store = node.store()
    try:
        job = store.get(job_id)
    finally:
        store.close()
    pid = job.meta.get("worker_pid")
    return pid if job.state == "running" and pid and pid not in not_on else None


@pytest.mark.slow  # ~2-3 min: segmentations and worker restarts
def test_a_killed_worker_is_restarted_its_job_requeued_and_a_poison_job_failed(
    running_node: Any, series: Path, poison: Path, free_port: int
) -> None:
    http_port = free_port
    node = running_node(
        node={"workers": 2, "worker_crash_limit": 2},
        http={"host": "127.0.0.1", "port": http_port, "min_free_mb": 10},
    )
    url = f"http://127.0.0.1:{http_port}"
    wait_for(lambda: _http(url + "/readyz")[0] == 200, 180, "both workers to be ready")
    wait_for(lambda: node.log().count("worker: model") == 2, 180, "both models to be loaded")
    assert len(worker_pids(node.proc.pid)) == 2
    assert storescu(series, node.port) == 0
    job = wait_for(lambda: one_job(node), 30, "the job")
    # the worker that claimed the job (a job takes about a second now: no time to sample CPU use)
    victim = wait_for(lambda: _running_on(node, job.id, set()), 300, "segmentation to start", 0.02)
    os.kill(victim, signal.SIGKILL)  # the busy worker, as the OOM killer would

    status, kind, body = wait_for(
        lambda: (r := _http(url + "/readyz"))[0] == 503 and r, 20, "/readyz to miss a worker", 0.05
    )
    problem = json.loads(body)
    assert kind == "application/problem+json" and problem["status"] == 503
    assert "1 of 2 workers running; missing: rtseg-worker-" in problem["detail"]
    wait_for(lambda: state_of(node, job.id) == "done", 600, "the requeued job to finish")
    wait_for(lambda: _http(url + "/readyz")[0] == 200, 180, "the pool to be back at 2")
    assert len(worker_pids(node.proc.pid)) == 2 and victim not in worker_pids(node.proc.pid)
    metrics = _http(url + "/metrics")[2]
    assert "rtseg_workers_configured 2.0" in metrics and "rtseg_workers_live 2.0" in metrics
    assert "rtseg_worker_restarts_total 1.0" in metrics
    store = node.store()
    done = store.get(job.id)
    store.close()
    assert done.attempts == 2 and done.meta["worker_deaths"] == 1

    # a job that kills its worker every time: failed after worker_crash_limit deaths
    assert storescu(poison, node.port) == 0
    poisoned = wait_for(lambda: [j for j in node.store().list() if j.id != job.id], 30, "the job")[0]
    killed: set[int] = set()
    for _ in range(2):
        pid = wait_for(lambda: _running_on(node, poisoned.id, killed), 300, "the job to run")
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
    wait_for(lambda: state_of(node, poisoned.id) == "failed", 30, "the job to fail")
    report = subprocess.run(
        [*_rtseg(), "node", "status", "--config", str(node.config)], capture_output=True, text=True
    )
    assert f"job {poisoned.id} (dicom): worker died 2 times on this job" in report.stdout
    wait_for(lambda: _http(url + "/readyz")[0] == 200, 180, "the pool to be back at 2 again")
    assert "rtseg_worker_restarts_total 3.0" in _http(url + "/metrics")[2]
    assert node.stop() == 0


def _rtseg() -> list[str]:
    import sys

    return [sys.executable, "-m", "rtseg_app"]
