"""The site acceptance gate: a new global model replaces the one in use only if it is not worse here.

Both models segment the site's held-out approved cases (labelled case folders);
the candidate passes when no structure's mean Dice drops by more than
``margin`` against the model in use. Every decision -- with the
per-structure table and both versions -- is appended to
``<data_dir>/models/gate.jsonl`` (no case names, no patient data).
The incumbent's scores are cached per (model hash, cases) so that a nightly
gate on unchanged cases evaluates only the candidate.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rtseg.cases import case_dirs, load_case
from rtseg.errors import ModelError, RtsegError
from rtseg.evaluation import CaseScores, evaluate, summarize
from rtseg.model.manifest import load_manifest, model_hash
from rtseg.model.registry import Registry, version_name

log = logging.getLogger(__name__)

DEFAULT_MARGIN = 0.02
GATE_LOG = "gate.jsonl"
CACHE_DIR = "gate-cache"


@dataclass(frozen=True)
class StructureComparison:
    """Mean Dice of one structure for both models (None: not present in any reference)."""

    name: str
    incumbent: float | None
    candidate: float | None
    cases: int
    dropped: bool

    @property
    def delta(self) -> float | None:
        if self.incumbent is None or self.candidate is None:
            return None
        return self.candidate - self.incumbent


@dataclass(frozen=True)
class GateDecision:
    accepted: bool
    candidate: str  # registry version name
    incumbent: str
    margin: float
    n_cases: int
    rows: tuple[StructureComparison, ...]
    reasons: tuple[str, ...]
    promoted: bool = False

    @property
    def dropped(self) -> list[str]:
        return [r.name for r in self.rows if r.dropped]

    def table(self) -> str:
        """The per-structure comparison as a reviewer reads it."""
        lines = [
            f"{'structure':<14} {'in use':>7} {'candidate':>9} {'change':>7}  cases",
        ]
        for r in self.rows:
            delta = "" if r.delta is None else f"{r.delta:+.3f}"
            mark = f"  DROP > {self.margin:g}" if r.dropped else ""
            lines.append(
                f"{r.name:<14} {_fmt(r.incumbent):>7} {_fmt(r.candidate):>9} {delta:>7}  {r.cases:>5}{mark}"
            )
        return "\n".join(lines)

    def record(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["rows"] = [{**asdict(r), "delta": r.delta} for r in self.rows]
        doc["dropped"] = self.dropped
        return doc


def compare(
    incumbent: list[CaseScores], candidate: list[CaseScores], margin: float
) -> tuple[StructureComparison, ...]:
    """Per-structure mean Dice of both models; ``dropped`` where the candidate lost more than ``margin``."""
    before, after = summarize(incumbent).per_structure, summarize(candidate).per_structure
    rows = []
    for name, stats in before.items():
        old = stats["dice"]
        new = after.get(name, {}).get("dice")
        lost = old is not None and (new is None or new < old - margin)
        rows.append(StructureComparison(name, old, new, int(stats["cases"] or 0), lost))
    return tuple(rows)


def run_gate(
    candidate_dir: Path,
    cases_dir: Path,
    registry: Registry,
    *,
    margin: float = DEFAULT_MARGIN,
    promote: bool = False,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> GateDecision:
    """Evaluate ``candidate_dir`` against the registry's current model; promote it if asked and passed."""
    say = progress or (lambda _msg: None)
    if margin < 0:
        raise ModelError(f"the margin must not be negative (got {margin})")
    incumbent = registry.ensure()
    cand_manifest = load_manifest(candidate_dir)
    candidate = version_name(cand_manifest, model_hash(candidate_dir))
    reasons = _contract_problems(load_manifest(incumbent.folder), cand_manifest)
    dirs = case_dirs(cases_dir)
    cases = [load_case(d) for d in dirs]
    say(f"{len(cases)} held-out case(s); model in use {incumbent.version}, candidate {candidate}")
    old = _cached_scores(registry, incumbent.folder, dirs, cases, threads, say)
    rows: tuple[StructureComparison, ...] = ()
    if not reasons:
        say(f"evaluating the candidate {candidate}")
        try:
            new = _scores(candidate_dir, cases, threads)
        except (RtsegError, RuntimeError, ValueError) as exc:  # a model that cannot segment is refused
            reasons = (f"the candidate failed to segment the held-out cases ({exc})",)
        else:
            rows = compare(old, new, margin)
            reasons = tuple(
                f"{r.name}: Dice {_fmt(r.incumbent)} → {_fmt(r.candidate)} (drop > {margin:g})"
                for r in rows
                if r.dropped
            )
    decision = GateDecision(not reasons, candidate, incumbent.version, margin, len(cases), rows, reasons)
    if decision.accepted and promote:
        added = registry.add(candidate_dir)
        registry.promote(added.version, reason=f"gate: passed on {len(cases)} case(s), margin {margin:g}")
        decision = replace(decision, promoted=True)
    _log_decision(registry, decision)
    return decision


def _contract_problems(incumbent: Any, candidate: Any) -> tuple[str, ...]:
    """A candidate must contour every structure of the model in use, with the same labels."""
    have = {s.name: s.label for s in candidate.structures}
    problems = []
    for s in incumbent.structures:
        if s.name not in have:
            problems.append(f"{s.name}: not among the candidate's structures")
        elif have[s.name] != s.label:
            problems.append(f"{s.name}: label {have[s.name]} in the candidate, {s.label} in the model in use")
    return tuple(problems)


def _scores(model_dir: Path, cases: list[Any], threads: int | None) -> list[CaseScores]:
    from rtseg.model.segmenter import NnunetSegmenter

    segmenter = NnunetSegmenter(model_dir, device="cpu", threads=threads)
    try:
        return evaluate(segmenter, cases, surfaces=False)
    finally:
        del segmenter
        gc.collect()  # two models never need to be in memory at once


def _cached_scores(
    registry: Registry,
    model_dir: Path,
    dirs: list[Path],
    cases: list[Any],
    threads: int | None,
    say: Callable[[str], None],
) -> list[CaseScores]:
    key = f"{model_hash(model_dir, short=False)[:24]}-{_cases_fingerprint(dirs)}"
    path = registry.root / CACHE_DIR / f"{key}.json"
    if path.is_file():
        say("model in use: scores on these cases cached")
        return _scores_from_json(json.loads(path.read_text()))
    say("evaluating the model in use")
    scores = _scores(model_dir, cases, threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(s) for s in scores]))
    os.replace(tmp, path)
    return scores


def _scores_from_json(doc: list[dict[str, Any]]) -> list[CaseScores]:
    from rtseg.metrics import Scores

    return [
        CaseScores(d["case_id"], {n: Scores(**s) for n, s in d["scores"].items()}, d["seconds"]) for d in doc
    ]


def _cases_fingerprint(dirs: list[Path]) -> str:
    """Changes when a case is added, removed or rewritten."""
    digest = hashlib.sha256()
    for case in dirs:
        for path in sorted(p for p in case.rglob("*") if p.is_file()):
            st = path.stat()
            digest.update(f"{path.relative_to(case.parent)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _log_decision(registry: Registry, decision: GateDecision) -> None:
    registry.root.mkdir(parents=True, exist_ok=True)
    entry = {"time": datetime.now(UTC).isoformat(timespec="seconds"), **decision.record()}
    with open(registry.root / GATE_LOG, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    verdict = "accepted" if decision.accepted else "refused"
    log.info(
        "gate %s candidate %s against %s on %d case(s)%s",
        verdict,
        decision.candidate,
        decision.incumbent,
        decision.n_cases,
        f"; dropped: {', '.join(decision.dropped)}" if decision.dropped else "",
    )


def read_gate_log(registry: Registry) -> list[dict[str, Any]]:
    path = registry.root / GATE_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
