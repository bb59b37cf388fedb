"""Job history that explains itself: every series the node sees has a record with what happened and why.

The SCP runs in-process on a real pynetdicom association (dcmtk storescu as the
modality); the operator commands run as the real command line. No model: where
a test needs a job to have failed or finished, it moves the job in the store as
a worker would.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from node_helpers import no_patient_data, storescu, subset_series

from dicom_node.assembly import Assembler
from dicom_node.node import open_stores
from dicom_node.scp import Receiver, start_scp
from dicom_node.spool import Spool, uid_key
from rtseg.audit import AuditLog
from rtseg.jobs import Job, JobState
from rtseg.settings import load_settings


class Node:
    """The receiving half of a node (SCP, spool, assembly) on a data directory, and its config file."""

    def __init__(self, root: Path, selection: dict[str, str] | None = None) -> None:
        root.mkdir(parents=True)
        self.data_dir = root / "data"
        self.config = root / "node.toml"
        lines = ["[dicom]", 'host = "127.0.0.1"', "port = 0", "[node]", "quiet_time_s = 0.5"]
        lines += ["min_free_disk_mb = 10", "[paths]", f'data_dir = "{self.data_dir}"', "[selection]"]
        lines += [f'{k} = "{v}"' for k, v in (selection or {}).items()]
        self.config.write_text("\n".join(lines) + "\n")
        self.settings = load_settings(self.config, environ={})
        self.store, deliveries = open_stores(self.data_dir)
        self.audit = AuditLog(self.data_dir / "audit" / "audit.log")
        spool = Spool(self.data_dir / "spool", 10, self.audit)
        self.assembler = Assembler(self.store, spool, self.settings, self.audit)
        receiver = Receiver(spool, self.assembler, deliveries, self.audit)
        self.server = start_scp(self.settings.dicom, receiver, self.audit, lambda outcome: None)
        self.port = int(self.server.server_address[1])

    def send(self, series: Path) -> list[str]:
        """C-STORE ``series`` and wait out the quiet time: the ids of the jobs it completed."""
        assert storescu(series, self.port) == 0
        time.sleep(self.settings.node.quiet_time_s + 0.1)
        return self.assembler.tick()

    def rtseg(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "rtseg_app", "node", *args, "--config", str(self.config)]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    def status(self) -> str:
        done = self.rtseg("status")
        assert done.returncode == 0, done.stderr
        return done.stdout

    def segmented(self, job_id: str) -> Job:
        """What a worker does with a queued job that it segments."""
        self.store.transition(job_id, JobState.QUEUED, JobState.RUNNING)
        return self.store.transition(job_id, JobState.RUNNING, JobState.DONE, model_version="1.0")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Any]:
    made: list[Node] = []

    def make(**selection: str) -> Node:
        made.append(Node(tmp_path / f"node{len(made)}", selection))
        return made[-1]

    yield make
    for n in made:
        n.server.shutdown()
        n.store.close()


@pytest.fixture(scope="module")
def series(phantom_ct96: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return subset_series(phantom_ct96, tmp_path_factory.mktemp("history") / "ct", 12)


def test_a_series_sent_twice_is_recorded_as_a_duplicate_of_its_job(node: Any, series: Path) -> None:
    n = node()
    (first,) = n.send(series)
    n.segmented(first)
    (again,) = n.send(series)  # the PACS answers success: the node must say why nothing comes back
    record = n.store.get(again)
    assert record.state == JobState.SKIPPED and record.meta["duplicate_of"] == first
    assert str(record.error).startswith(f"duplicate of job {first}: 12 instance(s) sent again")
    status = n.status()
    assert f"job {again} (dicom MODALITY) duplicate: received " in status
    assert f"duplicate of job {first}" in status
    (event,) = [e for e in n.audit.entries() if e["event"] == "series_duplicate"]
    assert event["duplicate_of"] == first and event["instances"] == 12
    assert len(list((n.data_dir / "spool" / "ct").rglob("*.dcm"))) == 12  # kept once
    assert (
        no_patient_data(status) == []
        and pydicom.dcmread(next(series.iterdir())).SeriesInstanceUID not in status
    )


def test_a_series_skipped_by_the_description_filter_names_the_rule(
    node: Any, series: Path, tmp_path: Path
) -> None:
    n = node(series_description_exclude="scout|topogram")
    scout = subset_series(series, tmp_path / "scout", 12, description="Topogram 0.6 T20f", uid_tag="scout")
    (job_id,) = n.send(scout)
    assert n.store.get(job_id).state == JobState.SKIPPED
    status = n.status()
    line = next(line for line in status.splitlines() if job_id in line)
    assert "skipped: received " in line
    assert "series description matches the exclude pattern ([selection] series_description_exclude)" in line


def test_a_failure_resolved_by_a_resend_is_not_current_trouble(node: Any, series: Path) -> None:
    n = node()
    (first,) = n.send(series)
    n.store.transition(first, JobState.QUEUED, JobState.RUNNING)
    n.store.transition(first, JobState.RUNNING, JobState.FAILED, error="model failed: out of memory")
    (resent,) = n.send(series)  # the operator has the series sent again; this time it works
    done = n.segmented(resent)
    status = n.status()
    assert "failed jobs: 0" in status
    assert f"job {first} (dicom): model failed: out of memory (resolved by job {resent})" in status
    assert f"job {first} (dicom MODALITY) resolved: " in status
    line = next(line for line in status.splitlines() if f"job {resent} " in line)
    assert done.turnaround is not None and f"turnaround {done.turnaround:.1f} s" in line
    assert "started " in line and "finished " in line


def test_resegment_queues_a_job_that_supersedes_and_says_so(node: Any, series: Path) -> None:
    n = node()
    (first,) = n.send(series)
    n.segmented(first)
    uid = str(pydicom.dcmread(next(series.iterdir())).SeriesInstanceUID)
    done = n.rtseg("resegment", uid)
    assert done.returncode == 0, done.stdout + done.stderr
    (new,) = [j for j in n.store.list() if j.id != first]
    assert new.state == JobState.QUEUED and new.meta["supersedes"] == first and new.meta["resegment"]
    assert new.series_key == uid_key(uid) and len(new.meta["instances"]) == 12
    assert done.stdout.strip() == f"queued job {new.id}: resegmented on request, supersedes job {first}"
    assert uid not in done.stdout
    status = n.status()
    assert f"job {first} (dicom MODALITY) superseded: " in status and f"superseded by job {new.id}" in status
    busy = n.rtseg("resegment", first)  # by job id: the new job is still queued
    assert busy.returncode == 1 and f"job {new.id} is queued" in busy.stdout
    (event,) = [e for e in n.audit.entries() if e["event"] == "resegment_requested"]
    assert event["supersedes"] == first and event["job"] == new.id and event["by"] == "cli"


def test_resegment_of_a_series_whose_instances_are_gone_says_send_it_again(node: Any, series: Path) -> None:
    n = node(series_description_include="thorax")  # the phantom is not: skipped, spool removed
    (skipped,) = n.send(series)
    done = n.rtseg("resegment", skipped)
    assert done.returncode == 1
    assert done.stdout.strip() == (
        f"cannot resegment: the instances of job {skipped} are gone (skipped, expired or deleted):"
        " send the series to the node again"
    )
    missing = n.rtseg("resegment", "1.2.3.4.5")
    assert missing.returncode == 1 and "no job and no series with that id or UID" in missing.stdout
    assert len(n.store.list()) == 1
