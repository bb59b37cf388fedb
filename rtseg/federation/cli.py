"""``rtseg federation coordinator|site|certs|simulate``."""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]
START_MODEL_HELP = (
    "model folder to continue from (e.g. the default model): round 0 is its plans, labels and weights"
    " (default: plans from the pooled fingerprint, random weights)"
)


def _cmd_certs(args: argparse.Namespace) -> int:
    from rtseg.federation.certs import make_certs

    certs = make_certs(args.out, args.sites, args.federation, tuple(args.host))
    print(f"CA: {certs.ca} (give to every site)\nserver: {certs.server_cert}, {certs.server_key}")
    for site, (private, public) in certs.site_keys.items():
        print(f"site {site}: private key {private} (to that site only), public key {public} (register)")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from rtseg.federation.simulate import TINY, SimulationSpec, simulate

    spec = SimulationSpec(
        sites=args.sites,
        rounds=args.rounds,
        cases_per_site=args.cases,
        matrix=args.matrix,
        local_epochs=args.local_epochs,
        cpu=replace(TINY, iterations_per_epoch=args.iterations),
        secure=not args.insecure,
        min_sites=args.min_sites or 1,
        aggregation=args.aggregation,
        dp_clip=args.dp_clip,
        dp_epsilon=args.dp_epsilon,
        start_model=args.start_model,
    )
    work = args.work or args.out.with_name(args.out.name + "-work")
    started = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {msg}", flush=True)

    simulate(spec, args.out, work, say)
    return 0


def _cmd_coordinator(args: argparse.Namespace) -> int:
    """SuperLink with a persistent database, site keys registered, then the ServerApp run."""
    from rtseg.federation.processes import (
        ServerTls,
        register_node,
        start_run,
        start_superlink,
        stop,
        wait_port,
        wait_run,
        write_app,
        write_connection,
    )
    from rtseg.federation.simulate import SimulationSpec
    from rtseg.federation.start_model import load_start_model
    from rtseg.model.cpu import CpuConfig

    if args.start_model is not None:
        load_start_model(args.start_model)  # a bad folder is one line now, not a failed run later
    state = args.state.resolve()
    tls = None
    if not args.insecure:
        certs = args.certs.resolve()
        tls = ServerTls(certs / "ca.crt", certs / "server.crt", certs / "server.key")
    superlink = start_superlink(
        state / "flwr-home", args.port, state / "superlink.db", tls, node_auth=tls is not None, host=args.host
    )
    cli_home = state / "flwr-cli"
    try:
        wait_port(args.port, proc=superlink)
        write_connection(cli_home, f"127.0.0.1:{args.port}", tls.ca if tls else None)
        if tls is not None:
            for key in sorted((args.certs / "sites").glob("*.pub")):
                register_node(cli_home, key, key.stem)  # an already registered key is refused: harmless
        cpu = CpuConfig.from_dict(json.loads(args.cpu_config.read_text())) if args.cpu_config else CpuConfig()
        spec = SimulationSpec(
            rounds=args.rounds,
            local_epochs=args.local_epochs,
            cpu=cpu,
            min_sites=args.min_sites,
            aggregation=args.aggregation,
            max_share=args.max_share,
            round_timeout=args.round_timeout,
            federation=args.federation,
            sites=args.wait_sites or args.min_sites,
            start_model=args.start_model,
        )
        run_id = start_run(cli_home, write_app(state / "app", spec.run_config(state / "state")))
        print(f"run {run_id} started; coordinator log: {state / 'state' / 'coordinator.log'}", flush=True)
        status = wait_run(cli_home, run_id, timeout=args.timeout)
        print(f"run {run_id}: {status}")
        final = state / "state" / "models" / f"round_{args.rounds:03d}"
        if status == "finished:completed" and final.is_dir():
            shutil.rmtree(state / "global", ignore_errors=True)
            shutil.copytree(final, state / "global")
            print(f"global model: {state / 'global'}")
            return 0
        return 1
    finally:
        stop(superlink)


def _cmd_site(args: argparse.Namespace) -> int:
    from rtseg.federation.schedule import SiteSettings, Window, run_site

    if args.config:
        settings = SiteSettings.from_toml(args.config)
    else:
        settings = SiteSettings(
            coordinator=args.coordinator,
            site_id=args.site_id,
            data_dir=args.data,
            work_dir=args.work,
            ca=None if args.insecure else args.ca,
            key=args.key,
            window=Window.parse(args.window),
            threads=args.threads,
            nice=args.nice,
            insecure=args.insecure,
            partial_labels=args.partial_labels,
            **({"max_memory_gb": args.max_memory_gb} if args.max_memory_gb is not None else {}),
        )
    stop = threading.Event()
    try:
        run_site(settings, stop)
    except KeyboardInterrupt:
        stop.set()
    return 0


def register(sub: Any, handlers: dict[str, Handler]) -> None:
    p = sub.add_parser(
        "federation", help="federated training with Flower (coordinator, site, certs, simulate)"
    )
    fsub = p.add_subparsers(dest="federation_command", required=True, metavar="ACTION")

    q = fsub.add_parser(
        "certs", help="private CA, server certificate and ECDSA site keys for a new federation"
    )
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--sites", nargs="+", required=True, help="site names")
    q.add_argument("--host", action="append", default=[], help="extra server name or IP for the certificate")
    q.add_argument("--federation", default="rtseg")
    q.set_defaults(fed_action=_cmd_certs)

    q = fsub.add_parser("coordinator", help="SuperLink (persistent database) + the ServerApp; resumes")
    q.add_argument("--state", type=Path, required=True, help="coordinator folder (database, rounds, models)")
    q.add_argument("--port", type=int, default=9092)
    q.add_argument("--host", default="0.0.0.0", help="address the SuperLink listens on (default all)")
    q.add_argument("--certs", type=Path, help="folder from `rtseg federation certs`")
    q.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (tests only)")
    q.add_argument("--rounds", type=int, default=10)
    q.add_argument("--local-epochs", type=int, default=1)
    q.add_argument("--min-sites", type=int, default=2)
    q.add_argument("--wait-sites", type=int, help="sites to wait for before starting (default min-sites)")
    q.add_argument("--aggregation", default="fedavg", choices=["fedavg", "fedprox", "trimmed-mean", "median"])
    q.add_argument(
        "--max-share",
        type=float,
        default=0.5,
        help="largest share of the FedAvg weight any one site gets, whatever it reports (default 0.5)",
    )
    q.add_argument("--round-timeout", type=float, default=6 * 3600.0)
    q.add_argument("--federation", default="rtseg")
    q.add_argument("--cpu-config", type=Path, help="JSON of rtseg's CpuConfig (default: its defaults)")
    q.add_argument("--start-model", type=Path, help=START_MODEL_HELP)
    q.add_argument("--timeout", type=float, default=7 * 24 * 3600.0)
    q.set_defaults(fed_action=_cmd_coordinator)

    q = fsub.add_parser("site", help="this site's SuperNode + ClientApp, within its participation window")
    q.add_argument("--config", type=Path, help="TOML with a [federation] table (overrides the options)")
    q.add_argument("--coordinator", help="SuperLink host:port")
    q.add_argument("--site-id")
    q.add_argument("--data", type=Path, help="the site's cases (<case>/ct, <case>/labels.nii.gz)")
    q.add_argument("--work", type=Path, help="the site's working folder")
    q.add_argument("--ca", type=Path, help="the federation's CA certificate")
    q.add_argument("--key", type=Path, help="the site's ECDSA private key")
    q.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only; else --ca)")
    q.add_argument(
        "--window", default="always", help="daily participation window HH:MM-HH:MM (default always)"
    )
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--nice", type=int, default=10)
    q.add_argument(
        "--max-memory-gb",
        type=float,
        help="memory the site's training may take (default: three quarters of this machine's)",
    )
    q.add_argument(
        "--partial-labels",
        choices=["ignore", "background"],
        default="ignore",
        help="structures a case's contour set lacks: nnU-Net's ignore label (default), or trained as drawn",
    )
    q.set_defaults(fed_action=_cmd_site)

    q = fsub.add_parser("simulate", help="a whole federation on this machine (real Flower processes)")
    q.add_argument("--sites", type=int, default=2)
    q.add_argument("--rounds", type=int, default=3)
    q.add_argument("--out", type=Path, required=True, help="folder for the final global model")
    q.add_argument("--work", type=Path, help="working folder (default OUT-work)")
    q.add_argument("--cases", type=int, default=4, help="phantom cases per site")
    q.add_argument("--matrix", type=int, default=48)
    q.add_argument("--local-epochs", type=int, default=1)
    q.add_argument("--iterations", type=int, default=3, help="iterations per local epoch")
    q.add_argument("--min-sites", type=int)
    q.add_argument("--aggregation", default="fedavg", choices=["fedavg", "fedprox", "trimmed-mean", "median"])
    q.add_argument("--dp-clip", type=float, default=0.0, help="Flower LocalDpMod clipping norm (0: off)")
    q.add_argument("--dp-epsilon", type=float, default=10.0)
    q.add_argument("--insecure", action="store_true", help="no TLS / node authentication")
    q.add_argument("--start-model", type=Path, help=START_MODEL_HELP)
    q.set_defaults(fed_action=_cmd_simulate)
    handlers["federation"] = lambda args: int(args.fed_action(args))
