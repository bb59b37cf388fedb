"""The study's three claims judged per OAR, as the seed study did, with a paired test across cases.

The seed study (Utrecht/Heidelberg) counted, over its OARs: those where the
local models were significantly worse cross-center, those where the federated
model matched the in-center local model, and those where the federated model
was best cross-center. Here, on each test center X and for each OAR, the two
models' Dice on the same cases are compared with the Wilcoxon signed-rank test
(two-sided, ``ALPHA``; exact for small samples without ties), on the cases whose
reference holds the OAR:

* **local drop**: local-X above local-Y on X's cases, significantly;
* **federated matches in-center**: federated not significantly below local-X;
* **federated best cross-center**: federated's mean Dice on X's cases the highest
  of the models that did not train on X (local-Y, the ensemble of the local
  models, and federated itself; centralised pooled the data and is left out),
  and whether it is significantly above local-Y.

Each claim is a family of tests, one per OAR (18), on each test center, so
some uncorrected p < 0.05 turn up by chance alone (0.9 of 18 where nothing
differs). Every count is therefore given twice: uncorrected, as the seed study
reported, and with Holm's step-down correction over the OARs of that family
(:func:`holm`), which keeps the chance of any false "significant" at ``ALPHA``.
For "federated matches in-center", a claim of *no* significant difference, the
correction works the other way (fewer differences are significant, so more OARs
"match"): there the uncorrected count is the stricter one.

A signed-rank test on n cases cannot reach p < 0.05 below n = 6 (all
differences of one sign give p = 2 / 2ⁿ), nor Holm's first threshold
0.05 / 18 below n = 10: with fewer cases per center those counts are 0
whatever the models do, and the text says so.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from rtseg.structures import EXTERNAL
from rtseg.study.design import CENTERS, ENSEMBLE, FEDERATED, LOCAL_ARMS, other
from rtseg.study.scoring import ScoreRow

ALPHA = 0.05


@dataclass(frozen=True)
class Paired:
    """Arm ``a`` against arm ``b`` on one OAR of one test center's cases."""

    center: str
    structure: str
    a: str
    b: str
    n: int  # cases scored by both where the reference holds the OAR
    mean_a: float | None
    mean_b: float | None
    p: float | None  # Wilcoxon signed-rank, two-sided; None below 2 cases; 1.0 when every difference is 0
    p_holm: float | None = None  # Holm-adjusted over the OARs of this comparison and center

    @property
    def diff(self) -> float | None:
        return None if self.mean_a is None or self.mean_b is None else self.mean_a - self.mean_b

    def above(self, corrected: bool = False) -> bool:
        """``a`` significantly above ``b`` (after Holm's correction when ``corrected``)."""
        return self.significant(corrected) and (self.diff or 0.0) > 0

    def below(self, corrected: bool = False) -> bool:
        return self.significant(corrected) and (self.diff or 0.0) < 0

    def significant(self, corrected: bool = False) -> bool:
        p = self.p_holm if corrected else self.p
        return p is not None and p < ALPHA


def min_cases_for(alpha: float = ALPHA, tests: int = 1) -> int:
    """The fewest cases with which the two-sided signed-rank test can reach ``alpha / tests``.

    ``tests``: the size of a Holm family; its smallest p must be below ``alpha / tests``.
    """
    return next(n for n in range(1, 64) if 2.0 / 2**n < alpha / tests)


def holm(ps: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None stays None and does not count as a test).

    Sorted ascending, the k-th smallest of m p-values becomes max over j ≤ k of
    min(1, (m − j + 1) · p_j): an adjusted p below ``ALPHA`` is significant with
    the family-wise error rate held at ``ALPHA`` (Holm 1979). Hand-written: scipy
    has no Holm, and statsmodels would be a dependency for five lines.
    """
    order = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    m = len(order)
    out: list[float | None] = [None] * len(ps)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def _holm_family(tests: Sequence[Paired]) -> list[Paired]:
    """``tests`` (one comparison on one center, one per OAR) with their Holm-adjusted p."""
    adjusted = holm([t.p for t in tests])
    return [replace(t, p_holm=q) for t, q in zip(tests, adjusted, strict=True)]


def paired(rows: Iterable[ScoreRow], a: str, b: str, center: str, structure: str) -> Paired:
    """``a`` vs ``b`` on ``structure`` over ``center``'s test cases (paired by case)."""
    dice: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        keep = r.kind == "test" and r.center == center and r.structure == structure and r.reference_ml > 0
        if keep and r.arm in (a, b) and r.dice is not None:
            dice[r.arm][r.case_id] = r.dice
    return Paired(center, structure, a, b, *paired_means(dice[a], dice[b]))


def paired_means(
    a: Mapping[str, float], b: Mapping[str, float]
) -> tuple[int, float | None, float | None, float | None]:
    """(n, mean of ``a``, mean of ``b``, signed-rank p of ``a − b``) over the keys both hold."""
    keys = sorted(set(a) & set(b))
    if not keys:
        return 0, None, None, None
    x = np.array([a[k] for k in keys])
    y = np.array([b[k] for k in keys])
    return len(keys), float(x.mean()), float(y.mean()), signed_rank_p(x - y)


def signed_rank_p(d: npt.NDArray[np.float64]) -> float | None:
    from scipy.stats import wilcoxon

    if len(d) < 2:
        return None
    if not np.any(d != 0):
        return 1.0
    p = float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
    return None if math.isnan(p) else p


@dataclass(frozen=True)
class OarClaims:
    """Per test center, the OARs that support each claim, derived from every test behind them.

    Each tested claim is a method, uncorrected (as the seed study counted) or with
    ``corrected=True`` Holm's correction over the family's OARs; "best cross-center"
    ranks means and has no test to correct.
    """

    oars: tuple[str, ...]
    tests: tuple[Paired, ...]  # per center: local in vs cross, federated vs each, federated vs ensemble

    def family(self, center: str, a: str, b: str) -> list[Paired]:
        """The tests of ``a`` against ``b`` on ``center``'s cases, one per OAR, in ``oars``' order."""
        return [p for p in self.tests if (p.center, p.a, p.b) == (center, a, b)]

    def _drop(self, x: str) -> list[Paired]:
        return self.family(x, LOCAL_ARMS[x], LOCAL_ARMS[other(x)])

    def _in(self, x: str) -> list[Paired]:
        return self.family(x, FEDERATED, LOCAL_ARMS[x])

    def _cross(self, x: str) -> list[Paired]:
        return self.family(x, FEDERATED, LOCAL_ARMS[other(x)])

    def drops(self, corrected: bool = False) -> dict[str, tuple[str, ...]]:
        """Per center X: the OARs where local-X is significantly above local-Y on X's cases."""
        return {x: tuple(p.structure for p in self._drop(x) if p.above(corrected)) for x in CENTERS}

    def matches(self, corrected: bool = False) -> dict[str, tuple[str, ...]]:
        """Per center X: the OARs where federated is not significantly below local-X."""
        return {x: tuple(p.structure for p in self._in(x) if p.n and not p.below(corrected)) for x in CENTERS}

    def aboves(self, corrected: bool = False) -> dict[str, tuple[str, ...]]:
        """Per center X: the OARs where federated is best cross-center and significantly above local-Y."""
        best = self.best_cross
        return {
            x: tuple(p.structure for p in self._cross(x) if p.above(corrected) and p.structure in best[x])
            for x in CENTERS
        }

    @property
    def best_cross(self) -> dict[str, tuple[str, ...]]:
        out = {}
        for x in CENTERS:
            ensemble = {p.structure: p for p in self.family(x, FEDERATED, ENSEMBLE)}
            out[x] = tuple(p.structure for p in self._cross(x) if _best_cross(p, ensemble[p.structure]))
        return out

    @property
    def cases(self) -> dict[str, int]:
        """Test center → most cases any OAR was compared on."""
        return {x: max((p.n for p in self._drop(x)), default=0) for x in CENTERS}

    @property
    def least_cases(self) -> dict[str, int]:
        """Test center → fewest cases any OAR (held by some case) was compared on."""
        return {x: min((p.n for p in self._drop(x) if p.n), default=0) for x in CENTERS}


def oar_claims(rows: Sequence[ScoreRow]) -> OarClaims:
    """The three claims over the OARs the test sets hold, uncorrected and with Holm's correction."""
    oars = tuple(sorted({r.structure for r in rows if r.kind == "test" and r.structure != EXTERNAL}))
    tests: list[Paired] = []
    for x in CENTERS:
        local_in, local_cross = LOCAL_ARMS[x], LOCAL_ARMS[other(x)]
        for a, b in ((local_in, local_cross), (FEDERATED, local_in), (FEDERATED, local_cross)):
            tests += _holm_family([paired(rows, a, b, x, s) for s in oars])
        tests += [paired(rows, FEDERATED, ENSEMBLE, x, s) for s in oars]  # a ranking only: no correction
    return OarClaims(oars, tuple(tests))


def _best_cross(vs_local: Paired, vs_ensemble: Paired) -> bool:
    """Federated's mean at least that of local-Y and of the ensemble (where the ensemble was scored)."""
    if not vs_local.n or vs_local.diff is None or vs_local.diff < 0:
        return False
    return not vs_ensemble.n or (vs_ensemble.diff or 0.0) >= 0


def claims_text(c: OarClaims) -> list[str]:
    """Plain-language paragraphs, as the seed study put its findings."""
    if not c.oars:
        return []
    n_oars = len(c.oars)
    few = [x for x, n in c.cases.items() if n < min_cases_for()]
    out = []

    def per_center(found: dict[str, tuple[str, ...]]) -> str:
        parts = (f"{len(v)} of {n_oars} on center {x}'s cases ({_names(v)})" for x, v in found.items())
        return "; ".join(parts)

    out.append(
        f"Per OAR (Wilcoxon signed-rank across cases, two-sided, p < {ALPHA}): local models are significantly"
        f" worse cross-center than in-center on {per_center(c.drops())}. The federated model matches"
        f" the in-center local model (not significantly worse) on {per_center(c.matches())}."
        f" Cross-center it is the best of the models that did not train on the test center on"
        f" {per_center(c.best_cross)}, significantly above the other center's local model on"
        f" {per_center(c.aboves())}. (The seed study: local models significantly worse cross-center"
        " on 4–7 of 9 OARs, federated matching local on at least 7 of 9 and best cross-center.)"
    )
    out.append(
        f"With Holm's correction over the {n_oars} OARs of each comparison and center (the family-wise"
        f" error held at {ALPHA}): local models significantly worse cross-center on"
        f" {per_center(c.drops(corrected=True))}; federated significantly above the other center's local"
        f" model on {per_center(c.aboves(corrected=True))}; federated not significantly worse than the"
        f" in-center local model on {per_center(c.matches(corrected=True))} (for this claim of no difference"
        " the uncorrected count above is the stricter one)."
    )
    if few:
        out.append(
            f"With {', '.join(f'{c.cases[x]} case(s) on center {x}' for x in few)}, no difference can be"
            f" significant (the signed-rank test needs at least {min_cases_for()} cases for p < {ALPHA}):"
            " the significance counts there are 0 by construction, not evidence of no difference."
        )
    need = min_cases_for(tests=n_oars)
    short = [x for x, n in c.least_cases.items() if n < need and x not in few]
    if short:
        out.append(
            f"Holm's smallest threshold is {ALPHA} / {n_oars}, which the signed-rank test reaches only"
            f" with at least {need} cases (p = 2 / 2ⁿ when every case agrees): with"
            f" {', '.join(f'{c.least_cases[x]}-{c.cases[x]} cases per OAR on center {x}' for x in short)},"
            " an OAR compared on fewer cases cannot be significant after the correction, whatever its"
            " difference."
        )
    return out


def _names(oars: tuple[str, ...]) -> str:
    return ", ".join(oars) if oars else "none"


def claims_table(c: OarClaims) -> str:
    """Markdown: per OAR and test center, each comparison's mean difference and p."""
    index = {(p.center, p.structure, p.a, p.b): p for p in c.tests}
    lines = [
        "| OAR | test center | n | local in − cross (p; Holm p) | federated − local in (p; Holm p)"
        " | federated − local cross (p; Holm p) |",
        "|---|---|---:|---|---|---|",
    ]
    for s in c.oars:
        for x in CENTERS:
            y = other(x)
            cells = [
                index[(x, s, LOCAL_ARMS[x], LOCAL_ARMS[y])],
                index[(x, s, FEDERATED, LOCAL_ARMS[x])],
                index[(x, s, FEDERATED, LOCAL_ARMS[y])],
            ]
            lines.append(f"| {s} | {x} | {cells[0].n} | " + " | ".join(_cell(p) for p in cells) + " |")
    return "\n".join(lines)


def _cell(p: Paired) -> str:
    """``diff (p; Holm p)``: bold where significant after Holm's correction, italic where only uncorrected."""
    if p.diff is None:
        return "–"
    mark = "**" if p.significant(corrected=True) else "*" if p.significant() else ""
    p_text = p_value_text(p.p)
    if p.p_holm is not None:
        p_text += f"; {p_value_text(p.p_holm)}"
    return f"{mark}{p.diff:+.3f} ({p_text}){mark}"


def p_value_text(p: float | None) -> str:
    """Three decimals, "< 0.001" below (13 cases that all agree give p = 0.00024, not 0.000); "–" for none."""
    if p is None:
        return "–"
    return "< 0.001" if p < 0.0005 else f"{p:.3f}"
