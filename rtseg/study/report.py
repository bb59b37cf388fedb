"""The study's results folder: results.md, results.csv, scores.csv and the PNG figures."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rtseg.structures import EXTERNAL
from rtseg.study import plots
from rtseg.study.arms import read_epochs, rounds_dir
from rtseg.study.design import ARMS, BOTH, CENTERS, CENTRALISED, FEDERATED, LOCAL_ARMS, StudySpec, relation
from rtseg.study.findings import (
    Cell,
    FalsePositive,
    OrientationCell,
    aggregate,
    conclusion,
    false_positive_summary,
    findings,
    learned_conclusion,
    nephrectomy_false_positives,
    oar_means,
    orientation,
    orientation_summary,
)
from rtseg.study.per_oar import claims_table, claims_text, oar_claims
from rtseg.study.scoring import CurvePoint, ScoreRow, write_rows
from rtseg.study.shift import FactorEffect, factor_effects, shift_table, shift_text

TRAINED_ON = {
    **{arm: center for center, arm in LOCAL_ARMS.items()},
    FEDERATED: f"{BOTH} (Flower)",
    CENTRALISED: f"{BOTH} pooled",
}
LOCALS = " and ".join(LOCAL_ARMS.values())


@dataclass(frozen=True)
class Report:
    results_md: Path
    results_csv: Path
    figures: tuple[Path, ...]
    headline: str  # the in-/cross-center table, as in results.md
    conclusion: tuple[str, ...]


def write_report(
    spec: StudySpec,
    out: Path,
    work: Path,
    rows: Sequence[ScoreRow],
    curve: Sequence[CurvePoint],
    timings: dict[str, float],
    runs: int = 1,
) -> Report:
    out.mkdir(parents=True, exist_ok=True)
    cells = aggregate(rows)
    write_rows(out / "results.csv", cells, Cell)
    write_rows(out / "scores.csv", rows, ScoreRow)
    write_rows(out / "federated_rounds.csv", curve, CurvePoint)
    found = findings(cells)
    per_oar = oar_claims(rows)
    text = conclusion(found, spec.mode) + claims_text(per_oar) + learned_conclusion(cells, spec.mode)
    orient = orientation(rows)
    fps = nephrectomy_false_positives(rows)
    epochs = {arm: read_epochs(work, arm) for arm in ARMS}
    figures = (
        plots.dice_by_structure(rows, out / "dice_by_structure.png"),
        plots.dice_by_model(rows, out / "dice_by_model.png"),
        plots.learning_curves(curve, epochs, found.overall, out / "learning_curves.png"),
        plots.orientation(orient, out / "orientation.png"),
    )
    headline = in_cross_table(cells)
    effects = factor_effects(rows)
    sections = [
        _header(spec, timings, runs),
        "## Conclusion\n\n" + "\n\n".join(text),
        "## In-center and cross-center (mean over OARs)\n\n" + headline,
        "## The claims per OAR (paired Wilcoxon signed-rank across cases)\n\n"
        "Each cell: mean Dice difference (p; Holm-adjusted p over the OARs of that column and center)."
        " Bold: significant after Holm's correction; italic: p < 0.05 uncorrected only.\n\n"
        + claims_table(per_oar),
        "## Dice per structure\n\n" + structure_table(cells, "dice_mean", 3),
        "## HD95 per structure (mm)\n\n" + structure_table(cells, "hd95_mm", 1),
        "## Mean surface distance per structure (mm)\n\n" + structure_table(cells, "msd_mm", 2),
        _shift_section(effects, rows),
        _orientation_section(orient),
        _nephrectomy_section(fps),
        _rounds_section(curve, work),
        _figures_section(figures),
        _timings_section(timings, runs),
    ]
    md = out / "results.md"
    md.write_text("\n\n".join(sections) + "\n")
    return Report(md, out / "results.csv", figures, headline, tuple(text))


def _shift_section(effects: Sequence[FactorEffect], rows: Sequence[ScoreRow]) -> str:
    return (
        "## Domain shift: which factors make a local model drop\n\n"
        "Each local model on its own center's first test cases and on the same cases (the same random "
        "draws: the same children) with one factor of the other center; mean OAR Dice per case, paired "
        "Wilcoxon signed-rank (bold: significant drop, p < 0.05). The last row of each model is the whole "
        "shift: the other center's test cases, against that center's own local model.\n\n"
        + shift_table(effects, rows)
        + "\n\n"
        + shift_text(effects)
    )


def _header(spec: StudySpec, timings: dict[str, float], runs: int) -> str:
    n_test = spec.test_cases
    resumed = f" over {runs} runs (resumed)" if runs > 1 else ""
    return (
        f"# rtseg evaluate: the two-center study on the phantom cohort ({spec.mode} mode)\n\n"
        f"Run {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {os.cpu_count()} CPU core(s), "
        f"{platform.python_implementation()} {platform.python_version()}; "
        f"{timings.get('total', 0.0) / 60:.1f} min in all{resumed}.\n\n"
        f"- Training: {spec.train_cases} phantom cases per center (seed {spec.train_seed}), "
        f"matrix {spec.matrix}; the same cases for every arm (federated: each site holds its center's).\n"
        f"- Budget: {spec.budget()}.\n"
        f"- Test: {n_test} held-out cases per center (seed {spec.test_seed}) plus nephrectomy cases up to "
        f"{spec.nephrectomy_cases} per center; orientation: {spec.orientation_cases} case(s) per center "
        "stored as HFS, FFS and HFP.\n"
        "- Metrics per structure: Dice, HD95 and mean surface distance in mm (physical spacing, symmetric), "
        "averaged over the cases whose reference holds the structure. Every case goes through the node's "
        "path: DICOM loading, orientation handling, model, RTSTRUCT written and read back.\n"
        f"- Models: {LOCALS} (one center each), federated {BOTH} (SuperLink and two SuperNodes on "
        f"loopback, TLS and node keys, FedAvg), centralised (pooled {BOTH}, the upper bound), ensemble "
        f"({LOCALS}, class probabilities averaged)."
    )


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def in_cross_table(cells: Sequence[Cell]) -> str:
    means = oar_means(cells)
    head = "| model | trained on | " + " | ".join(
        f"test {x}: Dice | HD95 mm | MSD mm" for x in CENTERS
    ) + " | both: Dice |"  # fmt: skip
    lines = [head, "|" + "---|" * (3 + 3 * len(CENTERS))]
    for arm in ARMS:
        parts, dices = [], []
        for x in CENTERS:
            m = means.get((arm, x), {})
            mark = {"in-center": " (in)", "cross-center": " (cross)"}.get(relation(arm, x), "")
            parts += [_fmt(m.get("dice")) + mark, _fmt(m.get("hd95_mm"), 1), _fmt(m.get("msd_mm"), 2)]
            dices.append(m.get("dice"))
        both = (
            sum(d for d in dices if d is not None) / len(dices) if all(d is not None for d in dices) else None
        )
        trained = TRAINED_ON.get(arm, " + ".join(LOCAL_ARMS.values()))
        lines.append(f"| {arm} | {trained} | " + " | ".join(parts) + f" | {_fmt(both)} |")
    return "\n".join(lines)


def structure_table(cells: Sequence[Cell], field: str, digits: int) -> str:
    """Structures × (model, test center); in-center and cross-center columns of the local models marked."""
    columns = [(a, x) for a in ARMS for x in CENTERS]
    index = {(c.arm, c.test_center, c.structure): c for c in cells}
    structures = list(dict.fromkeys(c.structure for c in cells))
    names = [f"{a} on {x}" + (" (cross)" if relation(a, x) == "cross-center" else "") for a, x in columns]
    lines = ["| structure | " + " | ".join(names) + " |", "|" + "---|" * (len(columns) + 1)]
    for s in structures:
        values = []
        for a, x in columns:
            c = index.get((a, x, s))
            values.append(_fmt(getattr(c, field) if c and c.n_cases else None, digits))
        label = s if s != EXTERNAL else f"{s} (body)"
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _orientation_section(cells: Sequence[OrientationCell]) -> str:
    lines = [
        "## Orientation robustness\n",
        orientation_summary(cells) + "\n",
        "| model | position | cases | mean OAR Dice | RTSTRUCT read-back Dice | wrong-side flags |",
        "|---|---|---|---|---|---|",
    ]
    for c in cells:
        lines.append(
            f"| {c.arm} | {c.position} | {c.n_cases} | {_fmt(c.dice)} | {_fmt(c.rtstruct_dice)}"
            f" | {c.wrong_side} |"
        )
    return "\n".join(lines)


def _nephrectomy_section(fps: Sequence[FalsePositive]) -> str:
    lines = [
        "## False positives after nephrectomy\n",
        false_positive_summary(fps) + "\n",
        "| model | case | center | removed | predicted (ml) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {f.arm} | {f.case_id} | {f.center} | {f.removed} | {f.predicted_ml:.1f} |" for f in fps]
    return "\n".join(lines)


def _rounds_section(curve: Sequence[CurvePoint], work: Path) -> str:
    path = rounds_dir(work) / "rounds.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    by_round = {r["round"]: r for r in records}
    lines = [
        "## Federated rounds\n",
        "Held-out mean OAR Dice of the global model after each round (round 0: initial weights), "
        "with the round's wall time, the longest site training time and what each site sent.\n",
        "| round | "
        + " | ".join(f"Dice test {x}" for x in CENTERS)
        + " | round s | training s | MB per site |",
        "|" + "---|" * (4 + len(CENTERS)),
    ]
    for r in sorted({p.round for p in curve}):
        dices = [_mean_of([p.oar_dice for p in curve if p.round == r and p.center == x]) for x in CENTERS]
        rec: dict[str, Any] = by_round.get(r, {})
        sites = rec.get("sites", {}).values()
        train = max((s["train_seconds"] for s in sites), default=None)
        sent = max((s["bytes_sent"] / 1e6 for s in sites), default=None)
        lines.append(
            f"| {r} | " + " | ".join(_fmt(d) for d in dices)
            + f" | {_fmt(rec.get('seconds'), 1)} | {_fmt(train, 1)} | {_fmt(sent, 2)} |"
        )  # fmt: skip
    return "\n".join(lines)


def _mean_of(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _figures_section(figures: Sequence[Path]) -> str:
    return "## Figures\n\n" + "\n\n".join(f"![{p.stem}]({p.name})" for p in figures)


def _timings_section(timings: dict[str, float], runs: int) -> str:
    lines = ["## Time per stage\n", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    if runs > 1:
        lines.append(
            f"\nThe study ran {runs} times in this work folder (resumed): each stage's seconds are"
            " the sum over the runs, so a stage that a later run found done counts what it took when it ran."
        )
    return "\n".join(lines)
