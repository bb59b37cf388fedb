"""The DICOM node: SCP + series assembly + segmentation workers + sender, in one process tree.

Startup recovery makes a restart after ``kill -9`` safe: half-written spool
files are deleted (never acknowledged), received series are open again (their
quiet time restarts), jobs left ``running`` are queued again, and ``sending``
jobs resume with their per-destination delivery rows.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dicom_node.assembly import CT_KIND, Assembler
from dicom_node.scp import RT_KIND, Receiver, start_scp
from dicom_node.scu import Sender
from dicom_node.spool import Spool
from rtseg.audit import AuditLog
from rtseg.closed_loop import SEGMENTED, ClosedLoop, config_from_settings
from rtseg.deliveries import DeliveryStore
from rtseg.jobs import FINAL, Job, JobState, JobStore, state_db
from rtseg.privacy import redact_uids
from rtseg.settings import Settings
from rtseg.worker import WorkerPool, job_dir

log = logging.getLogger(__name__)

TICK_S = 0.2
SEND_POLL_S = 0.2  # a finished RTSTRUCT waits this long at most before its delivery starts
JANITOR_S = 60.0
FAILURE_AUDIT_S = 1.0  # a failed job's reason reaches the audit trail within this
# a worker (another process) may commit a failure stamped a little before the node's last scan
FAILURE_SCAN_SLACK_S = 60.0
CLOSED_LOOP_S = 5.0  # approved RTSTRUCTs back from the TPS: paired and scored off the SCP thread
RETAINED = frozenset({JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER})  # whose CT retention deletes
RESULTS_EXPIRE = frozenset(
    {JobState.DONE, JobState.FAILED, JobState.SKIPPED}
)  # whose outputs go (not dead letters)


def open_stores(data_dir: Path) -> tuple[JobStore, DeliveryStore]:
    store = JobStore(state_db(data_dir))
    return store, DeliveryStore(store.db_path)


class Loop:
    """Runs ``step`` every ``interval`` seconds in a daemon thread until stopped."""

    def __init__(self, name: str, step: Callable[[], object], interval: float) -> None:
        self._step = step
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # noqa: BLE001 - a background loop logs and carries on
                log.exception("%s: unexpected error", self._thread.name)
            self._stop.wait(self._interval)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)


class Node:
    """Everything ``rtseg serve`` runs for the DICOM face.

    Parameters
    ----------
    settings
        The node's settings.
    model_dir
        Model folder the workers load.
    """

    def __init__(self, settings: Settings, model_dir: Path) -> None:
        self.settings = settings
        self.data_dir = Path(settings.data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store, self.deliveries = open_stores(self.data_dir)
        self.audit = AuditLog(self.data_dir / "audit" / "audit.log")
        self.spool = Spool(self.data_dir / "spool", settings.node.min_free_disk_mb, self.audit)
        self.assembler = Assembler(self.store, self.spool, settings, self.audit)
        self.receiver = Receiver(
            self.spool,
            self.assembler,
            self.deliveries,
            self.audit,
            settings.dicom.accept_rtstruct,
            settings.dicom.max_instance_bytes,
        )
        self.sender = Sender(
            self.store,
            self.deliveries,
            self.data_dir,
            settings.dicom.ae_title,
            settings.node,
            settings.dicom.tls,
            self.audit,
        )
        # supervised: a dead worker is restarted by the pool itself
        self.pool = WorkerPool.from_settings(settings, self.store, self.data_dir, model_dir)
        self.closed_loop = ClosedLoop(
            self.data_dir, self.store, config_from_settings(settings.federation), self.audit.record
        )
        self._loops = [
            Loop("rtseg-assembly", self.assembler.tick, TICK_S),
            Loop("rtseg-sender", self.sender.run_once, SEND_POLL_S),
            Loop("rtseg-retention", self.purge, JANITOR_S),
            Loop("rtseg-failures", self.audit_failures, FAILURE_AUDIT_S),
            Loop("rtseg-closed-loop", self.closed_loop.run_once, CLOSED_LOOP_S),
        ]
        self.server: object | None = None
        self._failures_scanned = 0.0  # audit_failures: the first scan reads every failed job once
        # told "accepted"/"rejected"/"aborted" per association; rtseg serve adds the metrics counter
        self.association_observers: list[Callable[[str], None]] = []

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server is not None else 0  # type: ignore[attr-defined]

    def start(self) -> None:
        stale = self.spool.clean_temporary()
        if stale:
            log.warning("removed %d half-written instance(s) left by a crash", stale)
        open_series = self.assembler.recover()
        requeued = self.pool.start()
        sending = len(self.store.list({JobState.SENDING}))
        log.info(
            "recovered: %d open series, %d requeued job(s), %d job(s) sending",
            open_series,
            len(requeued),
            sending,
        )
        self.audit.record("node_started", open_series=open_series, requeued=len(requeued), sending=sending)
        self.server = start_scp(self.settings.dicom, self.receiver, self.audit, self._observe_association)
        for loop in self._loops:
            loop.start()

    def _observe_association(self, outcome: str) -> None:
        for observer in self.association_observers:
            observer(outcome)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()  # type: ignore[attr-defined]
            self.server.server_close()  # type: ignore[attr-defined]
        for loop in self._loops:
            loop.stop()
        self.sender.stop()
        self.pool.stop(timeout=10.0)
        self.audit.record("node_stopped")
        self.store.close()
        self.deliveries.close()

    def purge(self) -> int:
        """Retention: delete patient data the node no longer needs; returns how much was deleted.

        The received CT of finished and dead-lettered jobs ``node.retention_h``
        after they finished (a segmented CT at least ``[federation.closed_loop]
        window_h``, for late approvals), and received RT Structure Sets (spool and
        quarantine) ``node.retention_h`` after they arrived. Each deletion is audited.
        """
        now = time.time()
        purged = sum(self._purge_ct(job) for job in self._expired_jobs(now))
        purged += self._purge_rt(now - self.settings.node.retention_h * 3600)
        purged += sum(self._purge_results(job) for job in self._expired_results(now))
        if purged:
            log.info("retention: deleted %d CT series, RT object(s) and job output folder(s)", purged)
        return purged

    def audit_failures(self) -> int:
        """Audit each failed DICOM job once (``job_failed`` with its reason); returns how many.

        Workers are other processes: the node, which owns the audit trail, reports what they failed.
        """
        # only jobs changed since the last scan (a little before): the history is not read every second
        started = time.time()
        since = self._failures_scanned - FAILURE_SCAN_SLACK_S
        jobs = self.store.list({JobState.FAILED}, source="dicom", updated_since=since, limit=1_000_000)
        self._failures_scanned = started
        fresh = [j for j in jobs if not j.meta.get("failure_audited")]
        for job in fresh:
            reason = redact_uids(job.error or "")
            self.audit.record("job_failed", job=job.id, series=job.series_key, reason=reason)
            self.store.update(job.id, meta={**job.meta, "failure_audited": True})
        return len(fresh)

    def _keep_until(self, job: Job) -> float:
        hours = self.settings.node.retention_h
        if job.state in SEGMENTED:  # an approved structure set may still come back for it
            hours = max(hours, self.closed_loop.config.window_h)
        return job.updated + hours * 3600

    def _expired_jobs(self, now: float) -> list[Job]:
        """Finished DICOM jobs past their retention whose series no other job still needs."""
        jobs = self.store.list(source="dicom", limit=1_000_000)
        needed = {  # a later job of the same series (sent again) shares its spool folder
            j.series_key
            for j in jobs
            if j.state not in FINAL or (j.state in RETAINED and self._keep_until(j) > now)
        }
        return [
            j for j in jobs if j.state in RETAINED and not j.meta.get("purged") and j.series_key not in needed
        ]

    def _expired_results(self, now: float) -> list[Job]:
        """Finished DICOM jobs whose outputs are past ``node.results_retention_h``.

        Not a dead letter (its RTSTRUCT waits for ``rtseg node retry``), and a segmented job's
        RTSTRUCT at least ``[federation.closed_loop] window_h`` (an approval is compared with it).
        """
        jobs = self.store.list(RESULTS_EXPIRE, source="dicom", limit=1_000_000)
        return [j for j in jobs if not j.meta.get("results_purged") and self._results_until(j) <= now]

    def _results_until(self, job: Job) -> float:
        """From when the job finished: later changes (its CT purged, a note) do not restart the clock."""
        hours = self.settings.node.results_retention_h
        if job.state in SEGMENTED:
            hours = max(hours, self.closed_loop.config.window_h)
        return (job.finished or job.updated) + hours * 3600

    def _purge_results(self, job: Job) -> int:
        shutil.rmtree(self.data_dir / job_dir(job), ignore_errors=True)
        self.store.update(job.id, meta={**job.meta, "results_purged": True})
        self.audit.record("retention_purged", kind="results", job=job.id, series=job.series_key)
        return 1

    def _purge_ct(self, job: Job) -> int:
        self.spool.remove_series(CT_KIND, job.series_key)
        self.store.update(job.id, meta={**job.meta, "purged": True})
        self.audit.record("retention_purged", kind=CT_KIND, job=job.id, series=job.series_key)
        return 1

    def _purge_rt(self, cutoff: float) -> int:
        purged = 0
        for root, where in (
            (self.data_dir / "spool" / RT_KIND, "spool"),
            (self.closed_loop.quarantine, "quarantine"),
        ):
            for path in sorted(root.glob("*/*.dcm")):
                if path.stat().st_mtime > cutoff:
                    continue
                path.unlink()
                if not any(path.parent.iterdir()):
                    path.parent.rmdir()
                self.audit.record(
                    "retention_purged", kind=RT_KIND, where=where, series=path.parent.name, instance=path.stem
                )
                purged += 1
        return purged
