"""The study's phantom cohorts: training cases per center, held-out test cases, orientation copies."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from rtseg.errors import InputError
from rtseg.phantom.cohort import SHIFT_FACTORS, case_id, case_variant, shifted_center, write_case
from rtseg.study.design import CENTERS, POSITIONS, StudySpec

NEPHRECTOMY = ("nephrectomy_L", "nephrectomy_R")
SCAN_LIMIT = 500  # case indices searched for nephrectomy cases before giving up


@dataclass(frozen=True)
class Job:
    """One phantom case to write (``position`` forces the patient position)."""

    center: str
    seed: int
    index: int
    out: Path
    matrix: int
    position: str | None = None

    @property
    def case_dir(self) -> Path:
        return self.out / (
            case_id(self.center, self.seed, self.index) + (f"_{self.position}" if self.position else "")
        )


@dataclass(frozen=True)
class TestCase:
    """A held-out labelled case and what it is."""

    case_dir: Path
    case_id: str
    center: str
    position: str
    variant: str

    @property
    def nephrectomy_side(self) -> str | None:
        """``"L"`` or ``"R"`` when a kidney was removed, else None."""
        return self.variant[-1] if self.variant in NEPHRECTOMY else None


@dataclass(frozen=True)
class Cohorts:
    train: dict[str, Path]  # center → folder of its training cases
    test: tuple[TestCase, ...]  # both centers, as drawn (mixed positions)
    orientation: tuple[TestCase, ...]  # the first test cases again, in each of POSITIONS
    shift: tuple[TestCase, ...] = ()  # the first test draws of each center with one factor of the other


def held_out_indices(center: str, seed: int, n_test: int, n_nephrectomy: int) -> list[int]:
    """Indices ``0 … n_test-1``, then further nephrectomy cases until there are ``n_nephrectomy``."""
    chosen = list(range(n_test))
    found = sum(case_variant(center, seed, i) in NEPHRECTOMY for i in chosen)
    index = n_test
    while found < n_nephrectomy:
        if index >= n_test + SCAN_LIMIT:
            raise InputError(f"no {n_nephrectomy} nephrectomy cases among {SCAN_LIMIT} center-{center} cases")
        if case_variant(center, seed, index) in NEPHRECTOMY:
            chosen.append(index)
            found += 1
        index += 1
    return chosen


def cohort_jobs(spec: StudySpec, root: Path) -> tuple[list[Job], list[Job], list[Job], list[Job]]:
    """(training, test, orientation, shift) jobs of the study under ``root``."""
    train, test, orientation, shift = [], [], [], []
    for center in CENTERS:
        for i in range(spec.train_cases):
            train.append(Job(center, spec.train_seed, i, root / "train" / center, spec.matrix))
        indices = held_out_indices(center, spec.test_seed, spec.test_cases, spec.nephrectomy_cases)
        test += [Job(center, spec.test_seed, i, root / "test", spec.matrix) for i in indices]
        for i in indices[: spec.orientation_cases]:
            orientation += [
                Job(center, spec.test_seed, i, root / "orientation", spec.matrix, p) for p in POSITIONS
            ]
        for factor in SHIFT_FACTORS:
            shifted = shifted_center(center, factor)
            shift += [
                Job(shifted, spec.test_seed, i, root / "shift", spec.matrix) for i in range(spec.shift_cases)
            ]
    return train, test, orientation, shift


def make_cohorts(
    spec: StudySpec, root: Path, workers: int = 2, advance: Callable[[], None] | None = None
) -> Cohorts:
    """Write every case not yet written (phantoms are deterministic: finished cases are kept)."""
    train, test, orientation, shift = cohort_jobs(spec, root)
    todo = [j for j in train + test + orientation + shift if not _done(j.case_dir)]
    for job in train + test + orientation + shift:
        if advance and job not in todo:
            advance()
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for future in as_completed([pool.submit(_write, job) for job in todo]):
            future.result()
            if advance:
                advance()
    return Cohorts(
        {c: root / "train" / c for c in CENTERS},
        tuple(read_test_case(j.case_dir) for j in test),
        tuple(read_test_case(j.case_dir) for j in orientation),
        tuple(read_test_case(j.case_dir) for j in shift),
    )


def _done(case_dir: Path) -> bool:
    return (case_dir / "case.json").is_file() and (case_dir / "labels.nii.gz").is_file()


def _write(job: Job) -> None:
    write_case(job.center, job.seed, job.index, job.out, job.matrix, job.position)


def read_test_case(case_dir: Path) -> TestCase:
    info = json.loads((case_dir / "case.json").read_text())
    return TestCase(
        case_dir,
        str(info["case_id"]),
        str(info["center"]),
        str(info["patient_position"]),
        str(info["variant"]),
    )
