"""The study's claims per OAR with a paired signed-rank test: counts, p-values and what too few cases mean."""

from __future__ import annotations

import re

import numpy as np
import pytest
from scipy.stats import wilcoxon

from rtseg.study.per_oar import ALPHA, claims_table, claims_text, holm, min_cases_for, oar_claims, paired
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


def _cohort(n: int, seed: int = 0, oars: tuple[str, ...] = OARS) -> list[ScoreRow]:
    """Local models drop cross-center on Liver and Spleen (and any OAR not in ``OARS``) but not on Pancreas;
    federated ≈ local in-center, best cross-center on Liver; the ensemble between."""
    rng = np.random.default_rng(seed)
    rows: list[ScoreRow] = []
    for x, y in (("C", "D"), ("D", "C")):
        base = {s: 0.8 + 0.02 * rng.standard_normal(n) for s in oars}
        drop = {s: {"Spleen": 0.06, "Pancreas": 0.0}.get(s, 0.10) for s in oars}
        noise = {s: 0.01 * rng.standard_normal(n) for s in oars}
        rows += _rows(f"local-{x}", x, {s: list(base[s]) for s in oars})
        rows += _rows(f"local-{y}", x, {s: list(base[s] - drop[s] + noise[s]) for s in oars})
        rows += _rows("federated", x, {s: list(base[s] - 0.002 + noise[s] * 0.5) for s in oars})
        rows += _rows("ensemble", x, {s: list(base[s] - drop[s] / 2) for s in oars})
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
        assert set(claims.drops()[x]) == {"Liver", "Spleen"}  # Pancreas: no drop, not significant
        assert set(claims.matches()[x]) == set(OARS)
        assert "Liver" in claims.best_cross[x] and "Liver" in claims.aboves()[x]
    text = " ".join(claims_text(claims))
    assert (
        "significantly worse cross-center than in-center on 2 of 3 on center C's cases (Liver, Spleen)"
        in text
    )
    assert "needs at least" not in text  # 10 cases a center: significance is possible
    table = claims_table(claims)
    # p = 2 / 2^10 for every Liver case agreeing; Holm over 3 OARs: 3 × that, still bold
    assert re.search(r"\| Liver \| C \| 10 \| \*\*\+0\.\d{3} \(0\.002; 0\.006\)\*\* \|", table)
    assert re.search(
        r"\| Pancreas \| C \| 10 \| [+-]0\.0\d\d \(0\.\d{3}; [01]\.\d{3}\) \|", table
    )  # not bold


def test_too_few_cases_make_no_difference_significant_and_the_text_says_so() -> None:
    assert min_cases_for() == 6 and 2.0 / 2**5 >= ALPHA > 2.0 / 2**6
    claims = oar_claims(_cohort(4))
    assert all(not v for v in claims.drops().values())  # a drop of 0.1 on every case: still p = 0.125
    text = " ".join(claims_text(claims))
    assert "needs at least 6 cases" in text and "0 by construction" in text


def test_a_federated_model_below_local_in_center_does_not_match() -> None:
    rows = [r for r in _cohort(10) if r.arm != "federated"]
    rng = np.random.default_rng(1)
    for x in ("C", "D"):
        local = {
            s: [r.dice or 0.0 for r in rows if r.arm == f"local-{x}" and r.center == x and r.structure == s]
            for s in OARS
        }
        shifted = {s: [d - 0.05 + 0.005 * rng.standard_normal() for d in v] for s, v in local.items()}
        rows += _rows("federated", x, shifted)
    claims = oar_claims(rows)
    assert claims.matches() == {"C": (), "D": ()}


def test_holm_adjusts_step_down_and_skips_missing_tests() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 of m = 4: 4 × 0.005, 3 × 0.01, 2 × 0.03, max(0.06, 1 × 0.04)
    assert holm([0.01, 0.04, None, 0.03, 0.005]) == pytest.approx([0.03, 0.06, None, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []


EIGHTEEN = tuple(f"OAR{i:02d}" for i in range(18))


def test_with_18_oars_nine_cases_cannot_pass_holm_and_the_text_says_so() -> None:
    """Every one of 9 cases agreeing gives p = 2 / 512 = 0.0039 < 0.05 but above 0.05 / 18: the
    uncorrected count is 18 of 18, the corrected one 0, and the report explains why."""
    assert min_cases_for(tests=18) == 10 and 2.0 / 2**9 >= ALPHA / 18 > 2.0 / 2**10
    claims = oar_claims(_cohort(9, oars=EIGHTEEN))
    assert {x: len(v) for x, v in claims.drops().items()} == {"C": 18, "D": 18}
    assert claims.drops(corrected=True) == {"C": (), "D": ()}
    text = " ".join(claims_text(claims))
    assert "With Holm's correction over the 18 OARs" in text
    assert "significantly worse cross-center on 0 of 18 on center C's cases (none)" in text
    assert "at least 10 cases" in text and "9-9 cases per OAR on center C" in text
    table = claims_table(claims)
    assert re.search(
        r"\| OAR00 \| C \| 9 \| \*\+0\.\d{3} \(0\.004; 0\.070\)\* \|", table
    )  # italic: uncorrected only


def test_with_18_oars_twelve_cases_pass_holm() -> None:
    claims = oar_claims(_cohort(12, oars=EIGHTEEN))
    assert {x: len(v) for x, v in claims.drops(corrected=True).items()} == {"C": 18, "D": 18}
    # every case agreeing: p = 2 / 2^12 = 0.00049, shown as such and not as 0.000; Holm: 18 × that
    assert re.search(
        r"\| OAR00 \| C \| 12 \| \*\*\+0\.\d{3} \(< 0\.001; 0\.009\)\*\* \|", claims_table(claims)
    )
    assert "cannot be significant after the correction" not in " ".join(claims_text(claims))


def test_the_full_study_compares_every_oar_on_enough_cases_for_holm() -> None:
    """A kidney is missing after its nephrectomy: even so each kidney is in 10 or more test cases a center."""
    from rtseg.phantom.cohort import case_variant
    from rtseg.structures import STRUCTURES
    from rtseg.study.data import held_out_indices
    from rtseg.study.design import FULL

    oars = [s.name for s in STRUCTURES if s.name != "External"]
    need = min_cases_for(tests=len(oars))
    assert len(oars) == 18 and need == 10
    for center in ("C", "D"):
        indices = held_out_indices(center, FULL.test_seed, FULL.test_cases, FULL.nephrectomy_cases)
        variants = [case_variant(center, FULL.test_seed, i) for i in indices]
        for side in "LR":
            assert sum(v != f"nephrectomy_{side}" for v in variants) >= need, (center, side, variants)
