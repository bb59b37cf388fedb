"""``/v1/model``: which model segments the uploads, its structures and where it came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify

from rtseg.model.manifest import MANIFEST_NAME, load_manifest, model_hash
from service.context import ServiceContext, service

bp = Blueprint("model", __name__, url_prefix="/model")


@bp.get("")
def get() -> Response:
    return jsonify(model_info(service()))


def model_dir(ctx: ServiceContext) -> Path:
    """The configured model folder, or the embedded default (a ModelError if it is missing)."""
    if ctx.model_dir is not None:
        return ctx.model_dir
    from rtseg.model.default import default_model_dir

    return default_model_dir()


def model_info(ctx: ServiceContext) -> dict[str, Any]:
    """Manifest, hash and provenance; hashed once per change of the model files."""
    folder = model_dir(ctx)
    manifest = load_manifest(folder)
    key = (str(folder), *_mtimes(folder, manifest.folds, manifest.checkpoint))
    cached = ctx.cache.get("model")
    if cached is not None and cached[0] == key:
        info: dict[str, Any] = cached[1]
        return info
    provenance = {k: v for k, v in manifest.provenance.items() if k != "config"}
    info = {
        "name": manifest.name,
        "version": manifest.version,
        "hash": model_hash(folder),
        "configuration": manifest.configuration,
        "folds": list(manifest.folds),
        "orientation": manifest.orientation,
        "structures": [
            {"name": s.name, "label": s.label, "color": list(s.color), "rt_type": s.rt_type}
            for s in manifest.structures
        ],
        "federation_round": manifest.provenance.get("federation_round"),
        "provenance": provenance,
    }
    ctx.cache["model"] = (key, info)
    return info


def _mtimes(folder: Path, folds: tuple[str, ...], checkpoint: str) -> list[int]:
    paths = [folder / MANIFEST_NAME, *(folder / f"fold_{f}" / checkpoint for f in folds)]
    return [p.stat().st_mtime_ns if p.exists() else 0 for p in paths]
