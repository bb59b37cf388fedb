"""The study's claims per OAR with a paired signed-rank test: counts, p-values and what too few cases mean."""

from __future__ import annotations

import re

import numpy as np
import pytest
from scipy.stats import wilcoxon

from rtseg.study.per_oar import ALPHA, claims_table, claims_text, min_cases_for, oar_claims, paired
from rtseg.study.scoring import ScoreRow

OARS = ("Liver", "Spleen", "Pancreas")


def _rows(arm: str, center: str, dice: dict[str, list[float]]) -> list[ScoreRow]:
    """One row per case and OAR; ``dice[oar][i]`` is case i's Dice."""
    out = []
    for s, values in dice.items():
        for i, d in enumerate(values):
            out.append(
                ScoreRow(
                    arm,
                    "test",
                    f"{center}_{i}",
                    center,
                    "HFS",
                    "normal",
                    s,
                    d,
                    5.0,
                    1.0,
                    50.0,
                    50.0,
                    0.99,
                    False,
                )
            )
    return out


def _cohort(n: int, seed: int = 0) -> list[ScoreRow]:
    """Local models drop cross-center on Liver and Spleen but not on Pancreas; federated ≈ local in-center,
    best cross-center on Liver; the ensemble between."""
    rng = np.random.default_rng(seed)
    rows: list[ScoreRow] = []
    for x, y in (("C", "D"), ("D", "C")):
        base = {s: 0.8 + 0.02 * rng.standard_normal(n) for s in OARS}
        drop = {"Liver": 0.10, "Spleen": 0.06, "Pancreas": 0.0}
        noise = {s: 0.01 * rng.standard_normal(n) for s in OARS}
        rows += _rows(f"local-{x}", x, {s: list(base[s]) for s in OARS})
        rows += _rows(f"local-{y}", x, {s: list(base[s] - drop[s] + noise[s]) for s in OARS})
        rows += _rows("federated", x, {s: list(base[s] - 0.002 + noise[s] * 0.5) for s in OARS})
        rows += _rows("ensemble", x, {s: list(base[s] - drop[s] / 2) for s in OARS})
    return rows


def test_the_signed_rank_p_is_scipys_and_pairs_by_case() -> None:
    a = [0.9, 0.85, 0.88, 0.91, 0.87, 0.9, 0.86, 0.89]
    b = [0.8, 0.86, 0.79, 0.82, 0.80, 0.84, 0.81, 0.83]
    rows = _rows("local-C", "C", {"Liver": a}) + _rows("local-D", "C", {"Liver": b[::-1]})[::-1]
    got = paired(rows, "local-C", "local-D", "C", "Liver")
    assert got.n == 8
    assert got.p == pytest.approx(wilcoxon(np.array(a) - np.array(b[::-1])).pvalue)
    assert got.diff == pytest.approx(np.mean(a) - np.mean(b))


def test_the_claims_count_the_oars_where_each_holds_significantly() -> None:
    claims = oar_claims(_cohort(10))
    for x in ("C", "D"):
        assert set(claims.local_drop[x]) == {"Liver", "Spleen"}  # Pancreas: no drop, not significant
        assert set(claims.fed_matches_in[x]) == set(OARS)
        assert "Liver" in claims.fed_best_cross[x] and "Liver" in claims.fed_above_cross[x]
    text = " ".join(claims_text(claims))
    assert (
        "significantly worse cross-center than in-center on 2 of 3 on center C's cases (Liver, Spleen)"
        in text
    )
    assert "needs at least" not in text  # 10 cases a center: significance is possible
    table = claims_table(claims)
    assert re.search(r"\| Liver \| C \| 10 \| \*\*\+0\.\d{3} \(0\.0\d\d\)\*\* \|", table)
    assert re.search(r"\| Pancreas \| C \| 10 \| [+-]0\.0\d\d \(0\.\d{3}\) \|", table)  # not bold


def test_too_few_cases_make_no_difference_significant_and_the_text_says_so() -> None:
    assert min_cases_for() == 6 and 2.0 / 2**5 >= ALPHA > 2.0 / 2**6
    claims = oar_claims(_cohort(4))
    assert all(not v for v in claims.local_drop.values())  # a drop of 0.1 on every case: still p = 0.125
    text = " ".join(claims_text(claims))
    assert "needs at least 6 cases" in text and "0 by construction" in text


def test_a_federated_model_below_local_in_center_does_not_match() -> None:
    rows = [r for r in _cohort(10) if r.arm != "federated"]
    rng = np.random.default_rng(1)
    for x in ("C", "D"):
        local = {
            s: [r.dice for r in rows if r.arm == f"local-{x}" and r.center == x and r.structure == s]
            for s in OARS
        }
        rows += _rows(
            "federated",
            x,
            {s: [d - 0.05 + 0.005 * rng.standard_normal() for d in v] for s, v in local.items()},
        )  # type: ignore[operator]
    claims = oar_claims(rows)
    assert claims.fed_matches_in == {"C": (), "D": ()}
