"""``rtseg serve``: the DICOM node with its companions, the HTTP API and the federation site.

The composition root starts them side by side, so that neither face imports the
other. User-facing output is printed here; nothing printed carries patient data.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtseg.settings import Settings, load_settings
from service.cli import wait_for_signal

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
    from rtseg.privacy import start_log_file

    settings = load_settings(args.config)
    log_file = start_log_file(settings.data_dir, settings.logging)  # before the workers: they log through it
    model_dir, model = _model(settings)
    site = _site(settings)  # a bad [federation] table stops us before anything listens
    node = Node(settings, model_dir)
    node.start()
    for line in _describe(settings, node.port, model):
        print(line, flush=True)
    print(f"log: {log_file.resolve() if log_file else 'stderr only ([logging] file = false)'}", flush=True)
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
    wait_for_signal()
    print("stopping ...", flush=True)
    for stop_companion in reversed(stops):
        stop_companion()
    node.stop()
    print("stopped", flush=True)
    return 0


def register(sub: Any, handlers: dict[str, Handler]) -> None:
    """Add ``rtseg serve``."""
    p = sub.add_parser("serve", help="run the DICOM node (SCP, segmentation workers, sender)")
    p.add_argument(
        "--config", type=Path, help="TOML settings file (RTSEG_* environment variables override it)"
    )
    handlers["serve"] = _cmd_serve
