"""Orthanc as the PACS: a CT series stored in Orthanc is routed to the node, the RTSTRUCT comes back.

Orthanc is started by the test with its own configuration (DICOM port, AE
title, a modality entry for the node). The node accepts only Orthanc (AE title
and host) and returns results to the sender.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from node_helpers import (
    NodeProcess,
    no_patient_data,
    orthanc_request,
    subset_series,
    wait_for,
    wait_port,
)
from test_node import check_rtstruct

from rtseg.net import free_port

pytestmark = pytest.mark.skipif(
    shutil.which("Orthanc") is None, reason="Orthanc is not installed (scripts/setup.sh test)"
)


class Orthanc:
    def __init__(self, root: Path, node_port: int) -> None:
        self.root = root
        self.http = free_port()
        self.dicom = free_port()
        config = {
            "Name": "rtseg-test-pacs",
            "StorageDirectory": str(root / "db"),
            "IndexDirectory": str(root / "db"),
            "HttpPort": self.http,
            "DicomPort": self.dicom,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {"rtseg": ["RTSEG", "127.0.0.1", node_port]},
            "Plugins": [],
        }
        (root / "orthanc.json").write_text(json.dumps(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        with open(self.root / "orthanc.log", "wb") as log:
            self.proc = subprocess.Popen(["Orthanc", str(self.root / "orthanc.json")], stdout=log, stderr=log)
        wait_port(self.http)
        wait_port(self.dicom)
        return self

    def api(self, path: str, data: bytes | None = None) -> Any:
        return orthanc_request(self.http, path, data)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.mark.slow  # > 60 s: several segmentations and restarts
def test_series_routed_from_orthanc_comes_back_as_rtstruct_in_the_same_study(
    phantom_ct96: Path, tmp_path: Path
) -> None:
    series = subset_series(phantom_ct96, tmp_path / "ct", 24)
    (tmp_path / "orthanc").mkdir()
    # Orthanc needs the node's port in its config, the node needs Orthanc's: reserve the node's first
    (tmp_path / "node-root").mkdir()
    node = NodeProcess(tmp_path / "node-root", None)
    pacs = Orthanc(tmp_path / "orthanc", node.port).start()
    try:
        node.overrides = {
            "dicom": {
                "return_to_sender": True,
                "allowed_callers": [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom}],
            }
        }
        node.write_config()
        node.start()
        uploaded = [pacs.api("/instances", p.read_bytes()) for p in sorted(series.iterdir())]
        study, ct_series = uploaded[0]["ParentStudy"], uploaded[0]["ParentSeries"]
        answer = pacs.api(
            "/modalities/rtseg/store", json.dumps({"Resources": [ct_series], "Synchronous": True}).encode()
        )
        assert answer["InstancesCount"] == 24 and answer["FailedInstancesCount"] == 0

        def rtstruct_series() -> list[Any]:
            found = [pacs.api(f"/series/{s}") for s in pacs.api(f"/studies/{study}")["Series"]]
            return [s for s in found if s["MainDicomTags"].get("Modality") == "RTSTRUCT"]

        (rs_series,) = wait_for(rtstruct_series, 900, "the RTSTRUCT in Orthanc", interval=1.0)
        assert len(rs_series["Instances"]) == 1
        rs_path = tmp_path / "rs.dcm"
        rs_path.write_bytes(pacs.api(f"/instances/{rs_series['Instances'][0]}/file"))
        store = node.store()
        (job,) = store.list(source="dicom")
        wait_for(lambda: str(store.get(job.id).state) == "done", 60, "the job to be done")
        store.close()
        node.stop()
    finally:
        if node.proc is not None:
            node.stop()
        pacs.stop()
    check_rtstruct(rs_path, series, job.id)
    assert job.meta["calling_ae"] == "ORTHANC"
    assert pydicom.dcmread(rs_path).ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    assert no_patient_data(node.log()) == [] and no_patient_data(node.audit_text()) == []
    delivered = [e for e in node.audit() if e["event"] == "rtstruct_delivered"]
    assert [(e["destination"], e["ae_title"]) for e in delivered] == [("sender", "ORTHANC")]
