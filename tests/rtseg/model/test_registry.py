"""Model registry: versions copied in by hash, atomic current pointer, generation, rollback, hot swap."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rtseg.errors import ModelError
from rtseg.model.default import default_model_dir
from rtseg.model.manifest import load_manifest, model_hash, save_manifest
from rtseg.model.registry import Registry, registry_of, serving_model_dir
from rtseg_app.cli import main


def make_candidate(
    out: Path, *, federation: str, round_: int, bias_shift: dict[int, float] | None = None
) -> Path:
    """A copy of the default model from "another round": weights nudged with numpy (new hash).

    ``bias_shift`` adds to the output-layer bias of the given labels (a large
    negative value means the model never predicts that label).
    """
    import torch

    shutil.copytree(default_model_dir(), out)
    path = out / "fold_all" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    weights = checkpoint["network_weights"]
    rng = np.random.default_rng(round_)
    for key, tensor in weights.items():
        array = tensor.detach().cpu().numpy().copy()
        if key.startswith("decoder.seg_layers.") and key.endswith(".bias"):
            for label, shift in (bias_shift or {}).items():
                array[label] += shift
        elif array.dtype == np.float32 and array.size > 1:
            array += rng.normal(0.0, 1e-6, array.shape).astype(np.float32) * float(array.std() or 1.0)
        weights[key] = torch.from_numpy(array)
    torch.save(checkpoint, path)
    manifest = load_manifest(out)
    provenance = {**manifest.provenance, "federation": federation, "federation_round": round_}
    save_manifest(out, type(manifest)(**{**manifest.__dict__, "provenance": provenance}))
    return out


@pytest.fixture(scope="module")
def candidate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_candidate(tmp_path_factory.mktemp("cand") / "model", federation="fed-peds", round_=3)


def test_initial_current_is_the_embedded_default(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    assert registry.generation() == 0
    current = registry.ensure()
    digest = model_hash(default_model_dir())
    assert current.version == f"local/r0/{digest}"
    assert registry.generation() == 1
    assert model_hash(registry.current_dir()) == digest  # copied in, same files
    assert (tmp_path / "models" / "current").resolve() == current.folder
    assert registry.ensure().version == current.version and registry.generation() == 1  # idempotent


def test_promote_and_rollback_change_what_the_segmenter_loads(tmp_path: Path, candidate: Path) -> None:
    from rtseg.model.segmenter import NnunetSegmenter

    registry = Registry(tmp_path)
    default = registry.ensure()
    added = registry.add(candidate)
    assert added.version == f"fed-peds/r3/{model_hash(candidate)}"
    assert added.round == 3 and added.federation == "fed-peds"
    assert registry.add(candidate).version == added.version  # idempotent
    link = serving_model_dir(None, tmp_path)

    registry.promote(added.version)
    assert registry.generation() == 2
    seg = NnunetSegmenter(link.resolve(), device="cpu", threads=1)
    assert model_hash(seg.model_dir) == added.hash
    assert seg.manifest.provenance["federation_round"] == 3

    registry.rollback()
    assert registry.generation() == 3
    assert registry.current().version == default.version
    seg = NnunetSegmenter(link.resolve(), device="cpu", threads=1)
    assert model_hash(seg.model_dir) == default.hash
    events = [(h["event"], h["version"]) for h in registry.history()]
    assert events == [("initial", default.version), ("promote", added.version), ("rollback", default.version)]
    with pytest.raises(ModelError, match="nothing to roll back"):
        registry.rollback()
    with pytest.raises(ModelError, match="no model version"):
        registry.promote("fed-peds/r9/000000000000")


def test_damaged_version_is_not_promoted(tmp_path: Path, candidate: Path) -> None:
    registry = Registry(tmp_path)
    added = registry.add(candidate)
    checkpoint = added.folder / "fold_all" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ModelError, match="damaged"):
        registry.promote(added.version)


def test_cli_list_promote_rollback(
    tmp_path: Path, candidate: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = str(tmp_path)
    assert main(["model", "promote", str(candidate), "--data-dir", data]) == 0
    out = capsys.readouterr().out
    version = f"fed-peds/r3/{model_hash(candidate)}"
    assert f"current model: {version}" in out and "not checked by the gate" in out
    assert main(["model", "list", "--data-dir", data]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "rtseg-peds-abdomen" in line]
    assert len(rows) == 2
    assert rows[0].startswith("  local/r0/") and rows[1].startswith(f"* {version}")
    assert "generation 2" in out
    assert main(["model", "rollback", "--data-dir", data]) == 0
    assert f"(was {version}); generation 3" in capsys.readouterr().out
    assert main(["model", "rollback", "--data-dir", data]) == 2
    assert "nothing to roll back" in capsys.readouterr().err


def test_concurrent_reader_never_sees_a_half_written_pointer(tmp_path: Path, candidate: Path) -> None:
    registry = Registry(tmp_path)
    first = registry.ensure()
    second = registry.add(candidate)
    writer = textwrap.dedent(
        f"""
        from rtseg.model.registry import Registry
        r = Registry({str(tmp_path)!r})
        for _ in range(40):
            r.promote({second.version!r})
            r.rollback()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", writer])
    seen, last = set(), 0
    valid = {first.folder, second.folder}
    while proc.poll() is None or len(seen) < 2:
        state = json.loads((tmp_path / "models" / "state.json").read_text())  # never partial
        assert state["generation"] >= last
        last = state["generation"]
        assert registry.current_dir() in valid
        assert (tmp_path / "models" / "current").resolve() in valid
        seen.add(state["version"])
        if proc.poll() is not None:
            break
    assert proc.wait() == 0
    assert registry.generation() == 1 + 80
    assert seen == {first.version, second.version}


def test_worker_follows_only_a_registry_link(tmp_path: Path) -> None:
    link = serving_model_dir(None, tmp_path)
    assert registry_of(link) is not None
    assert registry_of(default_model_dir()) is None
    assert serving_model_dir(default_model_dir(), tmp_path) == default_model_dir()


def middle_slices(ct_dir: Path, out: Path, n: int) -> Path:
    """The ``n`` middle slices of a CT series (a smaller valid series) copied to ``out``."""
    import pydicom

    from rtseg.ct import load_series

    uids = load_series(ct_dir).info.sop_instance_uids
    start = max(0, (len(uids) - n) // 2)
    keep = set(uids[start : start + n])
    out.mkdir(parents=True)
    for path in ct_dir.glob("*.dcm"):
        if pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID in keep:
            shutil.copy2(path, out / path.name)
    return out


@pytest.mark.slow  # three real segmentations in a worker process (~1 min of CPU)
def test_worker_hot_swaps_between_jobs(tmp_path: Path, phantom_ct96: Path, candidate: Path) -> None:
    import time

    from rtseg.jobs import FINAL, JobState, JobStore
    from rtseg.pipeline import model_identity
    from rtseg.worker import WorkerPool

    data = tmp_path / "data"
    middle_slices(phantom_ct96, data / "inputs" / "ct", 12)
    registry = Registry(data)
    default = registry.ensure()
    added = registry.add(candidate)
    store = JobStore(data / "state.db")
    pool = WorkerPool(store, data, serving_model_dir(None, data), workers=1, threads=1)
    pool.start()

    def run_job(key: str) -> object:
        job = store.create("dicom", key, "inputs/ct", state=JobState.QUEUED)
        deadline = time.monotonic() + 600
        while store.get(job.id).state not in FINAL and time.monotonic() < deadline:
            time.sleep(0.3)
        return store.get(job.id)

    try:
        first = run_job("k1")
        registry.promote(added.version)
        second = run_job("k2")
        registry.rollback()
        third = run_job("k3")
    finally:
        pool.stop()
    expected = [model_identity(load_manifest(v.folder), v.folder).version for v in (default, added, default)]
    got = [(j.state, j.model_version, j.result["model"]["version"]) for j in (first, second, third)]  # type: ignore[attr-defined]
    assert got == [(JobState.DONE, v, v) for v in expected]
    assert added.hash in expected[1] and default.hash in expected[0]
