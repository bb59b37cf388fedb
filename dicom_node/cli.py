"""``rtseg node echo|status|retry|resegment``: the DICOM face's operator commands.

Registered into the ``rtseg`` command line by :func:`register` (the composition
root, :mod:`rtseg_app`, also owns ``rtseg serve`` and ``rtseg node bench``).
User-facing output is printed here; nothing printed carries patient data.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtseg.settings import load_settings

if TYPE_CHECKING:
    from rtseg.jobs import Job, JobStore

Handler = Callable[[argparse.Namespace], int]


def _cmd_node(args: argparse.Namespace) -> int:
    action: Handler = args.node_action
    return action(args)


def _node_echo(args: argparse.Namespace) -> int:
    from dicom_node.scu import echo

    settings = load_settings(args.config)
    if args.destination:
        found = [d for d in settings.destinations if d.name == args.destination]
        if not found:
            names = ", ".join(d.name for d in settings.destinations) or "none configured"
            print(f"no destination {args.destination!r} ({names})")
            return 2
        d = found[0]
        target: dict[str, Any] = {"ae_title": d.ae_title, "host": d.host, "port": d.port, "tls": d.tls}
    else:
        host = args.host or "127.0.0.1"
        target = {
            "ae_title": settings.dicom.ae_title,
            "host": host,
            "port": settings.dicom.port,
            "tls": False,
        }
        target["tls"] = settings.dicom.tls.enabled
    ok, seconds = echo(args.aet, target, settings.dicom.tls)
    where = f"{target['ae_title']}@{target['host']}:{target['port']}"
    print(f"C-ECHO {where}: {'success' if ok else 'FAILED'} in {seconds * 1000:.0f} ms")
    return 0 if ok else 1


def _node_status(args: argparse.Namespace) -> int:
    from dicom_node.node import open_stores
    from rtseg.jobs import state_db

    settings = load_settings(args.config)
    db = state_db(settings.data_dir)
    if not db.is_file():
        print(f"no node state in {Path(settings.data_dir).resolve()} (never started?)")
        return 1
    store, deliveries = open_stores(Path(settings.data_dir))
    counts = store.counts()
    print("jobs: " + ", ".join(f"{state} {n}" for state, n in counts.items()))
    _print_recent(store, args.limit)
    dead = deliveries.dead(limit=args.limit)
    print(f"dead letters: {len(dead)}")
    for row in dead:
        print(f"  job {row.job_id} → {row.destination}: {row.attempts} tries, last error: {row.last_error}")
    _print_failures(store, args.limit)
    incomplete = [j for j in store.list(source="dicom", limit=100_000) if j.meta.get("late_instances")]
    print(f"incomplete series (late_instance_policy flag): {len(incomplete)}")
    for job in incomplete[-args.limit :]:
        late = job.meta["late_instances"]
        print(f"  job {job.id}: {late} instance(s) arrived after segmentation, not contoured")
    return 0


def _print_recent(store: JobStore, limit: int) -> None:
    """Every series the node saw, newest first: outcome, reason, times."""
    from rtseg.jobs import PageQuery

    jobs, _ = store.page(PageQuery(limit=limit))
    print(f"recent jobs (newest first, at most {limit}):")
    for job in jobs:
        print("  " + _job_line(store, job))


def _job_line(store: JobStore, job: Job) -> str:
    told = store.explain(job)
    who = job.meta.get("calling_ae") or job.source
    line = f"job {job.id} ({job.source} {who}) {told.outcome}: {_times(job)}"
    return line + (f"; {told.reason}" if told.reason else "")


def _times(job: Job) -> str:
    parts = [f"received {_clock(job.created)}"]
    if job.started is not None:
        parts.append(f"started {_clock(job.started)}")
    if job.finished is not None and job.turnaround is not None:
        parts.append(f"finished {_clock(job.finished)}, turnaround {job.turnaround:.1f} s")
    return ", ".join(parts)


def _clock(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _print_failures(store: JobStore, limit: int) -> None:
    """Failed jobs, apart from those a later job of the same series made good."""
    from rtseg.jobs import JobState

    failed = [(job, store.explain(job)) for job in store.list({JobState.FAILED}, limit=100_000)]
    current = [job for job, told in failed if told.resolved_by is None]
    resolved = [(job, told) for job, told in failed if told.resolved_by is not None]
    print(f"failed jobs: {len(current)}")
    for job in current[-limit:]:
        print(f"  job {job.id} ({job.source}): {job.error}")
    print(f"failed jobs resolved by a later job: {len(resolved)}")
    for job, told in resolved[-limit:]:
        print(f"  job {job.id} ({job.source}): {job.error} (resolved by job {told.resolved_by})")


def _node_resegment(args: argparse.Namespace) -> int:
    from dicom_node.node import open_stores
    from rtseg.audit import AuditLog
    from rtseg.jobs import JobError, state_db

    settings = load_settings(args.config)
    data_dir = Path(settings.data_dir)
    if not state_db(data_dir).is_file():
        print(f"no node state in {data_dir.resolve()} (never started?)")
        return 1
    store, _ = open_stores(data_dir)
    try:
        job = store.resegment(args.ref, data_dir)
    except JobError as exc:
        print(f"cannot resegment: {exc}")  # no UID echoed: the output may be pasted anywhere
        return 1
    earlier = job.meta["supersedes"]
    AuditLog(data_dir / "audit" / "audit.log").record(
        "resegment_requested", job=job.id, supersedes=earlier, series=job.series_key, by="cli"
    )
    print(f"queued job {job.id}: resegmented on request, supersedes job {earlier}")
    return 0


def _node_retry(args: argparse.Namespace) -> int:
    from dicom_node.node import open_stores
    from rtseg.audit import AuditLog
    from rtseg.deliveries import requeue_dead_letters
    from rtseg.jobs import state_db

    settings = load_settings(args.config)
    data_dir = Path(settings.data_dir)
    if not state_db(data_dir).is_file():
        print(f"no node state in {data_dir.resolve()} (never started?)")
        return 1
    store, deliveries = open_stores(data_dir)
    audit = AuditLog(data_dir / "audit" / "audit.log")
    requeued = requeue_dead_letters(store, deliveries, audit, args.jobs)
    for job_id, names in requeued.items():
        print(f"requeued job {job_id} → {', '.join(names)}")
    if not requeued:
        print("nothing to retry (no dead letters)")
    return 0


def register(sub: Any, handlers: dict[str, Handler]) -> Any:
    """Add ``rtseg node``; return its action subparsers, where the root adds ``bench``."""
    p = sub.add_parser("node", help="operator helpers for the DICOM node")
    nsub = p.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    q = nsub.add_parser("echo", help="C-ECHO the node (default) or a configured destination")
    q.add_argument("--config", type=Path)
    q.add_argument("--destination", help="name of a configured destination")
    q.add_argument("--host", help="node address (default 127.0.0.1)")
    q.add_argument("--aet", default="RTSEG-ECHO", help="calling AE title (default RTSEG-ECHO)")
    q.set_defaults(node_action=_node_echo)
    q = nsub.add_parser(
        "status", help="job counts, recent jobs with times and reasons, dead letters, failures"
    )
    q.add_argument("--config", type=Path)
    q.add_argument("--limit", type=int, default=10, help="rows of recent jobs, dead letters and failures")
    q.set_defaults(node_action=_node_status)
    q = nsub.add_parser("retry", help="send dead-lettered deliveries again (all, or the given jobs)")
    q.add_argument("--config", type=Path)
    q.add_argument("jobs", nargs="*", metavar="JOB_ID", help="jobs to retry (default: every dead letter)")
    q.set_defaults(node_action=_node_retry)
    q = nsub.add_parser("resegment", help="segment a series the node has again (a new job that supersedes)")
    q.add_argument("--config", type=Path)
    q.add_argument(
        "ref", metavar="SERIES_UID|JOB_ID", help="a job id, or the SeriesInstanceUID of the series"
    )
    q.set_defaults(node_action=_node_resegment)
    handlers["node"] = _cmd_node
    return nsub
