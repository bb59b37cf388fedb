"""The coordinator's Flower ServerApp: fingerprint round, plans once, then training rounds.

State lives in ``state-dir`` (run config) so that a restarted coordinator
resumes from the last completed round: ``plans.json``, ``dataset.json``,
``fingerprint.json``, ``declared.json`` (cases each site declared),
``aliases.json``, ``rounds/round_XXX.npz`` (global arrays after round XXX,
written atomically), ``rounds.jsonl`` (per-round figures) and
``models/round_XXX/`` (a standard nnU-Net v2 results folder + rtseg manifest).
With ``start-model`` (a model folder) round 0 is that model's plans, label
table and weights instead of plans from the pooled fingerprint and random ones;
``start_model.json`` keeps its name, version and hash, which every round's
manifest (``started_from``) and ``rounds.jsonl`` line repeat.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rtseg.cases import CONTOURED, FILLED, STATES
from rtseg.errors import FederationError
from rtseg.federation.aggregate import (
    AggregationPolicy,
    Rejection,
    Update,
    aggregate,
    bounded_shares,
    cases_problem,
    screen,
    site_weights,
)
from rtseg.federation.fingerprint import SiteFingerprint, check_labels, pooled_fingerprint
from rtseg.federation.flower import Grid, Payload, Reply, server_app
from rtseg.federation.start_model import StartModel, label_problem, load_start_model
from rtseg.federation.task import COVERAGE_PREFIX, DATASET_ID, DATASET_NAME, plans_hash
from rtseg.model.cpu import CpuConfig
from rtseg.model.dataset import dataset_folder_name
from rtseg.model.manifest import (
    ModelManifest,
    default_provenance,
    model_hash,
    save_manifest,
    structures_from_dataset_json,
)
from rtseg.model.rounds import initial_weights, plan_from_fingerprint
from rtseg.model.weights import load_arrays, save_arrays, write_checkpoint
from rtseg.privacy import RedactingFormatter
from rtseg.structures import STRUCTURES

log = logging.getLogger(__name__)
STRUCTURE_NAMES = frozenset(s.name for s in STRUCTURES)

Arrays = dict[str, np.ndarray]
PREPARE_KEYS = ("plans", "plans-hash", "cpu-config")
START_MODEL_FILE = "start_model.json"


@dataclass(frozen=True)
class CoordinatorConfig:
    state_dir: Path
    federation: str
    model_name: str
    rounds: int
    local_epochs: int
    min_sites: int
    wait_sites: int
    round_timeout: float
    join_timeout: float
    cpu: CpuConfig
    policy: AggregationPolicy
    prox_mu: float
    start_model: Path | None = None  # a model folder: round 0 is its plans and weights

    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> CoordinatorConfig:
        method = str(rc.get("aggregation", "fedavg"))
        return cls(
            state_dir=Path(str(rc["state-dir"])),
            federation=str(rc.get("federation", "rtseg")),
            model_name=str(rc.get("model-name", "rtseg-peds-abdomen-fl")),
            rounds=int(rc["rounds"]),
            local_epochs=int(rc.get("local-epochs", 1)),
            min_sites=int(rc.get("min-sites", 1)),
            wait_sites=int(rc.get("wait-sites", rc.get("min-sites", 1))),
            round_timeout=float(rc.get("round-timeout", 3600)),
            join_timeout=float(rc.get("join-timeout", 600)),
            cpu=CpuConfig.from_dict(json.loads(str(rc["cpu-config"]))),
            policy=AggregationPolicy(
                method=method,
                trim_fraction=float(rc.get("trim-fraction", 0.2)),
                norm_factor=float(rc.get("norm-factor", 5.0)),
                max_cases=int(rc.get("max-cases", 10_000)),
                max_share=float(rc.get("max-share", 0.5)),
            ),
            prox_mu=float(rc.get("prox-mu", 0.01 if method == "fedprox" else 0.0)),
            start_model=Path(str(rc["start-model"])) if rc.get("start-model") else None,
        )


@dataclass(frozen=True)
class Plan:
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    aliases: dict[str, str]
    declared: dict[str, int]  # node id → cases declared in the fingerprint round
    started_from: dict[str, str] | None = None  # the start model's name, version and hash; None: random

    @property
    def hash(self) -> str:
        return plans_hash(self.plans)


def run(grid: Grid, rc: dict[str, Any]) -> None:
    cfg = CoordinatorConfig.from_run_config(rc)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    _log_to(cfg.state_dir / "coordinator.log")
    nodes = grid.wait_for_nodes(cfg.wait_sites, cfg.join_timeout)
    log.info("federation %s: run %d, %d sites connected", cfg.federation, grid.run_id, len(nodes))
    try:
        _run_rounds(grid, cfg, nodes)
    except FederationError as exc:
        # the reason goes to coordinator.log here and, with the exception, into the run's status
        log.error("federation %s stopped: %s", cfg.federation, exc)
        raise
    log.info("federation %s finished: %d rounds", cfg.federation, cfg.rounds)


def _run_rounds(grid: Grid, cfg: CoordinatorConfig, nodes: list[int]) -> None:
    """The fingerprint round and round 0 unless a round is on record, then the rounds still to run."""
    done = completed_round(cfg.state_dir)
    if done is None:
        plan = initialise(grid, nodes, cfg)
        done = 0
    else:
        plan = load_plan(cfg.state_dir)
        log.info("resuming after round %d (plans %s)", done, plan.hash)
    arrays = load_arrays(round_file(cfg.state_dir, done))
    for r in range(done + 1, cfg.rounds + 1):
        arrays = run_round(grid, cfg, plan, arrays, r)


def _log_to(path: Path) -> None:
    root = logging.getLogger("rtseg")
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == str(path) for h in root.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(RedactingFormatter())
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def round_file(state_dir: Path, r: int) -> Path:
    return state_dir / "rounds" / f"round_{r:03d}.npz"


def completed_round(state_dir: Path) -> int | None:
    """The last round whose global weights were written (0: initial weights), None: nothing yet."""
    found = [int(p.stem.split("_")[1]) for p in (state_dir / "rounds").glob("round_*.npz")]
    return max(found) if found and (state_dir / "plans.json").is_file() else None


def load_plan(state_dir: Path) -> Plan:
    def read(name: str) -> Any:
        return json.loads((state_dir / name).read_text())

    declared = {str(k): int(v) for k, v in read("declared.json").items()}
    started_from = read(START_MODEL_FILE) if (state_dir / START_MODEL_FILE).is_file() else None
    return Plan(read("plans.json"), read("dataset.json"), read("aliases.json"), declared, started_from)


def initialise(grid: Grid, nodes: list[int], cfg: CoordinatorConfig) -> Plan:
    """Fingerprint round, one plan for everybody, weights initialised once (round 0).

    With ``cfg.start_model`` the plans, ``dataset.json`` and weights are the
    model's; the fingerprint round still runs (the sites declare their cases and
    resample to the model's spacing), and a site whose label table is not the
    model's is left out with the reason.
    """
    start = load_start_model(cfg.start_model) if cfg.start_model else None  # refused before any site works
    spacing = start.spacing_zyx if start else cfg.cpu.target_spacing_zyx
    query = Payload(config={"spacing": [float(s) for s in spacing]})
    replies = grid.send("query.fingerprint", {n: query for n in nodes}, cfg.round_timeout)
    fingerprints, refused = _fingerprints(replies, start)
    if len(fingerprints) < cfg.min_sites:
        reasons = "".join(f"; site {x.site}: {x.reason}" for x in refused)
        raise FederationError(
            f"{len(fingerprints)} fingerprints, fewer than min-sites {cfg.min_sites}{reasons}"
        )
    labels = check_labels(fingerprints)
    pooled = pooled_fingerprint([fp for _, fp in fingerprints])
    intensity = pooled["foreground_intensity_properties_per_channel"]["0"]
    log.info(
        "pooled fingerprint of %d sites, %d cases: mean %.1f, std %.1f, p0.5 %.1f, p99.5 %.1f",
        len(fingerprints),
        len(pooled["spacings"]),
        intensity["mean"],
        intensity["std"],
        intensity["percentile_00_5"],
        intensity["percentile_99_5"],
    )
    plans, dataset_json, weights = _round_zero(cfg, start, labels, pooled)
    aliases = json.loads(Path(f"{weights}.aliases.json").read_text())
    declared = {site: fp.n_cases for site, fp in fingerprints}
    started_from = start.record if start else None
    for name, doc in (
        ("plans.json", plans),
        ("dataset.json", dataset_json),
        ("fingerprint.json", pooled),
        ("aliases.json", aliases),
        ("declared.json", declared),
        *([(START_MODEL_FILE, started_from)] if started_from else []),
    ):
        (cfg.state_dir / name).write_text(json.dumps(doc, indent=1))
    plan = Plan(plans, dataset_json, aliases, declared, started_from)
    _save_round(cfg, plan, 0, load_arrays(weights))
    prepare = Payload(config={k: v for k, v in _round_config(cfg, plan, 1).items() if k in PREPARE_KEYS})
    for reply in grid.send("query.prepare", {n: prepare for n in nodes}, cfg.round_timeout):
        if reply.payload is None:
            log.warning("site %d could not preprocess: %s", reply.node_id, reply.error)
        else:
            log.info("site %d preprocessed in %.1f s", reply.node_id, float(reply.payload.config["seconds"]))
    log.info("plans %s sent with every round; initial weights are round 0", plan.hash)
    return plan


def _fingerprints(
    replies: list[Reply], start: StartModel | None
) -> tuple[list[tuple[str, SiteFingerprint]], list[Rejection]]:
    """The usable fingerprints, and the sites refused for a label table the start model does not have."""
    fingerprints: list[tuple[str, SiteFingerprint]] = []
    refused: list[Rejection] = []
    for reply in replies:
        if reply.payload is None:
            log.warning("site %d sent no fingerprint: %s", reply.node_id, reply.error)
            continue
        got = fingerprint_from_reply(reply.payload, str(reply.node_id))
        problem = label_problem(got, start) if start and isinstance(got, SiteFingerprint) else None
        if isinstance(got, Rejection):
            log.warning("site %s: fingerprint rejected: %s", got.site, got.reason)
        elif problem:
            refused.append(Rejection(str(reply.node_id), problem))
            log.warning("site %s refused: %s", reply.node_id, problem)
        else:
            fingerprints.append((str(reply.node_id), got))
    return fingerprints, refused


def _round_zero(
    cfg: CoordinatorConfig, start: StartModel | None, labels: dict[str, int], pooled: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """Plans, ``dataset.json`` and the round-0 weights file: the start model's, or planned and initialised."""
    work = cfg.state_dir / "nnunet"
    if start is not None:
        log.info("round 0 is %s, %s: its plans, labels and weights", start.label, start.path)
        plans = start.plans_for(dataset_folder_name(DATASET_ID, DATASET_NAME))
        weights = initial_weights(work, plans, start.dataset_json, work / "initial.npz", start.checkpoint)
        return plans, start.dataset_json, weights
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": len(pooled["spacings"]),
        "file_ending": ".nii.gz",
        "name": DATASET_NAME,
    }
    plans = json.loads(plan_from_fingerprint(work, DATASET_ID, dataset_json, pooled, cfg.cpu).read_text())
    return plans, dataset_json, initial_weights(work, plans, dataset_json, work / "initial.npz")


def fingerprint_from_reply(payload: Payload, site: str) -> SiteFingerprint | Rejection:
    """The site's fingerprint, or why it cannot be read (missing keys, wrong types, bad JSON)."""
    try:
        return SiteFingerprint.from_record(payload.config)
    except FederationError as exc:
        return Rejection(site, exc.message)
    except KeyError as exc:
        return Rejection(site, f"malformed fingerprint: no {exc}")
    except (TypeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        return Rejection(site, f"malformed fingerprint: {exc}")
    except RecursionError:  # a label table nested a thousand deep: one site must not stop the run
        return Rejection(site, "malformed fingerprint: its label table nests deeper than JSON can be read")


def run_round(grid: Grid, cfg: CoordinatorConfig, plan: Plan, arrays: Arrays, r: int) -> Arrays:
    nodes = grid.wait_for_nodes(cfg.min_sites, cfg.join_timeout)
    if len(nodes) < cfg.min_sites:
        raise FederationError(
            f"round {r}: {len(nodes)} sites connected, fewer than min-sites {cfg.min_sites}"
        )
    payload = Payload(arrays=arrays, config=_round_config(cfg, plan, r))
    started = time.monotonic()
    replies = grid.send("train", {n: payload for n in nodes}, cfg.round_timeout)
    updates, stats, refused = [], {}, []
    for reply in replies:
        site = str(reply.node_id)
        if reply.payload is None:
            log.warning("round %d: site %s failed: %s", r, site, reply.error)
            continue
        got = update_from_reply(reply.payload, site, plan.hash, r)
        if got is None:
            log.warning("round %d: site %s answered for another round or plans; ignored", r, site)
        elif isinstance(got, Rejection):
            refused.append(got)
            log.warning("round %d: site %s rejected: %s", r, site, got.reason)
        else:
            updates.append(got)
            seconds = float(reply.payload.config["train-seconds"])
            coverage = coverage_from_reply(reply.payload.config, got.cases)
            stats[site] = {"bytes_sent": reply.nbytes, "train_seconds": seconds, "coverage": coverage}
            log.info(
                "round %d: site %s structures (contoured+filled of %d cases): %s",
                r,
                site,
                got.cases,
                _known(coverage),
            )
    missing = sorted(set(map(str, nodes)) - {u.site for u in updates} - {x.site for x in refused})
    if missing:
        log.warning("round %d: no usable reply from sites %s", r, missing)
    fit, rejected = screen(updates, arrays, cfg.policy)
    rejected = refused + rejected
    if len(fit) < cfg.min_sites:
        reasons = "; ".join(f"site {x.site}: {x.reason}" for x in rejected) or "none rejected"
        raise FederationError(
            f"round {r}: {len(fit)} usable updates, fewer than min-sites {cfg.min_sites} ({reasons})"
        )
    weights = site_weights(fit, plan.declared, cfg.policy)
    shares = bounded_shares(weights, cfg.policy.max_share)
    new = aggregate(fit, weights, arrays, cfg.policy)
    seconds = time.monotonic() - started
    _save_round(cfg, plan, r, new)
    record = {
        "round": r,
        "seconds": round(seconds, 2),
        "sites": {
            u.site: {**stats[u.site], "weight": w, "share": round(f, 6)}
            for u, w, f in zip(fit, weights, shares, strict=True)
        },
        "rejected": {x.site: x.reason for x in rejected},
        "missing": missing,
        "bytes_to_each_site": payload_bytes(payload),
        "aggregation": cfg.policy.method,
        "started_from": plan.started_from,
    }
    with (cfg.state_dir / "rounds.jsonl").open("a") as out:
        out.write(json.dumps(record) + "\n")
    log.info(
        "round %d completed in %.1f s: %d updates aggregated, %d rejected",
        r,
        seconds,
        len(fit),
        len(rejected),
    )
    return new


def update_from_reply(payload: Payload, site: str, plans_hash: str, r: int) -> Update | Rejection | None:
    """The site's update, why it cannot be used, or None when it answers another round or plans.

    Flower delivers whatever a site sends: every value read here is checked for
    its type before use, so a malformed reply drops that site, never the round.
    """
    c = payload.config
    number = c.get("round")
    if isinstance(number, bool) or not isinstance(number, int):
        return Rejection(site, f"round must be a whole number, got {type(number).__name__}")
    if number != r or c.get("plans-hash") != plans_hash:
        return None
    problem = cases_problem(c.get("cases"))
    seconds = c.get("train-seconds")
    if problem is None and (
        isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds)
    ):
        problem = f"train-seconds must be a finite number, got {str(seconds)[:20]!r}"
    if problem:
        return Rejection(site, problem)
    return Update(site, payload.arrays, int(c["cases"]))


def coverage_from_reply(config: dict[str, Any], cases: int) -> dict[str, dict[str, int]]:
    """Structure → state → cases, from a reply's ``coverage.<Structure>.<state>`` counts.

    Only for the report: the counts weigh nothing. A key naming no known
    structure or state, or a count that is not a whole number in [0, cases],
    is left out (a site cannot write into the report what no case can be).
    """
    out: dict[str, dict[str, int]] = {}
    for key, value in config.items():
        if not key.startswith(COVERAGE_PREFIX):
            continue
        name, _, state = key[len(COVERAGE_PREFIX) :].rpartition(".")
        whole = isinstance(value, int) and not isinstance(value, bool)
        if name in STRUCTURE_NAMES and state in STATES and whole and 0 <= value <= cases:
            out.setdefault(name, {})[state] = int(value)
    return out


def _known(coverage: dict[str, dict[str, int]]) -> str:
    """``Liver 4, Spleen 2, …``: per structure the cases a person or a model labelled."""
    known = {n: s.get(CONTOURED, 0) + s.get(FILLED, 0) for n, s in coverage.items()}
    return ", ".join(f"{n} {k}" for n, k in known.items()) or "not reported"


def payload_bytes(payload: Payload) -> int:
    return int(sum(a.nbytes for a in payload.arrays.values()))


def _round_config(cfg: CoordinatorConfig, plan: Plan, r: int) -> dict[str, Any]:
    return {
        "round": r,
        "plans": json.dumps(plan.plans),
        "plans-hash": plan.hash,
        "cpu-config": json.dumps(cfg.cpu.to_dict()),
        "epochs": cfg.local_epochs,
        "epoch-offset": (r - 1) * cfg.local_epochs,
        "total-epochs": cfg.rounds * cfg.local_epochs,
        "prox-mu": cfg.prox_mu,
    }


def _save_round(cfg: CoordinatorConfig, plan: Plan, r: int, arrays: Arrays) -> Path:
    """Global model of round ``r``: nnU-Net results folder first, then the resume point (atomic)."""
    model_dir = write_checkpoint(
        arrays, plan.aliases, plan.plans, plan.dataset_json, cfg.state_dir / "models" / f"round_{r:03d}", r
    )
    digest = model_hash(model_dir, folds=("all",), checkpoint="checkpoint_final.pth")
    provenance = default_provenance(
        training_data={"kind": "federated", "sites": sorted(plan.declared), "cases": plan.declared},
        seeds={"training": cfg.cpu.seed},
        command="rtseg federation coordinator",
        federation_round=r,
    )
    provenance.update(federation=cfg.federation, round=r, hash=digest, plans_hash=plan.hash)
    if plan.started_from is not None:
        provenance["started_from"] = plan.started_from
    manifest = ModelManifest(
        name=cfg.model_name,
        version=f"{cfg.federation}-r{r}-{digest}",
        structures=structures_from_dataset_json(plan.dataset_json),
        provenance=provenance,
    )
    save_manifest(model_dir, manifest)
    target = round_file(cfg.state_dir, r)
    tmp = save_arrays(target.with_suffix(".tmp"), arrays)
    os.replace(tmp, target)
    log.info("global model of round %d: %s (%s)", r, model_dir, manifest.version)
    return model_dir


app = server_app(run)
