"""A series outside the model's region fails its job, audited, and yields no RTSTRUCT (issue 16).

The series is the inferior third of a phantom (lower abdomen: no liver level, no lungs), sent
with dcmtk's storescu to a real `rtseg serve` with a real dcmtk storescp as its destination.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from node_helpers import Storescp, no_patient_data, storescu, wait_for

from rtseg.jobs import Job


@pytest.fixture(scope="module")
def lower_third(phantom_ct96: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    datasets = [pydicom.dcmread(p) for p in sorted(phantom_ct96.glob("*.dcm"))]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    out = tmp_path_factory.mktemp("lower") / "ct"
    out.mkdir()
    for i, ds in enumerate(datasets[: len(datasets) // 3]):
        ds.save_as(out / f"slice{i:03d}.dcm", enforce_file_format=True)
    return out


def _finished(node: Any) -> Job | None:
    store = node.store()
    try:
        jobs = store.list(source="dicom")
    finally:
        store.close()
    return jobs[0] if jobs and str(jobs[0].state) in ("failed", "done") else None


def test_a_series_outside_the_region_fails_its_job_with_the_reason_and_an_audit_event(
    running_node: Any, lower_third: Path, tmp_path: Path
) -> None:
    dest = Storescp(tmp_path / "dest").start()
    try:
        destination = {"name": "tps", "ae_title": dest.ae_title, "host": "127.0.0.1", "port": dest.port}
        node = running_node([destination])
        assert storescu(lower_third, node.port) == 0
        job = wait_for(lambda: _finished(node), 300, "the job to finish")
        assert str(job.state) == "failed"
        assert job.error.startswith("the series does not show the model's region, the upper abdomen")
        assert "0 mm at the level of its organs" in job.error
        events = wait_for(lambda: [e for e in node.audit() if e["event"] == "job_failed"], 30, "the audit")
        assert events == [
            {"time": events[0]["time"], "event": "job_failed", "job": job.id, "series": job.series_key}
            | {"reason": job.error}
        ]
        assert not (node.data_dir / "jobs" / job.id / "rtstruct.dcm").exists()
        node.stop()
        assert dest.received() == []  # nothing reached the TPS
        assert no_patient_data(node.log()) == [] and no_patient_data(node.audit_text()) == []
        assert "does not show the model's region" in node.log()
    finally:
        dest.stop()


def test_selection_region_check_false_segments_it_anyway(running_node: Any, lower_third: Path) -> None:
    node = running_node(selection={"region_check": False})
    assert storescu(lower_third, node.port) == 0
    job = wait_for(lambda: _finished(node), 300, "the job to finish")
    assert str(job.state) == "done", job.error
    assert (node.data_dir / job.output_path).is_file()
    assert not [e for e in node.audit() if e["event"] == "job_failed"]
