"""From per-case scores to the study's tables and its plain-language conclusion (pure functions).

Comparisons are made on one test center at a time, so that a harder test set
does not pass for a model's weakness: on center X's cases the *in-center* model
is local-X and the *cross-center* model is local-Y. Means over structures are
macro averages over the OARs (External excluded) that the reference holds.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from rtseg.structures import EXTERNAL
from rtseg.study.design import ARMS, CENTERS, CENTRALISED, ENSEMBLE, FEDERATED, LOCAL_ARMS, other, relation
from rtseg.study.scoring import ScoreRow

DICE_TOL = 0.02  # Dice differences within this are "matched", beyond it a "drop"
FP_ML = 1.0  # predicted kidney volume (ml) that counts as a false positive where there is none
LEARNED = 0.1  # below this best mean OAR Dice the models have not learned: comparisons are noise
LEARNED_OAR = 0.2  # an OAR some model reaches this Dice on (either center) counts as learned


@dataclass(frozen=True)
class Cell:
    """One arm on one test center, one structure: means over the cases that hold the structure."""

    arm: str
    test_center: str
    relation: str
    structure: str
    n_cases: int
    dice_mean: float | None
    dice_sd: float | None
    hd95_mm: float | None
    msd_mm: float | None
    missed: int  # cases where the reference has the structure and the prediction has none of it
    fp_cases: int  # cases without the structure in the reference
    fp_ml: float | None  # mean predicted volume in those cases


def aggregate(rows: Iterable[ScoreRow], kind: str = "test") -> list[Cell]:
    groups: dict[tuple[str, str, str], list[ScoreRow]] = defaultdict(list)
    for r in rows:
        if r.kind == kind:
            groups[(r.arm, r.center, r.structure)].append(r)
    cells = [_cell(key, group) for key, group in groups.items()]
    order = {a: i for i, a in enumerate(ARMS)}
    return sorted(cells, key=lambda c: (order.get(c.arm, len(order)), c.arm, c.test_center))


def _cell(key: tuple[str, str, str], rows: list[ScoreRow]) -> Cell:
    arm, center, structure = key
    present = [r for r in rows if r.reference_ml > 0]
    absent = [r for r in rows if r.reference_ml == 0]
    dices = [r.dice for r in present if r.dice is not None]
    return Cell(
        arm, center, relation(arm, center), structure, len(present),
        mean(dices), float(np.std(dices)) if dices else None,
        mean([r.hd95_mm for r in present]), mean([r.msd_mm for r in present]),
        sum(r.predicted_ml == 0 for r in present), len(absent), mean([r.predicted_ml for r in absent]),
    )  # fmt: skip


def mean(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def oar_means(cells: Iterable[Cell]) -> dict[tuple[str, str], dict[str, float | None]]:
    """(arm, test center) → mean over OARs of Dice, HD95 and MSD."""
    by: dict[tuple[str, str], list[Cell]] = defaultdict(list)
    for c in cells:
        if c.structure != EXTERNAL and c.n_cases > 0:
            by[(c.arm, c.test_center)].append(c)
    return {
        key: {
            "dice": mean([c.dice_mean for c in group]),
            "hd95_mm": mean([c.hd95_mm for c in group]),
            "msd_mm": mean([c.msd_mm for c in group]),
        }
        for key, group in by.items()
    }


@dataclass(frozen=True)
class Comparison:
    """Model ``a`` against model ``b`` on one test center (mean OAR Dice and per-OAR counts)."""

    center: str
    a: float
    b: float
    better: int  # OARs where a − b > DICE_TOL
    worse: int  # OARs where b − a > DICE_TOL
    compared: int

    @property
    def diff(self) -> float:
        return self.a - self.b

    @property
    def matched(self) -> int:
        """OARs where ``a`` is not worse than ``b`` by more than the tolerance."""
        return self.compared - self.worse


def compare(cells: Sequence[Cell], arm_a: str, arm_b: str, center: str) -> Comparison | None:
    def dices(arm: str) -> dict[str, float]:
        return {
            c.structure: c.dice_mean
            for c in cells
            if c.arm == arm
            and c.test_center == center
            and c.structure != EXTERNAL
            and c.dice_mean is not None
        }

    a, b = dices(arm_a), dices(arm_b)
    common = sorted(set(a) & set(b))
    if not common:
        return None
    d = [a[s] - b[s] for s in common]
    return Comparison(
        center,
        float(np.mean([a[s] for s in common])),
        float(np.mean([b[s] for s in common])),
        sum(x > DICE_TOL for x in d),
        sum(x < -DICE_TOL for x in d),
        len(common),
    )


@dataclass(frozen=True)
class Findings:
    local_drop: dict[str, Comparison]  # test center X: local-X (a) vs local-Y (b)
    fed_vs_in: dict[str, Comparison]  # test center X: federated (a) vs local-X (b)
    fed_vs_cross: dict[str, Comparison]  # test center X: federated (a) vs local-Y (b)
    overall: dict[str, float]  # arm → mean OAR Dice over both test centers
    gap_to_centralised: float | None  # centralised − federated, over both test centers


def findings(cells: Sequence[Cell]) -> Findings:
    means = oar_means(cells)
    overall = {}
    for arm in ARMS:
        values = [means.get((arm, x), {}).get("dice") for x in CENTERS]
        if all(v is not None for v in values):
            overall[arm] = float(np.mean([v for v in values if v is not None]))
    gap = overall[CENTRALISED] - overall[FEDERATED] if {CENTRALISED, FEDERATED} <= set(overall) else None
    return Findings(
        local_drop=_by_center(cells, _in_model, _cross_model),
        fed_vs_in=_by_center(cells, _federated, _in_model),
        fed_vs_cross=_by_center(cells, _federated, _cross_model),
        overall=overall,
        gap_to_centralised=gap,
    )


def _by_center(
    cells: Sequence[Cell], a: Callable[[str], str], b: Callable[[str], str]
) -> dict[str, Comparison]:
    """Model ``a(X)`` against model ``b(X)`` on each test center X that both were scored on."""
    out = {}
    for x in CENTERS:
        got = compare(cells, a(x), b(x), x)
        if got is not None:
            out[x] = got
    return out


def learned_oars(cells: Iterable[Cell]) -> list[str]:
    """OARs that some model segments with mean Dice ≥ ``LEARNED_OAR`` on some test center."""
    best: dict[str, float] = defaultdict(float)
    for c in cells:
        if c.structure != EXTERNAL and c.dice_mean is not None:
            best[c.structure] = max(best[c.structure], c.dice_mean)
    return sorted(s for s, d in best.items() if d >= LEARNED_OAR)


def learned_conclusion(cells: Sequence[Cell], mode: str) -> list[str]:
    """The study's claims again, on the OARs some model learned, when the models learned only a few.

    The mean over all OARs is then mostly zeros of structures no model can
    segment yet; the few it learned still show how the arms compare.
    """
    learned = learned_oars(cells)
    all_oars = {c.structure for c in cells if c.structure != EXTERNAL}
    if not learned or len(learned) == len(all_oars):
        return []
    sub = findings([c for c in cells if c.structure in learned])
    names = ", ".join(learned)
    head = (
        f"Restricted to the OARs some model learned (best Dice ≥ {LEARNED_OAR}: {names}; "
        f"{len(learned)} of {len(all_oars)} OARs), the comparison reads:"
    )
    paragraphs = conclusion(sub, mode)
    if mode != "full":
        paragraphs = paragraphs[1:]  # the quick-mode warning is said once, above
    return [head, *paragraphs]


def conclusion(f: Findings, mode: str) -> list[str]:
    """Plain-language paragraphs, each computed from the numbers."""
    out = []
    if mode != "full":
        out.append(
            f"This is a {mode}-mode run: tiny models trained for a few iterations on a few small cases. "
            "The numbers show that the benchmark runs end to end, not how accurate any approach is."
        )
    best = max(f.overall.values(), default=0.0)
    if best < LEARNED:
        out.append(
            f"The models have not learned the task (best mean OAR Dice {best:.3f} < {LEARNED}): "
            "every difference below is noise."
        )
    claims = [_local_drop(f), _fed_in(f), _fed_cross(f)]
    out += [text for _, text in claims]
    out.append(_gap(f))
    held = sum(ok for ok, _ in claims)
    verdict = {3: "reproduces", 0: "does not reproduce"}.get(held, f"partly reproduces ({held} of 3 claims)")
    if best < LEARNED:
        verdict = "cannot tell whether it reproduces"
    out.append(
        f"In short, the phantom benchmark {verdict} the study's finding that local models drop cross-center "
        "while the federated model matches local in-center and is best cross-center."
    )
    return out


def _in_model(x: str) -> str:
    return LOCAL_ARMS[x]


def _cross_model(x: str) -> str:
    return LOCAL_ARMS[other(x)]


def _federated(_: str) -> str:
    return FEDERATED


def _per_center(comps: dict[str, Comparison], a: Callable[[str], str], b: Callable[[str], str]) -> str:
    parts = [
        f"on center {x}'s cases {a(x)} {c.a:.3f} vs {b(x)} {c.b:.3f} ({c.diff:+.3f}; {_count(c)})"
        for x, c in comps.items()
    ]
    return "; ".join(parts) if parts else "no comparison possible"


def _count(c: Comparison) -> str:
    return f"better on {c.better}, worse on {c.worse} of {c.compared} OARs by more than {DICE_TOL}"


def _local_drop(f: Findings) -> tuple[bool, str]:
    ok = bool(f.local_drop) and all(c.diff > DICE_TOL for c in f.local_drop.values())
    verb = "drop" if ok else "do not clearly drop"
    return ok, (
        f"Local models {verb} cross-center (mean OAR Dice, in-center model first): "
        f"{_per_center(f.local_drop, _in_model, _cross_model)}."
    )


def _fed_in(f: Findings) -> tuple[bool, str]:
    ok = bool(f.fed_vs_in) and all(c.diff >= -DICE_TOL for c in f.fed_vs_in.values())
    verb = "matches or beats" if ok else "trails"
    matched = ", ".join(f"{c.matched} of {c.compared} OARs on {x}" for x, c in f.fed_vs_in.items())
    return ok, (
        f"The federated model {verb} the in-center local model (within {DICE_TOL} Dice; matched on "
        f"{matched or 'no OAR'}): {_per_center(f.fed_vs_in, _federated, _in_model)}."
    )


def _fed_cross(f: Findings) -> tuple[bool, str]:
    beats_cross = bool(f.fed_vs_cross) and all(c.diff > 0 for c in f.fed_vs_cross.values())
    rivals = {a: v for a, v in f.overall.items() if a != CENTRALISED}
    best = max(rivals, key=lambda a: rivals[a]) if rivals else None
    ok = beats_cross and best == FEDERATED
    ranking = ", ".join(f"{a} {v:.3f}" for a, v in sorted(rivals.items(), key=lambda kv: -kv[1]))
    verb = "is" if ok else "is not"
    return ok, (
        f"Cross-center, the federated model {verb} the best of the models a single center or a simple "
        f"ensemble could have: {_per_center(f.fed_vs_cross, _federated, _cross_model)}. "
        f"Mean OAR Dice over both test centers: {ranking or 'not available'}." + _ensemble(f)
    )


def _ensemble(f: Findings) -> str:
    if ENSEMBLE not in f.overall or FEDERATED not in f.overall:
        return ""
    d = f.overall[FEDERATED] - f.overall[ENSEMBLE]
    return f" The federated model is {abs(d):.3f} Dice {'above' if d >= 0 else 'below'} the local ensemble."


def _gap(f: Findings) -> str:
    if f.gap_to_centralised is None:
        return "The gap to centralised training could not be computed."
    g = f.gap_to_centralised
    where = "trails" if g > 0 else "is ahead of"
    close = f", within the {DICE_TOL} tolerance" if abs(g) <= DICE_TOL else ""
    return (
        f"Federated training {where} centralised training on pooled data by {abs(g):.3f} mean OAR Dice"
        f" over both test centers (centralised {f.overall[CENTRALISED]:.3f}, federated"
        f" {f.overall[FEDERATED]:.3f}{close})."
    )


# --- orientation and nephrectomy ----------------------------------------------------------------


@dataclass(frozen=True)
class OrientationCell:
    arm: str
    position: str
    n_cases: int
    dice: float | None  # mean OAR Dice
    rtstruct_dice: float | None  # RTSTRUCT read back vs label map, mean over structures predicted
    wrong_side: int  # structures flagged on the wrong side of the patient


def orientation(rows: Iterable[ScoreRow]) -> list[OrientationCell]:
    groups: dict[tuple[str, str], list[ScoreRow]] = defaultdict(list)
    for r in rows:
        if r.kind == "orientation":
            groups[(r.arm, r.position)].append(r)
    out = []
    for (arm, position), group in groups.items():
        oars = [r for r in group if r.structure != EXTERNAL and r.reference_ml > 0]
        per_case = _case_means(oars)
        out.append(
            OrientationCell(
                arm, position, len(per_case), mean(list(per_case.values())),
                mean([r.rtstruct_dice for r in group]), sum(r.wrong_side for r in group),
            )
        )  # fmt: skip
    order = {a: i for i, a in enumerate(ARMS)}
    return sorted(out, key=lambda c: (order.get(c.arm, len(order)), c.position))


def _case_means(rows: Iterable[ScoreRow]) -> dict[str, float]:
    by: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        by[r.case_id].append(r.dice if r.dice is not None else 0.0)
    return {k: float(np.mean(v)) for k, v in by.items()}


def orientation_summary(cells: Sequence[OrientationCell]) -> str:
    by: dict[str, list[float]] = defaultdict(list)
    for c in cells:
        if c.dice is not None:
            by[c.arm].append(c.dice)
    spreads = {a: max(v) - min(v) for a, v in by.items() if len(v) > 1}
    if not spreads:
        return "Orientation robustness could not be measured."
    worst = max(spreads, key=lambda a: spreads[a])
    agreement = [c.rtstruct_dice for c in cells if c.rtstruct_dice is not None]
    flags = sum(c.wrong_side for c in cells)
    return (
        f"Orientation: the same cases stored as {', '.join(sorted({c.position for c in cells}))} change the "
        f"mean OAR Dice by at most {spreads[worst]:.3f} ({worst}). The written RTSTRUCTs read back agree "
        f"with the predicted label maps at Dice ≥ {min(agreement, default=float('nan')):.3f} "
        f"(mean over structures), and {flags} structure(s) were flagged on the wrong side of the patient."
    )


@dataclass(frozen=True)
class FalsePositive:
    arm: str
    case_id: str
    center: str
    removed: str  # the structure the reference lacks (Kidney_L or Kidney_R)
    predicted_ml: float


def nephrectomy_false_positives(rows: Iterable[ScoreRow]) -> list[FalsePositive]:
    out = []
    for r in rows:
        removed = {"nephrectomy_L": "Kidney_L", "nephrectomy_R": "Kidney_R"}.get(r.variant)
        if r.kind == "test" and r.structure == removed and r.reference_ml == 0:
            out.append(FalsePositive(r.arm, r.case_id, r.center, removed, r.predicted_ml))
    return out


def false_positive_summary(fps: Sequence[FalsePositive]) -> str:
    if not fps:
        return "No nephrectomy case in the test set: false positives not measured."
    by: dict[str, list[float]] = defaultdict(list)
    for fp in fps:
        by[fp.arm].append(fp.predicted_ml)
    parts = [
        f"{arm} {sum(v > FP_ML for v in vols)} of {len(vols)} (mean {np.mean(vols):.1f} ml)"
        for arm, vols in by.items()
    ]
    return f"Kidney predicted where it was removed (> {FP_ML:g} ml): " + "; ".join(parts) + "."
