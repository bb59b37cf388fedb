"""A federation that continues from an existing model (run config ``start-model``).

A hospital federation starts from the shipped model, not from random weights:
round 0 is that model's plans (network, patch, spacing and CT normalisation),
its ``dataset.json`` and its weights. The folder is read as every model folder
is (:func:`~rtseg.model.manifest.load_manifest` checks its plans; the weights
go through the restricted checkpoint loader in the nnU-Net child), so a model
folder cannot run code at the coordinator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtseg.errors import FederationError, ModelError
from rtseg.federation.fingerprint import SiteFingerprint
from rtseg.model.cpu import CONFIGURATION
from rtseg.model.manifest import load_manifest, model_hash, read_json

IGNORE = "ignore"


@dataclass(frozen=True)
class StartModel:
    """What round 0 takes from the model folder."""

    path: Path
    name: str  # the model's manifest name
    version: str  # and version
    hash: str  # rtseg's short model hash (its checkpoint, plans.json and dataset.json)
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    checkpoint: Path

    @property
    def label(self) -> str:
        """``name version (hash …)``, for the log."""
        return f"{self.name} {self.version} (hash {self.hash})"

    @property
    def record(self) -> dict[str, str]:
        """What the round manifests and ``rounds.jsonl`` say the federation started from."""
        return {"name": self.name, "version": self.version, "hash": self.hash}

    @property
    def labels(self) -> dict[str, int]:
        """The label table the sites must declare (an ignore label is training data, not a class)."""
        return {str(k): int(v) for k, v in self.dataset_json["labels"].items() if k != IGNORE}

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """The model's voxel spacing in canonical (z, y, x) order: the sites resample to it once."""
        forward = list(self.plans.get("transpose_forward", [0, 1, 2]))
        spacing = self.plans["configurations"][CONFIGURATION]["spacing"]
        z, y, x = (float(spacing[forward.index(axis)]) for axis in range(3))
        return z, y, x

    def plans_for(self, dataset_name: str) -> dict[str, Any]:
        """The model's plans for the federation's dataset (a site accepts plans for its own only)."""
        return {**self.plans, "dataset_name": dataset_name}


def load_start_model(path: Path) -> StartModel:
    """The model folder ``path`` as round 0; :class:`FederationError` naming why it cannot be."""
    path = Path(path)
    try:
        manifest = load_manifest(path)
        plans, dataset_json = read_json(path / "plans.json"), read_json(path / "dataset.json")
    except ModelError as exc:
        raise FederationError(f"the start model cannot be used: {exc.message}", source=str(path)) from exc
    if manifest.configuration != CONFIGURATION:
        problem = f"its configuration is {manifest.configuration!r}; the federation trains {CONFIGURATION}"
    elif len(manifest.folds) != 1:
        problem = f"it is an ensemble of {len(manifest.folds)} folds; a federation continues one network"
    elif not isinstance(dataset_json.get("labels"), dict):
        problem = "its dataset.json has no label table"
    else:
        checkpoint = path / f"fold_{manifest.folds[0]}" / manifest.checkpoint
        if checkpoint.is_file():
            digest = model_hash(path, folds=manifest.folds, checkpoint=manifest.checkpoint)
            return StartModel(path, manifest.name, manifest.version, digest, plans, dataset_json, checkpoint)
        problem = f"no fold_{manifest.folds[0]}/{manifest.checkpoint}"
    raise FederationError(f"the start model cannot be used: {problem}", source=str(path))


def label_problem(fingerprint: SiteFingerprint, start: StartModel) -> str | None:
    """Why a site cannot train the start model (its label table differs), or None."""
    if fingerprint.labels == start.labels:
        return None
    return f"its labels {fingerprint.labels} are not the start model's {start.labels}"
