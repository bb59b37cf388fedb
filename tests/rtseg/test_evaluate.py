"""``rtseg evaluate``: the two-center study. Fast tests of the summary logic; one slow end-to-end run."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from rtseg.phantom.cohort import SHIFT_FACTORS, case_variant, shifted_center
from rtseg.structures import STRUCTURES
from rtseg.study.data import NEPHRECTOMY, held_out_indices
from rtseg.study.design import ARMS, FULL, QUICK, relation
from rtseg.study.findings import (
    FalsePositive,
    OrientationCell,
    aggregate,
    conclusion,
    false_positive_summary,
    findings,
    nephrectomy_false_positives,
    orientation,
    orientation_summary,
)
from rtseg.study.report import in_cross_table, write_report
from rtseg.study.runner import StageClock
from rtseg.study.scoring import CurvePoint, ScoreRow

RTSEG = [sys.executable, "-m", "rtseg_app"]
OARS = ("Liver", "Spleen", "Kidney_L")


def rows(arm: str, center: str, dice: float, kind: str = "test", position: str = "HFS") -> list[ScoreRow]:
    """Two cases of ``center`` scored by ``arm`` with the same Dice on every OAR."""
    out = []
    for case in (f"{center}_0", f"{center}_1"):
        for s in (*OARS, "External"):
            out.append(
                ScoreRow(
                    arm, kind, case, center, position, "normal", s, dice, 5.0, 1.0, 100.0, 100.0, 0.99, False
                )
            )
    return out


def study(table: dict[str, tuple[float, float]]) -> list[ScoreRow]:
    """``arm → (Dice on center C, Dice on center D)`` as score rows."""
    return [r for arm, (a, b) in table.items() for r in rows(arm, "C", a) + rows(arm, "D", b)]


STUDY_PATTERN = {  # local drops cross-center, federated ≈ local in-center and best cross-center
    "local-C": (0.90, 0.78),
    "local-D": (0.80, 0.88),
    "federated": (0.90, 0.885),
    "centralised": (0.93, 0.91),
    "ensemble": (0.85, 0.84),
}


def test_the_study_pattern_is_recognised_and_the_gap_to_centralised_computed() -> None:
    f = findings(aggregate(study(STUDY_PATTERN)))
    assert f.local_drop["C"].diff == pytest.approx(0.10) and f.local_drop["D"].diff == pytest.approx(0.10)
    assert f.fed_vs_in["D"].diff == pytest.approx(0.005) and f.fed_vs_in["D"].matched == 3
    assert f.fed_vs_cross["C"].diff == pytest.approx(0.10)
    assert f.overall["federated"] == pytest.approx(0.8925)
    assert f.gap_to_centralised == pytest.approx(0.0275)
    text = " ".join(conclusion(f, "full"))
    assert "Local models drop cross-center" in text
    assert "matches or beats the in-center local model" in text
    assert "the federated model is the best" in text
    assert "trails centralised training on pooled data by 0.02" in text and "(centralised 0.920" in text
    assert "reproduces the study's finding" in text and "partly" not in text
    assert "quick" not in text and "not learned" not in text


def test_a_federated_model_behind_the_local_models_is_reported_as_not_reproducing() -> None:
    table = {**STUDY_PATTERN, "federated": (0.70, 0.70)}  # worse than every local model
    text = " ".join(conclusion(findings(aggregate(study(table))), "full"))
    assert "The federated model trails the in-center local model" in text
    assert "the federated model is not the best" in text
    assert "partly reproduces (1 of 3 claims)" in text
    assert "trails centralised training on pooled data by 0.220" in text


def test_untrained_models_and_quick_mode_are_said_to_mean_nothing() -> None:
    table = {arm: (0.02, 0.01) for arm in ARMS}
    text = " ".join(conclusion(findings(aggregate(study(table))), "quick"))
    assert "quick-mode run" in text and "have not learned the task" in text
    assert "cannot tell whether it reproduces" in text


def test_in_cross_table_marks_in_and_cross_center_columns() -> None:
    table = in_cross_table(aggregate(study(STUDY_PATTERN)))
    assert "| local-C | C | 0.900 (in) | 5.0 | 1.00 | 0.780 (cross) |" in table
    assert "| ensemble | local-C + local-D | 0.850 |" in table
    assert relation("local-D", "C") == "cross-center" and relation("federated", "C") == "both centers"


def test_cells_average_only_cases_that_hold_the_structure() -> None:
    absent = ScoreRow("local-C", "test", "C_9", "C", "HFS", "nephrectomy_L", "Kidney_L",
                      0.0, None, None, 0.0, 12.5, None, False)  # fmt: skip
    cells = aggregate(rows("local-C", "C", 0.8) + [absent])
    kidney = next(c for c in cells if c.structure == "Kidney_L")
    assert kidney.n_cases == 2 and kidney.dice_mean == pytest.approx(0.8)
    assert kidney.fp_cases == 1 and kidney.fp_ml == pytest.approx(12.5)
    assert nephrectomy_false_positives([absent]) == [FalsePositive("local-C", "C_9", "C", "Kidney_L", 12.5)]
    assert "local-C 1 of 1 (mean 12.5 ml)" in false_positive_summary(nephrectomy_false_positives([absent]))


def test_orientation_spread_is_the_largest_change_between_positions() -> None:
    scored = [
        r
        for position, dice in (("HFS", 0.8), ("FFS", 0.8), ("HFP", 0.7))
        for r in rows("federated", "C", dice, kind="orientation", position=position)
    ]
    cells = orientation(scored)
    assert [c.position for c in cells] == ["FFS", "HFP", "HFS"]
    assert cells[1] == OrientationCell("federated", "HFP", 2, pytest.approx(0.7), pytest.approx(0.99), 0)
    assert "by at most 0.100 (federated)" in orientation_summary(cells)


def test_test_sets_hold_the_asked_nephrectomy_cases() -> None:
    for center in ("C", "D"):
        chosen = held_out_indices(center, 3000, 2, 2)
        assert chosen[:2] == [0, 1]
        assert sum(case_variant(center, 3000, i) in NEPHRECTOMY for i in chosen) >= 2


def test_the_quick_budget_is_the_same_for_every_arm() -> None:
    assert QUICK.local_config().epochs == QUICK.rounds * QUICK.local_epochs
    assert QUICK.iterations == QUICK.epochs * QUICK.cpu.iterations_per_epoch


def test_the_report_writes_tables_and_valid_pngs_from_made_up_scores(tmp_path: Path) -> None:
    scored = study(STUDY_PATTERN) + [
        r for arm in ARMS for p in ("HFS", "FFS", "HFP") for r in rows(arm, "C", 0.8, "orientation", p)
    ]
    curve = [CurvePoint(r, c, f"{c}_0", 0.2 + 0.3 * r) for r in range(3) for c in ("C", "D")]
    report = write_report(QUICK, tmp_path / "out", tmp_path / "work", scored, curve, {"total": 60.0})
    md = report.results_md.read_text()
    assert "reproduces the study's finding" in md and "| federated | HFP | 2 | 0.800 |" in md
    assert "1.0 min in all." in md and "resumed" not in md  # one run: no note on summed times
    assert "## The claims per OAR" in md and "| Liver | C | 2 | +0.100 (0.500; 1.000) |" in md
    assert "needs at least 6 cases" in md  # 2 cases a center: no OAR can differ significantly
    assert "| 2 | 0.800 | 0.800 |" in md  # federated round 2, held-out Dice on A and on B
    for png in report.figures:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resumed_study_reports_each_stage_summed_over_its_runs(tmp_path: Path) -> None:
    path = tmp_path / "timings.json"
    first = StageClock(path)  # killed in training: the cohorts' time is kept, the training's lost
    first.record("phantom cohorts", 100.0)
    assert first.runs == 1 and json.loads(path.read_text())["seconds"]["phantom cohorts"] == 100.0
    second = StageClock(path)
    second.record("phantom cohorts", 0.5)  # found done
    second.record("training, all arms at once", 1800.0)
    summed = second.summed()
    assert second.runs == 2 and list(summed) == ["phantom cohorts", "training, all arms at once", "total"]
    assert summed["phantom cohorts"] == 100.5 and summed["training, all arms at once"] == 1800.0
    assert json.loads(path.read_text()) == {"runs": 2, "seconds": summed}
    path.write_text(json.dumps({"phantom cohorts": 100.0, "total": 1700.0}))  # an earlier rtseg's file
    assert StageClock(path).runs == 2
    path.write_text("{not json")  # unreadable: this run's times, not a crash at the report
    assert StageClock(path).runs == 1

    summed["total"] = 1901.0  # what the report prints: the header's minutes from the summed total
    scored = study(STUDY_PATTERN)
    curve = [CurvePoint(r, c, f"{c}_0", 0.5) for r in range(2) for c in ("C", "D")]
    md = write_report(
        QUICK, tmp_path / "out", tmp_path / "work", scored, curve, summed, second.runs
    ).results_md.read_text()
    assert "31.7 min in all over 2 runs (resumed)" in md and "| training, all arms at once | 1800 |" in md
    assert "found done counts what it took when it ran" in md


# --- the real command, end to end --------------------------------------------------------------


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
@pytest.mark.study  # about 5 min on 2 cores (in CI with the slow tests)
@pytest.mark.timeout(1800)
def test_evaluate_quick_writes_the_study_tables_and_figures(tmp_path: Path) -> None:
    out, work = tmp_path / "results", tmp_path / "work"
    started = time.monotonic()
    run = subprocess.run(
        [*RTSEG, "evaluate", "--quick", "--out", str(out), "--work", str(work)],
        capture_output=True,
        text=True,
        timeout=1700,
    )
    first = time.monotonic() - started
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| model | trained on |" in run.stdout and "In short, the phantom benchmark" in run.stdout
    assert (
        "quick study: five models, phantom centers C and D;" in run.stdout
    )  # not A and B: the default model's

    md = (out / "results.md").read_text()
    headings = ["## Conclusion", "## In-center and cross-center", "## Dice per structure", "## HD95"]
    headings += [
        "## Mean surface distance",
        "## Orientation robustness",
        "## False positives after nephrectomy",
        "## Domain shift: which factors make a local model drop",
    ]
    for heading in [*headings, "## Federated rounds"]:
        assert heading in md
    for arm in ARMS:
        assert f"| {arm} |" in md
    assert "(in)" in md and "(cross)" in md and "quick-mode run" in md
    for position in ("HFS", "FFS", "HFP"):
        assert f"| federated | {position} |" in md

    results = _csv(out / "results.csv")
    keys = {(r["arm"], r["test_center"], r["structure"]) for r in results}
    assert keys == {(a, c, s.name) for a in ARMS for c in ("C", "D") for s in STRUCTURES}
    assert len(results) == len(keys)
    for r in results:
        assert r["relation"] == relation(r["arm"], r["test_center"])
        if r["dice_mean"]:
            assert 0.0 <= float(r["dice_mean"]) <= 1.0
        for key in ("hd95_mm", "msd_mm", "fp_ml"):
            if r[key]:
                assert 0.0 <= float(r[key]) < 1000.0
    scores = _csv(out / "scores.csv")
    assert {r["kind"] for r in scores} == {"test", "orientation", "shift"}
    shifted = {(r["arm"], r["center"]) for r in scores if r["kind"] == "shift"}
    assert shifted == {(f"local-{c}", shifted_center(c, f)) for c in ("C", "D") for f in SHIFT_FACTORS}
    assert "| local-C | scanner | 1 |" in md and "| local-D | population | 1 |" in md
    assert any(r["variant"].startswith("nephrectomy") for r in scores)
    rounds = {int(r["round"]) for r in _csv(out / "federated_rounds.csv")}
    assert rounds == set(range(QUICK.rounds + 1))

    for name in ("dice_by_structure", "dice_by_model", "learning_curves", "orientation"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image

        assert matplotlib.image.imread(png).shape[0] > 100  # decodes, and is a real figure
        assert f"]({name}.png)" in md

    # The work folder resumes: nothing is trained or predicted again, the results are the same.
    started = time.monotonic()
    again = subprocess.run(
        [*RTSEG, "evaluate", "--quick", "--out", str(out), "--work", str(work)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert time.monotonic() - started < first / 2
    assert _csv(out / "results.csv") == results
    # ... and its report gives what the stages took when they ran, not the ~0 s of finding them done
    timings = json.loads((work / "timings.json").read_text())
    assert timings["runs"] == 2 and timings["seconds"]["total"] > 0.5 * first
    assert timings["seconds"]["training, all arms at once"] > 0.2 * first
    assert "min in all over 2 runs (resumed)" in (out / "results.md").read_text()


def test_when_few_oars_are_learned_the_claims_are_read_again_on_those() -> None:
    from rtseg.study.findings import learned_conclusion, learned_oars

    def liver_only(arm: str, center: str, dice: float) -> list[ScoreRow]:
        return [
            replace(r, dice=dice if r.structure in ("Liver", "External") else 0.0)
            for r in rows(arm, center, dice)
        ]

    scored = [
        r for arm, (a, b) in STUDY_PATTERN.items() for r in liver_only(arm, "C", a) + liver_only(arm, "D", b)
    ]
    cells = aggregate(scored)
    assert learned_oars(cells) == ["Liver"]
    overall = " ".join(conclusion(findings(cells), "full"))
    assert "have not learned the task" not in overall  # the Liver alone lifts the mean over 3 OARs to 0.3
    text = " ".join(learned_conclusion(cells, "full"))
    assert "Restricted to the OARs some model learned (best Dice ≥ 0.2: Liver; 1 of 3 OARs)" in text
    assert "Local models drop cross-center" in text and "reproduces the study's finding" in text
    assert (
        learned_conclusion(aggregate(study(STUDY_PATTERN)), "full") == []
    )  # every OAR learned: nothing to add


def test_scoring_starts_the_longest_tasks_first_and_splits_off_the_shifted_cases() -> None:
    """In the full study a local model's shifted cases outnumber its test cases, and the ensemble runs two
    networks per case: as whole arms in ARMS' order, one core would end up scoring the ensemble alone."""
    from rtseg.study.data import Cohorts, TestCase
    from rtseg.study.runner import scoring_tasks

    def case(center: str, i: int) -> TestCase:
        return TestCase(Path(f"/cases/{center}_{i}"), f"{center}_{i}", center, "HFS", "normal")

    test = tuple(case(c, i) for c in ("C", "D") for i in range(FULL.test_cases))
    shift = tuple(
        case(shifted_center(c, f), i)
        for c in ("C", "D")
        for f in SHIFT_FACTORS
        for i in range(FULL.shift_cases)
    )
    tasks = scoring_tasks(Cohorts({}, test, test[:4], shift))
    # the ensemble: 2 × 30 cases; a local model's shifted cases: 6 factors × 8; every other arm: 30
    assert [t.key for t in tasks[:3]] == [("ensemble", "test"), ("local-C", "shift"), ("local-D", "shift")]
    assert {t.key for t in tasks} == {(a, "test") for a in ARMS} | {
        ("local-C", "shift"),
        ("local-D", "shift"),
    }
    costs = [t.cost for t in tasks]
    assert costs == sorted(costs, reverse=True)
    assert sum(len(t.cases) for t in tasks) == len(ARMS) * (len(test) + 4) + len(shift)
    c_shift = next(t for t in tasks if t.key == ("local-C", "shift"))
    assert {c.center for _, c in c_shift.cases} == {shifted_center("C", f) for f in SHIFT_FACTORS}


def test_scoring_workers_keep_the_pipelines_notes_in_the_work_folder_not_on_the_console(
    tmp_path: Path,
) -> None:
    """A spawned scoring worker has no log handler: without one, every per-case cleaning note went to
    stderr through Python's last-resort handler, between ``rtseg evaluate``'s progress bars."""
    note = "Liver: a separate piece (5.1 ml) 40 mm or more from its main part removed"
    worker = "import logging, sys; from pathlib import Path; from rtseg.study.runner import log_to_file; "
    warn = f"logging.getLogger('rtseg.pipeline').warning({note!r})"
    path = tmp_path / "scoring.log"
    bare = subprocess.run([sys.executable, "-c", worker + warn], capture_output=True, text=True, timeout=120)
    assert note in bare.stderr  # what the console showed before
    configured = subprocess.run(
        [sys.executable, "-c", worker + f"log_to_file(Path({str(path)!r})); " + warn],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert configured.returncode == 0 and configured.stderr == ""
    assert note in path.read_text() and "WARNING" in path.read_text()
