"""Score a model against labelled cases: per structure Dice, HD95 and mean surface distance."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rtseg.cases import LabelledCase
from rtseg.metrics import Scores, score, structure_masks
from rtseg.model.segmenter import Segmenter
from rtseg.pipeline import clean_segmentation
from rtseg.structures import EXTERNAL, Structure


@dataclass(frozen=True)
class CaseScores:
    case_id: str
    scores: dict[str, Scores]  # structure name → scores
    seconds: float


@dataclass(frozen=True)
class Summary:
    """Mean per structure over cases where the structure exists in the reference."""

    per_structure: dict[str, dict[str, float | None]]
    mean_oar_dice: float | None
    min_oar: tuple[str, float] | None
    n_cases: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def score_case(
    case: LabelledCase, predicted: np.ndarray, structures: Iterable[Structure], surfaces: bool = True
) -> dict[str, Scores]:
    """Scores of each structure of one case; spacing in the label array's axis order."""
    spacing = case.volume.spacing
    out = {}
    for s in structures:
        external = s.name == EXTERNAL
        out[s.name] = score(
            structure_masks(predicted, s.label, external),
            structure_masks(case.labels, s.label, external),
            spacing,
            surfaces,
        )
    return out


def evaluate(
    segmenter: Segmenter,
    cases: Iterable[LabelledCase],
    surfaces: bool = True,
    progress: Callable[[CaseScores], None] | None = None,
    delivered: bool = True,
) -> list[CaseScores]:
    """Scores of ``segmenter`` on each labelled case.

    ``delivered``: score what the node sends (:func:`rtseg.pipeline.clean_segmentation`: structures
    the CT cannot show dropped, one-piece organs settled at their level); False scores the model's
    labels as they come.
    """
    results = []
    for case in cases:
        seg = segmenter.segment(case.volume)
        if delivered:
            seg = clean_segmentation(case.volume, seg)[0]
        result = CaseScores(
            case.case_id, score_case(case, seg.labels, segmenter.manifest.structures, surfaces), seg.seconds
        )
        results.append(result)
        if progress:
            progress(result)
    return results


def summarize(results: list[CaseScores]) -> Summary:
    names = list(results[0].scores) if results else []
    per: dict[str, dict[str, float | None]] = {}
    for name in names:
        present = [r.scores[name] for r in results if r.scores[name].reference_ml > 0]
        absent = [r.scores[name] for r in results if r.scores[name].reference_ml == 0]
        per[name] = {
            "dice": _mean([s.dice for s in present]),
            "hd95_mm": _mean([s.hd95_mm for s in present]),
            "msd_mm": _mean([s.msd_mm for s in present]),
            "cases": float(len(present)),
            # predicted volume where the reference has none (e.g. a kidney after nephrectomy)
            "false_positive_ml": _mean([s.predicted_ml for s in absent]),
        }
    oars = {n: v["dice"] for n, v in per.items() if n != EXTERNAL and v["dice"] is not None}
    mean = float(np.mean(list(oars.values()))) if oars else None
    worst = min(oars.items(), key=lambda kv: kv[1]) if oars else None
    return Summary(per, mean, (worst[0], float(worst[1])) if worst else None, len(results))


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def write_results(results: list[CaseScores], summary: Summary, out_dir: Path) -> None:
    """``scores.csv`` (one row per case and structure), ``summary.json`` and ``summary.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "scores.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case", "structure", "dice", "hd95_mm", "msd_mm", "reference_ml", "predicted_ml"])
        for r in results:
            for name, s in r.scores.items():
                writer.writerow(
                    [
                        r.case_id,
                        name,
                        _fmt(s.dice),
                        _fmt(s.hd95_mm),
                        _fmt(s.msd_mm),
                        f"{s.reference_ml:.2f}",
                        f"{s.predicted_ml:.2f}",
                    ]
                )
    (out_dir / "summary.json").write_text(summary.to_json())
    (out_dir / "summary.md").write_text(summary_table(summary))


def summary_table(summary: Summary) -> str:
    lines = [
        "| structure | Dice | HD95 (mm) | MSD (mm) | cases | FP ml where absent |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in summary.per_structure.items():
        lines.append(
            f"| {name} | {_fmt(v['dice'])} | {_fmt(v['hd95_mm'], 1)} | {_fmt(v['msd_mm'], 2)} "
            f"| {int(v['cases'] or 0)} | {_fmt(v['false_positive_ml'], 1)} |"
        )
    lines.append("")
    lines.append(
        f"Mean Dice over OARs: {_fmt(summary.mean_oar_dice)}; lowest: "
        f"{summary.min_oar[0]} {summary.min_oar[1]:.3f}"
        if summary.min_oar
        else "no OARs scored"
    )
    return "\n".join(lines) + "\n"


def _fmt(v: float | None, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f}"
