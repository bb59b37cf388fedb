"""PNG figures of the study (matplotlib's object API: no pyplot state, no display needed)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from rtseg.structures import EXTERNAL
from rtseg.study.design import ARMS, CENTERS, FEDERATED, relation
from rtseg.study.findings import OrientationCell
from rtseg.study.scoring import CurvePoint, ScoreRow

COLORS = dict(zip(ARMS, ("#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f", "#9467bd"), strict=True))
CENTER_COLORS = dict(zip(CENTERS, ("#4c72b0", "#dd8452"), strict=True))


def dice_by_structure(rows: Sequence[ScoreRow], path: Path) -> Path:
    """One panel per structure: per-case Dice of each model (both test centers)."""
    test = [r for r in rows if r.kind == "test" and r.reference_ml > 0]
    structures = list(dict.fromkeys(r.structure for r in test))
    cols = 5
    n_rows = max(1, -(-len(structures) // cols))
    fig = Figure(figsize=(3.2 * cols, 2.6 * n_rows), constrained_layout=True)
    axes = fig.subplots(n_rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, structures, strict=False):
        data = [[r.dice or 0.0 for r in test if r.structure == name and r.arm == a] for a in ARMS]
        _boxes(ax, data, [COLORS[a] for a in ARMS])
        ax.set_title(name, fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(range(1, len(ARMS) + 1), [a.replace("-", "\n", 1) for a in ARMS], fontsize=6)
    for ax in axes[len(structures) :]:
        ax.set_visible(False)
    fig.suptitle("Dice per structure and model (held-out cases of both centers)")
    fig.savefig(path, dpi=90)
    return path


def dice_by_model(rows: Sequence[ScoreRow], path: Path) -> Path:
    """Per model: per-case mean OAR Dice on each test center, in-/cross-center marked."""
    per_case: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in rows:
        if r.kind == "test" and r.structure != EXTERNAL and r.reference_ml > 0:
            per_case[(r.arm, r.center, r.case_id)].append(r.dice or 0.0)
    fig = Figure(figsize=(10, 4.5), constrained_layout=True)
    ax = fig.subplots()
    data, colors, ticks, labels = [], [], [], []
    for i, arm in enumerate(ARMS):
        for j, center in enumerate(CENTERS):
            values = [float(np.mean(v)) for (a, c, _), v in per_case.items() if a == arm and c == center]
            data.append(values)
            colors.append(CENTER_COLORS[center])
            ticks.append(i * 3 + j + 1)
            labels.append(f"{arm}\non {center} ({relation(arm, center).split()[0]})")
    _boxes(ax, data, colors, positions=ticks)
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set_ylabel("mean OAR Dice per case")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Mean OAR Dice per model on each test center")
    fig.savefig(path, dpi=90)
    return path


def learning_curves(
    curve: Sequence[CurvePoint],
    epochs: dict[str, list[dict[str, Any]]],
    final: dict[str, float],
    path: Path,
) -> Path:
    """Left: the federated global model per round on held-out cases; right: local training losses."""
    fig = Figure(figsize=(11, 4.2), constrained_layout=True)
    left, right = fig.subplots(1, 2)
    for center in CENTERS:
        by_round: dict[int, list[float]] = defaultdict(list)
        for p in curve:
            if p.center == center:
                by_round[p.round].append(p.oar_dice)
        xs = sorted(by_round)
        left.plot(xs, [np.mean(by_round[x]) for x in xs], "o-", color=CENTER_COLORS[center],
                  label=f"{FEDERATED}, test {center}")  # fmt: skip
    for arm, value in final.items():
        if arm != FEDERATED:
            left.axhline(value, ls="--", lw=1, color=COLORS.get(arm, "k"), label=f"{arm} (final, both)")
    left.set_xlabel("federated round (0 = initial weights)")
    left.set_ylabel("held-out mean OAR Dice")
    left.set_title("Federated global model per round")
    _legend(left)
    for arm, records in epochs.items():
        if records:
            right.plot([r["epoch"] for r in records], [r["train_loss"] for r in records], "o-",
                       color=COLORS.get(arm, "k"), label=arm)  # fmt: skip
    right.set_xlabel("epoch")
    right.set_ylabel("training loss")
    right.set_title("Local and centralised training")
    _legend(right)
    fig.savefig(path, dpi=90)
    return path


def orientation(cells: Sequence[OrientationCell], path: Path) -> Path:
    """Mean OAR Dice of each model with the same cases stored in each patient position."""
    positions = sorted({c.position for c in cells})
    fig = Figure(figsize=(8, 4), constrained_layout=True)
    ax = fig.subplots()
    width = 0.8 / max(1, len(positions))
    for k, position in enumerate(positions):
        values = [
            next((c.dice or 0.0 for c in cells if c.arm == a and c.position == position), 0.0) for a in ARMS
        ]
        ax.bar(np.arange(len(ARMS)) + k * width, values, width, label=position)
    ax.set_xticks(np.arange(len(ARMS)) + width * (len(positions) - 1) / 2, list(ARMS))
    ax.set_ylabel("mean OAR Dice")
    ax.set_ylim(0, 1)
    ax.set_title("Same cases stored in each patient position")
    ax.legend()
    fig.savefig(path, dpi=90)
    return path


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:  # nothing plotted (e.g. no epochs recorded): no empty legend
        ax.legend(fontsize=7)


def _boxes(ax: Any, data: list[list[float]], colors: list[str], positions: list[int] | None = None) -> None:
    filled = [d if d else [np.nan] for d in data]  # an empty box still takes its place
    parts = ax.boxplot(filled, positions=positions, patch_artist=True, widths=0.6, showfliers=True)
    for box, color in zip(parts["boxes"], colors, strict=True):
        box.set_facecolor(color)
        box.set_alpha(0.7)
