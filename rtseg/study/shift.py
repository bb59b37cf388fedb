"""The domain-shift experiment: which of the factors in which the two centers differ make a local model drop.

Centers C and D differ in six factors (:data:`rtseg.phantom.cohort.SHIFT_FACTORS`):
population (age), scanner (kernel, noise, kVp, pixel encoding), slice thickness,
field of view, contrast protocol and patient positions. For each center X, the
local model trained on X is scored on X's first test cases and on the same
cases drawn as "X with one factor of the other center" (``X+scanner`` …): the
same children (same random draws) changed in that one factor. The drop per
factor is paired by case and tested with the Wilcoxon signed-rank test, and
the factors of one local model are one family for Holm's correction
(:func:`rtseg.study.per_oar.holm`): six factors, so the smallest p must be
below 0.05 / 6, which the test reaches only with 8 cases or more. The
cross-center drop (X's local model on the other center's test cases against the
other center's own local model) is the whole shift, for scale.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from rtseg.phantom.cohort import SHIFT_FACTORS, shifted_center
from rtseg.structures import EXTERNAL
from rtseg.study.design import CENTERS, LOCAL_ARMS, other
from rtseg.study.per_oar import ALPHA, holm, p_value_text, paired_means
from rtseg.study.scoring import ScoreRow

KIND = "shift"


@dataclass(frozen=True)
class FactorEffect:
    """Local model of ``center`` on its own cases and on the same cases shifted in ``factor``."""

    center: str
    factor: str
    n: int  # cases scored both ways
    own: float | None  # mean OAR Dice on the center's own cases
    shifted: float | None  # ... on the same cases with the other center's factor
    p: float | None
    p_holm: float | None = None  # Holm-adjusted over the factors of this local model

    @property
    def drop(self) -> float | None:
        return None if self.own is None or self.shifted is None else self.own - self.shifted

    @property
    def significant(self) -> bool:
        """A significant drop, uncorrected."""
        return self.p is not None and self.p < ALPHA and (self.drop or 0.0) > 0

    @property
    def significant_holm(self) -> bool:
        """A significant drop after Holm's correction over the model's factors."""
        return self.p_holm is not None and self.p_holm < ALPHA and (self.drop or 0.0) > 0


def draw_key(case_id: str) -> str:
    """``"C+scanner_s3000_002"`` → ``"s3000_002"``: the draw a shifted case shares with its base case."""
    parts = case_id.split("_")
    return "_".join(parts[1:3])


def case_means(rows: Sequence[ScoreRow], arm: str, kind: str, center: str) -> dict[str, float]:
    """Per case (by draw), ``arm``'s mean Dice over the OARs the reference holds."""
    dice: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r.arm == arm and r.kind == kind and r.center == center and r.structure != EXTERNAL:
            if r.reference_ml > 0 and r.dice is not None:
                dice[draw_key(r.case_id)].append(r.dice)
    return {k: float(np.mean(v)) for k, v in dice.items()}


def factor_effects(rows: Sequence[ScoreRow]) -> list[FactorEffect]:
    """One effect per (center, factor) that has shifted cases among ``rows``, Holm-adjusted per center."""
    effects = []
    for x in CENTERS:
        own = case_means(rows, LOCAL_ARMS[x], "test", x)
        mine = []
        for factor in SHIFT_FACTORS:
            shifted = case_means(rows, LOCAL_ARMS[x], KIND, shifted_center(x, factor))
            effect = _effect(x, factor, own, shifted)
            if effect is not None:
                mine.append(effect)
        adjusted = holm([e.p for e in mine])
        effects += [replace(e, p_holm=q) for e, q in zip(mine, adjusted, strict=True)]
    return effects


def _effect(
    center: str, factor: str, own: dict[str, float], shifted: dict[str, float]
) -> FactorEffect | None:
    """The effect over the draws both hold; None when they share none."""
    n, mean_own, mean_shifted, p = paired_means(own, shifted)
    return FactorEffect(center, factor, n, mean_own, mean_shifted, p) if n else None


def shift_table(effects: Sequence[FactorEffect], rows: Sequence[ScoreRow]) -> str:
    """Markdown: per local model, the drop of each factor and the whole cross-center drop."""
    lines = [
        "| local model | the other center's … | n | Dice own cases | Dice shifted | drop (p; Holm p) |",
        "|---|---|---|---|---|---|",
    ]
    for x in CENTERS:
        y = other(x)
        lines += [_row(e) for e in effects if e.center == x]
        # the whole shift: local-X on Y's cases against Y's own local model, paired by case
        native = case_means(rows, LOCAL_ARMS[y], "test", y)
        cross = case_means(rows, LOCAL_ARMS[x], "test", y)
        whole = _effect(x, f"everything: center {y}'s test cases, against {LOCAL_ARMS[y]}", native, cross)
        if whole is not None:
            lines.append(_row(whole, f" ({LOCAL_ARMS[y]})"))
    return "\n".join(lines)


def _row(e: FactorEffect, own_note: str = "") -> str:
    """Bold: a significant drop after Holm's correction (the whole shift: one test, none needed);
    italic: significant uncorrected only."""
    holm_p = "" if e.p_holm is None else f"; {p_value_text(e.p_holm)}"
    cell = f"{e.drop:+.3f} ({p_value_text(e.p)}{holm_p})"
    strong = e.significant_holm if e.p_holm is not None else e.significant
    mark = "**" if strong else "*" if e.significant else ""
    return (
        f"| {LOCAL_ARMS[e.center]} | {e.factor} | {e.n} | {e.own:.3f}{own_note} | {e.shifted:.3f} | "
        f"{mark}{cell}{mark} |"
    )


def shift_text(effects: Sequence[FactorEffect]) -> str:
    """One sentence per local model naming the factors that make it drop significantly."""
    if not effects:
        return "No shifted cases were scored."
    out = []
    for x in CENTERS:
        mine = [e for e in effects if e.center == x]
        if not mine:
            continue
        ranked = sorted((e for e in mine if e.significant), key=lambda e: -(e.drop or 0.0))
        if ranked:
            named = ", ".join(f"{e.factor} ({e.drop:+.3f})" for e in ranked)
            kept = [e.factor for e in ranked if e.significant_holm]
            after = ", ".join(kept) if kept else f"none (on {min(e.n for e in ranked)} cases)"
            out.append(
                f"{LOCAL_ARMS[x]} drops significantly (p < {ALPHA}) with the other center's {named};"
                f" after Holm's correction over its {len(mine)} factors: {after}."
            )
        else:
            worst = max(mine, key=lambda e: e.drop or 0.0)
            out.append(
                f"{LOCAL_ARMS[x]} drops significantly with none of the factors alone"
                f" (largest: {worst.factor}, {worst.drop:+.3f} on {worst.n} cases)."
            )
    return " ".join(out)
