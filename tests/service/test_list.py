"""``GET /v1/segmentations`` (the job history, paged and filtered) and ``POST …/{id}/resegment``.

A real waitress server; the DICOM face's receiving half runs in-process on the
same data directory, fed by dcmtk storescu over a real association.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from svc_helpers import Running

from dicom_node.assembly import Assembler
from dicom_node.dcmtk import require_dcmtk_tool
from dicom_node.scp import Receiver, start_scp
from dicom_node.spool import Spool
from rtseg.audit import AuditLog, read_entries
from rtseg.deliveries import DeliveryStore
from rtseg.jobs import JobState
from rtseg.settings import load_settings

PROBLEM = "application/problem+json"


def _receive_twice(running: Running, series: Path) -> tuple[str, str]:
    """Send ``series`` to an SCP on the server's data directory twice; the first job is segmented."""
    env = {"RTSEG_DATA_DIR": str(running.data_dir), "RTSEG_DICOM_PORT": "0", "RTSEG_DICOM_HOST": "127.0.0.1"}
    settings = load_settings(environ={**env, "RTSEG_NODE_QUIET_TIME_S": "0.5"})
    audit = AuditLog(running.data_dir / "audit" / "audit.log")
    spool = Spool(running.data_dir / "spool", 10, audit)
    assembler = Assembler(running.store, spool, settings, audit)
    receiver = Receiver(spool, assembler, DeliveryStore(running.store.db_path), audit)
    server = start_scp(settings.dicom, receiver, audit, lambda outcome: None)
    port = str(server.server_address[1])
    storescu = [require_dcmtk_tool("storescu"), "-aec", "RTSEG", "-aet", "CT1", "127.0.0.1", port, "+sd"]
    try:
        ids = []
        for _ in range(2):
            assert subprocess.run([*storescu, str(series)], capture_output=True).returncode == 0
            time.sleep(0.6)
            (job_id,) = assembler.tick()
            ids.append(job_id)
            if len(ids) == 1:
                running.store.transition(job_id, JobState.QUEUED, JobState.RUNNING)
                running.store.transition(job_id, JobState.RUNNING, JobState.DONE, model_version="1.0")
    finally:
        server.shutdown()
    return ids[0], ids[1]


def _http_jobs(running: Running, n: int) -> list[str]:
    """``n`` HTTP jobs received one after the other (no worker: they stay queued)."""
    ids = []
    for i in range(n):
        job = running.store.create("http", f"key{i}", f"jobs/j{i}/input", state=JobState.QUEUED)
        ids.append(job.id)
        time.sleep(0.01)  # distinct receipt times
    return ids


def test_a_series_sent_twice_is_listed_as_a_duplicate_of_its_job(
    serve: Callable[..., Running], phantom_ct96: Path
) -> None:
    running = serve()
    first, again = _receive_twice(running, phantom_ct96)
    answer = running.get("/v1/segmentations")
    assert answer.status_code == 200
    items = answer.json()["items"]
    assert [i["id"] for i in items] == [again, first]  # newest first
    record, segmented = items
    assert record["outcome"] == "duplicate" and record["duplicate_of"] == first
    assert record["reason"].startswith(f"duplicate of job {first}:")
    assert (record["source"], record["calling_ae"], record["state"]) == ("dicom", "CT1", "skipped")
    assert segmented["outcome"] == "segmented" and segmented["model_version"] == "1.0"
    assert segmented["started"] and segmented["finished"] and segmented["turnaround_s"] >= 0
    assert segmented["links"]["resegment"] == f"/v1/segmentations/{first}/resegment"
    skipped = running.get("/v1/segmentations", params={"state": "skipped", "source": "dicom"}).json()
    assert [i["id"] for i in skipped["items"]] == [again]


def test_the_list_pages_newest_first_and_filters_by_time(serve: Callable[..., Running]) -> None:
    running = serve()
    ids = _http_jobs(running, 5)
    seen, params = [], {"limit": "2"}
    while True:
        page = running.get("/v1/segmentations", params=params).json()
        seen += [i["id"] for i in page["items"]]
        if page["next"] is None:
            break
        assert page["links"]["next"].startswith("/v1/segmentations?")
        params = {"limit": "2", "cursor": page["next"]}
    assert seen == ids[::-1]
    between = (running.store.get(ids[1]).created + running.store.get(ids[2]).created) / 2
    since = datetime.fromtimestamp(between, UTC).isoformat()
    later = running.get("/v1/segmentations", params={"since": since}).json()
    assert [i["id"] for i in later["items"]] == ids[:1:-1]
    earlier = running.get("/v1/segmentations", params={"until": since, "state": "queued,done"}).json()
    assert [i["id"] for i in earlier["items"]] == ids[1::-1]
    assert running.get("/v1/segmentations", params={"source": "dicom"}).json()["items"] == []


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"state": "bogus"}, "state 'bogus' is not one of received, queued"),
        ({"limit": "0"}, "limit must be a whole number from 1 to 200"),
        ({"limit": "many"}, "limit must be a whole number from 1 to 200"),
        ({"since": "yesterday"}, "since must be an ISO 8601 date or date-time"),
        ({"until": "2026-13-01"}, "until must be an ISO 8601 date or date-time"),
        ({"source": "ftp"}, "source must be dicom or http"),
        ({"cursor": "!!"}, "cursor: the cursor is not one this server gave out"),
    ],
)
def test_bad_filters_are_400_problems(
    serve: Callable[..., Running], params: dict[str, str], detail: str
) -> None:
    answer = serve().get("/v1/segmentations", params=params)
    assert answer.status_code == 400 and answer.headers["Content-Type"] == PROBLEM
    assert answer.json()["type"] == "urn:rtseg:problem:bad-parameter" and detail in answer.json()["detail"]


def test_the_list_needs_the_token(serve: Callable[..., Running]) -> None:
    running = serve()
    answer = requests.get(f"{running.url}/v1/segmentations", timeout=10)
    assert answer.status_code == 401 and answer.headers["Content-Type"] == PROBLEM


def test_resegment_over_http_supersedes_or_says_why_not(
    serve: Callable[..., Running], phantom_ct96: Path
) -> None:
    running = serve()
    first, duplicate = _receive_twice(running, phantom_ct96)
    url = f"{running.url}/v1/segmentations/{duplicate}/resegment"  # the record leads to its job
    answer = requests.post(url, headers=_auth(), timeout=30)
    assert answer.status_code == 202, answer.text
    new: dict[str, Any] = answer.json()
    assert new["state"] == "queued" and new["supersedes"] == first
    assert new["reason"] == f"resegmented on request, supersedes job {first}"
    listed = {i["id"]: i for i in running.get("/v1/segmentations").json()["items"]}
    assert listed[first]["outcome"] == "superseded" and listed[first]["superseded_by"] == new["id"]
    asked = [
        e
        for e in read_entries(running.data_dir / "audit" / "audit.log")
        if e["event"] == "resegment_requested"
    ]
    assert [(e["job"], e["supersedes"], e["by"]) for e in asked] == [(new["id"], duplicate, "api")]
    busy = requests.post(url, headers=_auth(), timeout=30)
    assert busy.status_code == 409 and f"job {new['id']} is queued" in busy.json()["detail"]
    missing = requests.post(f"{running.url}/v1/segmentations/nope/resegment", headers=_auth(), timeout=30)
    assert missing.status_code == 404 and missing.headers["Content-Type"] == PROBLEM


def _auth() -> dict[str, str]:
    from svc_helpers import AUTH

    return AUTH
