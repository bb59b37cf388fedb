"""The whole study in one call: cohorts, five arms, scores, report; resumable from its work folder."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from rtseg.phantom.cohort import CENTERS as PHANTOM_CENTERS
from rtseg.study import arms, report
from rtseg.study.data import Cohorts, TestCase, cohort_jobs, make_cohorts
from rtseg.study.design import ARMS, BOTH, CENTERS, ENSEMBLE, FEDERATED, LOCAL_ARMS, StudySpec
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
from rtseg.study.shift import KIND as SHIFT

log = logging.getLogger(__name__)

T = TypeVar("T")
SCORING_PROCESSES = 2  # arms scored at once
TIMINGS = "timings.json"  # in the work folder: seconds per stage over all runs
LOCALS = ", ".join(LOCAL_ARMS.values())
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
    clock = StageClock(work / TIMINGS)
    cohorts = _timed(clock, "phantom cohorts", lambda: _cohorts(spec, work, stage))
    say(f"training budget: {spec.budget()}")
    _timed(clock, "training, all arms at once", lambda: _train_all(spec, cohorts, work, stage, clock))
    rows = _timed(clock, "inference and scoring", lambda: _scores(cohorts, work, threads, stage))
    curve = _timed(clock, "federated learning curve", lambda: _curve(spec, cohorts, work, threads, stage))
    return report.write_report(spec, out, work, rows, curve, clock.summed(), clock.runs)


class StageClock:
    """Seconds per stage summed over the runs of a study's work folder, saved after every stage.

    A run that resumes finds the finished stages in the work folder and takes about 0 s for
    them; the report should say what they cost when they ran. The file is rewritten after
    each stage, so a run that is killed still leaves the stages it finished (the part of
    the stage it was in is lost) and its time up to then in ``total``. An unreadable
    file, or the flat ``{stage: seconds}`` of rtseg before 2026-12-06, counts as it can.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.earlier, self.runs = _earlier_runs(path)
        self.runs += 1  # this one
        self.started = time.monotonic()
        self.this_run: dict[str, float] = {}
        self._lock = threading.Lock()  # the pooled arms and the federation finish in their own threads

    def record(self, name: str, seconds: float) -> None:
        with self._lock:
            self.this_run[name] = seconds
            self.this_run["total"] = time.monotonic() - self.started
            self.path.write_text(json.dumps({"runs": self.runs, "seconds": self.summed()}, indent=1))

    def summed(self) -> dict[str, float]:
        """Each stage's seconds over all runs, this run's stages first (in the order they ended)."""
        keys = [*dict.fromkeys(k for k in (*self.this_run, *self.earlier) if k != "total"), "total"]
        return {k: self.earlier.get(k, 0.0) + self.this_run.get(k, 0.0) for k in keys}


def _earlier_runs(path: Path) -> tuple[dict[str, float], int]:
    """The seconds per stage and the number of runs that ``path`` holds (nothing: none)."""
    if not path.is_file():
        return {}, 0
    try:
        earlier = json.loads(path.read_text())
        runs, seconds = (earlier["runs"], earlier["seconds"]) if "seconds" in earlier else (1, earlier)
        return {str(k): float(v) for k, v in seconds.items()}, int(runs)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("%s unreadable (%s): the report gives this run's times only", path.name, exc)
        return {}, 0


def _timed(clock: StageClock, name: str, step: Callable[[], T]) -> T:
    t0 = time.monotonic()
    result = step()
    seconds = time.monotonic() - t0
    clock.record(name, seconds)
    log.info("%s: %.0f s", name, seconds)
    return result


def _train_all(spec: StudySpec, cohorts: Cohorts, work: Path, stage: Stage, clock: StageClock) -> None:
    """The pooled arms and the federation side by side.

    A federated round spends much of its time waiting (Flower's message polling,
    process starts, aggregation), while the pooled arms keep the cores busy; run
    one after the other, the waits add up. Every arm trains in its own processes
    with fixed seeds and one torch thread, so running them together changes the
    time taken, not the models.
    """
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="arms") as pool:
        futures = [
            pool.submit(
                _timed,
                clock,
                f"training {LOCALS}, centralised",
                lambda: _pooled(spec, cohorts, work, stage),
            ),
            pool.submit(
                _timed, clock, "federated training (Flower)", lambda: _federated(spec, cohorts, work, stage)
            ),
        ]
        for future in futures:
            future.result()  # the first failure is raised once both have stopped


def _cohorts(spec: StudySpec, work: Path, stage: Stage) -> Cohorts:
    n = sum(len(jobs) for jobs in cohort_jobs(spec, work / "cohorts"))
    with stage("phantom cases", n) as advance:
        return make_cohorts(spec, work / "cohorts", advance=advance)


def _pooled(spec: StudySpec, cohorts: Cohorts, work: Path, stage: Stage) -> None:
    with stage(f"{LOCALS}, centralised: epochs", 3 * spec.epochs) as advance:
        arms.train_pooled_arms(spec, cohorts.train, work, advance)


def _federated(spec: StudySpec, cohorts: Cohorts, work: Path, stage: Stage) -> None:
    with stage(f"federated {BOTH}: rounds", spec.rounds) as advance:
        arms.train_federated(spec, cohorts.train, work, advance)


def _scores(cohorts: Cohorts, work: Path, threads: int | None, stage: Stage) -> list[ScoreRow]:
    """Every arm on every test case, two scoring tasks at a time in their own processes.

    Most of a case's time is single-threaded Python (DICOM, contours, RTSTRUCT,
    surface distances), so one process per core beats one process with more
    torch threads. Each local model also scores its center's shifted cases
    (:mod:`rtseg.study.shift`) as a task of its own, and the tasks start longest
    first (:func:`scoring_tasks`), so no arm is left running alone on one core at
    the end. A task's rows are cached as CSV once it is done (resume).
    """
    tasks = scoring_tasks(cohorts)
    by_task: dict[tuple[str, str], list[ScoreRow]] = {}
    workers = max(1, min(SCORING_PROCESSES, os.cpu_count() or 1))
    per_process = max(1, threads // workers) if threads else 1
    with stage("inference: cases × models", sum(len(t.cases) for t in tasks)) as advance:
        todo = []
        for task in tasks:
            if task.cache(work).is_file():
                by_task[task.key] = read_score_rows(task.cache(work))
                for _ in task.cases:
                    advance()
            else:
                todo.append(task)
        with ProcessPoolExecutor(
            workers,
            mp_context=mp.get_context("spawn"),
            initializer=log_to_file,
            initargs=(work / SCORING_LOG,),
        ) as pool:
            futures = {pool.submit(_score_task, work, t, per_process): t for t in todo}
            for future in as_completed(futures):
                task = futures[future]
                by_task[task.key] = future.result()
                for _ in task.cases:
                    advance()
    return [row for task in sorted(tasks, key=_report_order) for row in by_task[task.key]]


SCORING_LOG = "scoring.log"  # under the work folder: what the node's pipeline said while scoring


def log_to_file(path: Path) -> None:
    """A scoring worker's warnings (the pipeline's per-case notes, "Liver: a separate piece … removed")
    go to ``path``, not through Python's last-resort handler onto the console between the progress bars."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)


@dataclass(frozen=True)
class ScoringTask:
    """One arm on one part of the cases: ``"test"`` (test and orientation cases) or ``SHIFT``."""

    arm: str
    part: str
    cases: tuple[tuple[str, TestCase], ...]

    @property
    def key(self) -> tuple[str, str]:
        return self.arm, self.part

    @property
    def cost(self) -> int:
        """Relative time: the ensemble runs two networks per case."""
        return len(self.cases) * (2 if self.arm == ENSEMBLE else 1)

    def cache(self, work: Path) -> Path:
        return work / "scores" / f"{self.arm}.{self.part}.csv"


def scoring_tasks(cohorts: Cohorts) -> list[ScoringTask]:
    """The scoring tasks, longest first (the greedy order that balances two workers best)."""
    common = tuple([("test", c) for c in cohorts.test] + [("orientation", c) for c in cohorts.orientation])
    tasks = [ScoringTask(arm, "test", common) for arm in ARMS]
    for center, arm in LOCAL_ARMS.items():
        shifted = tuple((SHIFT, c) for c in cohorts.shift if PHANTOM_CENTERS[c.center].draws_as == center)
        if shifted:
            tasks.append(ScoringTask(arm, SHIFT, shifted))
    return sorted(tasks, key=lambda t: -t.cost)  # stable: ties keep the arms' order


def _report_order(task: ScoringTask) -> tuple[int, int]:
    return ARMS.index(task.arm), task.part != "test"


def _score_task(work: Path, task: ScoringTask, threads: int) -> list[ScoreRow]:
    """One arm on one task's cases, in a worker process; its rows are written to the task's CSV."""
    segmenter = load_arm(work, task.arm, threads)
    rows = score_arm(task.arm, segmenter, list(task.cases), work / "rtstruct" / task.arm)
    write_rows(task.cache(work), rows, ScoreRow)
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
