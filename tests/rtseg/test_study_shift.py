"""The domain-shift experiment: per factor, a local model on its own cases against the same cases shifted."""

from __future__ import annotations

import numpy as np
import pytest

from rtseg.phantom.cohort import SHIFT_FACTORS, case_id, shifted_center
from rtseg.study.data import cohort_jobs
from rtseg.study.design import FULL, QUICK
from rtseg.study.per_oar import min_cases_for
from rtseg.study.scoring import ScoreRow
from rtseg.study.shift import draw_key, factor_effects, shift_table, shift_text

OARS = ("Liver", "Spleen", "Pancreas")
N = 6


def _rows(arm: str, kind: str, center: str, dice: list[float]) -> list[ScoreRow]:
    """Case i of ``center`` with Dice ``dice[i]`` on every OAR and 0 on External."""
    out = []
    for i, d in enumerate(dice):
        cid = case_id(center, 3000, i)
        for s, value in [*((o, d) for o in OARS), ("External", 0.0)]:
            out.append(
                ScoreRow(arm, kind, cid, center, "HFS", "normal", s, value, 5.0, 1.0, 50.0, 50.0, 0.99, False)
            )
    return out


def _study() -> list[ScoreRow]:
    """local-C loses 0.15 with D's scanner and nothing with D's slices; local-D loses 0.05 with C's ages."""
    rng = np.random.default_rng(1)
    own = list(0.85 + 0.02 * rng.standard_normal(N))
    rows = _rows("local-C", "test", "C", own)
    rows += _rows("local-C", "shift", shifted_center("C", "scanner"), [d - 0.15 for d in own])
    rows += _rows(
        "local-C", "shift", shifted_center("C", "slices"), [d + 0.001 * (-1) ** i for i, d in enumerate(own)]
    )
    rows += _rows("local-D", "test", "D", own)
    rows += _rows(
        "local-D",
        "shift",
        shifted_center("D", "population"),
        [d - 0.05 - 0.01 * i for i, d in enumerate(own)],
    )
    rows += _rows("local-D", "test", "C", [d - 0.1 for d in own])  # local-D cross-center on C
    rows += _rows("local-C", "test", "D", [d - 0.2 for d in own])  # local-C cross-center on D
    return rows


def test_a_shifted_case_pairs_with_the_base_case_of_the_same_draw() -> None:
    assert draw_key(case_id(shifted_center("C", "scanner"), 3000, 2)) == draw_key(case_id("C", 3000, 2))
    assert draw_key(case_id("C", 3000, 2)) != draw_key(case_id("C", 3000, 3))


def test_the_factors_that_make_a_local_model_drop_are_found_and_named() -> None:
    rows = _study()
    effects = {(e.center, e.factor): e for e in factor_effects(rows)}
    assert set(effects) == {("C", "scanner"), ("C", "slices"), ("D", "population")}
    scanner = effects[("C", "scanner")]
    assert (
        scanner.n == N and abs((scanner.drop or 0) - 0.15) < 1e-9 and scanner.significant
    )  # External left out
    assert not effects[("C", "slices")].significant
    assert effects[("D", "population")].significant
    text = shift_text(list(effects.values()))
    assert "local-C drops significantly (p < 0.05) with the other center's scanner (+0.150);" in text
    # 6 cases: p = 2 / 64 = 0.031 at best, above Holm's 0.05 / 2 for local-C's two factors
    assert "after Holm's correction over its 2 factors: none (on 6 cases)" in text
    assert (
        "slices" not in text
        and "local-D drops significantly (p < 0.05) with the other center's population" in text
    )
    table = shift_table(list(effects.values()), rows)
    assert (
        "| local-C | scanner | 6 |" in table and "*+0.150 (0.031; 0.062)* |" in table
    )  # italic: uncorrected
    assert (
        "| local-C | everything: center D's test cases, against local-D | 6 |" in table
        and "**+0.200" in table
    )


def test_no_significant_factor_is_said_as_such() -> None:
    rows = [r for r in _study() if "scanner" not in r.center]
    text = shift_text(factor_effects(rows))
    assert "local-C drops significantly with none of the factors alone (largest: slices" in text


def test_the_study_writes_each_center_with_each_factor_of_the_other(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for spec in (QUICK, FULL):
        shift = cohort_jobs(spec, tmp_path)[3]
        assert len(shift) == 2 * len(SHIFT_FACTORS) * spec.shift_cases
        assert {j.center for j in shift} == {shifted_center(c, f) for c in "CD" for f in SHIFT_FACTORS}
        assert {j.index for j in shift} == set(range(spec.shift_cases))
    # the least n at which the signed-rank test can pass Holm's correction over the six factors
    assert FULL.shift_cases >= min_cases_for(tests=len(SHIFT_FACTORS)) == 8


def test_eight_cases_pass_holm_over_the_six_factors() -> None:
    """8 cases all dropping: p = 2 / 256 = 0.0078 < 0.05 / 6, so the drop survives the correction."""
    rng = np.random.default_rng(2)
    own = list(0.85 + 0.02 * rng.standard_normal(8))
    rows = _rows("local-C", "test", "C", own)
    for k, factor in enumerate(SHIFT_FACTORS):
        drop = 0.1 if factor == "scanner" else 0.0
        rows += _rows(
            "local-C",
            "shift",
            shifted_center("C", factor),
            [d - drop + 0.001 * (-1) ** (i + k) for i, d in enumerate(own)],
        )
    effects = {e.factor: e for e in factor_effects(rows)}
    assert len(effects) == len(SHIFT_FACTORS) == 6
    assert effects["scanner"].significant_holm and effects["scanner"].p_holm == pytest.approx(6 * 2 / 256)
    assert not any(e.significant_holm for f, e in effects.items() if f != "scanner")
    text = shift_text(list(effects.values()))
    assert "after Holm's correction over its 6 factors: scanner." in text
    assert "**+0.100 (0.008; 0.047)**" in shift_table(list(effects.values()), rows)
