"""``rtseg cases report``: per site, which structures its cases carry and how large they are.

A coordinator decides from these numbers whether a site is ready to join the
federation: how many cases, how many structures each case brings (contoured by
a person, filled by a model, unknown), the median volume of each structure
(a volume far from the other sites' hints at a mapping or unit mistake) and a
coverage heat map (cases × structures). Only label maps and ``case.json`` are
read, never the CT, so a report of hundreds of cases takes seconds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import numpy as np

from rtseg.cases import (
    CONTOURED,
    CT_DIR,
    FILLED,
    LABELS_FILE,
    STATES,
    UNKNOWN,
    case_dirs,
    structure_states,
)
from rtseg.errors import InputError
from rtseg.phantom.cohort import read_label_image
from rtseg.structures import EXTERNAL, STRUCTURES

NAMES: tuple[str, ...] = tuple(s.name for s in STRUCTURES)


@dataclass(frozen=True)
class CaseCoverage:
    """One case: each structure's state and its volume (ml; 0.0 where the label map has none)."""

    case_id: str
    states: dict[str, str]
    volumes_ml: dict[str, float]

    def count(self, state: str) -> int:
        return sum(1 for s in self.states.values() if s == state)


@dataclass(frozen=True)
class SiteReport:
    """The cases of one site folder, and the cases that could not be read (with why)."""

    site: str
    cases: list[CaseCoverage]
    problems: list[str] = field(default_factory=list)

    def median_volume_ml(self, name: str) -> float | None:
        """Median volume of ``name`` over the cases where it is known (contoured or filled) and present."""
        values = [
            c.volumes_ml[name] for c in self.cases if c.states[name] != UNKNOWN and c.volumes_ml[name] > 0
        ]
        return median(values) if values else None

    def state_count(self, name: str, state: str) -> int:
        return sum(1 for c in self.cases if c.states[name] == state)


def site_folders(root: Path) -> list[Path]:
    """``root`` itself if it holds cases, else each sub-folder that does (one per site)."""
    if not root.is_dir():
        raise InputError("not a folder of cases", source=str(root))
    if any(_is_case(p) for p in root.iterdir()):
        return [root]
    sites = sorted(p for p in root.iterdir() if p.is_dir() and any(_is_case(c) for c in p.iterdir()))
    if not sites:
        raise InputError(
            f"no cases found (expected <case>/{CT_DIR}/ and <case>/{LABELS_FILE}, or such folders per site)",
            source=str(root),
        )
    return sites


def _is_case(path: Path) -> bool:
    return (path / CT_DIR).is_dir() and (path / LABELS_FILE).is_file()


def site_report(folder: Path) -> SiteReport:
    """Coverage of every case of ``folder``; a case that cannot be read is listed, not fatal."""
    cases, problems = [], []
    for case_dir in case_dirs(folder):
        try:
            cases.append(case_coverage(case_dir))
        except InputError as exc:
            problems.append(f"{case_dir.name}: {exc.message}")
    return SiteReport(folder.name, cases, problems)


def case_states(case_dir: Path) -> dict[str, str]:
    """Every structure's state from ``case.json``; a case without a record is fully contoured."""
    recorded = structure_states(case_dir)
    return {name: recorded.get(name, CONTOURED if not recorded else UNKNOWN) for name in NAMES}


def coverage_counts(folder: Path) -> dict[str, dict[str, int]]:
    """Structure → state → how many cases of ``folder``: counts only, no case ids (what a site may tell)."""
    counts = {name: dict.fromkeys(STATES, 0) for name in NAMES}
    for case_dir in case_dirs(folder):
        for name, state in case_states(case_dir).items():
            counts[name][state] += 1
    return counts


def case_coverage(case_dir: Path) -> CaseCoverage:
    """States from ``case.json`` (a case without a record is fully contoured) and volumes from the labels."""
    states = case_states(case_dir)
    labels, affine = read_label_image(case_dir / LABELS_FILE)
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=max(s.label for s in STRUCTURES) + 1)
    volumes = {s.name: float(counts[s.label]) * voxel_ml for s in STRUCTURES}
    volumes[EXTERNAL] = float(np.count_nonzero(labels)) * voxel_ml  # the body: every labelled voxel
    return CaseCoverage(case_dir.name, states, volumes)


def report_table(report: SiteReport) -> str:
    """The printed report of one site: cases, structures per case, then one row per structure."""
    n = len(report.cases)
    lines = [f"site {report.site}: {n} case(s)"]
    for state in STATES:
        per_case = [c.count(state) for c in report.cases]
        if per_case:
            lines.append(
                f"  {state + ' per case':<22} median {median(per_case):>4g}  min {min(per_case):>2}"
                f"  max {max(per_case):>2}"
            )
    lines.append(f"  {'structure':<14} {CONTOURED:>9} {FILLED:>6} {UNKNOWN:>7} {'median ml':>10}")
    for name in NAMES:
        volume = report.median_volume_ml(name)
        shown = f"{volume:10.1f}" if volume is not None else f"{'-':>10}"
        counts = [report.state_count(name, s) for s in STATES]
        lines.append(f"  {name:<14} {counts[0]:>9} {counts[1]:>6} {counts[2]:>7} {shown}")
    lines += [f"  unreadable: {p}" for p in report.problems]
    return "\n".join(lines)


def coverage_png(reports: list[SiteReport], out: Path) -> Path:
    """Heat map per site (rows: cases, columns: structures; contoured, filled, unknown) as a PNG."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    code = {CONTOURED: 2, FILLED: 1, UNKNOWN: 0}
    heights = [max(len(r.cases), 1) for r in reports]
    fig = Figure(figsize=(9, 1.5 + 0.18 * sum(heights) + 0.6 * len(reports)), layout="constrained")
    axes = fig.subplots(len(reports), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    cmap = ListedColormap(["#d9d9d9", "#f4a261", "#2a9d8f"])
    for ax, report in zip(axes, reports, strict=True):
        grid = np.array([[code[c.states[n]] for n in NAMES] for c in report.cases] or [[0] * len(NAMES)])
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=2, aspect="auto", interpolation="nearest")
        ax.set_title(f"site {report.site}: {len(report.cases)} case(s)", fontsize=9)
        ax.set_xticks(range(len(NAMES)), NAMES, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(report.cases)), [c.case_id for c in report.cases], fontsize=6)
    fig.suptitle("structure coverage: green contoured, orange filled, grey unknown", fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def coverage_summary(reports: list[SiteReport]) -> Counter[str]:
    """Structure states over every case of every site (the report's last line)."""
    total: Counter[str] = Counter()
    for report in reports:
        for case in report.cases:
            total.update(case.states.values())
    return total
