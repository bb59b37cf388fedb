"""DICOM SEG delivery: a destination with ``formats = ["rtstruct", "seg"]`` gets both objects.

`rtseg serve` runs as a real process with the default model; two dcmtk
storescp processes are the destinations, one asking for both formats, one
left at the default (the RTSTRUCT alone).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from node_helpers import Storescp, storescu, subset_series, wait_for

from rtseg.worker import rtstruct_uids, seg_uids


@pytest.fixture(scope="module")
def series(phantom_ct96: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return subset_series(phantom_ct96, tmp_path_factory.mktemp("series") / "ct", 24, uid_tag="seg")


def _destination(name: str, scp: Storescp, **extra: Any) -> dict[str, Any]:
    return {"name": name, "ae_title": scp.ae_title, "host": "127.0.0.1", "port": scp.port, **extra}


def test_a_destination_asking_for_seg_receives_rtstruct_and_seg(
    running_node: Any, series: Path, tmp_path: Path
) -> None:
    both = Storescp(tmp_path / "pacs", "PACS").start()
    default = Storescp(tmp_path / "tps", "TPS").start()
    try:
        node = running_node(
            [_destination("pacs", both, formats=["rtstruct", "seg"]), _destination("tps", default)]
        )
        assert storescu(series, node.port) == 0
        wait_for(lambda: len(both.received()) >= 2 and default.received(), 600, "both deliveries")
        wait_for(lambda: node.states() == ["done"], 60, "the job to be done")
        received, tps = both.received(), default.received()
    finally:
        both.stop()
        default.stop()
    job = node.store().list()[0]
    ct = pydicom.dcmread(next(series.iterdir()))
    assert sorted(ds.Modality for ds in received) == ["RTSTRUCT", "SEG"]
    assert [ds.Modality for ds in tps] == ["RTSTRUCT"]  # the default is unchanged
    seg = next(ds for ds in received if ds.Modality == "SEG")
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage
    assert seg.SOPInstanceUID == seg_uids(job.id)[1]
    assert seg.StudyInstanceUID == ct.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.SeriesInstanceUID
    assert seg.SeriesInstanceUID not in (ct.SeriesInstanceUID, rtstruct_uids(job.id)[0])
    assert job.model_version in seg.SeriesDescription
    assert {item.SegmentLabel for item in seg.SegmentSequence} >= {"External", "Liver"}
    seg_file = next(p for p in (tmp_path / "pacs").iterdir() if pydicom.dcmread(p).Modality == "SEG")
    check = subprocess.run(["dciodvfy", str(seg_file)], capture_output=True, text=True)
    assert [line for line in (check.stdout + check.stderr).splitlines() if "Error" in line] == []
    delivered = {e["destination"]: e for e in node.audit() if e["event"] == "rtstruct_delivered"}
    assert "seg" in delivered["pacs"] and "seg" not in delivered["tps"]
    assert "SEG delivered to pacs" in node.log()
