"""Labelled cases on disk: ``<case>/ct/`` (DICOM series) + ``<case>/labels.nii.gz``.

This is the one format for training, evaluation and a site's local data: the
phantom generator writes it, and the node's closed loop adds clinician-approved
cases in it. Labels are read onto the CT's own voxel grid and checked against
it, so a misaligned label map is an error, never silently wrong training data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from rtseg.ct import load_series
from rtseg.errors import InputError
from rtseg.phantom.cohort import read_label_image
from rtseg.volume import CTVolume, Orientation

LABELS_FILE = "labels.nii.gz"
CT_DIR = "ct"
RECORD_FILE = "case.json"
# case.json "structures" states: drawn by a person, filled by a model, or nobody knows
CONTOURED, FILLED, UNKNOWN = "contoured", "filled", "unknown"
STATES = (CONTOURED, FILLED, UNKNOWN)


@dataclass(frozen=True, eq=False)
class LabelledCase:
    """A CT volume and its reference label map on the same grid."""

    case_id: str
    volume: CTVolume
    labels: npt.NDArray[np.uint8]  # [k, j, i] like volume.hu

    def canonical(self) -> tuple[npt.NDArray[np.int16], tuple[float, float, float], npt.NDArray[np.uint8]]:
        """(image [z, y, x], spacing zyx, labels [z, y, x]) in the orientation models see."""
        orientation = Orientation.from_affine(self.volume.affine)
        image = orientation.to_canonical(self.volume.hu).astype(np.int16)
        labels = orientation.to_canonical(self.labels)
        return image, orientation.canonical_spacing(self.volume.spacing), labels


def case_dirs(root: Path) -> list[Path]:
    """Case folders below ``root`` (those holding a ct/ folder and a label map), sorted."""
    if not root.is_dir():
        raise InputError("not a folder of cases", source=str(root))
    found = sorted(p for p in root.iterdir() if (p / CT_DIR).is_dir() and (p / LABELS_FILE).is_file())
    if not found:
        raise InputError(
            f"no cases found (expected <case>/{CT_DIR}/ and <case>/{LABELS_FILE})", source=str(root)
        )
    return found


def load_case(case_dir: Path) -> LabelledCase:
    volume = load_series(case_dir / CT_DIR)
    labels, affine = read_label_image(case_dir / LABELS_FILE)
    if labels.shape != volume.shape:
        raise InputError(
            f"label map shape {labels.shape} differs from the CT {volume.shape}",
            source=str(case_dir / LABELS_FILE),
        )
    if not np.allclose(affine, volume.affine, atol=1e-2):
        raise InputError(
            "label map geometry (origin/orientation/spacing) differs from the CT",
            source=str(case_dir / LABELS_FILE),
        )
    return LabelledCase(case_dir.name, volume, labels)


def iter_cases(root: Path) -> Iterator[LabelledCase]:
    for case_dir in case_dirs(root):
        yield load_case(case_dir)


def structure_states(case_dir: Path) -> dict[str, str]:
    """``case.json``'s ``{structure: "contoured"|"filled"|"unknown"}``; empty without a record.

    A case without ``case.json`` (a phantom, an older closed-loop case) is fully labelled.
    """
    path = case_dir / RECORD_FILE
    if not path.is_file():
        return {}
    try:
        states = json.loads(path.read_text()).get("structures", {})
    except (json.JSONDecodeError, AttributeError) as exc:
        raise InputError(f"not a case record: {exc}", source=str(path)) from exc
    if not isinstance(states, dict) or not all(v in STATES for v in states.values()):
        raise InputError(f"'structures' must map names to one of {STATES}", source=str(path))
    return {str(k): str(v) for k, v in states.items()}


def unknown_structures(roots: Iterable[Path]) -> dict[str, frozenset[str]]:
    """Case id → the structures nobody contoured, for the cases of ``roots`` that have any."""
    out: dict[str, frozenset[str]] = {}
    for root in roots:
        for case_dir in case_dirs(root):
            unknown = frozenset(n for n, state in structure_states(case_dir).items() if state == UNKNOWN)
            if unknown:
                out[case_dir.name] = unknown
    return out
