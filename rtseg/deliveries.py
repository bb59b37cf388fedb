"""Per-destination delivery state of each job, in the job store's SQLite file.

A delivery row is ``pending`` until the destination acknowledged the RTSTRUCT
(``acked``) or the retry limit was reached (``dead``). The row is committed
right after the C-STORE success status, so after a ``kill -9`` at most the one
in-flight store is repeated, with the same SOP Instance UID: the destination
keeps one instance. RT Structure Sets received by the SCP are recorded here too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from rtseg.audit import AuditLog
from rtseg.jobs import Job, JobError, JobState, JobStore, SqliteTables

log = logging.getLogger(__name__)

PENDING, ACKED, DEAD = "pending", "acked", "dead"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    updated REAL NOT NULL,
    PRIMARY KEY (job_id, destination)
);
CREATE TABLE IF NOT EXISTS received_objects (
    instance_key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    series_key TEXT NOT NULL,
    path TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    received REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Delivery:
    job_id: str
    destination: str
    state: str
    attempts: int
    next_attempt: float
    last_error: str | None


class DeliveryStore(SqliteTables):
    """Delivery rows and received RT objects, beside the job table in the node's state file."""

    schema = _SCHEMA

    def ensure(self, job_id: str, destinations: list[str]) -> list[Delivery]:
        """The job's delivery rows, creating missing ones as pending."""
        with self._tx() as db:
            for name in destinations:
                db.execute(
                    "INSERT OR IGNORE INTO deliveries (job_id, destination, updated) VALUES (?, ?, ?)",
                    (job_id, name, time.time()),
                )
        return self.for_job(job_id)

    def for_job(self, job_id: str) -> list[Delivery]:
        rows = self._conn().execute(
            "SELECT job_id, destination, state, attempts, next_attempt, last_error FROM deliveries"
            " WHERE job_id = ? ORDER BY destination",
            (job_id,),
        )
        return [Delivery(*row) for row in rows.fetchall()]

    def acked(self, job_id: str, destination: str) -> None:
        self._set(job_id, destination, "state = ?, attempts = attempts + 1, last_error = NULL", (ACKED,))

    def failed(self, job_id: str, destination: str, error: str, next_attempt: float, dead: bool) -> None:
        self._set(
            job_id,
            destination,
            "state = ?, attempts = attempts + 1, last_error = ?, next_attempt = ?",
            (DEAD if dead else PENDING, error, next_attempt),
        )

    def _set(self, job_id: str, destination: str, sets: str, args: tuple[object, ...]) -> None:
        with self._tx() as db:
            db.execute(
                f"UPDATE deliveries SET {sets}, updated = ? WHERE job_id = ? AND destination = ?",
                (*args, time.time(), job_id, destination),
            )

    def requeue(self, job_id: str) -> list[str]:
        """The job's dead deliveries back to pending, due now, tries counted afresh; their names."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT destination FROM deliveries WHERE job_id = ? AND state = ? ORDER BY destination",
                (job_id, DEAD),
            ).fetchall()
            db.execute(
                "UPDATE deliveries SET state = ?, attempts = 0, next_attempt = 0, last_error = NULL,"
                " updated = ? WHERE job_id = ? AND state = ?",
                (PENDING, time.time(), job_id, DEAD),
            )
        return [str(r[0]) for r in rows]

    def dead(self, limit: int = 100) -> list[Delivery]:
        rows = self._conn().execute(
            "SELECT job_id, destination, state, attempts, next_attempt, last_error FROM deliveries"
            " WHERE state = ? ORDER BY updated DESC LIMIT ?",
            (DEAD, limit),
        )
        return [Delivery(*row) for row in rows.fetchall()]

    def latest(self) -> list[tuple[Delivery, float]]:
        """Per destination, its most recently changed delivery and when it changed (epoch seconds)."""
        rows = self._conn().execute(
            "SELECT job_id, destination, state, attempts, next_attempt, last_error, MAX(updated)"
            " FROM deliveries GROUP BY destination ORDER BY destination"
        )  # SQLite takes the bare columns from the row of the MAX
        return [(Delivery(*row[:6]), float(row[6])) for row in rows.fetchall()]

    def record_object(
        self, instance_key: str, kind: str, series_key: str, path: str, calling_ae: str
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO received_objects VALUES (?, ?, ?, ?, ?, ?)",
                (instance_key, kind, series_key, path, calling_ae, time.time()),
            )

    def count_objects(self, kind: str) -> int:
        row = self._conn().execute("SELECT COUNT(*) FROM received_objects WHERE kind = ?", (kind,)).fetchone()
        return int(row[0])

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def requeue_dead_letters(
    store: JobStore, deliveries: DeliveryStore, audit: AuditLog, job_ids: Sequence[str] = ()
) -> dict[str, list[str]]:
    """An operator's retry: dead deliveries (of ``job_ids``, else all) go back to the sender.

    Each dead delivery is pending again with its tries counted afresh, and a
    dead-lettered job is ``sending`` again; a running node's sender picks them up.

    Returns
    -------
    dict
        Requeued destination names by job id (empty: nothing was dead).

    Raises
    ------
    JobError
        A given job does not exist or has no dead delivery (checked before anything changes).
    """
    jobs = [store.get(job_id) for job_id in job_ids]
    for job in jobs:
        if not any(d.state == DEAD for d in deliveries.for_job(job.id)):
            raise JobError(f"job {job.id} is {job.state}, with no dead delivery to retry")
    if not job_ids:
        dead = {d.job_id for d in deliveries.dead(limit=1_000_000)}
        jobs = [job for job in store.list({JobState.DEAD_LETTER, JobState.SENDING}) if job.id in dead]
    return {job.id: _requeue(store, deliveries, audit, job) for job in jobs}


def _requeue(store: JobStore, deliveries: DeliveryStore, audit: AuditLog, job: Job) -> list[str]:
    names = deliveries.requeue(job.id)  # first, or the sender would settle the job as dead again
    if job.state == JobState.DEAD_LETTER:
        store.transition(job.id, JobState.DEAD_LETTER, JobState.SENDING, error=None)
    audit.record("delivery_requeued", job=job.id, destinations=names)
    log.info("job %s: deliveries to %s requeued by the operator", job.id, ", ".join(names))
    return names
