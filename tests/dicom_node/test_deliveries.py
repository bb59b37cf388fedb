"""Deliveries: one destination's trouble never delays another's; dead letters are retried by the operator."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from node_helpers import Storescp, wait_for
from pynetdicom.sop_class import RTStructureSetStorage  # type: ignore[attr-defined]
from test_scp import _dataset

from dicom_node.node import Loop, open_stores
from dicom_node.scu import Sender
from rtseg.audit import AuditLog
from rtseg.deliveries import PENDING
from rtseg.jobs import Job, JobState, JobStore
from rtseg.settings import NodeSettings, TlsSettings


class HungListener:
    """A loopback TCP server that accepts every connection and never answers (a hung destination)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed by close()
                return
            self.accepted.append(conn)  # read nothing, answer nothing

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def _sending_job(store: JobStore, data_dir: Path, n: int, destinations: list[dict[str, Any]]) -> Job:
    """A job whose RTSTRUCT is written and waits for its deliveries."""
    job = store.create("dicom", f"series{n}", f"spool/ct/series{n}", state=JobState.SENDING)
    out = Path("jobs") / job.id / "rtstruct.dcm"
    (data_dir / out).parent.mkdir(parents=True)
    ds = _dataset(RTStructureSetStorage, f"1.2.3.4.4{n}", f"1.2.3.4{n}")
    ds.Modality = "RTSTRUCT"
    ds.save_as(data_dir / out, enforce_file_format=True)
    return store.update(job.id, output_path=str(out), meta={"destinations": destinations})


def _sender(data_dir: Path, **node: Any) -> tuple[Sender, JobStore, Any, AuditLog]:
    store, deliveries = open_stores(data_dir)
    audit = AuditLog(data_dir / "audit" / "audit.log")
    sender = Sender(store, deliveries, data_dir, "RTSEG", NodeSettings(**node), TlsSettings(), audit)
    return sender, store, deliveries, audit


def test_a_hung_destination_does_not_delay_the_others(tmp_path: Path) -> None:
    hung = HungListener()
    good = Storescp(tmp_path / "received").start()
    sender, store, deliveries, _ = _sender(tmp_path / "data")
    destinations = [
        {"name": "a-hung", "ae_title": "HUNG", "host": "127.0.0.1", "port": hung.port, "tls": False},
        {"name": "b-good", "ae_title": "DEST", "host": "127.0.0.1", "port": good.port, "tls": False},
    ]
    jobs = [_sending_job(store, tmp_path / "data", n, destinations) for n in (1, 2)]
    loop = Loop("sender-test", sender.run_once, 0.2)
    started = time.monotonic()
    loop.start()
    try:
        wait_for(lambda: len(good.received()) == 2, 5, "both RTSTRUCTs at the good destination")
        elapsed = time.monotonic() - started
        hung_rows = [r for job in jobs for r in deliveries.for_job(job.id) if r.destination == "a-hung"]
        still_stuck = bool(hung.accepted) and all(r.state == PENDING and r.attempts == 0 for r in hung_rows)
    finally:
        loop.stop()
        hung.close()
        sender.stop()
        good.stop()
    assert elapsed < 5
    assert still_stuck  # the hung destination had the first association and is still waiting
    assert [s.SOPInstanceUID for s in good.received()] == ["1.2.3.4.41", "1.2.3.4.42"]


def _rtseg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rtseg_app", *args], capture_output=True, text=True)


def test_node_retry_requeues_dead_letters_and_the_delivery_then_succeeds(
    tmp_path: Path, free_port: int
) -> None:
    data = tmp_path / "data"
    port = free_port  # nothing listens here yet
    config = tmp_path / "node.toml"
    config.write_text(f'[paths]\ndata_dir = "{data}"\n')
    sender, store, deliveries, audit = _sender(data, retry_limit=1)
    dest = {"name": "tps", "ae_title": "DEST", "host": "127.0.0.1", "port": port, "tls": False}
    jobs = [_sending_job(store, data, n, [dest]) for n in (1, 2)]
    sender.run_once()
    sender.stop()
    sender.run_once()  # settles: both jobs are dead letters
    assert [store.get(j.id).state for j in jobs] == [JobState.DEAD_LETTER] * 2

    unknown = _rtseg("node", "retry", "--config", str(config), "nosuchjob")
    assert unknown.returncode == 2 and "no job 'nosuchjob'" in unknown.stdout + unknown.stderr
    one = _rtseg("node", "retry", "--config", str(config), jobs[0].id)
    assert one.returncode == 0, one.stdout + one.stderr
    assert f"requeued job {jobs[0].id} → tps" in one.stdout
    assert [store.get(j.id).state for j in jobs] == [JobState.SENDING, JobState.DEAD_LETTER]

    dest_scp = Storescp(tmp_path / "received")
    dest_scp.port = port
    dest_scp.start()
    try:
        rest = _rtseg("node", "retry", "--config", str(config))  # all the others
        assert rest.returncode == 0 and f"requeued job {jobs[1].id} → tps" in rest.stdout
        assert jobs[0].id not in rest.stdout  # already requeued: nothing left to retry for it
        loop = Loop("sender-test", sender.run_once, 0.2)
        loop.start()
        try:
            wait_for(lambda: all(store.get(j.id).state == JobState.DONE for j in jobs), 20, "both jobs done")
        finally:
            loop.stop()
            sender.stop()
        assert len(dest_scp.received()) == 2
    finally:
        dest_scp.stop()
    assert [e["job"] for e in audit.entries() if e["event"] == "delivery_requeued"] == [j.id for j in jobs]
    nothing = _rtseg("node", "retry", "--config", str(config))
    assert nothing.returncode == 0 and "nothing to retry" in nothing.stdout
