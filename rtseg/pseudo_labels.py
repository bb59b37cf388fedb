"""Pseudo-labels: fill a case's unknown structures from a model's prediction (``case.json``: "filled").

The other answer to an incomplete contour set (the first is nnU-Net's ignore
label, :func:`rtseg.model.dataset.mark_unknown`): the seed study filled 8 of
its 17 OARs with another model's output. A filled structure then trains like a
contoured one, so its quality is the model's: ``docs/federation.md``
("Incomplete contour sets") measures both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from rtseg.cases import FILLED, LABELS_FILE, RECORD_FILE, UNKNOWN, load_case, structure_states
from rtseg.errors import InputError
from rtseg.phantom.cohort import write_label_image
from rtseg.structures import EXTERNAL

if TYPE_CHECKING:  # the protocol only: importing the segmenter module loads torch
    from rtseg.model.segmenter import Segmenter


def fill_unknown(case_dir: Path, segmenter: Segmenter) -> list[str]:
    """Label a case's unknown structures where ``segmenter`` finds them; returns the names filled.

    Only voxels no person labelled as an organ (background or External) are
    filled, so a contoured organ is never overwritten. Each unknown structure
    the model knows becomes "filled" in ``case.json`` (also when the model finds
    none of it: the case then says the structure is absent); External and
    structures the model lacks stay "unknown".
    """
    states = structure_states(case_dir)
    label_of = {s.name: s.label for s in segmenter.manifest.structures}
    todo = [n for n, state in states.items() if state == UNKNOWN and n != EXTERNAL and n in label_of]
    if not todo:
        return []
    case = load_case(case_dir)
    predicted = segmenter.segment(case.volume).labels
    if predicted.shape != case.labels.shape:
        raise InputError("the prediction is not on the case's CT grid", source=str(case_dir))
    labels = case.labels.copy()
    free = labels == 0
    if EXTERNAL in label_of:
        free |= labels == label_of[EXTERNAL]
    for name in todo:
        labels[free & (predicted == label_of[name])] = label_of[name]
    write_label_image(labels, case.volume.affine, case_dir / LABELS_FILE)
    _record(case_dir, {**states, **dict.fromkeys(todo, FILLED)})
    return todo


def _record(case_dir: Path, states: dict[str, str]) -> None:
    path = case_dir / RECORD_FILE
    record = json.loads(path.read_text())
    record["structures"] = states
    if isinstance(record.get("counts"), dict):  # the import's summary counts follow the states
        record["counts"] = {
            s: sum(1 for v in states.values() if v == s) for s in sorted(set(states.values()))
        }
    path.write_text(json.dumps(record, indent=1) + "\n")
