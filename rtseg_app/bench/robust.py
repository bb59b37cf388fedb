"""Robust aggregation against one poisoned site, measured on real phantom-federation updates.

Runs one round of a three-site phantom federation (real SuperLink and
SuperNodes, :mod:`rtseg.federation.simulate`), keeps the global model the
sites started from and the three updates they sent, then replays the
coordinator's own screening, weighting and aggregation with one site's update
poisoned in several ways. The figure is the distance of each resulting global
model from the honest aggregate (FedAvg of the three unpoisoned updates),
relative to the length of the honest step. A Dice comparison would need a
federation trained for hours on these cores; the tiny model of one round has
no Dice to compare.

``rtseg bench --section robust --out OUT`` (the federation is reused from
``WORK/robust`` when it is already there; the rows also go to ``robust.json`` there).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from rtseg.errors import FederationError
from rtseg.federation.aggregate import (
    AggregationPolicy,
    Arrays,
    Update,
    aggregate,
    screen,
    site_weights,
)
from rtseg.federation.simulate import TINY, LocalFederation, SimulationSpec, rounds_log
from rtseg.model.weights import load_arrays, save_arrays

Attack = Callable[[Update, Arrays], Update]


def collect_updates(work: Path, sites: int = 3) -> tuple[Arrays, list[Update]]:
    """The round-0 global model and the updates the sites sent in round 1 (cached under ``work``)."""
    saved = work / "updates"
    if not (saved / "done.json").is_file():
        spec = SimulationSpec(
            sites=sites, rounds=1, cases_per_site=2, matrix=48, cpu=replace(TINY, iterations_per_epoch=3)
        )
        spec.min_sites = sites
        with LocalFederation(work / "federation", spec) as fed:
            fed.make_cohorts(cache=work / "cohorts")
            fed.start_coordinator()
            for i in range(sites):
                fed.start_site(i)
            run_id, status = fed.run()
            if status != "finished:completed":
                raise FederationError(f"run {run_id} ended {status}")
            (record,) = rounds_log(fed.state_dir)
            save_arrays(saved / "global.npz", load_arrays(fed.state_dir / "rounds" / "round_000.npz"))
            for i in range(sites):
                sent = sorted((fed.site_dir(i) / "sent").glob("*-train.json"))[-1]
                cases = json.loads(sent.read_text())["records"]["config"]["values"]["cases"]
                save_arrays(saved / f"site{i}-{cases}.npz", load_arrays(sent.with_suffix(".npz")))
        (saved / "done.json").write_text(json.dumps({"round_seconds": record["seconds"]}))
    updates = [
        Update(p.stem.split("-")[0], load_arrays(p), int(p.stem.split("-")[1]))
        for p in sorted(saved.glob("site*.npz"))
    ]
    return load_arrays(saved / "global.npz"), updates


def _scaled(factor: float) -> Attack:
    def attack(u: Update, ref: Arrays) -> Update:
        return replace(
            u, arrays={k: (ref[k] + factor * (v - ref[k])).astype(v.dtype) for k, v in u.arrays.items()}
        )

    return attack


ATTACKS: dict[str, Attack] = {
    "nothing (all honest)": lambda u, ref: u,
    "sign-flipped step (-1x)": _scaled(-1.0),
    "sign-flipped, 4x step (-4x)": _scaled(-4.0),
    "scaled step (4x)": _scaled(4.0),
    "huge weights (1e4x step)": _scaled(1e4),
    "claims 10**9 cases, 4x step": lambda u, ref: replace(_scaled(4.0)(u, ref), cases=10**9),
}
LIAR = "declared 10**9 in the fingerprint too, 4x step"  # the declared cap no longer helps
COLUMNS = {  # column → policy; "fedavg, no share bound" is FedAvg as it was before max-share
    "fedavg, no share bound": AggregationPolicy("fedavg", max_share=1.0),
    "fedavg": AggregationPolicy("fedavg"),
    "trimmed-mean": AggregationPolicy("trimmed-mean"),
    "median": AggregationPolicy("median"),
}


def distance(a: Arrays, b: Arrays) -> float:
    return float(np.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in a)))


def compare(reference: Arrays, updates: list[Update], declared: dict[str, int]) -> list[dict[str, Any]]:
    """Relative distance to the honest FedAvg for every attack (on the last site) and method."""
    plain = AggregationPolicy(max_share=1.0)
    honest = aggregate(updates, site_weights(updates, declared, plain), reference, plain)
    step = distance(honest, reference)
    cases = [(name, attack, declared) for name, attack in ATTACKS.items()]
    cases.append((LIAR, ATTACKS["claims 10**9 cases, 4x step"], {**declared, updates[-1].site: 10**9}))
    rows = []
    for name, attack, told in cases:
        sent = [*updates[:-1], attack(updates[-1], reference)]
        row: dict[str, Any] = {"attack": name}
        for column, policy in COLUMNS.items():
            fit, rejected = screen(sent, reference, policy)
            new = aggregate(fit, site_weights(fit, told, policy), reference, policy)
            row[column] = round(distance(new, honest) / step, 3)
            row[f"{column}-rejected"] = [r.site for r in rejected]
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| poisoned site sends | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for row in rows:
        cells = [f"{row[c]:.3f}" + (" (screened out)" if row[f"{c}-rejected"] else "") for c in COLUMNS]
        lines.append(f"| {row['attack']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
