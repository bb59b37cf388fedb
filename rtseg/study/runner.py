"""The whole study in one call: cohorts, five arms, scores, report; resumable from its work folder."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TypeVar

from rtseg.study import arms, report
from rtseg.study.data import Cohorts, cohort_jobs, make_cohorts
from rtseg.study.design import ARMS, CENTERS, FEDERATED, StudySpec
from rtseg.study.scoring import (
    CurvePoint,
    ScoreRow,
    federated_curve,
    load_arm,
    read_curve,
    read_score_rows,
    score_arm,
    write_rows,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Advance = Callable[[], None]
Stage = Callable[[str, int], AbstractContextManager[Advance]]  # (description, total) → advance()


@contextmanager
def silent_stage(_description: str, _total: int) -> Iterator[Advance]:
    yield lambda: None


def run_study(
    spec: StudySpec,
    out: Path,
    work: Path,
    *,
    threads: int | None = None,
    stage: Stage = silent_stage,
    say: Callable[[str], None] = log.info,
) -> report.Report:
    """Run (or resume) the study in ``work`` and write the results into ``out``."""
    spec.check_work_dir(work)
    timings: dict[str, float] = {}
    started = time.monotonic()
    cohorts = _timed(timings, "phantom cohorts", lambda: _cohorts(spec, work, stage))
    say(f"training budget: {spec.budget()}")
    _timed(timings, "training local-A, local-B, centralised", lambda: _pooled(spec, cohorts, work, stage))
    _timed(timings, "federated training (Flower)", lambda: _federated(spec, cohorts, work, stage))
    rows = _timed(timings, "inference and scoring", lambda: _scores(cohorts, work, threads, stage))
    curve = _timed(timings, "federated learning curve", lambda: _curve(spec, cohorts, work, threads, stage))
    timings["total"] = time.monotonic() - started
    (work / "timings.json").write_text(json.dumps(timings, indent=1))
    return report.write_report(spec, out, work, rows, curve, timings)


def _timed(timings: dict[str, float], name: str, step: Callable[[], T]) -> T:
    t0 = time.monotonic()
    result = step()
    timings[name] = time.monotonic() - t0
    log.info("%s: %.0f s", name, timings[name])
    return result


def _cohorts(spec: StudySpec, work: Path, stage: Stage) -> Cohorts:
    n = sum(len(jobs) for jobs in cohort_jobs(spec, work / "cohorts"))
    with stage("phantom cases", n) as advance:
        return make_cohorts(spec, work / "cohorts", advance=advance)


def _pooled(spec: StudySpec, cohorts: Cohorts, work: Path, stage: Stage) -> None:
    with stage("local-A, local-B, centralised: epochs", 3 * spec.epochs) as advance:
        arms.train_pooled_arms(spec, cohorts.train, work, advance)


def _federated(spec: StudySpec, cohorts: Cohorts, work: Path, stage: Stage) -> None:
    with stage("federated A+B: rounds", spec.rounds) as advance:
        arms.train_federated(spec, cohorts.train, work, advance)


def _scores(cohorts: Cohorts, work: Path, threads: int | None, stage: Stage) -> list[ScoreRow]:
    cases = [("test", c) for c in cohorts.test] + [("orientation", c) for c in cohorts.orientation]
    rows: list[ScoreRow] = []
    with stage("inference: cases × models", len(cases) * len(ARMS)) as advance:
        for arm in ARMS:
            cached = work / "scores" / f"{arm}.csv"
            if cached.is_file():
                rows += read_score_rows(cached)
                for _ in cases:
                    advance()
                continue
            segmenter = load_arm(work, arm, threads)
            got = score_arm(arm, segmenter, cases, work / "rtstruct" / arm, advance)
            write_rows(cached, got, ScoreRow)
            rows += got
    return rows


def _curve(
    spec: StudySpec, cohorts: Cohorts, work: Path, threads: int | None, stage: Stage
) -> list[CurvePoint]:
    cached = work / "scores" / f"{FEDERATED}-rounds.csv"
    if cached.is_file():
        return read_curve(cached)
    cases = [c for x in CENTERS for c in [t for t in cohorts.test if t.center == x][: spec.curve_cases]]
    with stage("federated rounds scored", spec.rounds + 1) as advance:
        points = federated_curve(work, cases, threads, advance)
    write_rows(cached, points, CurvePoint)
    return points
