"""Series assembly: a series is complete on release or after a quiet time; then it is selected or skipped.

DICOM does not signal the end of a series, so each open series remembers when
its last instance arrived; a background tick completes series that have been
quiet for ``node.quiet_time_s`` and have no store in flight. Sooner, with
``node.complete_on_release``: when the one association that sent the instances
of a series has been released normally (not aborted, not dropped), nothing
came for ``node.release_grace_s`` and its instances form a whole axial stack
(the loader's own check: evenly spaced, no slice missing), the next tick
completes it; an instance that still comes is a late one. A sender that opens
an association per instance or per batch releases many times in the middle of
a series: a series that came on more than one association waits for the quiet
time. The job row is
created (``received``) with the first instance, before that instance is
acknowledged, so a restart finds every open series and its spool folder, and
the quiet time starts again.

Completion is atomic with respect to receiving: it runs under the assembler's
lock and records, in the same transition ``received → queued``, which instances
make up the series (``meta["instances"]``); the worker segments those only. A
new instance of a series whose job has moved on is a *late* instance (one sent
again is acknowledged and not kept twice). ``node.late_instance_policy``:
``supersede`` opens a new job, the next *generation* of the series, on all its
instances, whose RTSTRUCT says which one it supersedes; ``flag`` keeps the
instances and marks the job and its RTSTRUCT incomplete; ``reject`` answers a
failure. A series that was skipped or failed made no RTSTRUCT; instances that
arrive for it again open a new job.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from dicom_node.spool import Spool
from rtseg.audit import AuditLog
from rtseg.ct import check_stack
from rtseg.errors import InputError
from rtseg.jobs import Job, JobError, JobState, JobStore
from rtseg.privacy import redact_uids
from rtseg.rtstruct import amend_description
from rtseg.settings import Caller, NodeSettings, Selection, Settings
from rtseg.worker import description_note

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
    association: int = 0  # the association, numbered by the SCP (0: not known)


class LateInstance(Exception):
    """An instance arrived for a series that was already processed, and policy rejects it."""


@dataclass
class _Open:
    job_id: str
    last: float
    inflight: int = 0
    late: bool = False  # late instances of a finished job under policy "flag"
    duplicate_of: str | None = None  # a re-send of what job ``duplicate_of`` has: recorded, not kept
    duplicates: int = 0  # instances of the re-send already received (this run of the node)
    received: int = 0  # instances begun: one arriving while the stack is checked is seen
    senders: set[int] = field(default_factory=set)  # associations that sent instances and are still open
    released: bool = False  # every sender released normally since the last instance: check the stack
    released_at: float = 0.0  # when it was released (clock)
    associations: set[int] = field(default_factory=set)  # every association that sent an instance
    interrupted: bool = False  # a sender aborted: only the quiet time completes it


def select(selection: Selection, header: SeriesHeader, n_instances: int) -> str | None:
    """Why a complete series is not segmented, naming the ``[selection]`` rule; None if it is selected."""
    found = _unselected(selection, header, n_instances)
    return None if found is None else f"{found[1]} ([selection] {found[0]})"


def _unselected(selection: Selection, header: SeriesHeader, n_instances: int) -> tuple[str, str] | None:
    """(rule, reason) of the first selection rule that refuses the series, or None."""
    if selection.modalities and header.modality.upper() not in selection.modalities:
        return "modalities", f"modality {header.modality or '(none)'} is not selected"
    desc = header.description
    if selection.series_description_include and not re.search(
        selection.series_description_include, desc, re.I
    ):
        return "series_description_include", "series description does not match the include pattern"
    if selection.series_description_exclude and re.search(selection.series_description_exclude, desc, re.I):
        return "series_description_exclude", "series description matches the exclude pattern"
    if selection.body_parts and header.body_part.upper() not in selection.body_parts:
        return "body_parts", f"body part {header.body_part or '(none)'} is not selected"
    excluded = set(header.image_type) & set(selection.image_type_exclude)
    if excluded:
        return "image_type_exclude", f"image type {'/'.join(sorted(excluded))} is excluded"
    lo, hi = selection.slice_thickness_mm
    if header.slice_thickness is not None and not lo <= header.slice_thickness <= hi:
        return (
            "slice_thickness_mm",
            f"slice thickness {header.slice_thickness:g} mm is outside {lo:g}-{hi:g} mm",
        )
    nlo, nhi = selection.slice_count
    if not nlo <= n_instances <= nhi:
        return "slice_count", f"{n_instances} slices is outside {nlo}-{nhi}"
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
    def begin(self, series_key: str, header: SeriesHeader, peer: Peer, instance_key: str = "") -> bool:
        """Register an instance about to be written; False if it is to be acknowledged and not kept.

        Raises :class:`LateInstance` when the late-instance policy is ``reject``.
        """
        with self._lock:
            entry = self._open.get(series_key)
            if entry is not None and entry.duplicate_of and not self._stored(series_key, instance_key):
                self._finish_duplicate(series_key, entry)  # new content: more than a re-send
                del self._open[series_key]
                entry = None
            if entry is None:
                entry = self._open_series(series_key, header, peer, instance_key)
            entry.last = self.clock()
            entry.received += 1
            entry.released = False
            if peer.association:
                entry.senders.add(peer.association)
                entry.associations.add(peer.association)
            if entry.duplicate_of:
                entry.duplicates += 1
                return False
            entry.inflight += 1
            return True

    def _stored(self, series_key: str, instance_key: str) -> bool:
        folder = self.spool.series_dir(CT_KIND, series_key)
        return bool(instance_key) and (folder / f"{instance_key}.dcm").is_file()

    def end(self, series_key: str) -> None:
        with self._lock:
            entry = self._open[series_key]
            entry.inflight -= 1
            entry.last = self.clock()

    def _open_series(self, series_key: str, header: SeriesHeader, peer: Peer, instance_key: str) -> _Open:
        # A skipped or failed series made no RTSTRUCT: instances arriving again (the rest of a
        # series completed too early, or a complete resend) open a new job on the same spool folder.
        retry = {JobState.SKIPPED, JobState.FAILED}
        existing = [j for j in self.store.list(source="dicom", series_key=series_key) if j.state not in retry]
        received = [j for j in existing if j.state == JobState.RECEIVED]
        if received:
            entry = _Open(received[0].id, self.clock())
        elif existing:
            return self._late(series_key, header, peer, instance_key, existing[-1])
        else:
            entry = _Open(self._new_job(series_key, header, peer).id, self.clock())
        self._open[series_key] = entry
        return entry

    def _new_job(self, series_key: str, header: SeriesHeader, peer: Peer, **extra: Any) -> Job:
        meta = {"calling_ae": peer.ae_title, "peer_host": peer.host, "header": asdict(header), **extra}
        job = self.store.create("dicom", series_key, f"spool/{CT_KIND}/{series_key}", meta=meta)
        log.info("series %s: first instance from %s", series_key, peer.ae_title)
        return job

    def _late(
        self, series_key: str, header: SeriesHeader, peer: Peer, instance_key: str, latest: Job
    ) -> _Open:
        """An instance for a series whose latest job has moved on.

        It is a duplicate (already received), opens a new generation, is flagged, or is refused.
        """
        if self._stored(series_key, instance_key):
            # a re-send of what the node has: acknowledged, not kept twice, and recorded as what it is
            job = self._new_job(series_key, header, peer, duplicate_of=latest.id)
            entry = _Open(job.id, self.clock(), duplicate_of=latest.id)
            self._open[series_key] = entry
            return entry
        policy = self.node.late_instance_policy
        if policy == "reject":
            raise LateInstance("the series was already processed")
        if policy == "flag":
            entry = _Open(latest.id, self.clock(), late=True)
        else:
            generation = int(latest.meta.get("generation", 1)) + 1
            job = self._new_job(series_key, header, peer, supersedes=latest.id, generation=generation)
            log.warning(
                "series %s: new instances after job %s was %s: job %s will segment the whole series",
                series_key,
                latest.id,
                latest.state,
                job.id,
            )
            entry = _Open(job.id, self.clock())
        self._open[series_key] = entry
        return entry

    # -- associations -----------------------------------------------------------------
    def released(self, association: int) -> None:
        """The association was released normally: its series may be complete (the next tick checks)."""
        self._ended(association, normal=True)

    def aborted(self, association: int) -> None:
        """The association was aborted: its series wait for the quiet time."""
        self._ended(association, normal=False)

    def _ended(self, association: int, *, normal: bool) -> None:
        with self._lock:
            for entry in self._open.values():
                if association not in entry.senders:
                    continue
                entry.senders.discard(association)
                entry.interrupted |= not normal
                entry.released = self.node.complete_on_release and not (entry.senders or entry.interrupted)
                entry.released_at = self.clock()

    # -- completing -----------------------------------------------------------------
    def recover(self) -> int:
        """After a restart: every received DICOM job is an open series again."""
        jobs = self.store.list({JobState.RECEIVED}, source="dicom", limit=100_000)
        with self._lock:
            for job in jobs:
                entry = _Open(job.id, self.clock(), duplicate_of=job.meta.get("duplicate_of"))
                self._open.setdefault(job.series_key, entry)
        return len(jobs)

    def tick(self) -> list[str]:
        """Complete every series quiet for long enough, then those whole on release; returns job ids.

        Completion holds the lock: an instance arriving meanwhile waits, then finds
        the job queued (a late instance), never a half-completed series.
        """
        return self._complete_quiet() + self._complete_released()

    def _complete_quiet(self) -> list[str]:
        done = []
        why = f"quiet for {self.node.quiet_time_s:g} s"
        with self._lock:
            now = self.clock()
            due = [
                (key, e)
                for key, e in self._open.items()
                if e.inflight == 0 and now - e.last >= self.node.quiet_time_s
            ]
            for key, entry in due:
                if self._finish(key, entry, why):
                    done.append(entry.job_id)
        return done

    def _complete_released(self) -> list[str]:
        """Complete the released series that are whole stacks; the others wait for the quiet time."""
        with self._lock:
            ready = [(key, e, e.received) for key, e in self._open.items() if self._releasable(e)]
        done = []
        for key, entry, received in ready:
            why = self._whole_stack(key)  # reads every header: outside the lock, stores go on
            with self._lock:
                changed = self._open.get(key) is not entry or entry.received != received
                if changed or not self._releasable(entry):
                    continue  # an instance came meanwhile: its association's end decides again
                if why is None:
                    entry.released = False  # not checked again until another release
                elif self._finish(key, entry, why):
                    done.append(entry.job_id)
        return done

    def _releasable(self, entry: _Open) -> bool:
        """Released by its one sender a grace time ago, nothing in flight, a series to segment.

        Not late and not a re-send: those keep the quiet time.
        """
        return (
            entry.released
            and len(entry.associations) == 1
            and self.clock() - entry.released_at >= self.node.release_grace_s
            and entry.inflight == 0
            and not (entry.late or entry.duplicate_of)
        )

    def _whole_stack(self, series_key: str) -> str | None:
        """Why the series is complete ("association released, N slices, no gap"), or None if it is not."""
        try:
            n = check_stack(self.spool.instances(CT_KIND, series_key))
        except InputError as exc:
            log.info(
                "series %s: association released, but the series is not whole (%s): waiting for the"
                " quiet time",
                series_key,
                redact_uids(exc.message),
            )
            return None
        return f"association released, {n} slices, no gap"

    def _finish(self, series_key: str, entry: _Open, why: str) -> bool:
        # one series' failure must not strand the others due in the same tick
        try:
            if entry.late:
                self._flag(series_key, entry.job_id)
            elif entry.duplicate_of:
                self._finish_duplicate(series_key, entry)
            else:
                self._complete(series_key, entry.job_id, why)
        except OSError as exc:
            log.error("series %s: cannot complete it (%s); retrying", series_key, exc.strerror)
            return False
        except JobError as exc:
            log.error("series %s: not completed: %s", series_key, exc)
        del self._open[series_key]
        return True

    def open_series(self) -> int:
        with self._lock:
            return len(self._open)

    def _complete(self, series_key: str, job_id: str, why: str) -> None:
        job = self.store.get(job_id)
        instances = [p.stem for p in self.spool.instances(CT_KIND, series_key)]
        n = len(instances)
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
            log.info("series %s (%d instances, %s) skipped: %s", series_key, n, why, reason)
            self.audit.record(
                "series_skipped", job=job_id, series=series_key, instances=n, reason=reason, completed=why
            )
            return
        meta["destinations"] = self._destinations(job.meta)
        meta["instances"] = instances  # this generation of the series: what the worker segments
        self.store.transition(job_id, JobState.RECEIVED, JobState.QUEUED, meta=meta)
        names = ", ".join(d["name"] for d in meta["destinations"]) or "none"
        log.info("series %s complete (%d instances, %s): queued, destinations %s", series_key, n, why, names)
        self.audit.record(
            "series_queued",
            job=job_id,
            series=series_key,
            instances=n,
            completed=why,
            calling_ae=job.meta.get("calling_ae"),
            destinations=[d["name"] for d in meta["destinations"]],
        )
        if job.meta.get("supersedes"):
            self._record_superseded(job, n)

    def _finish_duplicate(self, series_key: str, entry: _Open) -> None:
        """Record a re-send of a series the node has: skipped as a duplicate of the job that has it."""
        job = self.store.get(entry.job_id)
        reason = (
            f"duplicate of job {entry.duplicate_of}: {entry.duplicates} instance(s) sent again were"
            f" already received; nothing new to segment (rtseg node resegment {entry.duplicate_of}"
            " forces a new result)"
        )
        meta = {**job.meta, "duplicates": entry.duplicates}
        self.store.transition(job.id, JobState.RECEIVED, JobState.SKIPPED, meta=meta, error=reason)
        log.info(
            "series %s sent again: duplicate of job %s, not segmented again", series_key, entry.duplicate_of
        )
        self.audit.record(
            "series_duplicate",
            job=job.id,
            duplicate_of=entry.duplicate_of,
            series=series_key,
            instances=entry.duplicates,
            calling_ae=job.meta.get("calling_ae"),
        )

    def _record_superseded(self, job: Job, n: int) -> None:
        earlier = self.store.get(str(job.meta["supersedes"]))
        before = len(earlier.meta.get("instances", ()))
        log.warning("job %s supersedes job %s: %d instances instead of %d", job.id, earlier.id, n, before)
        self.audit.record(
            "series_superseded",
            job=job.id,
            supersedes=earlier.id,
            series=job.series_key,
            instances=n,
            earlier_instances=before,
            generation=job.meta.get("generation"),
        )

    def _flag(self, series_key: str, job_id: str) -> None:
        """Policy ``flag``: the job and its RTSTRUCT say how many instances it did not segment."""
        job = self.store.get(job_id)
        segmented = set(job.meta.get("instances", ()))
        late = [p for p in self.spool.instances(CT_KIND, series_key) if p.stem not in segmented]
        job = self.store.update(job_id, meta={**job.meta, "late_instances": len(late)})
        log.warning(
            "series %s: %d instance(s) after job %s were not segmented", series_key, len(late), job_id
        )
        self.audit.record(
            "late_instances_flagged", job=job_id, series=series_key, late=len(late), segmented=len(segmented)
        )
        note = description_note(job.meta)
        written = self.store.db_path.parent / job.output_path if job.output_path else None
        # running: its worker does it; purged by retention: nothing left to amend
        if (
            note
            and written is not None
            and written.is_file()
            and job.state not in (JobState.QUEUED, JobState.RUNNING)
        ):
            amend_description(written, note)

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
