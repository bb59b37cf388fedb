"""The SCP in-process against real peers (dcmtk storescu/echoscu, pynetdicom SCUs, raw sockets).

No model here: these tests stop at the spool and the job queue.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from node_helpers import echoscu, no_patient_data, storescu, subset_series, wait_for
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, RTStructureSetStorage  # type: ignore[attr-defined]

from dicom_node.assembly import Assembler
from dicom_node.node import open_stores
from dicom_node.scp import Receiver, start_scp
from dicom_node.spool import Spool
from rtseg.audit import AuditLog
from rtseg.jobs import JobState
from rtseg.settings import Settings, load_settings

KEY_FILE = re.compile(r"^[0-9a-f]{24}\.dcm$")


class InProcessScp:
    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        base = {"RTSEG_DATA_DIR": str(data_dir), "RTSEG_DICOM_PORT": "0", "RTSEG_DICOM_HOST": "127.0.0.1"}
        base.update({"RTSEG_NODE_QUIET_TIME_S": "0.5", "RTSEG_NODE_MIN_FREE_DISK_MB": "10"})
        self.settings: Settings = load_settings(environ={**base, **env})
        self.data_dir = data_dir
        self.store, self.deliveries = open_stores(data_dir)
        self.audit = AuditLog(data_dir / "audit" / "audit.log")
        self.spool = Spool(data_dir / "spool", self.settings.node.min_free_disk_mb, self.audit)
        self.assembler = Assembler(self.store, self.spool, self.settings, self.audit)
        receiver = Receiver(
            self.spool,
            self.assembler,
            self.deliveries,
            self.audit,
            max_instance_bytes=self.settings.dicom.max_instance_bytes,
        )
        self.outcomes: list[str] = []  # association outcomes as the metrics observer sees them
        self.server = start_scp(self.settings.dicom, receiver, self.audit, self.outcomes.append)
        self.port = int(self.server.server_address[1])

    def complete(self) -> list[str]:
        time.sleep(self.settings.node.quiet_time_s + 0.1)
        return self.assembler.tick()

    def spooled(self) -> list[Path]:
        return sorted(p for p in (self.data_dir / "spool").rglob("*") if p.is_file())

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scp(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Any]:
    caplog.set_level(logging.DEBUG)
    made: list[InProcessScp] = []

    def make(**env: str) -> InProcessScp:
        made.append(InProcessScp(tmp_path / f"data{len(made)}", env))
        return made[-1]

    yield make
    for node in made:
        node.close()
    assert not no_patient_data(caplog.text), "patient data in the log"


@pytest.fixture(scope="module")
def small_series(phantom_ct96: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return subset_series(phantom_ct96, tmp_path_factory.mktemp("small") / "ct", 12)


def _raw_file(
    path: Path, sop_class: str, sop_instance: str, body: bytes, ts: str = ExplicitVRLittleEndian
) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ts
    buf = BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.write_bytes(buf.getvalue() + body)
    return path


def _encode(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _dataset(sop_class: str, sop: str, series: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = sop_class, sop, series
    ds.StudyInstanceUID = "1.2.3.4"
    ds.Modality = "CT"
    ds.PatientName, ds.PatientID = "PHANTOM^EVIL", "RTSEG-A_EVIL"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _send_raw(port: int, path: Path, monkeypatch: pytest.MonkeyPatch, aet: str = "BADPEER") -> int:
    """C-STORE the file's dataset bytes as they are (pynetdicom's chunked sending: no re-encoding)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    ae = AE(ae_title=aet)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="RTSEG")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    return int(status.Status)


def test_series_from_storescu_is_spooled_under_hashed_names_and_queued(scp: Any, small_series: Path) -> None:
    node = scp()
    assert echoscu(node.port) == 0
    assert storescu(small_series, node.port) == 0
    files = node.spooled()
    assert len(files) == 12
    assert all(KEY_FILE.match(p.name) for p in files)
    # the spool holds the bytes the peer sent: same pixel data, same UIDs
    uids = {pydicom.dcmread(p).SOPInstanceUID for p in files}
    assert uids == {pydicom.dcmread(p).SOPInstanceUID for p in small_series.iterdir()}
    (job_id,) = node.complete()
    job = node.store.get(job_id)
    assert job.state == JobState.QUEUED
    assert job.meta["n_instances"] == 12 and job.meta["calling_ae"] == "MODALITY"
    assert job.meta["destinations"] == []


def test_compressed_transfer_syntax_is_accepted_and_kept(
    scp: Any, small_series: Path, tmp_path: Path
) -> None:
    import subprocess

    src = sorted(small_series.iterdir())[0]
    jls = tmp_path / "jls.dcm"
    subprocess.run(["dcmcjpls", str(src), str(jls)], check=True)
    node = scp()
    assert storescu([jls], node.port, "RTSEG", "MODALITY", "-xt") == 0  # propose JPEG-LS lossless
    (stored,) = node.spooled()
    assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == JPEGLSLossless


def test_unknown_calling_ae_or_host_is_rejected(scp: Any, small_series: Path, caplog: Any) -> None:
    node = scp(RTSEG_DICOM_ALLOWED_CALLERS="MODALITY@127.0.0.1,PACS@10.9.9.9")
    assert echoscu(node.port, aet="MODALITY") == 0
    assert echoscu(node.port, aet="INTRUDER") != 0
    assert echoscu(node.port, aet="PACS") != 0  # known AE title, wrong host
    assert storescu(small_series, node.port, aet="INTRUDER") != 0
    assert node.spooled() == []
    assert "association rejected: calling AE INTRUDER from 127.0.0.1 is not allowed" in caplog.text
    events = [e["event"] for e in node.audit.entries()]
    assert events.count("association_rejected") == 3


def test_malformed_dataset_gets_cannot_understand(scp: Any, tmp_path: Path, monkeypatch: Any) -> None:
    node = scp()
    garbage = _raw_file(
        tmp_path / "bad.dcm", CTImageStorage, "1.2.3.4.5", b"\x08\x00\x18\x00UI\xff\xff" + b"x" * 50
    )
    assert _send_raw(node.port, garbage, monkeypatch) == 0xC000
    truncated = _encode(_dataset(CTImageStorage, "1.2.3.4.6", "1.2.3.9"))[:-7]
    assert _send_raw(
        node.port, _raw_file(tmp_path / "t.dcm", CTImageStorage, "1.2.3.4.6", truncated), monkeypatch
    ) in (
        0xC000,
        0x0000,  # a cut inside the last value may still parse; then it must be stored safely
    )
    assert echoscu(node.port) == 0
    assert all(p.is_relative_to(node.data_dir) for p in node.spooled())


def test_wrong_sop_class_in_dataset_gets_mismatch(scp: Any, tmp_path: Path, monkeypatch: Any) -> None:
    node = scp()
    body = _encode(_dataset(MRImageStorage, "1.2.3.4.7", "1.2.3.10"))
    path = _raw_file(tmp_path / "mr.dcm", CTImageStorage, "1.2.3.4.7", body)
    assert _send_raw(node.port, path, monkeypatch) == 0xA900
    assert node.spooled() == []


def test_unsupported_sop_class_has_no_presentation_context(scp: Any) -> None:
    node = scp()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="RTSEG")
    assert not assoc.is_established  # the only proposed context was refused: no association
    assert echoscu(node.port) == 0


@pytest.mark.parametrize(
    ("sop", "series"),
    [
        ("1.2.3.4.9", "../../../../tmp/rtseg-evil"),
        ("../../rtseg-evil", "1.2.3.12"),
        ("1.2.03.4", "1.2.3.13"),  # leading zero: not a conformant UID
        ("1.2.3.4.10", "1.2.3.x"),
    ],
)
def test_crafted_uids_get_a_failure_and_write_nothing(
    scp: Any, tmp_path: Path, monkeypatch: Any, sop: str, series: str
) -> None:
    node = scp()
    path = _raw_file(
        tmp_path / "evil.dcm", CTImageStorage, sop, _encode(_dataset(CTImageStorage, sop, series))
    )
    assert _send_raw(node.port, path, monkeypatch) == 0xC000
    assert node.spooled() == []
    assert not list(Path("/tmp").glob("rtseg-evil*"))
    assert not list(tmp_path.parent.glob("rtseg-evil*"))


def test_aborted_association_keeps_what_was_acknowledged(scp: Any, small_series: Path) -> None:
    node = scp()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="RTSEG")
    files = sorted(small_series.iterdir())
    statuses = [assoc.send_c_store(pydicom.dcmread(p)).Status for p in files[:3]]
    assoc.abort()
    assert statuses == [0, 0, 0]
    assert echoscu(node.port) == 0
    assert len(node.spooled()) == 3
    (job_id,) = node.complete()  # 3 slices: below the minimum slice count, never segmented
    job = node.store.get(job_id)
    assert job.state == JobState.SKIPPED and "3 slices" in str(job.error)
    assert node.spooled() == []


def test_huge_pdu_closes_the_connection_and_the_node_carries_on(scp: Any) -> None:
    node = scp(RTSEG_DICOM_MAX_PDU="65536")
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0) + b"\0" * 1000)
        try:
            closed = sock.recv(100) == b""
        except ConnectionResetError:
            closed = True
    assert closed and time.monotonic() - started < 5
    assert echoscu(node.port) == 0


def test_endless_garbage_and_half_pdus_do_not_hang_the_node(scp: Any) -> None:
    node = scp()
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(b"\x07" + b"\xff" * 5000)  # unknown PDU type 0x07 with nonsense
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(b"\x01\x00")  # half a header, then close
    assert echoscu(node.port) == 0


def test_low_disk_answers_out_of_resources(scp: Any, small_series: Path) -> None:
    node = scp(RTSEG_NODE_MIN_FREE_DISK_MB=str(10**9))  # a petabyte: never available
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="RTSEG")
    status = assoc.send_c_store(pydicom.dcmread(next(small_series.iterdir())))
    assoc.release()
    assert status.Status == 0xA700
    assert node.spooled() == []


def _c_store(port: int, path: Path) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="RTSEG")
    status = assoc.send_c_store(pydicom.dcmread(path))
    assoc.release()
    return int(status.Status)


def test_the_rest_of_a_completed_series_opens_a_superseding_job(scp: Any, small_series: Path) -> None:
    node = scp()  # default policy: supersede
    files = sorted(small_series.iterdir())
    assert storescu(files[:11], node.port) == 0
    (first,) = node.complete()
    assert _c_store(node.port, files[11]) == 0x0000
    assert _c_store(node.port, files[0]) == 0x0000  # sent again: kept once, opens nothing
    (second,) = node.complete()
    first_job, second_job = node.store.get(first), node.store.get(second)
    assert len(first_job.meta["instances"]) == 11 and len(second_job.meta["instances"]) == 12
    assert second_job.state == JobState.QUEUED and second_job.meta["supersedes"] == first
    assert len(node.spooled()) == 12 and len(node.store.list()) == 2
    (event,) = [e for e in node.audit.entries() if e["event"] == "series_superseded"]
    assert event["supersedes"] == first and event["instances"] == 12 and event["earlier_instances"] == 11


def test_an_instance_resent_with_other_content_after_completion_is_audited(
    scp: Any, small_series: Path, tmp_path: Path
) -> None:
    """Kept once (the segmented copy stays), but other content under its UID is never silent."""
    node = scp()
    files = sorted(small_series.iterdir())
    assert storescu(files, node.port) == 0
    node.complete()
    changed = pydicom.dcmread(files[0])
    changed.SeriesDescription = "CHANGED"  # same SOP Instance UID, other content
    changed.save_as(tmp_path / "changed.dcm")
    assert _c_store(node.port, tmp_path / "changed.dcm") == 0x0000
    node.complete()
    segmented, record = node.store.list()  # nothing new to segment: recorded as a duplicate
    assert record.state == JobState.SKIPPED and record.meta["duplicate_of"] == segmented.id
    (event,) = [e for e in node.audit.entries() if e["event"] == "duplicate_instance_differs"]
    assert event["kind"] == "ct" and event["action"] == "ignored"
    kept = [p for p in node.spooled() if pydicom.dcmread(p).SOPInstanceUID == changed.SOPInstanceUID]
    assert [pydicom.dcmread(p).get("SeriesDescription") for p in kept] != ["CHANGED"]


@pytest.mark.parametrize("policy", ["flag", "reject"])
def test_late_instances_flagged_or_rejected_open_no_second_job(
    scp: Any, small_series: Path, policy: str
) -> None:
    node = scp(RTSEG_NODE_LATE_INSTANCE_POLICY=policy)
    files = sorted(small_series.iterdir())
    assert storescu(files[:11], node.port) == 0
    (job_id,) = node.complete()
    assert _c_store(node.port, files[11]) == (0x0000 if policy == "flag" else 0xC000)
    node.complete()
    assert len(node.store.list()) == 1
    job = node.store.get(job_id)
    assert job.meta["n_instances"] == 11 and len(job.meta["instances"]) == 11
    assert len(node.spooled()) == (12 if policy == "flag" else 11)  # flagged: kept, never lost
    assert job.meta.get("late_instances") == (1 if policy == "flag" else None)
    events = [e["event"] for e in node.audit.entries()]
    assert ("late_instances_flagged" in events) == (policy == "flag")


def test_an_instance_arriving_during_completion_strands_no_series(scp: Any, small_series: Path) -> None:
    """Force the interleaving a review found: a C-STORE for series A while A is being completed."""
    from dicom_node.node import Loop

    node = scp()
    other = subset_series(small_series, small_series.parent.parent / "other", 11, uid_tag="race-b")
    files = sorted(small_series.iterdir())
    assert storescu(files[:11], node.port) == 0
    a_key = node.store.list()[0].series_key
    instances = node.spool.instances
    stored: list[int] = []
    during: list[list[int]] = []  # what the C-STORE had got while A's completion was in progress

    def store_during_completion(kind: str, series_key: str) -> list[Path]:
        if series_key == a_key and not stored:  # A's completion has begun: A's last slice arrives
            sender = threading.Thread(target=lambda: stored.append(_c_store(node.port, files[11])))
            sender.start()
            sender.join(2.0)  # returns at once if nothing waits for the completion to finish
            during.append(list(stored))
            node.spool.instances = instances  # type: ignore[method-assign]
        return instances(kind, series_key)

    node.spool.instances = store_during_completion  # type: ignore[method-assign]
    time.sleep(node.settings.node.quiet_time_s + 0.1)
    assert [node.store.get(j).series_key for j in node.assembler.tick()] == [a_key]
    assert storescu(other, node.port) == 0  # series B, due in the same tick as A's reopened entry
    loop = Loop("test-assembly", node.assembler.tick, 0.1)  # as the node runs it
    loop.start()
    try:
        wait_for(lambda: stored == [0], 10, "the C-STORE during completion")
        wait_for(
            lambda: len(node.store.list()) == 3 and not node.store.list({JobState.RECEIVED}),
            10,
            "every series to be completed",
        )
    finally:
        loop.stop()
    by_size = sorted(len(j.meta.get("instances", ())) for j in node.store.list())
    assert by_size == [11, 11, 12]  # A's first generation, B, and A complete with its last slice
    assert during == [[]]  # the C-STORE waited for A's completion instead of reopening it


def test_rtstruct_is_spooled_and_recorded(scp: Any) -> None:
    node = scp()
    ds = _dataset(RTStructureSetStorage, "1.2.3.4.20", "1.2.3.21")
    ds.Modality = "RTSTRUCT"
    ae = AE(ae_title="PLANNING")
    ae.add_requested_context(RTStructureSetStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="RTSEG")
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0
    (stored,) = node.spooled()
    assert stored.parent.parent.name == "rtstruct" and KEY_FILE.match(stored.name)
    assert node.deliveries.count_objects("rtstruct") == 1
    assert node.store.list() == []  # not a segmentation job
    assert wait_for(lambda: "rtstruct_received" in [e["event"] for e in node.audit.entries()], 5, "audit")


def test_node_echo_command(scp: Any, tmp_path: Path) -> None:
    import subprocess
    import sys

    node = scp()
    config = tmp_path / "echo.toml"
    config.write_text(
        f'[dicom]\nport = {node.port}\n[[destinations]]\nname = "self"\nae_title = "RTSEG"\n'
        f'host = "127.0.0.1"\nport = {node.port}\n[[destinations]]\nname = "down"\nae_title = "X"\n'
        'host = "127.0.0.1"\nport = 1\n'
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "rtseg_app", "node", "echo", "--config", str(config), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    own, down = run(), run("--destination", "down")
    assert own.returncode == 0 and re.search(rf"RTSEG@127.0.0.1:{node.port}: success in \d+ ms", own.stdout)
    assert down.returncode == 1 and "C-ECHO X@127.0.0.1:1: FAILED" in down.stdout


def test_association_outcomes_reach_the_prometheus_counter(scp: Any) -> None:
    from prometheus_client import generate_latest

    from service.telemetry import Telemetry

    node = scp(RTSEG_DICOM_ALLOWED_CALLERS="MODALITY@127.0.0.1")
    telemetry = Telemetry()  # what rtseg serve hands the node: the HTTP service's /metrics registry
    assert echoscu(node.port, aet="MODALITY") == 0
    assert echoscu(node.port, aet="INTRUDER") != 0
    wait_for(lambda: len(node.outcomes) >= 2, 10, "association outcomes")
    assert sorted(node.outcomes) == ["accepted", "rejected"]
    for outcome in node.outcomes:
        telemetry.dicom_associations.labels(outcome).inc()
    text = generate_latest(telemetry.registry).decode()
    assert 'rtseg_dicom_associations_total{outcome="accepted"} 1.0' in text
    assert 'rtseg_dicom_associations_total{outcome="rejected"} 1.0' in text


# -- memory bounds on one instance ---------------------------------------------------------------
BOMB_MB = 256  # what the Deflate bomb inflates to; the node's bound is set to 8 MB below


def _send_files(port: int, files: list[tuple[Path, str]], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """C-STORE each (file, transfer syntax) as encoded, on one association; the statuses."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # sends the bytes, never decodes
    ae = AE(ae_title="MODALITY")
    for syntax in {s for _, s in files}:
        ae.add_requested_context(CTImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="RTSEG")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(path).Status) for path, _ in files]
    finally:
        assoc.release()


def test_deflate_bomb_is_refused_in_bounded_memory_and_the_node_carries_on(
    scp: Any, small_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    from dicom_bombs import peak_rss_mb, reset_peak_rss, write_deflate_bomb

    node = scp(RTSEG_DICOM_MAX_INSTANCE_MB="8")
    bomb = write_deflate_bomb(tmp_path / "bomb.dcm", BOMB_MB, "1.2.826.0.1.3680043.10.1234.2.1", "1.2.3.9")
    normal = next(small_series.iterdir())
    assert bomb.stat().st_size < 1 << 20
    reset_peak_rss()
    before = peak_rss_mb()
    sent = [(bomb, DeflatedExplicitVRLittleEndian), (normal, ExplicitVRLittleEndian)]
    statuses = _send_files(node.port, sent, monkeypatch)
    grown = peak_rss_mb() - before
    assert grown < 64, f"peak memory grew by {grown:.0f} MB receiving a {BOMB_MB} MB Deflate bomb"
    assert statuses == [0xC000, 0x0000]
    assert len(node.spooled()) == 1  # the normal slice only
    assert "inflates to more than 8 MB" in caplog.text


def test_sequences_nested_past_the_recursion_limit_are_refused_and_the_next_is_stored(
    scp: Any, small_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    from dicom_bombs import write_nested_sequences

    node = scp()
    nested = write_nested_sequences(
        tmp_path / "nested.dcm", 100_000, "1.2.826.0.1.3680043.10.1234.5.1", "1.2.3.13"
    )
    normal = next(small_series.iterdir())
    sent = [(nested, ExplicitVRLittleEndian), (normal, ExplicitVRLittleEndian)]
    statuses = _send_files(node.port, sent, monkeypatch)
    assert statuses == [0xC000, 0x0000]
    assert len(node.spooled()) == 1  # the normal slice only
    assert "sequences nested deeper than" in caplog.text and "Traceback" not in caplog.text


def test_plain_instance_over_the_bound_is_out_of_resources_and_the_next_is_stored(
    scp: Any, small_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    from dicom_bombs import peak_rss_mb, reset_peak_rss, write_plain_instance

    node = scp(RTSEG_DICOM_MAX_INSTANCE_MB="8", RTSEG_DICOM_MAX_PDU="262144")  # PDUs: small next to 8 MB
    big = write_plain_instance(tmp_path / "big.dcm", 40, "1.2.826.0.1.3680043.10.1234.3.1", "1.2.3.10")
    normal = next(small_series.iterdir())
    reset_peak_rss()
    before = peak_rss_mb()
    sent = [(big, ExplicitVRLittleEndian), (normal, ExplicitVRLittleEndian)]
    statuses = _send_files(node.port, sent, monkeypatch)
    grown = peak_rss_mb() - before
    assert grown < 32, f"peak memory grew by {grown:.0f} MB receiving a 40 MB instance (bound 8 MB)"
    assert statuses == [0xA700, 0x0000]
    assert len(node.spooled()) == 1
    assert "larger than the limit of 8 MB" in caplog.text


# -- completion when the sender releases the association ---------------------------------------
RELEASED_12 = "association released, 12 slices, no gap"


@contextmanager
def _ticking(node: InProcessScp) -> Iterator[None]:
    """The assembly tick running in the background, as ``rtseg serve`` runs it."""
    from dicom_node.node import Loop

    loop = Loop("test-assembly", node.assembler.tick, 0.1)
    loop.start()
    try:
        yield
    finally:
        loop.stop()


def _queued(node: InProcessScp) -> list[Any]:
    return node.store.list({JobState.QUEUED})


def _completions(node: InProcessScp) -> list[str]:
    """Why each completed series was completed, as its ``series_queued`` audit record says."""
    return [str(e.get("completed")) for e in node.audit.entries() if e["event"] == "series_queued"]


def _copy(series: Path, out: Path, tag: str, drop: int | None = None) -> list[Path]:
    """``series`` under new UIDs (another series), without slice ``drop`` (a gap) if given."""
    files = sorted(subset_series(series, out, len(list(series.iterdir())), uid_tag=tag).iterdir())
    return [f for i, f in enumerate(files) if i != drop]


def _send_assoc(port: int, files: list[Path]) -> Any:
    """An open association that has stored ``files`` (each acknowledged with success)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="RTSEG")
    assert assoc.is_established
    assert [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in files] == [0] * len(files)
    return assoc


def test_a_whole_series_from_storescu_completes_when_it_releases(scp: Any, small_series: Path) -> None:
    node = scp(RTSEG_NODE_QUIET_TIME_S="60")  # only the release can complete it within the test
    with _ticking(node):
        assert storescu(small_series, node.port) == 0  # dcmtk releases the association normally
        sent = time.monotonic()
        (job,) = wait_for(lambda: _queued(node), 20, "the series to be queued on release")
    assert time.monotonic() - sent < 20 and job.meta["n_instances"] == 12
    assert _completions(node) == [RELEASED_12]


def test_on_one_association_the_whole_series_completes_and_the_one_with_a_gap_waits(
    scp: Any, small_series: Path, tmp_path: Path
) -> None:
    node = scp(RTSEG_NODE_QUIET_TIME_S="8")
    gap = _copy(small_series, tmp_path / "gap", "release-gap", drop=5)
    with _ticking(node):
        _send_assoc(node.port, [*sorted(small_series.iterdir()), *gap]).release()
        released = time.monotonic()
        (whole,) = wait_for(lambda: _queued(node), 6, "the whole series to be queued")
        assert time.monotonic() - released < 6 and whole.meta["n_instances"] == 12
        assert [j.state for j in node.store.list({JobState.RECEIVED})] == [JobState.RECEIVED]
        wait_for(lambda: len(_queued(node)) == 2, 20, "the series with a gap after the quiet time")
    assert time.monotonic() - released >= 8
    assert _completions(node) == [RELEASED_12, "quiet for 8 s"]


def test_a_series_sent_on_two_associations_waits_for_the_quiet_time(scp: Any, small_series: Path) -> None:
    node = scp(RTSEG_NODE_QUIET_TIME_S="4")
    files = sorted(small_series.iterdir())
    with _ticking(node):
        first = _send_assoc(node.port, files[:6])  # stays open: more may come on it
        _send_assoc(node.port, files[6:]).release()
        first.release()
        released = time.monotonic()
        time.sleep(2.0)
        assert _queued(node) == []
        (job,) = wait_for(lambda: _queued(node), 20, "the series after the quiet time")
    assert time.monotonic() - released >= 4
    assert job.meta["n_instances"] == 12 and _completions(node) == ["quiet for 4 s"]


def test_a_sender_with_one_association_per_instance_is_not_cut_short(scp: Any, small_series: Path) -> None:
    """Each release leaves a whole stack (slices 1..n, no gap); only the quiet time may end the series."""
    node = scp(RTSEG_NODE_QUIET_TIME_S="4", RTSEG_NODE_RELEASE_GRACE_S="0")
    with _ticking(node):
        for f in sorted(small_series.iterdir(), key=_position):
            _send_assoc(node.port, [f]).release()
            time.sleep(0.3)  # several ticks between two associations
        (job,) = wait_for(lambda: _queued(node), 20, "the series after the quiet time")
    assert job.meta["n_instances"] == 12 and _completions(node) == ["quiet for 4 s"]
    assert node.store.list({JobState.RECEIVED}) == []


def _position(path: Path) -> float:
    return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])


def _abort(port: int, files: list[Path]) -> None:
    _send_assoc(port, files).abort()


def _drop(port: int, files: list[Path]) -> None:
    """The connection closes without a release or an abort (a crashed sender)."""
    assoc = _send_assoc(port, files)
    assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
    assoc.abort()  # what pynetdicom has left to do on its side; the peer sees only the closed socket


def _release_with_gap(port: int, files: list[Path]) -> None:
    _send_assoc(port, files[:5] + files[6:]).release()


@pytest.mark.parametrize(
    ("send", "env"),
    [
        (_release_with_gap, {}),
        (_abort, {}),
        (_drop, {}),
        (lambda port, files: _send_assoc(port, files).release(), {"RTSEG_NODE_COMPLETE_ON_RELEASE": "false"}),
    ],
    ids=["released-with-a-gap", "aborted", "connection-dropped", "complete_on_release-false"],
)
def test_the_quiet_time_completes_what_a_release_cannot(
    scp: Any, small_series: Path, send: Any, env: dict[str, str]
) -> None:
    node = scp(RTSEG_NODE_QUIET_TIME_S="4", **env)
    with _ticking(node):
        send(node.port, sorted(small_series.iterdir()))
        ended = time.monotonic()
        time.sleep(2.0)
        assert _queued(node) == [] and len(node.store.list({JobState.RECEIVED})) == 1
        wait_for(lambda: _queued(node), 20, "the quiet time")
    assert time.monotonic() - ended >= 4 and _completions(node) == ["quiet for 4 s"]


def test_a_straggler_after_completion_on_release_opens_a_superseding_job(
    scp: Any, phantom_ct96: Path, tmp_path: Path
) -> None:
    node = scp(RTSEG_NODE_QUIET_TIME_S="60")  # default policy: supersede
    files = sorted(subset_series(phantom_ct96, tmp_path / "s13", 13, uid_tag="straggler").iterdir())
    with _ticking(node):
        assert storescu(files[1:], node.port) == 0  # a whole stack of 12: completed on release
        (first,) = wait_for(lambda: _queued(node), 20, "the first 12 slices on release")
        assert _c_store(node.port, files[0]) == 0x0000  # the straggler, below the stack
        (second,) = wait_for(
            lambda: [j for j in _queued(node) if j.id != first.id], 20, "the superseding job"
        )
    assert len(first.meta["instances"]) == 12 and len(second.meta["instances"]) == 13
    assert second.meta["supersedes"] == first.id
    (event,) = [e for e in node.audit.entries() if e["event"] == "series_superseded"]
    assert (event["supersedes"], event["instances"], event["earlier_instances"]) == (first.id, 13, 12)
    assert _completions(node) == [RELEASED_12, "association released, 13 slices, no gap"]
