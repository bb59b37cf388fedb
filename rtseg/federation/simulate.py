"""A whole federation on one machine: real SuperLink and SuperNode processes on loopback.

Each site gets its own phantom center (A, B, A, ...) and its own cohort, its own
SuperNode, ``FLWR_HOME`` and working folder; the coordinator's state is a real
``--database`` plus the ServerApp's state folder. :class:`LocalFederation` is
also what the tests drive (stop a site mid-round, restart the coordinator).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtseg.errors import FederationError
from rtseg.federation.certs import FederationCerts, make_certs
from rtseg.federation.processes import (
    ServerTls,
    register_node,
    start_run,
    start_superlink,
    start_supernode,
    stop,
    wait_port,
    wait_run,
    write_app,
    write_connection,
)
from rtseg.federation.schedule import default_max_memory_gb
from rtseg.model.cpu import CpuConfig
from rtseg.net import free_port

log = logging.getLogger(__name__)

TINY = CpuConfig(
    target_spacing_zyx=(6.0, 6.0, 6.0),
    patch_size_zyx=(32, 48, 48),
    batch_size=2,
    base_features=4,
    n_stages=3,
    max_features=32,
    epochs=1,
    iterations_per_epoch=3,
    val_iterations_per_epoch=1,
    learning_rate=1e-2,
    da_workers=0,
    preprocess_workers=1,
    seed=0,
    threads=1,
)


@dataclass
class SimulationSpec:
    sites: int = 2
    rounds: int = 3
    cases_per_site: int = 4
    matrix: int = 48
    seed: int = 11
    local_epochs: int = 1
    cpu: CpuConfig = TINY
    secure: bool = True  # TLS with a private CA and SuperNode authentication
    min_sites: int = 1
    aggregation: str = "fedavg"
    max_share: float = 0.5  # no site above this share of the FedAvg weight
    round_timeout: float = 900.0
    dp_clip: float = 0.0
    dp_epsilon: float = 10.0
    federation: str = "rtseg-sim"
    start_model: Path | None = None  # a model folder: round 0 is its plans and weights
    site_extra: dict[int, dict[str, Any]] = field(default_factory=dict)  # node config additions per site

    def run_config(self, state_dir: Path) -> dict[str, Any]:
        return {
            "state-dir": str(state_dir.resolve()),
            "federation": self.federation,
            "model-name": "rtseg-peds-abdomen-fl",
            "rounds": self.rounds,
            "local-epochs": self.local_epochs,
            "min-sites": self.min_sites,
            "wait-sites": self.sites,
            "round-timeout": self.round_timeout,
            "join-timeout": 300.0,
            "aggregation": self.aggregation,
            "trim-fraction": 0.2,
            "norm-factor": 5.0,
            "max-cases": 10_000,
            "max-share": self.max_share,
            "prox-mu": 0.01 if self.aggregation == "fedprox" else 0.0,
            "cpu-config": json.dumps(self.cpu.to_dict()),
            "dp-clip": self.dp_clip,
            "dp-epsilon": self.dp_epsilon,
            "dp-delta": 1e-5,
            **({"start-model": str(self.start_model.resolve())} if self.start_model else {}),
        }


def site_center(index: int) -> str:
    return "AB"[index % 2]


class LocalFederation:
    """SuperLink + SuperNodes as real processes under ``root``; stop with :meth:`close`."""

    def __init__(self, root: Path, spec: SimulationSpec) -> None:
        self.root, self.spec = root.resolve(), spec
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.superlink: subprocess.Popen[bytes] | None = None
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}
        self.certs: FederationCerts | None = None
        self.cli_home = self.root / "flwr-cli"
        self.state_dir = self.root / "coordinator" / "state"
        if spec.secure:
            names = [f"site{i}" for i in range(spec.sites)] + ["intruder"]
            self.certs = make_certs(self.root / "certs", names, spec.federation)
        write_connection(self.cli_home, self.address, self.certs.ca if self.certs else None)

    def site_dir(self, i: int) -> Path:
        return self.root / f"site{i}"

    def make_cohorts(self, cache: Path | None = None) -> None:
        """Each site's phantom cohort; phantoms are deterministic, so ``cache`` may hold them already."""
        from rtseg.phantom.cohort import generate_cohort

        for i in range(self.spec.sites):
            if cache is not None:
                key = f"{site_center(i)}-{self.spec.seed + i}-{self.spec.cases_per_site}-{self.spec.matrix}"
                if not (cache / key).is_dir():
                    generate_cohort(
                        site_center(i),
                        self.spec.cases_per_site,
                        self.spec.seed + i,
                        cache / key,
                        self.spec.matrix,
                    )
                shutil.copytree(cache / key, self.site_dir(i) / "cases")
                continue
            generate_cohort(
                site_center(i),
                self.spec.cases_per_site,
                self.spec.seed + i,
                self.site_dir(i) / "cases",
                self.spec.matrix,
            )

    def start_coordinator(self, register: bool = True) -> None:
        home = self.root / "coordinator" / "flwr-home"
        tls = ServerTls(self.certs.ca, self.certs.server_cert, self.certs.server_key) if self.certs else None
        database = self.root / "coordinator" / "superlink.db"
        self.superlink = start_superlink(home, self.port, database, tls, node_auth=self.certs is not None)
        wait_port(self.port, proc=self.superlink)
        time.sleep(1.0)
        if self.certs and register:  # keys stay registered in the SuperLink's database
            for i in range(self.spec.sites):
                register_node(self.cli_home, self.certs.site_keys[f"site{i}"][1], f"site{i}")

    def start_site(self, i: int, key: str | None = None) -> subprocess.Popen[bytes]:
        site = self.site_dir(i)
        node_config = {
            "site-id": f"site{i}",
            "data-dir": str(site / "cases"),
            "work-dir": str(site / "work"),
            "threads": 1,
            "nice": 10,
            "record-dir": str(site / "sent"),
            "max-memory-gb": default_max_memory_gb(),  # as `rtseg federation site` does
            **self.spec.site_extra.get(i, {}),
        }
        private = self.certs.site_keys[key or f"site{i}"][0] if self.certs else None
        proc = start_supernode(
            site / "flwr-home",
            self.address,
            free_port(),
            node_config,
            self.certs.ca if self.certs else None,
            private,
            insecure=self.certs is None,  # `simulate --insecure`: loopback only
        )
        self.nodes[i] = proc
        return proc

    def stop_site(self, i: int) -> None:
        stop(self.nodes.pop(i))

    def stop_coordinator(self) -> None:
        if self.superlink is not None:
            stop(self.superlink)
            self.superlink = None

    def run(self, timeout: float = 3600.0) -> tuple[int, str]:
        app = write_app(self.root / "app", self.spec.run_config(self.state_dir))
        run_id = start_run(self.cli_home, app)
        log.info("run %d started", run_id)
        return run_id, wait_run(self.cli_home, run_id, timeout)

    def close(self) -> None:
        for i in list(self.nodes):
            self.stop_site(i)
        self.stop_coordinator()

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rounds_log(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def simulate(spec: SimulationSpec, out: Path, work: Path, say: Callable[[str], None] = print) -> Path:
    """Run the federation; copy the last global model to ``out``; report the figures."""
    started = time.monotonic()
    with LocalFederation(work, spec) as fed:
        say(f"phantom cohorts: {spec.sites} sites × {spec.cases_per_site} cases (centers A, B, ...)")
        fed.make_cohorts()
        say(f"SuperLink on {fed.address} ({'TLS + node authentication' if spec.secure else 'insecure'})")
        fed.start_coordinator()
        for i in range(spec.sites):
            fed.start_site(i)
        say(f"{spec.sites} SuperNodes started; running {spec.rounds} rounds")
        run_id, status = fed.run()
        if status != "finished:completed":
            raise FederationError(f"run {run_id} ended {status}; see {fed.state_dir / 'coordinator.log'}")
        final = fed.state_dir / "models" / f"round_{spec.rounds:03d}"
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(final, out)
        report(rounds_log(fed.state_dir), say)
    say(f"global model: {out} ({time.monotonic() - started:.0f} s in all)")
    return out


def report(rounds: list[dict[str, Any]], say: Callable[[str], None]) -> None:
    say(f"{'round':>5} {'seconds':>8} {'site':>6} {'MB sent':>8} {'training s':>10} {'other s':>8}")
    for r in rounds:
        train = max((s["train_seconds"] for s in r["sites"].values()), default=0.0)
        for site, s in r["sites"].items():
            say(
                f"{r['round']:>5} {r['seconds']:>8.1f} {site[-6:]:>6} {s['bytes_sent'] / 1e6:>8.3f}"
                f" {s['train_seconds']:>10.1f} {r['seconds'] - train:>8.1f}"
            )
        for site, reason in r["rejected"].items():
            say(f"{r['round']:>5} rejected {site}: {reason}")
