"""Segmentation jobs: the one job model shared by the DICOM node and the HTTP service.

A job is "segment this CT series". Its state lives in SQLite (WAL mode, one
row per job) and moves only along :data:`TRANSITIONS`; every change is a
compare-and-set on the current state, so two processes can never both claim or
finish the same job, and a restart after ``kill -9`` finds every job in the
last state that was committed.

States::

    received ─▶ queued ─▶ running ─▶ sending ─▶ done
        │          │          │          └────▶ dead_letter
        └▶ skipped └──────────┴▶ failed
    (running ─▶ queued when a crashed worker's job is recovered)

HTTP jobs go ``running → done``; DICOM jobs with destinations go through
``sending``. Paths stored in a job are relative to the data directory.
"""

from __future__ import annotations

import base64
import builtins
import json
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from rtseg.errors import RtsegError
from rtseg.privacy import uid_key


class JobState(StrEnum):
    RECEIVED = "received"  # instances arriving (DICOM) / upload being checked (HTTP)
    QUEUED = "queued"  # complete and selected: waiting for a worker
    RUNNING = "running"  # a worker is segmenting
    SENDING = "sending"  # RTSTRUCT written, deliveries pending
    DONE = "done"
    FAILED = "failed"  # the input or the model failed; the error says why
    DEAD_LETTER = "dead_letter"  # delivery gave up after the retry limit
    SKIPPED = "skipped"  # did not match the selection rules


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.RECEIVED: frozenset({JobState.QUEUED, JobState.SKIPPED, JobState.FAILED}),
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.SKIPPED}),  # skipped: cancelled
    JobState.RUNNING: frozenset({JobState.SENDING, JobState.DONE, JobState.FAILED, JobState.QUEUED}),
    JobState.SENDING: frozenset({JobState.DONE, JobState.DEAD_LETTER}),
    JobState.DEAD_LETTER: frozenset({JobState.SENDING}),  # an operator's retry
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset({JobState.QUEUED}),  # an operator's retry
    JobState.SKIPPED: frozenset(),
}
FINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER, JobState.SKIPPED})
CANCELLED = "cancelled by operator"  # the reason of a queued job an operator took off the queue


class JobError(RtsegError):
    """A job does not exist or cannot make the requested state change."""


@dataclass(frozen=True)
class Job:
    """One segmentation job (no patient data: keys are hashes, paths are relative)."""

    id: str
    source: str  # "dicom" or "http"
    state: JobState
    series_key: str  # hash of the SeriesInstanceUID (or of the upload)
    input_dir: str  # relative to the data directory
    output_path: str | None  # RTSTRUCT, relative to the data directory
    created: float
    updated: float
    attempts: int = 0
    error: str | None = None
    model_version: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)  # face-specific: caller AE, destinations, options
    result: Mapping[str, Any] = field(default_factory=dict)  # structures, volumes, flags, timings
    started: float | None = None  # when a worker last took it (``running``)
    finished: float | None = None  # when it reached a final state; None while it may still change

    @property
    def turnaround(self) -> float | None:
        """Seconds from receipt (``created``) to the final state, or None while unfinished."""
        return None if self.finished is None else self.finished - self.created


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    state TEXT NOT NULL,
    series_key TEXT NOT NULL,
    input_dir TEXT NOT NULL,
    output_path TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    model_version TEXT,
    meta TEXT NOT NULL DEFAULT '{}',
    result TEXT NOT NULL DEFAULT '{}',
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs (series_key);
"""
# columns added after the first release: an older state.db gains them on open
_ADDED_COLUMNS = {"started": "REAL", "finished": "REAL"}
_COLUMNS = ("output_path", "attempts", "error", "model_version", "meta", "result")


STATE_DB = "state.db"  # the one job table of a node: <data dir>/state.db (DICOM and HTTP jobs)


def state_db(data_dir: str | Path) -> Path:
    """Where the job table of the node with data directory ``data_dir`` lives."""
    return Path(data_dir) / STATE_DB


class SqliteTables:
    """Tables in one SQLite file, safe across threads and processes (one connection per thread).

    WAL journal, durable commits and ``BEGIN IMMEDIATE`` transactions; a
    subclass names its ``schema`` (``CREATE … IF NOT EXISTS``).
    """

    schema = ""

    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conn().executescript(self.schema)  # executescript manages its own transaction

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a committed state survives power loss
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


class JobStore(SqliteTables):
    """SQLite-backed job table; safe across threads and processes (one connection per thread)."""

    schema = _SCHEMA

    def __init__(self, db_path: Path) -> None:
        super().__init__(db_path)
        with self._tx() as db:
            have = {str(r[1]) for r in db.execute("PRAGMA table_info(jobs)").fetchall()}
            for name, kind in _ADDED_COLUMNS.items():
                if name not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    # -- queries ------------------------------------------------------------------
    def create(
        self,
        source: str,
        series_key: str,
        input_dir: str,
        *,
        state: JobState = JobState.RECEIVED,
        meta: Mapping[str, Any] | None = None,
        job_id: str | None = None,
    ) -> Job:
        now = time.time()
        job_id = job_id or uuid.uuid4().hex
        finished = now if state in FINAL else None
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, source, state, series_key, input_dir, created, updated, meta,"
                " finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    source,
                    str(state),
                    series_key,
                    input_dir,
                    now,
                    now,
                    json.dumps(dict(meta or {})),
                    finished,
                ),
            )
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobError(f"no job {job_id!r}")
        return _job(row)

    def find(self, job_id: str) -> Job | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row is not None else None

    def list(
        self,
        states: frozenset[JobState] | set[JobState] | None = None,
        *,
        source: str | None = None,
        series_key: str | None = None,
        updated_since: float | None = None,
        limit: int = 1000,
    ) -> list[Job]:
        sql, args = "SELECT * FROM jobs WHERE 1=1", builtins.list[object]()
        if updated_since is not None:
            sql += " AND updated >= ?"
            args.append(updated_since)
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += [str(s) for s in states]
        if source:
            sql += " AND source = ?"
            args.append(source)
        if series_key:
            sql += " AND series_key = ?"
            args.append(series_key)
        sql += " ORDER BY created LIMIT ?"
        args.append(limit)
        return [_job(r) for r in self._conn().execute(sql, args).fetchall()]

    def counts(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        found = {str(r[0]): int(r[1]) for r in rows}
        return {str(s): found.get(str(s), 0) for s in JobState}

    # -- state changes ----------------------------------------------------------------
    def transition(
        self,
        job_id: str,
        expected: JobState | frozenset[JobState] | set[JobState],
        new: JobState,
        **fields: Any,
    ) -> Job:
        """Move ``job_id`` from one of ``expected`` to ``new`` atomically, updating ``fields``.

        Raises :class:`JobError` if the job is not in an expected state (someone
        else moved it) or the change is not allowed by :data:`TRANSITIONS`.
        """
        allowed = {expected} if isinstance(expected, JobState) else set(expected)
        for state in allowed:
            if new not in TRANSITIONS[state] and new != state:
                raise JobError(f"job state change {state} → {new} is not allowed")
        now = time.time()
        sets, args = ["state = ?", "updated = ?"], [str(new), now]
        if new not in allowed:  # a state change, not an update of fields: the times follow it
            sets += ["started = COALESCE(?, started)", "finished = ?"]
            args += [now if new == JobState.RUNNING else None, now if new in FINAL else None]
        for key, value in fields.items():
            if key not in _COLUMNS:
                raise JobError(f"unknown job field {key!r}")
            sets.append(f"{key} = ?")
            args.append(json.dumps(dict(value)) if key in ("meta", "result") else value)
        with self._tx() as db:
            marks = ",".join("?" * len(allowed))
            cur = db.execute(
                f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND state IN ({marks})",
                [*args, job_id, *[str(s) for s in allowed]],
            )
            if cur.rowcount != 1:
                row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                found = "missing" if row is None else row[0]
                raise JobError(f"job {job_id} is {found}, not {'/'.join(sorted(map(str, allowed)))}")
        return self.get(job_id)

    def update(self, job_id: str, **fields: Any) -> Job:
        """Change fields without a state change (e.g. meta of a received job)."""
        job = self.get(job_id)
        return self.transition(job_id, job.state, job.state, **fields)

    def claim_next(self, sources: frozenset[str] | None = None, worker: int | None = None) -> Job | None:
        """Atomically take the oldest queued job (``queued → running``), or None.

        ``worker`` (the claiming process id) is kept in ``meta["worker_pid"]``, so that
        the job of a worker that dies can be found and queued again.
        """
        sql, args = "SELECT id FROM jobs WHERE state = ?", [str(JobState.QUEUED)]
        if sources:
            sql += f" AND source IN ({','.join('?' * len(sources))})"
            args += sorted(sources)
        sql += " ORDER BY created LIMIT 1"
        # idle workers poll often (rtseg.worker.POLL_S): a plain read finds nothing without the write lock
        if self._conn().execute(sql, args).fetchone() is None:
            return None
        with self._tx() as db:
            row = db.execute(sql, args).fetchone()
            if row is None:
                return None
            now = time.time()
            db.execute(
                "UPDATE jobs SET state = ?, updated = ?, started = ?, attempts = attempts + 1,"
                " meta = json_set(meta, '$.worker_pid', ?) WHERE id = ?",
                (str(JobState.RUNNING), now, now, worker, row[0]),
            )
        return self.get(row[0])

    def recover_worker(self, worker: int, crash_limit: int) -> builtins.list[Job]:
        """Jobs left ``running`` by the dead worker process ``worker``: queued again, or failed.

        Each such job counts the death in ``meta["worker_deaths"]``; at ``crash_limit``
        deaths it is failed ("worker died N times on this job") instead of retried forever.
        """
        rows = self._conn().execute(
            "SELECT id FROM jobs WHERE state = ? AND json_extract(meta, '$.worker_pid') = ?",
            (str(JobState.RUNNING), worker),
        )
        return [self._after_worker_death(str(r[0]), crash_limit) for r in rows.fetchall()]

    def _after_worker_death(self, job_id: str, crash_limit: int) -> Job:
        job = self.get(job_id)
        deaths = int(job.meta.get("worker_deaths", 0)) + 1
        meta = {k: v for k, v in job.meta.items() if k != "worker_pid"} | {"worker_deaths": deaths}
        if deaths >= crash_limit:
            error = f"worker died {deaths} times on this job"
            return self.transition(job_id, JobState.RUNNING, JobState.FAILED, meta=meta, error=error)
        return self.transition(job_id, JobState.RUNNING, JobState.QUEUED, meta=meta)

    def recover(self) -> builtins.list[Job]:
        """After a restart: jobs left ``running`` by a dead worker go back to ``queued``."""
        stuck = self.list({JobState.RUNNING})
        return [self.transition(j.id, JobState.RUNNING, JobState.QUEUED) for j in stuck]

    # -- history ------------------------------------------------------------------------
    def page(self, query: PageQuery) -> tuple[builtins.list[Job], str | None]:
        """Jobs newest first as ``query`` filters them, and the cursor of the next page (or None)."""
        sql, args = "SELECT * FROM jobs WHERE 1=1", builtins.list[object]()
        for clause, value in (
            ("source = ?", query.source),
            ("created >= ?", query.since),
            ("created < ?", query.until),
        ):
            if value is not None:
                sql += f" AND {clause}"
                args.append(value)
        if query.states:
            sql += f" AND state IN ({','.join('?' * len(query.states))})"
            args += sorted(str(s) for s in query.states)
        if query.after is not None:  # keyset paging: stable while new jobs arrive
            sql += " AND (created, id) < (?, ?)"
            args += [query.after[0], query.after[1]]
        sql += " ORDER BY created DESC, id DESC LIMIT ?"
        args.append(query.limit + 1)
        jobs = [_job(r) for r in self._conn().execute(sql, args).fetchall()]
        more = len(jobs) > query.limit
        jobs = jobs[: query.limit]
        return jobs, (encode_cursor(jobs[-1]) if more else None)

    def later(self, job: Job) -> builtins.list[Job]:
        """Jobs of the same series (and face) created after ``job``, oldest first."""
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE source = ? AND series_key = ? AND (created, id) > (?, ?)"
            " ORDER BY created, id",
            (job.source, job.series_key, job.created, job.id),
        )
        return [_job(r) for r in rows.fetchall()]

    def explain(self, job: Job) -> Outcome:
        """What happened to ``job`` and why, including what later jobs of its series did."""
        later = self.later(job)
        superseded_by = next((j.id for j in later if j.meta.get("supersedes") == job.id), None)
        resolved_by = None
        if job.state in (JobState.FAILED, JobState.DEAD_LETTER):
            resolved_by = next((j.id for j in later if j.state == JobState.DONE), None)
        return _outcome(job, superseded_by, resolved_by)

    def resegment(self, ref: str, data_dir: Path) -> Job:
        """Queue a new job for the series of job ``ref`` (or of series UID / key ``ref``) from its kept input.

        The new job supersedes the latest job of the series and says it was made on
        request (``meta["resegment"]``). Raises :class:`JobError` when nothing
        matches ``ref``, the series is still in progress, or its instances are gone.
        """
        earlier = self._latest_input(ref)
        busy = [
            j for j in self.list(source=earlier.source, series_key=earlier.series_key) if j.state not in FINAL
        ]
        if busy:
            raise JobError(
                f"the series is still in progress (job {busy[0].id} is {busy[0].state}); wait for it"
            )
        instances = _kept_instances(Path(data_dir), earlier)
        if not instances:
            raise JobError(
                f"the instances of job {earlier.id} are gone (skipped, expired or deleted):"
                " send the series to the node again"
            )
        generation = int(earlier.meta.get("generation", 1)) + 1
        meta = {
            **{k: v for k, v in earlier.meta.items() if k not in _RUN_META},
            "supersedes": earlier.id,
            "generation": generation,
            "resegment": True,
        }
        if earlier.source == "dicom":
            meta["instances"], meta["n_instances"] = instances, len(instances)
        return self._queue_copy(earlier, Path(data_dir), meta)

    def _latest_input(self, ref: str) -> Job:
        found = self.find(ref)
        if found is None:
            keys = {ref, uid_key(ref)} if _UID_RE.match(ref) else {ref}
            rows = [j for k in keys for j in self.list(series_key=k, limit=100_000)]
            if not rows:
                raise JobError("no job and no series with that id or UID is known to this node")
            found = max(rows, key=lambda j: (j.created, j.id))
        if found.meta.get("duplicate_of"):  # a record of a re-send: the series' job is the original
            return self.get(str(found.meta["duplicate_of"]))
        return found

    def _queue_copy(self, earlier: Job, data_dir: Path, meta: dict[str, Any]) -> Job:
        job_id = uuid.uuid4().hex
        input_dir, output = earlier.input_dir, None
        if earlier.source != "dicom":  # an upload lives in its job's folder: the new job gets a copy
            input_dir = f"jobs/{job_id}/input"
            shutil.copytree(data_dir / earlier.input_dir, data_dir / input_dir)
            output = f"jobs/{job_id}/{Path(earlier.output_path or 'rtstruct.dcm').name}"
        job = self.create(earlier.source, earlier.series_key, input_dir, meta=meta, job_id=job_id)
        if output is not None:
            self.update(job.id, output_path=output)
        return self.transition(job.id, JobState.RECEIVED, JobState.QUEUED)

    def cancel(self, job_id: str) -> Job:
        """Take a queued job off the queue: ``queued → skipped``, reason "cancelled by operator".

        Raises :class:`JobError` when the job is not (or no longer) queued: a
        worker that claimed it first wins, and the job runs.
        """
        job = self.get(job_id)
        if job.state != JobState.QUEUED:
            raise JobError(f"only a queued job can be cancelled: this one is {job.state}")
        try:
            return self.transition(job_id, JobState.QUEUED, JobState.SKIPPED, error=CANCELLED)
        except JobError:
            state = self.get(job_id).state
            raise JobError(f"only a queued job can be cancelled: this one is {state}") from None

    def delete(self, job_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


@dataclass(frozen=True)
class PageQuery:
    """Filters and position of one page of :meth:`JobStore.page` (times are epoch seconds)."""

    limit: int = 50
    states: frozenset[JobState] = frozenset()
    source: str | None = None
    since: float | None = None  # received at or after
    until: float | None = None  # received before
    after: tuple[float, str] | None = None  # (created, id) of the last job of the previous page


@dataclass(frozen=True)
class Outcome:
    """What happened to a job and why, in words an operator reads (no patient data)."""

    outcome: str  # segmented, skipped, duplicate, superseded, failed, resolved, dead_letter, or the state
    reason: str | None
    duplicate_of: str | None = None
    supersedes: str | None = None
    superseded_by: str | None = None
    resolved_by: str | None = None


def _outcome(job: Job, superseded_by: str | None, resolved_by: str | None) -> Outcome:
    meta, reason = job.meta, job.error
    links = {
        "duplicate_of": meta.get("duplicate_of"),
        "supersedes": meta.get("supersedes"),
        "superseded_by": superseded_by,
        "resolved_by": resolved_by,
    }
    if job.state == JobState.SKIPPED:
        word = "duplicate" if meta.get("duplicate_of") else "skipped"
    elif resolved_by:
        word, reason = "resolved", f"{reason}; resolved by job {resolved_by}"
    elif superseded_by:
        word, reason = "superseded", f"superseded by job {superseded_by}"
    elif job.state in (JobState.DONE, JobState.SENDING):
        word = "segmented"
    else:
        word = str(job.state)
    if meta.get("resegment") and reason is None:
        reason = f"resegmented on request, supersedes job {meta.get('supersedes')}"
    return Outcome(word, reason, **links)


_CURSOR_SEP = "~"


def encode_cursor(job: Job) -> str:
    """An opaque page cursor: the position just after ``job`` in newest-first order."""
    raw = f"{job.created!r}{_CURSOR_SEP}{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The position a cursor of :func:`encode_cursor` stands for; JobError if it is not one."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, job_id = raw.split(_CURSOR_SEP, 1)
        return float(created), job_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise JobError("the cursor is not one this server gave out") from exc


# what a job acquires while it runs: a copy made to run again starts without it
_RUN_META = frozenset({"worker_pid", "worker_deaths", "failure_audited", "purged", "late_instances"})
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)+$")


def _kept_instances(data_dir: Path, job: Job) -> builtins.list[str]:
    """The input still on disk for ``job``: DICOM instance keys, or the upload's file names."""
    folder = data_dir / job.input_dir
    if job.meta.get("purged") or not folder.is_dir():
        return []
    if job.source == "dicom":
        return sorted(p.stem for p in folder.iterdir() if p.suffix == ".dcm" and not p.name.startswith("."))
    return sorted(p.name for p in folder.iterdir())


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        source=row["source"],
        state=JobState(row["state"]),
        series_key=row["series_key"],
        input_dir=row["input_dir"],
        output_path=row["output_path"],
        created=row["created"],
        updated=row["updated"],
        attempts=row["attempts"],
        error=row["error"],
        model_version=row["model_version"],
        meta=json.loads(row["meta"]),
        result=json.loads(row["result"]),
        started=row["started"],
        finished=row["finished"],
    )
