"""One federated round on loopback: seconds in local training vs everything else, bytes per site.

Runs the real Flower processes of :mod:`rtseg.federation.simulate` (SuperLink,
one SuperNode per site, TLS and node authentication) for one round and reads
the coordinator's own round record (``rounds.jsonl``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rtseg.federation import FederationError
from rtseg.federation.simulate import TINY, LocalFederation, SimulationSpec, rounds_log


def one_round(
    work: Path,
    *,
    sites: int = 2,
    cases_per_site: int = 2,
    matrix: int = 48,
    iterations: int = TINY.iterations_per_epoch,
) -> dict[str, Any]:
    """Run a one-round federation under ``work`` and return its timing and traffic."""
    cpu = replace(TINY, iterations_per_epoch=iterations)
    spec = SimulationSpec(
        sites=sites, rounds=1, cases_per_site=cases_per_site, matrix=matrix, cpu=cpu, min_sites=sites
    )
    started = time.monotonic()
    with LocalFederation(work, spec) as fed:
        fed.make_cohorts(cache=work.parent / "fed-cohorts")
        fed.start_coordinator()
        for i in range(sites):
            fed.start_site(i)
        ready = time.monotonic()
        run_id, status = fed.run()
        if status != "finished:completed":
            raise FederationError(f"run {run_id} ended {status}; see {fed.state_dir / 'coordinator.log'}")
        rounds = rounds_log(fed.state_dir)
    finished = time.monotonic()
    if not rounds:
        raise FederationError("the coordinator recorded no round")
    return _summary(rounds[-1], spec, ready - started, finished - ready)


def _summary(record: dict[str, Any], spec: SimulationSpec, setup_s: float, run_s: float) -> dict[str, Any]:
    sites = record["sites"]
    train = max((s["train_seconds"] for s in sites.values()), default=0.0)
    return {
        "sites": len(sites),
        "cases_per_site": spec.cases_per_site,
        "matrix": spec.matrix,
        "config": {
            "base_features": spec.cpu.base_features,
            "n_stages": spec.cpu.n_stages,
            "iterations": spec.cpu.iterations_per_epoch,
        },
        "round_s": record["seconds"],
        "training_s": train,
        "other_s": max(record["seconds"] - train, 0.0),
        "bytes_per_site": {f"site{i}": s["bytes_sent"] for i, s in enumerate(sites.values())},
        "bytes_to_each_site": record.get("bytes_to_each_site"),
        "setup_s": setup_s,
        "run_s": run_s,
    }


def model_update_bytes(model_dir: Path) -> int:
    """Bytes of the float32 weights a site would send for ``model_dir``'s network (no envelope)."""
    from rtseg.model.checkpoints import load_checkpoint
    from rtseg.model.manifest import load_manifest

    manifest = load_manifest(model_dir)
    checkpoint = load_checkpoint(model_dir / f"fold_{manifest.folds[0]}" / manifest.checkpoint)
    weights = checkpoint["network_weights"]
    return int(sum(t.numel() * 4 for t in weights.values()))
