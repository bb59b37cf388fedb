"""``rtseg node echo|status|retry``: the DICOM face's operator commands.

Registered into the ``rtseg`` command line by :func:`register` (the composition
root, :mod:`rtseg_app`, also owns ``rtseg serve`` and ``rtseg node bench``).
User-facing output is printed here; nothing printed carries patient data.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rtseg.settings import load_settings

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
    from rtseg.jobs import JobState, state_db

    settings = load_settings(args.config)
    db = state_db(settings.data_dir)
    if not db.is_file():
        print(f"no node state in {Path(settings.data_dir).resolve()} (never started?)")
        return 1
    store, deliveries = open_stores(Path(settings.data_dir))
    counts = store.counts()
    print("jobs: " + ", ".join(f"{state} {n}" for state, n in counts.items()))
    dead = deliveries.dead(limit=args.limit)
    print(f"dead letters: {len(dead)}")
    for row in dead:
        print(f"  job {row.job_id} → {row.destination}: {row.attempts} tries, last error: {row.last_error}")
    failed = store.list({JobState.FAILED})[-args.limit :]
    print(f"failed jobs: {counts[JobState.FAILED]}")
    for job in failed:
        print(f"  job {job.id} ({job.source}): {job.error}")
    incomplete = [j for j in store.list(source="dicom", limit=100_000) if j.meta.get("late_instances")]
    print(f"incomplete series (late_instance_policy flag): {len(incomplete)}")
    for job in incomplete[-args.limit :]:
        late = job.meta["late_instances"]
        print(f"  job {job.id}: {late} instance(s) arrived after segmentation, not contoured")
    return 0


def _node_retry(args: argparse.Namespace) -> int:
    from dicom_node.audit import AuditLog
    from dicom_node.node import open_stores
    from dicom_node.scu import requeue_dead_letters
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
    q = nsub.add_parser("status", help="job counts by state, dead letters and recent errors")
    q.add_argument("--config", type=Path)
    q.add_argument("--limit", type=int, default=10, help="rows of dead letters and failures to show")
    q.set_defaults(node_action=_node_status)
    q = nsub.add_parser("retry", help="send dead-lettered deliveries again (all, or the given jobs)")
    q.add_argument("--config", type=Path)
    q.add_argument("jobs", nargs="*", metavar="JOB_ID", help="jobs to retry (default: every dead letter)")
    q.set_defaults(node_action=_node_retry)
    handlers["node"] = _cmd_node
    return nsub
