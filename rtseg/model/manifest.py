"""What a model folder is: an nnU-Net v2 results folder plus ``rtseg-model.json``.

A model folder is the standard folder nnU-Net writes for one trainer, plans and
configuration (``dataset.json``, ``plans.json``, ``fold_*/checkpoint_*.pth``).
rtseg adds ``rtseg-model.json`` (the manifest: name, version, structures,
provenance). A folder without a manifest -- any stock nnU-Net v2 results folder,
trained anywhere -- gets one derived from its own files, so it loads unchanged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import rtseg
from rtseg.errors import ModelError
from rtseg.model.plans_check import check_plans
from rtseg.structures import BY_NAME, Structure, color_for

MANIFEST_NAME = "rtseg-model.json"
MANIFEST_FORMAT = 1
CANONICAL_ORIENTATION = "LPS"  # [z, y, x] towards +S, +P, +L: ITK's identity direction


@dataclass(frozen=True)
class ModelManifest:
    """Identity and contract of a model folder."""

    name: str
    version: str
    structures: tuple[Structure, ...]
    configuration: str = "3d_fullres"
    folds: tuple[str, ...] = ("all",)
    checkpoint: str = "checkpoint_final.pth"
    orientation: str = CANONICAL_ORIENTATION
    provenance: dict[str, Any] = field(default_factory=dict)
    region: str = ""  # body region the model contours (a key of rtseg.region.REGIONS); "": not checked

    def labels(self) -> dict[str, int]:
        """The ``labels`` entry of ``dataset.json`` these structures stand for."""
        return {"background": 0, **{s.name: s.label for s in self.structures}}


def default_provenance(
    *,
    training_data: dict[str, Any] | None = None,
    seeds: dict[str, int] | None = None,
    command: str | None = None,
    federation_round: int | None = None,
) -> dict[str, Any]:
    """Provenance record for a model made now by this rtseg version (no patient data)."""
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "rtseg_version": rtseg.__version__,
        "training_data": training_data,
        "seeds": seeds,
        "command": command,
        "federation_round": federation_round,
    }


def save_manifest(model_dir: Path, manifest: ModelManifest) -> Path:
    """Write ``rtseg-model.json`` into ``model_dir``; returns its path."""
    doc = {
        "format": MANIFEST_FORMAT,
        "name": manifest.name,
        "version": manifest.version,
        "structures": [
            {"name": s.name, "label": s.label, "color": list(s.color), "rt_type": s.rt_type}
            for s in manifest.structures
        ],
        "configuration": manifest.configuration,
        "folds": list(manifest.folds),
        "checkpoint": manifest.checkpoint,
        "orientation": manifest.orientation,
        "provenance": manifest.provenance,
        **({"region": manifest.region} if manifest.region else {}),
    }
    path = Path(model_dir) / MANIFEST_NAME
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def load_manifest(model_dir: Path) -> ModelManifest:
    """The manifest of ``model_dir``: read from ``rtseg-model.json`` or derived from nnU-Net's files.

    Raises :class:`ModelError` for a missing folder, a malformed manifest, and
    plans that :func:`~rtseg.model.plans_check.check_plans` refuses.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError("model folder does not exist", source=str(model_dir))
    # every use of a model folder (segment, registry, gate, hot swap, HTTP, federation) starts here:
    # plans that could make nnU-Net import and run code are refused before anything reads them
    check_plans(read_json(model_dir / "plans.json"), source=str(model_dir / "plans.json"))
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        return derive_manifest(model_dir)
    doc = read_json(path)
    try:
        return ModelManifest(
            name=str(doc["name"]),
            version=str(doc["version"]),
            structures=tuple(
                Structure(str(s["name"]), int(s["label"]), _color(s["color"]), str(s.get("rt_type", "ORGAN")))
                for s in doc["structures"]
            ),
            configuration=str(doc["configuration"]),
            folds=tuple(str(f) for f in doc["folds"]),
            checkpoint=str(doc.get("checkpoint", "checkpoint_final.pth")),
            orientation=str(doc.get("orientation", CANONICAL_ORIENTATION)),
            provenance=dict(doc.get("provenance") or {}),
            region=str(doc.get("region") or ""),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"malformed model manifest ({exc!r})", source=str(path)) from exc


def derive_manifest(model_dir: Path, checkpoint: str = "checkpoint_final.pth") -> ModelManifest:
    """A manifest for a plain nnU-Net v2 results folder (no ``rtseg-model.json``)."""
    model_dir = Path(model_dir)
    dataset = read_json(model_dir / "dataset.json")
    plans = read_json(model_dir / "plans.json")
    folds = _detect_folds(model_dir, checkpoint)
    name = str(plans.get("dataset_name") or dataset.get("name") or model_dir.parent.name or model_dir.name)
    return ModelManifest(
        name=name,
        version="nnunet-" + model_hash(model_dir, folds=folds, checkpoint=checkpoint),
        structures=structures_from_dataset_json(dataset, source=str(model_dir / "dataset.json")),
        configuration=_detect_configuration(model_dir, plans),
        folds=folds,
        checkpoint=checkpoint,
        provenance={"derived_from": "nnU-Net results folder", "folder": model_dir.name},
    )


def structures_from_dataset_json(dataset: dict[str, Any], source: str | None = None) -> tuple[Structure, ...]:
    """Structures for the foreground labels of a ``dataset.json`` (fixed colours by name)."""
    labels = dataset.get("labels")
    if not isinstance(labels, dict):
        raise ModelError("dataset.json has no 'labels' mapping", source=source)
    order = dataset.get("regions_class_order")
    out: list[Structure] = []
    for index, (name, value) in enumerate(
        (k, v) for k, v in labels.items() if k not in ("background", "ignore")
    ):
        if isinstance(value, int):
            label = value
        elif isinstance(value, list) and isinstance(order, list) and index < len(order):
            label = int(order[index])  # region-based model: output label of the region
        else:
            raise ModelError(f"cannot map label {name!r}={value!r} to an output label", source=source)
        known = BY_NAME.get(name)
        out.append(Structure(name, label, color_for(name), known.rt_type if known else "ORGAN"))
    if not out:
        raise ModelError("dataset.json defines no foreground labels", source=source)
    return tuple(sorted(out, key=lambda s: s.label))


def model_hash(
    model_dir: Path,
    *,
    folds: tuple[str, ...] | None = None,
    checkpoint: str | None = None,
    short: bool = True,
) -> str:
    """SHA-256 over the checkpoints, ``plans.json`` and ``dataset.json`` (first 12 hex digits if short)."""
    model_dir = Path(model_dir)
    if folds is None or checkpoint is None:
        manifest = load_manifest(model_dir)
        folds, checkpoint = manifest.folds, manifest.checkpoint
    digest = hashlib.sha256()
    files = [model_dir / f"fold_{f}" / checkpoint for f in folds]
    for path in [*files, model_dir / "plans.json", model_dir / "dataset.json"]:
        if not path.is_file():
            raise ModelError(f"missing model file {path.relative_to(model_dir)}", source=str(model_dir))
        digest.update(path.relative_to(model_dir).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    hexdigest = digest.hexdigest()
    return hexdigest[:12] if short else hexdigest


def _detect_folds(model_dir: Path, checkpoint: str) -> tuple[str, ...]:
    found = [p.name[len("fold_") :] for p in model_dir.glob("fold_*") if (p / checkpoint).is_file()]
    numbered = sorted((f for f in found if f.isdigit()), key=int)
    if numbered:  # an ensemble of cross-validation folds, as nnU-Net's own auto-detection prefers
        return tuple(numbered)
    if "all" in found:
        return ("all",)
    raise ModelError(f"no fold_*/{checkpoint} in the model folder", source=str(model_dir))


def _detect_configuration(model_dir: Path, plans: dict[str, Any]) -> str:
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or not configurations:
        raise ModelError("plans.json has no configurations", source=str(model_dir / "plans.json"))
    parts = model_dir.name.split("__")  # Trainer__Plans__configuration
    if len(parts) == 3 and parts[2] in configurations:
        return parts[2]
    if len(configurations) == 1:
        return str(next(iter(configurations)))
    if "3d_fullres" in configurations:
        return "3d_fullres"
    raise ModelError(
        "cannot tell which configuration the model was trained with; add rtseg-model.json",
        source=str(model_dir),
    )


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a model file; any problem is a :class:`ModelError`."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelError(f"missing {path.name}", source=str(path.parent)) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"unreadable {path.name} ({exc})", source=str(path.parent)) from exc
    except RecursionError as exc:  # arrays or objects nested a thousand deep: no model file is
        raise ModelError(f"{path.name} nests deeper than JSON can be read", source=str(path.parent)) from exc
    if not isinstance(doc, dict):
        raise ModelError(f"{path.name} is not a JSON object", source=str(path.parent))
    return doc


def _color(value: Any) -> tuple[int, int, int]:
    r, g, b = (int(c) for c in value)
    return (r, g, b)
