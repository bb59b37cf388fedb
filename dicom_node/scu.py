"""The C-STORE SCU: sends each job's RTSTRUCT (and DICOM SEG) to its destinations, once per destination.

:class:`Sender` polls jobs in ``sending``. For each destination without an
acknowledgement it tries a C-STORE when the delivery is due, in that
destination's own lane (a thread per destination, one store at a time), so a
destination that hangs until the timeout never delays another's; a failure
schedules the next try with exponential backoff, and after ``node.retry_limit``
tries the delivery is dead. When every destination acknowledged, the job is
``done``; when the rest acknowledged and some are dead, ``dead_letter``. The
RTSTRUCT's UIDs are fixed per job, so the one store that may be repeated after
a crash (acknowledged by the peer, not yet committed here) is the same instance.
A destination's ``formats`` say which objects it gets: the RTSTRUCT, the SEG
(``result["files"]["seg"]``, UIDs fixed per job too) or both, in that order;
the delivery is acknowledged when every one of them was.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    RTStructureSetStorage,
    SegmentationStorage,
    Verification,
)

from dicom_node.spool import uid_key
from rtseg.audit import AuditLog
from rtseg.deliveries import ACKED, DEAD, Delivery, DeliveryStore
from rtseg.jobs import Job, JobError, JobState, JobStore
from rtseg.settings import NodeSettings, TlsSettings
from rtseg.worker import rtstruct_uids, seg_uids

log = logging.getLogger(__name__)


class SendError(Exception):
    """A C-STORE attempt did not end in Success (the message says why, without patient data)."""


def client_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """Verifies the destination against ``tls.ca``; presents our certificate when we have one."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca) if tls.ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.enabled:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


def _associate(ae_title: str, dest: Mapping[str, Any], tls: TlsSettings, timeout: float) -> Any:
    ae = AE(ae_title=ae_title)
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout * 4
    ae.network_timeout = timeout * 4
    ae.add_requested_context(RTStructureSetStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(SegmentationStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    tls_args = (client_ssl_context(tls), str(dest["host"])) if dest.get("tls") else None
    return ae.associate(
        str(dest["host"]), int(dest["port"]), ae_title=str(dest["ae_title"]), tls_args=tls_args
    )


def store_file(
    ae_title: str, dest: Mapping[str, Any], path: Path, tls: TlsSettings, timeout: float = 30.0
) -> None:
    """C-STORE one file to ``dest``; raises :class:`SendError` unless the peer answered Success."""
    try:
        dataset = pydicom.dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        raise SendError(f"cannot read {path.name} ({type(exc).__name__})") from exc
    assoc = _associate(ae_title, dest, tls, timeout)
    if not assoc.is_established:
        raise SendError("association rejected, aborted or no connection")
    try:
        status = assoc.send_c_store(dataset)
    except ValueError as exc:  # no accepted presentation context for the object's SOP class
        what = getattr(dataset.get("SOPClassUID"), "name", "this SOP class")
        raise SendError(f"the destination does not accept {what}") from exc
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        raise SendError("no response (connection lost or timed out)")
    if code not in (0x0000, 0xB000, 0xB007, 0xB006):
        raise SendError(f"destination answered status 0x{code:04X}")


def echo(
    ae_title: str, dest: Mapping[str, Any], tls: TlsSettings, timeout: float = 10.0
) -> tuple[bool, float]:
    """C-ECHO ``dest``: (success, round-trip seconds)."""
    started = time.perf_counter()
    assoc = _associate(ae_title, dest, tls, timeout)
    if not assoc.is_established:
        return False, time.perf_counter() - started
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    return getattr(status, "Status", None) == 0x0000, time.perf_counter() - started


class Sender:
    """Delivers the RTSTRUCTs of ``sending`` jobs, one delivery per (job, destination)."""

    def __init__(
        self,
        store: JobStore,
        deliveries: DeliveryStore,
        data_dir: Path,
        ae_title: str,
        node: NodeSettings,
        tls: TlsSettings,
        audit: AuditLog,
        send: Callable[..., None] = store_file,
    ) -> None:
        self.store = store
        self.deliveries = deliveries
        self.data_dir = Path(data_dir)
        self.ae_title = ae_title
        self.node = node
        self.tls = tls
        self.audit = audit
        self._send = send
        self._lanes: dict[str, threading.Thread] = {}  # destination name -> its busy lane
        self._settling = threading.Lock()

    def run_once(self) -> int:
        """Start every due delivery in its destination's lane; returns how many were started.

        A destination whose lane is still busy (e.g. a peer that accepts and never
        answers, until the timeout) is skipped until the lane is free again.
        """
        due: dict[str, list[tuple[Job, Delivery, Mapping[str, Any]]]] = {}
        for job in self.store.list({JobState.SENDING}):
            for row, dest in self._due(job):
                due.setdefault(row.destination, []).append((job, row, dest))
            self._settle(job)
        started = 0
        for name, items in due.items():
            lane = self._lanes.get(name)
            if lane is not None and lane.is_alive():
                continue
            lane = threading.Thread(
                target=self._run_lane, args=(items,), name=f"rtseg-send-{name}", daemon=True
            )
            self._lanes[name] = lane
            lane.start()
            started += len(items)
        return started

    def stop(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` seconds for the lanes in flight (a hung store is left to its timeout)."""
        deadline = time.monotonic() + timeout
        for lane in list(self._lanes.values()):
            lane.join(max(0.0, deadline - time.monotonic()))

    def _due(self, job: Job) -> list[tuple[Delivery, Mapping[str, Any]]]:
        destinations = {str(d["name"]): d for d in job.meta.get("destinations", [])}
        rows = self.deliveries.ensure(job.id, list(destinations))
        now = time.time()
        return [
            (row, destinations[row.destination])
            for row in rows
            if row.state not in (ACKED, DEAD) and row.next_attempt <= now and row.destination in destinations
        ]

    def _run_lane(self, items: list[tuple[Job, Delivery, Mapping[str, Any]]]) -> None:
        """One destination's due deliveries, one after the other, in this lane's own thread."""
        try:
            for job, row, dest in items:
                self._attempt(job, row, dest)
                self._settle(job)
        except Exception:  # noqa: BLE001 - a lane logs (redacted) and the next poll starts it again
            log.exception("delivery lane %s: unexpected error", items[0][1].destination)
        finally:
            self.deliveries.close()  # this thread's connection
            self.store.close()

    def _attempt(self, job: Job, row: Delivery, dest: Mapping[str, Any]) -> None:
        formats = tuple(dest.get("formats") or ("rtstruct",))
        try:
            for kind in formats:
                self._send(self.ae_title, dest, self._path(job, kind), self.tls)
        except SendError as exc:
            self._failed(job, row, dest, str(exc))
            return
        self.deliveries.acked(job.id, row.destination)
        sent = ", ".join(kind.upper() for kind in formats)
        log.info("job %s: %s delivered to %s (%s)", job.id, sent, row.destination, dest["ae_title"])
        uids = {"rtstruct": rtstruct_uids(job.id)[1], "seg": seg_uids(job.id)[1]}
        self.audit.record(
            "rtstruct_delivered",
            job=job.id,
            series=job.series_key,
            destination=row.destination,
            ae_title=dest["ae_title"],
            host=dest["host"],
            model=job.model_version,
            **{kind: uid_key(uids[kind]) for kind in formats},
        )

    def _path(self, job: Job, kind: str) -> Path:
        """The job's output file of ``kind``; :class:`SendError` when the job has none."""
        if kind == "rtstruct":
            return self.data_dir / str(job.output_path)
        recorded = (job.result.get("files") or {}).get(kind)
        if not isinstance(recorded, str):
            raise SendError(f"the job has no {kind.upper()} (it was segmented before one was asked for)")
        return self.data_dir / recorded

    def _failed(self, job: Job, row: Delivery, dest: Mapping[str, Any], error: str) -> None:
        tries = row.attempts + 1
        dead = tries >= self.node.retry_limit
        delay = min(self.node.retry_backoff_s * 2 ** (tries - 1), self.node.retry_backoff_max_s)
        self.deliveries.failed(job.id, row.destination, error, time.time() + delay, dead)
        if dead:
            log.error("job %s: delivery to %s dead after %d tries: %s", job.id, row.destination, tries, error)
            self.audit.record(
                "delivery_dead", job=job.id, destination=row.destination, tries=tries, error=error
            )
        else:
            log.warning(
                "job %s: delivery to %s failed (try %d, next in %.0f s): %s",
                job.id,
                row.destination,
                tries,
                delay,
                error,
            )

    def _settle(self, job: Job) -> None:
        with self._settling:  # two lanes may finish the same job's last deliveries together
            rows = self.deliveries.for_job(job.id)
            if any(r.state not in (ACKED, DEAD) for r in rows):
                return
            current = self.store.find(job.id)
            if current is None or current.state != JobState.SENDING:
                return
            self._finish(job, rows)

    def _finish(self, job: Job, rows: list[Delivery]) -> None:
        dead = [r for r in rows if r.state == DEAD]
        try:
            if dead:
                error = "; ".join(f"{r.destination}: {r.last_error}" for r in dead)
                self.store.transition(job.id, JobState.SENDING, JobState.DEAD_LETTER, error=error)
                log.error("job %s is dead-lettered: %s", job.id, error)
            else:
                self.store.transition(job.id, JobState.SENDING, JobState.DONE)
                log.info("job %s done", job.id)
        except JobError as exc:
            log.warning("job %s changed while sending: %s", job.id, exc)
