"""The DICOM node: SCP + series assembly + segmentation workers + sender, in one process tree.

Startup recovery makes a restart after ``kill -9`` safe: half-written spool
files are deleted (never acknowledged), received series are open again (their
quiet time restarts), jobs left ``running`` are queued again, and ``sending``
jobs resume with their per-destination delivery rows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dicom_node.assembly import CT_KIND, Assembler
from dicom_node.audit import AuditLog
from dicom_node.deliveries import DeliveryStore
from dicom_node.scp import Receiver, start_scp
from dicom_node.scu import Sender
from dicom_node.spool import Spool
from rtseg.closed_loop import ClosedLoop, config_from_settings
from rtseg.jobs import JobState, JobStore, state_db
from rtseg.settings import Settings
from rtseg.worker import WorkerPool

log = logging.getLogger(__name__)

TICK_S = 0.2
SEND_POLL_S = 0.5
JANITOR_S = 60.0
CLOSED_LOOP_S = 5.0  # approved RTSTRUCTs back from the TPS: paired and scored off the SCP thread


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
        self.spool = Spool(self.data_dir / "spool", settings.node.min_free_disk_mb)
        self.assembler = Assembler(self.store, self.spool, settings, self.audit)
        self.receiver = Receiver(
            self.spool, self.assembler, self.deliveries, self.audit, settings.dicom.accept_rtstruct
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
        n = settings.node
        self.pool = WorkerPool(
            self.store,
            self.data_dir,
            model_dir,
            n.workers,
            n.inference_threads,
            n.min_island_ml,
            n.worker_crash_limit,
        )  # supervised: a dead worker is restarted by the pool itself
        self.closed_loop = ClosedLoop(self.data_dir, self.store, config_from_settings(settings.federation))
        self._loops = [
            Loop("rtseg-assembly", self.assembler.tick, TICK_S),
            Loop("rtseg-sender", self.sender.run_once, SEND_POLL_S),
            Loop("rtseg-retention", self.purge, JANITOR_S),
            Loop("rtseg-closed-loop", self.closed_loop.run_once, CLOSED_LOOP_S),
        ]
        self.server: object | None = None
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
        self.pool.stop(timeout=10.0)
        self.audit.record("node_stopped")
        self.store.close()
        self.deliveries.close()

    def purge(self) -> int:
        """Retention: delete received CT of finished jobs older than ``node.retention_h``."""
        cutoff = time.time() - self.settings.node.retention_h * 3600
        purged = 0
        finished = {JobState.DONE, JobState.FAILED}
        for job in self.store.list(finished, source="dicom", limit=100_000):
            if job.updated > cutoff or job.meta.get("purged"):
                continue
            self.spool.remove_series(CT_KIND, job.series_key)
            self.store.update(job.id, meta={**job.meta, "purged": True})
            purged += 1
        if purged:
            log.info("retention: deleted the CT of %d finished job(s)", purged)
        return purged
