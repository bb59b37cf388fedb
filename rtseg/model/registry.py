"""The site's model registry: every model version the node has held, and which one it runs.

Layout inside the node's data directory::

    <data_dir>/models/
        versions/<federation>__r<round>__<hash>/   one nnU-Net model folder per version (copied in)
        state.json                                 current version, generation, rollback history
        current -> versions/...                    symlink to the current version's folder
        history.jsonl                              append-only log of promotions and rollbacks
        .lock                                      serialises writers (flock)

``state.json`` is the truth and is only ever replaced whole (temporary file +
``os.replace``), so a reader sees the old or the new state, never half of one.
The ``current`` symlink follows it (also replaced atomically) and gives
consumers that hold one fixed path (``rtseg serve``, ``/v1/model``) the current
model. ``generation`` grows by one with every change of the current model: a
worker polls it between jobs (:meth:`Registry.generation`, one small file read)
and reloads when it changed. The embedded default model is the first current
model (:meth:`Registry.ensure`).

Version names carry where a model came from: ``<federation>/r<round>/<hash>``,
e.g. ``fed-peds/r3/1a2b3c4d5e6f`` (federation and round from the manifest's
provenance; a model trained outside a federation is ``local/r0/<hash>``).
"""

from __future__ import annotations

import builtins
import fcntl
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rtseg.errors import ModelError
from rtseg.model.manifest import MANIFEST_NAME, ModelManifest, load_manifest, model_hash, save_manifest

log = logging.getLogger(__name__)

MODELS_DIR = "models"
STATE_FILE = "state.json"
CURRENT_LINK = "current"
HISTORY_FILE = "history.jsonl"
ENTRY_FILE = "registry-entry.json"  # beside the model files: version, full hash, when added
HISTORY_DEPTH = 20  # previous versions kept for rollback
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ModelVersion:
    """One registered model version."""

    version: str  # <federation>/r<round>/<hash>
    folder: Path  # absolute path of the version's model folder
    name: str  # manifest name
    model_version: str  # manifest version
    federation: str
    round: int
    hash: str  # short model hash (12 hex digits)
    created: str  # when the model was made (manifest provenance), "" if unknown
    added: str  # when it entered this registry


@dataclass(frozen=True)
class State:
    version: str | None
    generation: int
    history: tuple[str, ...]  # previous current versions, most recent last


def version_name(manifest: ModelManifest, digest: str) -> str:
    """``<federation>/r<round>/<hash>`` of a model from its manifest and short hash."""
    federation, round_ = _origin(manifest)
    return f"{federation}/r{round_}/{digest}"


def _origin(manifest: ModelManifest) -> tuple[str, int]:
    provenance = manifest.provenance
    federation = str(provenance.get("federation") or "local")
    federation = _SAFE.sub("-", federation).strip("-.") or "local"
    round_ = provenance.get("federation_round")
    return federation, int(round_) if isinstance(round_, int | float | str) and str(round_).isdigit() else 0


def _slug(version: str) -> str:
    return version.replace("/", "__")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Registry:
    """Model versions of one node under ``<data_dir>/models``.

    Parameters
    ----------
    data_dir
        The node's data directory (``paths.data_dir``).
    """

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir).resolve() / MODELS_DIR
        self.versions_dir = self.root / "versions"
        self.state_path = self.root / STATE_FILE
        self.link = self.root / CURRENT_LINK

    # -- readers (cheap, lock-free) ----------------------------------------------------
    def generation(self) -> int:
        """Number of changes of the current model so far (0: no current model yet)."""
        return self.state().generation

    def state(self) -> State:
        try:
            doc = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return State(None, 0, ())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"unreadable registry state ({exc})", source=str(self.state_path)) from exc
        return State(doc.get("version"), int(doc.get("generation", 0)), tuple(doc.get("history", ())))

    def current(self) -> ModelVersion:
        """The version the node runs now."""
        version = self.state().version
        if version is None:
            raise ModelError("the registry has no current model yet", source=str(self.root))
        return self.get(version)

    def current_dir(self) -> Path:
        """Folder of the current version (a real path, stable while that version is current)."""
        return self.current().folder

    def get(self, version: str) -> ModelVersion:
        folder = self.versions_dir / _slug(version)
        entry = folder / ENTRY_FILE
        if not entry.is_file():
            known = ", ".join(v.version for v in self.list()) or "none"
            raise ModelError(f"no model version {version!r} in the registry (known: {known})")
        return _read_version(folder)

    def list(self) -> list[ModelVersion]:
        """All registered versions, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        found = [_read_version(p) for p in self.versions_dir.iterdir() if (p / ENTRY_FILE).is_file()]
        return sorted(found, key=lambda v: (v.added, v.version))

    def history(self) -> builtins.list[dict[str, Any]]:
        """Promotions and rollbacks, oldest first."""
        path = self.root / HISTORY_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # -- writers (serialised by a lock file) --------------------------------------------
    def ensure(self) -> ModelVersion:
        """The current version; on first use the embedded default model becomes it."""
        with self._locked():
            state = self.state()
            if state.version is not None:
                self._sync_link(state.version)
                return self.get(state.version)
        from rtseg.model.default import default_model_dir

        added = self.add(default_model_dir())
        with self._locked():
            if self.state().version is None:  # nobody else initialised it meanwhile
                self._set_current(added.version, None, "initial")
        return self.current()

    def add(self, model_dir: Path) -> ModelVersion:
        """Copy a model folder in (only what inference needs), verified by hash; idempotent."""
        source = Path(model_dir)
        manifest = load_manifest(source)
        full = model_hash(source, folds=manifest.folds, checkpoint=manifest.checkpoint, short=False)
        version = version_name(manifest, full[:12])
        target = self.versions_dir / _slug(version)
        if (target / ENTRY_FILE).is_file():
            return self.get(version)
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.versions_dir / f".incoming-{uuid.uuid4().hex}"
        try:
            _copy_model(source, tmp, manifest)
            copied = model_hash(tmp, folds=manifest.folds, checkpoint=manifest.checkpoint, short=False)
            if copied != full:
                raise ModelError(
                    "the copied model differs from its source (hash mismatch)", source=str(source)
                )
            entry = {
                "version": version,
                "sha256": full,
                "added": datetime.now(UTC).isoformat(),
            }  # orders list()
            (tmp / ENTRY_FILE).write_text(json.dumps(entry, indent=1) + "\n")
            with self._locked():
                if (target / ENTRY_FILE).is_file():
                    return self.get(version)
                os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        log.info("model %s added to the registry", version)
        return self.get(version)

    def verify(self, version: str) -> None:
        """Raise :class:`ModelError` if the stored files no longer hash to the recorded value."""
        folder = self.versions_dir / _slug(version)
        entry = json.loads((folder / ENTRY_FILE).read_text())
        if model_hash(folder, short=False) != entry["sha256"]:
            raise ModelError(f"model version {version} is damaged (hash mismatch)", source=str(folder))

    def promote(self, version: str, reason: str = "operator") -> ModelVersion:
        """Make ``version`` current (the previous one goes onto the rollback history)."""
        self.verify(self.get(version).version)
        self.ensure()
        with self._locked():
            state = self.state()
            if state.version == version:
                return self.get(version)
            history = (*state.history, state.version) if state.version else state.history
            self._set_current(version, history[-HISTORY_DEPTH:], reason, event="promote")
        log.info("model %s promoted (%s)", version, reason)
        return self.get(version)

    def rollback(self, reason: str = "operator") -> ModelVersion:
        """Make the previously current version current again."""
        with self._locked():
            state = self.state()
            if not state.history:
                raise ModelError("nothing to roll back to: no earlier current model", source=str(self.root))
            previous = state.history[-1]
            self.verify(previous)
            self._set_current(previous, state.history[:-1], reason, event="rollback")
        log.info("model rolled back to %s (%s)", previous, reason)
        return self.get(previous)

    # -- internals -------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _set_current(
        self, version: str, history: tuple[str, ...] | None, reason: str, event: str = "initial"
    ) -> None:
        state = self.state()
        generation = state.generation + 1
        doc = {
            "version": version,
            "generation": generation,
            "history": list(history or ()),
            "updated": _now(),
        }
        _replace_text(self.state_path, json.dumps(doc, indent=1) + "\n")
        self._sync_link(version)
        record = {"time": doc["updated"], "event": event, "version": version, "previous": state.version}
        record.update(generation=generation, reason=reason)
        with open(self.root / HISTORY_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _sync_link(self, version: str) -> None:
        target = f"versions/{_slug(version)}"
        if self.link.is_symlink() and os.readlink(self.link) == target:
            return
        tmp = self.root / f".current-{uuid.uuid4().hex}"
        os.symlink(target, tmp)
        os.replace(tmp, self.link)


def _copy_model(source: Path, target: Path, manifest: ModelManifest) -> None:
    """The files inference needs: manifest, dataset/plans JSON and the manifest's checkpoints."""
    target.mkdir(parents=True)
    for name in ("dataset.json", "plans.json", "dataset_fingerprint.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    for fold in manifest.folds:
        (target / f"fold_{fold}").mkdir()
        shutil.copy2(
            source / f"fold_{fold}" / manifest.checkpoint, target / f"fold_{fold}" / manifest.checkpoint
        )
    if (source / MANIFEST_NAME).is_file():
        shutil.copy2(source / MANIFEST_NAME, target / MANIFEST_NAME)
    else:  # a stock nnU-Net folder: freeze the identity derived from its own files
        save_manifest(target, manifest)


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_version(folder: Path) -> ModelVersion:
    entry = json.loads((folder / ENTRY_FILE).read_text())
    manifest = load_manifest(folder)
    federation, round_ = _origin(manifest)
    return ModelVersion(
        version=str(entry["version"]),
        folder=folder,
        name=manifest.name,
        model_version=manifest.version,
        federation=federation,
        round=round_,
        hash=str(entry["sha256"])[:12],
        created=str(manifest.provenance.get("created") or ""),
        added=str(entry["added"]),
    )


def serving_model_dir(model_path: Path | None, data_dir: Path) -> Path:
    """The model folder a node serves: an explicit ``model_path``, else the registry's ``current`` link.

    The link is a stable path whose target changes on promotion; workers
    following it (see :func:`registry_of`) reload between jobs.
    """
    if model_path is not None:
        return Path(model_path)
    registry = Registry(data_dir)
    registry.ensure()
    return registry.link


def registry_of(model_dir: Path) -> Registry | None:
    """The registry whose ``current`` link ``model_dir`` is, or None for a fixed model folder."""
    path = Path(model_dir)
    if path.name != CURRENT_LINK or not path.is_symlink() or path.parent.name != MODELS_DIR:
        return None
    if not (path.parent / STATE_FILE).is_file():
        return None
    return Registry(path.parent.parent)
