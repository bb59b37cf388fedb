"""``rtseg serve`` and ``rtseg node echo|status|retry|bench``: the DICOM face's commands.

Registered into the ``rtseg`` command line by :func:`register`. User-facing
output is printed here; nothing printed carries patient data.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtseg.settings import Settings, load_settings

if TYPE_CHECKING:
    from rtseg.federation.schedule import SiteSettings

Handler = Callable[[argparse.Namespace], int]


def _model(settings: Settings) -> tuple[Path, str]:
    from rtseg.model.manifest import load_manifest, model_hash
    from rtseg.model.registry import serving_model_dir

    # model.path, else the registry's current model (workers follow promotions)
    model_dir = serving_model_dir(settings.model_path, settings.data_dir)
    manifest = load_manifest(model_dir)
    return model_dir, f"{manifest.name} {manifest.version} (hash {model_hash(model_dir)})"


def _describe(settings: Settings, port: int, model: str) -> list[str]:
    d = settings.dicom
    tls = "TLS" if d.tls.enabled else "no TLS"
    callers = ", ".join(f"{c.ae_title}@{c.host or '*'}" for c in d.allowed_callers) or "any calling AE"
    lines = [
        f"DICOM: AE {d.ae_title} listening on {d.host}:{port} ({tls}, max PDU {d.max_pdu or 'unlimited'})",
        f"  accepting: {callers}",
    ]
    for dest in settings.destinations:
        lines.append(
            f"  results to: {dest.name} = {dest.ae_title}@{dest.host}:{dest.port}{' TLS' if dest.tls else ''}"
        )
    if d.return_to_sender:
        lines.append("  results to: the calling AE (return to sender)")
    if not settings.destinations and not d.return_to_sender:
        lines.append("  results to: nowhere (no destinations): RTSTRUCTs stay in the data directory")
    n = settings.node
    lines += [
        f"data: {Path(settings.data_dir).resolve()}",
        f"model: {model}",
        f"workers: {n.workers}, quiet time {n.quiet_time_s:g} s, retention {n.retention_h:g} h",
    ]
    return lines


def _site(settings: Settings) -> SiteSettings | None:
    """This node's federation site, when the ``[federation]`` table names a coordinator."""
    if not settings.federation.get("coordinator"):
        return None
    from rtseg.federation.schedule import SiteSettings

    return SiteSettings.from_mapping(settings.federation, "[federation]", Path(settings.data_dir))


def _cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.node import Node

    settings = load_settings(args.config)
    model_dir, model = _model(settings)
    site = _site(settings)  # a bad [federation] table stops us before anything listens
    node = Node(settings, model_dir)
    node.start()
    for line in _describe(settings, node.port, model):
        print(line, flush=True)
    stops: list[Callable[[], None]] = []
    # --- optional companions start here -------------------------------------------------
    # The HTTP service (service/) starts here from settings.http and appends its stop
    # function to `stops`. Keep this block small: one companion, one call.
    from service.cli import start_companion

    stops.append(
        start_companion(settings, node.store, node.pool, node.data_dir, model_dir, node.association_observers)
    )
    # The federation site (rtseg/federation) runs when [federation] names a coordinator.
    if site is not None:
        from rtseg.federation.schedule import start_site

        print(site.describe(), flush=True)
        stops.append(start_site(site))
    # --- end of optional companions -----------------------------------------------------
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print("ready (SIGTERM or Ctrl-C stops)", flush=True)
    while not stop.wait(1.0):
        pass
    print("stopping ...", flush=True)
    for stop_companion in reversed(stops):
        stop_companion()
    node.stop()
    print("stopped", flush=True)
    return 0


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


def _node_bench(args: argparse.Namespace) -> int:
    from rtseg_app.bench.node import run_bench

    return run_bench(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from rtseg_app.bench.suite import run_suite

    return run_suite(args)


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _register_bench(sub: Any, handlers: dict[str, Handler]) -> None:
    from rtseg_app.bench.suite import SECTIONS

    p = sub.add_parser(
        "bench",
        help="measure inference vs stock nnU-Net, DICOM receive vs dcmtk, RTSTRUCT build, turnaround"
        " and one federated round; write bench.json and bench.md",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for bench.json and bench.md")
    p.add_argument("--work", type=Path, help="working folder (default OUT/work; reused between runs)")
    p.add_argument("--quick", action="store_true", help="small sizes: proves it works in a few minutes")
    p.add_argument("--levers", action="store_true", help="also measure each inference speed lever")
    p.add_argument(
        "--scaling", action="store_true", help="also turnaround and memory vs slice count and concurrency"
    )
    p.add_argument("--model", type=Path, help="model folder (default: the embedded default model)")
    p.add_argument("--slices", type=_count(8), help="slices of the benchmark CT (default 200; quick 48)")
    p.add_argument("--matrix", type=_count(32), help="matrix of the benchmark CT (default 512; quick 128)")
    p.add_argument("--series", type=_count(1), help="turnaround series (default 10; quick 3)")
    p.add_argument("--case-matrix", type=_count(32), help="matrix of the turnaround phantoms (default 256)")
    p.add_argument("--skip", action="append", choices=SECTIONS, help="leave a section out (repeatable)")
    handlers["bench"] = _cmd_bench


def register(sub: Any, handlers: dict[str, Handler]) -> None:
    _register_bench(sub, handlers)
    p = sub.add_parser("serve", help="run the DICOM node (SCP, segmentation workers, sender)")
    p.add_argument(
        "--config", type=Path, help="TOML settings file (RTSEG_* environment variables override it)"
    )
    handlers["serve"] = _cmd_serve

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
    q = nsub.add_parser("bench", help="receive throughput vs dcmtk storescp, turnaround p50/p95")
    q.add_argument("--work", type=Path, default=Path("rtseg-bench"), help="working folder")
    q.add_argument("--slices", type=int, default=300, help="slices of the throughput series (default 300)")
    q.add_argument("--matrix", type=int, default=512, help="image matrix of the throughput series")
    q.add_argument("--series", type=int, default=10, help="series for the turnaround figures (default 10)")
    q.add_argument("--model", type=Path, help="model folder (default: the embedded model)")
    q.add_argument("--case-matrix", type=int, default=128, help="matrix of the turnaround phantoms")
    q.add_argument("--skip-turnaround", action="store_true")
    q.add_argument("--skip-throughput", action="store_true")
    q.set_defaults(node_action=_node_bench)
    handlers["node"] = _cmd_node
