"""Series assembly: a series is complete after a quiet time; then it is selected or skipped.

DICOM does not signal the end of a series, so each open series remembers when
its last instance arrived; a background tick completes series that have been
quiet for ``node.quiet_time_s`` and have no store in flight. The job row is
created (``received``) with the first instance, before that instance is
acknowledged, so a restart finds every open series and its spool folder, and
the quiet time starts again. An instance of a series whose job has moved on is
a *late* instance: ``ignore`` acknowledges and discards it, ``reject`` answers
a failure; neither makes a second RTSTRUCT. A series that was skipped or failed
(e.g. cut short: too few or missing slices) made no RTSTRUCT; instances that
arrive for it again open a new job.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from dicom_node.audit import AuditLog
from dicom_node.spool import Spool
from rtseg.jobs import JobState, JobStore
from rtseg.settings import Caller, NodeSettings, Selection, Settings

log = logging.getLogger(__name__)

CT_KIND = "ct"


@dataclass(frozen=True)
class SeriesHeader:
    """What selection needs from a series' first instance (no patient data)."""

    modality: str = ""
    description: str = ""
    body_part: str = ""
    image_type: tuple[str, ...] = ()
    slice_thickness: float | None = None


@dataclass(frozen=True)
class Peer:
    """The calling AE of an association."""

    ae_title: str
    host: str


class LateInstance(Exception):
    """An instance arrived for a series that was already processed, and policy rejects it."""


@dataclass
class _Open:
    job_id: str
    last: float
    inflight: int = 0


def select(selection: Selection, header: SeriesHeader, n_instances: int) -> str | None:
    """Why a complete series is not segmented, or None if it is selected."""
    if selection.modalities and header.modality.upper() not in selection.modalities:
        return f"modality {header.modality or '(none)'} is not selected"
    desc = header.description
    if selection.series_description_include and not re.search(
        selection.series_description_include, desc, re.I
    ):
        return "series description does not match the include pattern"
    if selection.series_description_exclude and re.search(selection.series_description_exclude, desc, re.I):
        return "series description matches the exclude pattern"
    if selection.body_parts and header.body_part.upper() not in selection.body_parts:
        return f"body part {header.body_part or '(none)'} is not selected"
    excluded = set(header.image_type) & set(selection.image_type_exclude)
    if excluded:
        return f"image type {'/'.join(sorted(excluded))} is excluded"
    lo, hi = selection.slice_thickness_mm
    if header.slice_thickness is not None and not lo <= header.slice_thickness <= hi:
        return f"slice thickness {header.slice_thickness:g} mm is outside {lo:g}-{hi:g} mm"
    nlo, nhi = selection.slice_count
    if not nlo <= n_instances <= nhi:
        return f"{n_instances} slices is outside {nlo}-{nhi}"
    return None


class Assembler:
    """Tracks open series, completes them after the quiet time, queues or skips them."""

    def __init__(
        self,
        store: JobStore,
        spool: Spool,
        settings: Settings,
        audit: AuditLog,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.spool = spool
        self.settings = settings
        self.node: NodeSettings = settings.node
        self.audit = audit
        self.clock = clock
        self._open: dict[str, _Open] = {}
        self._lock = threading.Lock()

    # -- receiving ------------------------------------------------------------------
    def begin(self, series_key: str, header: SeriesHeader, peer: Peer) -> bool:
        """Register an instance about to be written; False if it is late and to be ignored.

        Raises :class:`LateInstance` when the late-instance policy is ``reject``.
        """
        with self._lock:
            entry = self._open.get(series_key)
            if entry is None:
                entry = self._open_series(series_key, header, peer)
                if entry is None:
                    if self.node.late_instance_policy == "reject":
                        raise LateInstance("the series was already processed")
                    log.info("late instance for series %s ignored (already processed)", series_key)
                    return False
            entry.inflight += 1
            entry.last = self.clock()
            return True

    def end(self, series_key: str) -> None:
        with self._lock:
            entry = self._open[series_key]
            entry.inflight -= 1
            entry.last = self.clock()

    def _open_series(self, series_key: str, header: SeriesHeader, peer: Peer) -> _Open | None:
        # A skipped or failed series made no RTSTRUCT: instances arriving again (the rest of a
        # series completed too early, or a complete resend) open a new job on the same spool folder.
        retry = {JobState.SKIPPED, JobState.FAILED}
        existing = [j for j in self.store.list(source="dicom", series_key=series_key) if j.state not in retry]
        if existing:
            received = [j for j in existing if j.state == JobState.RECEIVED]
            if not received:
                return None
            entry = _Open(received[0].id, self.clock())
        else:
            meta = {"calling_ae": peer.ae_title, "peer_host": peer.host, "header": asdict(header)}
            job = self.store.create("dicom", series_key, f"spool/{CT_KIND}/{series_key}", meta=meta)
            log.info("series %s: first instance from %s", series_key, peer.ae_title)
            entry = _Open(job.id, self.clock())
        self._open[series_key] = entry
        return entry

    # -- completing -----------------------------------------------------------------
    def recover(self) -> int:
        """After a restart: every received DICOM job is an open series again."""
        jobs = self.store.list({JobState.RECEIVED}, source="dicom", limit=100_000)
        with self._lock:
            for job in jobs:
                self._open.setdefault(job.series_key, _Open(job.id, self.clock()))
        return len(jobs)

    def tick(self) -> list[str]:
        """Complete every series quiet for long enough; returns their job ids."""
        now = self.clock()
        with self._lock:
            due = [
                (key, e)
                for key, e in self._open.items()
                if e.inflight == 0 and now - e.last >= self.node.quiet_time_s
            ]
            for key, _ in due:
                del self._open[key]
        for key, entry in due:
            self._complete(key, entry.job_id)
        return [e.job_id for _, e in due]

    def open_series(self) -> int:
        with self._lock:
            return len(self._open)

    def _complete(self, series_key: str, job_id: str) -> None:
        job = self.store.get(job_id)
        n = len(self.spool.instances(CT_KIND, series_key))
        header = SeriesHeader(
            **{
                **job.meta.get("header", {}),
                "image_type": tuple(job.meta.get("header", {}).get("image_type", ())),
            }
        )
        reason = select(self.settings.selection, header, n)
        meta = {**job.meta, "n_instances": n}
        if reason is not None:
            self.store.transition(job_id, JobState.RECEIVED, JobState.SKIPPED, meta=meta, error=reason)
            self.spool.remove_series(CT_KIND, series_key)
            log.info("series %s (%d instances) skipped: %s", series_key, n, reason)
            self.audit.record("series_skipped", job=job_id, series=series_key, instances=n, reason=reason)
            return
        meta["destinations"] = self._destinations(job.meta)
        self.store.transition(job_id, JobState.RECEIVED, JobState.QUEUED, meta=meta)
        names = ", ".join(d["name"] for d in meta["destinations"]) or "none"
        log.info("series %s complete (%d instances): queued, destinations %s", series_key, n, names)
        self.audit.record(
            "series_queued",
            job=job_id,
            series=series_key,
            instances=n,
            calling_ae=job.meta.get("calling_ae"),
            destinations=[d["name"] for d in meta["destinations"]],
        )

    def _destinations(self, meta: Mapping[str, Any]) -> list[dict[str, Any]]:
        out = [asdict(d) for d in self.settings.destinations]
        if self.settings.dicom.return_to_sender:
            caller = _caller(self.settings.dicom.allowed_callers, meta.get("calling_ae", ""))
            if caller is not None and caller.port is not None:
                host = caller.host or meta.get("peer_host", "")
                out.append(
                    {
                        "name": "sender",
                        "ae_title": caller.ae_title,
                        "host": host,
                        "port": caller.port,
                        "tls": False,
                    }
                )
            else:
                log.warning("return to sender: no port configured for calling AE %s", meta.get("calling_ae"))
        return out


def _caller(callers: tuple[Caller, ...], ae_title: str) -> Caller | None:
    return next((c for c in callers if c.ae_title == ae_title), None)
