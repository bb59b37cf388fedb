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

A signed-rank test on n cases cannot reach p < 0.05 below n = 6 (all
differences of one sign give p = 2 / 2ⁿ): with fewer cases per center the
counts of significant OARs are 0 whatever the models do, and the text says so.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

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

    @property
    def diff(self) -> float | None:
        return None if self.mean_a is None or self.mean_b is None else self.mean_a - self.mean_b

    @property
    def a_above(self) -> bool:
        """``a`` significantly above ``b``."""
        return self.p is not None and self.p < ALPHA and (self.diff or 0.0) > 0

    @property
    def a_below(self) -> bool:
        return self.p is not None and self.p < ALPHA and (self.diff or 0.0) < 0


def min_cases_for(alpha: float = ALPHA) -> int:
    """The fewest cases with which the two-sided signed-rank test can reach ``alpha``."""
    return next(n for n in range(1, 64) if 2.0 / 2**n < alpha)


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
    """Per test center, the OARs that support each claim, and every test behind them."""

    oars: tuple[str, ...]
    cases: dict[str, int]  # test center → most cases any OAR was compared on
    local_drop: dict[str, tuple[str, ...]]
    fed_matches_in: dict[str, tuple[str, ...]]
    fed_best_cross: dict[str, tuple[str, ...]]
    fed_above_cross: dict[str, tuple[str, ...]]  # ... and significantly above local-Y
    tests: tuple[Paired, ...]


def oar_claims(rows: Sequence[ScoreRow]) -> OarClaims:
    """The three claims over the OARs the test sets hold."""
    oars = tuple(sorted({r.structure for r in rows if r.kind == "test" and r.structure != EXTERNAL}))
    tests: list[Paired] = []
    drop, matches, best, above, cases = {}, {}, {}, {}, {}
    for x in CENTERS:
        local_in, local_cross = LOCAL_ARMS[x], LOCAL_ARMS[other(x)]
        d = [paired(rows, local_in, local_cross, x, s) for s in oars]
        m = [paired(rows, FEDERATED, local_in, x, s) for s in oars]
        c = [paired(rows, FEDERATED, local_cross, x, s) for s in oars]
        e = {p.structure: p for p in (paired(rows, FEDERATED, ENSEMBLE, x, s) for s in oars)}
        tests += [*d, *m, *c, *e.values()]
        cases[x] = max((p.n for p in d), default=0)
        drop[x] = tuple(p.structure for p in d if p.a_above)
        matches[x] = tuple(p.structure for p in m if p.n and not p.a_below)
        best[x] = tuple(p.structure for p in c if _best_cross(p, e[p.structure]))
        above[x] = tuple(p.structure for p in c if p.a_above and p.structure in best[x])
    return OarClaims(oars, cases, drop, matches, best, above, tuple(tests))


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
        f" worse cross-center than in-center on {per_center(c.local_drop)}. The federated model matches"
        f" the in-center local model (not significantly worse) on {per_center(c.fed_matches_in)}."
        f" Cross-center it is the best of the models that did not train on the test center on"
        f" {per_center(c.fed_best_cross)}, significantly above the other center's local model on"
        f" {per_center(c.fed_above_cross)}. (The seed study: local models significantly worse cross-center"
        " on 4–7 of 9 OARs, federated matching local on at least 7 of 9 and best cross-center.)"
    )
    if few:
        out.append(
            f"With {', '.join(f'{c.cases[x]} case(s) on center {x}' for x in few)}, no difference can be"
            f" significant (the signed-rank test needs at least {min_cases_for()} cases for p < {ALPHA}):"
            " the significance counts there are 0 by construction, not evidence of no difference."
        )
    return out


def _names(oars: tuple[str, ...]) -> str:
    return ", ".join(oars) if oars else "none"


def claims_table(c: OarClaims) -> str:
    """Markdown: per OAR and test center, each comparison's mean difference and p."""
    index = {(p.center, p.structure, p.a, p.b): p for p in c.tests}
    lines = [
        "| OAR | test center | n | local in − cross (p) | federated − local in (p)"
        " | federated − local cross (p) |",
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
    if p.diff is None:
        return "–"
    mark = "**" if p.p is not None and p.p < ALPHA else ""
    p_text = "–" if p.p is None else f"{p.p:.3f}"
    return f"{mark}{p.diff:+.3f} ({p_text}){mark}"
