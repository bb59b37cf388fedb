"""C-GET from a hostile PACS is bounded: one instance, instances and bytes per retrieval.

The PACS is a pynetdicom Query/Retrieve SCP written here: it answers C-FIND with
four structure sets and, on C-GET, sends an oversize instance, too many
instances, too many bytes in all, or one honest (unapproved) structure set. The
import skips each hostile item with the limit it broke, never has more than
the bounds on disk, and goes on with the next item.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    RTStructureSetStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from rtseg.net import free_port

MB = 1 << 20
STUDY = "1.2.826.0.1.3680043.10.999.1"
# per series: how many instances its C-GET sends, of what padding, with which ApprovalStatus
PLAN = {
    "oversize": (1, 3 * MB, "APPROVED"),  # over max_instance_mb = 1
    "many": (6, 1000, "APPROVED"),  # over retrieve_max_instances = 3
    "heavy": (3, 800_000, "APPROVED"),  # each under 1 MB, 2.4 MB in all: over retrieve_max_mb = 2
    "honest": (1, 1000, "UNAPPROVED"),
}
LIMITS = {
    "RTSEG_DICOM_MAX_INSTANCE_MB": "1",
    "RTSEG_DICOM_RETRIEVE_MAX_INSTANCES": "3",
    "RTSEG_DICOM_RETRIEVE_MAX_MB": "2",
}


def _rtstruct(series: str, padding: int, approval: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = STUDY, series, "RTSTRUCT"
    ds.StructureSetLabel, ds.ApprovalStatus = "PLAN", approval
    ds.add_new(0x00090010, "LO", "HOSTILE")  # a private block carries the bulk
    ds.add_new(0x00091010, "OB", b"\0" * padding)
    return ds


class HostilePacs:
    """C-FIND: one study, one RTSTRUCT series per :data:`PLAN` entry; C-GET: what the plan says."""

    def __init__(self, staging: Path) -> None:
        self.staging = staging
        self.series = {name: f"{STUDY}.{k + 1}" for k, name in enumerate(PLAN)}
        self.sops = {name: f"{uid}.1" for name, uid in self.series.items()}
        self.on_disk: list[tuple[int, int]] = []  # (files, bytes) staged before each instance sent
        self.sent: dict[str, int] = {}
        self.port = free_port()
        ae = AE(ae_title="HOSTILE")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_supported_context(RTStructureSetStorage, scu_role=True, scp_role=True)
        handlers = [(evt.EVT_C_FIND, self.find), (evt.EVT_C_GET, self.get)]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        level = event.identifier.QueryRetrieveLevel
        for name, series in self.series.items():
            ds = Dataset()
            ds.QueryRetrieveLevel, ds.StudyInstanceUID = level, STUDY
            if level == "SERIES":
                ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber = series, "RTSTRUCT", "1"
            elif level == "IMAGE":
                if event.identifier.SeriesInstanceUID != series:
                    continue
                ds.SeriesInstanceUID, ds.SOPInstanceUID = series, self.sops[name]
            yield 0xFF00, ds
            if level == "STUDY":
                break
        yield 0x0000, None

    def get(self, event: evt.Event) -> Iterator[int | tuple[int, Dataset | None]]:
        name = next(n for n, uid in self.sops.items() if uid == event.identifier.SOPInstanceUID)
        count, padding, approval = PLAN[name]
        yield count
        for _ in range(count):
            if event.assoc.is_aborted:
                return
            files = [p for p in self.staging.rglob("*") if p.is_file()]
            self.on_disk.append((len(files), sum(p.stat().st_size for p in files)))
            self.sent[name] = self.sent.get(name, 0) + 1
            yield 0xFF00, _rtstruct(self.series[name], padding, approval)

    def stop(self) -> None:
        self.server.shutdown()


def test_a_hostile_pacs_cannot_make_a_retrieval_write_past_its_bounds(tmp_path: Path) -> None:
    out = tmp_path / "cases"
    pacs = HostilePacs(out / ".rtseg-import" / "staging")
    try:
        run = subprocess.run(
            [sys.executable, "-m", "rtseg_app", "cases", "import", "--pacs", f"HOSTILE@127.0.0.1:{pacs.port}"]
            + ["--calling-ae", "RTSEG-IMPORT", "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **LIMITS},
        )
    finally:
        pacs.stop()
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("[")]
    over = "skipped: retrieval over a limit"
    assert lines[0].endswith(f"{over} (an instance larger than 1 MB ([dicom] max_instance_mb))"), lines
    assert lines[1].endswith(f"{over} (more than 3 instances ([dicom] retrieve_max_instances))"), lines
    assert lines[2].endswith(f"{over} (more than 2 MB in all ([dicom] retrieve_max_mb))"), lines
    assert lines[3].endswith("skipped: not approved (UNAPPROVED, label 'PLAN')"), lines  # the run went on
    assert re.search(r"^  retrieval over a limit +3$", run.stdout, re.MULTILINE), run.stdout
    # the PACS sent past the bounds, yet never more was on disk than they allow
    assert pacs.sent["many"] > 3 and pacs.sent["heavy"] == 3
    assert max(files for files, _ in pacs.on_disk) <= 3
    assert max(size for _, size in pacs.on_disk) <= 2 * MB
    assert not [p for p in (out / ".rtseg-import" / "staging").rglob("*") if p.is_file()]
    assert not [p for p in out.iterdir() if not p.name.startswith(".")]  # no case
    assert "Traceback" not in run.stderr and STUDY not in run.stdout + run.stderr


def test_the_client_reports_an_oversize_instance_and_keeps_none_of_it(tmp_path: Path) -> None:
    """Through the API: the item fails with the bound it broke; a later item on the same client is fine."""
    from dicom_node.qr import FoundRtstruct, Pacs, QueryRetrieve, RetrieveLimits

    pacs = HostilePacs(tmp_path / "staging")
    limits = RetrieveLimits(instance_bytes=MB, instances=3, total_bytes=2 * MB)
    try:
        qr = QueryRetrieve(Pacs.parse(f"HOSTILE@127.0.0.1:{pacs.port}"), "RTSEG", 10, limits)
        item = FoundRtstruct(STUDY, pacs.series["oversize"], pacs.sops["oversize"])
        got = qr.get_instance(item, tmp_path / "staging" / "x")
        honest = qr.get_instance(
            FoundRtstruct(STUDY, pacs.series["honest"], pacs.sops["honest"]), tmp_path / "staging" / "y"
        )
    finally:
        pacs.stop()
    assert (got.files, got.over_limit) == (0, True)
    assert got.problem == "an instance larger than 1 MB ([dicom] max_instance_mb)"
    assert not list((tmp_path / "staging" / "x").iterdir())
    assert (honest.files, honest.problem, honest.over_limit) == (1, "", False)


@pytest.mark.parametrize("key", ["retrieve_max_instances", "retrieve_max_mb"])
def test_the_retrieve_bounds_are_settings_with_one_error_style(key: str) -> None:
    from rtseg.errors import InputError
    from rtseg.settings import load_settings

    assert load_settings(environ={f"RTSEG_DICOM_{key.upper()}": "7"}).dicom.__dict__[key] == 7
    with pytest.raises(InputError, match=f"dicom.{key}"):
        load_settings(environ={f"RTSEG_DICOM_{key.upper()}": "0"})
