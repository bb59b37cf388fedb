"""The network's runtime (``[node] engine``): exported runtimes agree with torch; exports are cached."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from rtseg.ct.load import load_series
from rtseg.errors import ModelError
from rtseg.metrics import dice
from rtseg.model.default import default_model_dir
from rtseg.model.engines import require_runtime, resolve_runtime
from rtseg.model.runtimes import ExportedNetwork
from rtseg.model.segmenter import NnunetSegmenter
from rtseg.phantom.cohort import case_id, write_case

EXPORTED = ("onnxruntime", "openvino")


@pytest.fixture(scope="module")
def phantom128(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom128")
    write_case("A", 11, 0, root, matrix=128)
    return root / case_id("A", 11, 0) / "ct"


@pytest.fixture(scope="module")
def torch_segmenter() -> NnunetSegmenter:
    return NnunetSegmenter(default_model_dir(), device="cpu", threads=2, runtime="torch")


@pytest.mark.parametrize("runtime", EXPORTED)
def test_exported_runtime_agrees_with_torch_on_a_phantom(
    runtime: str, phantom128: Path, torch_segmenter: NnunetSegmenter, tmp_path: Path
) -> None:
    exported = NnunetSegmenter(
        default_model_dir(), device="cpu", threads=2, runtime=runtime, export_cache=tmp_path
    )
    assert isinstance(exported._predictor.network, ExportedNetwork)
    volume = load_series(phantom128)
    reference = torch_segmenter.segment(volume).labels
    labels = exported.segment(volume).labels
    present = [s for s in torch_segmenter.manifest.structures if (reference == s.label).any()]
    assert len(present) >= 10  # the phantom shows the model's organs: the agreement means something
    scores = {s.name: dice(labels == s.label, reference == s.label) for s in present}
    low = {name: score for name, score in scores.items() if score is None or score < 0.99}
    assert not low, f"{runtime} vs torch Dice below 0.99: {low}"


@pytest.mark.parametrize("runtime", EXPORTED)
def test_exported_runtime_logits_match_torch_on_one_tile(
    runtime: str, torch_segmenter: NnunetSegmenter, tmp_path: Path
) -> None:
    exported = NnunetSegmenter(
        default_model_dir(), device="cpu", threads=2, runtime=runtime, export_cache=tmp_path
    )
    predictor = torch_segmenter._predictor
    predictor.network.load_state_dict(predictor.list_of_parameters[0])
    tile = torch.randn(1, 1, *predictor.configuration_manager.patch_size, generator=torch.manual_seed(5))
    with torch.inference_mode():
        expected = predictor.network(tile)
        exported._predictor.network.load_state_dict(exported._predictor.list_of_parameters[0])
        got = exported._predictor.network(tile)
    assert got.shape == expected.shape and got.dtype == torch.float32
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 1e-4 * scale + 1e-3


def _onnx_segmenter(cache: Path) -> NnunetSegmenter:
    return NnunetSegmenter(
        default_model_dir(), device="cpu", threads=1, runtime="onnxruntime", export_cache=cache
    )


def test_export_is_cached_and_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rtseg.model.runtimes")
    _onnx_segmenter(tmp_path)
    exports = list(tmp_path.rglob("fold_*.onnx"))
    assert len(exports) == 1 and "engine cache: exported fold_0.onnx" in caplog.text
    mtime = exports[0].stat().st_mtime_ns
    caplog.clear()
    _onnx_segmenter(tmp_path)
    assert "engine cache: reusing fold_0.onnx" in caplog.text
    assert "exported" not in caplog.text
    assert exports[0].stat().st_mtime_ns == mtime


def test_tampered_export_is_rebuilt_not_trusted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _onnx_segmenter(tmp_path)
    (export,) = tmp_path.rglob("fold_*.onnx")
    good = export.read_bytes()
    export.write_bytes(good[:-64] + bytes(64))  # a weight changed on disk, still a loadable file
    caplog.set_level(logging.INFO, logger="rtseg.model.runtimes")
    _onnx_segmenter(tmp_path)
    assert "does not match its record: exporting again" in caplog.text
    assert "engine cache: exported fold_0.onnx" in caplog.text
    assert export.read_bytes() == good


def test_auto_is_torch_on_cuda_and_unknown_engine_is_refused() -> None:
    assert resolve_runtime("auto", "cuda") == "torch"
    assert resolve_runtime("auto", "cpu") in ("torch", "onnxruntime", "openvino")
    with pytest.raises(ModelError, match="unknown engine 'tensorrt'"):
        resolve_runtime("tensorrt", "cpu")
    with pytest.raises(ModelError, match="runs on the CPU"):
        resolve_runtime("onnxruntime", "cuda")


def test_missing_runtime_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    # onnxruntime is installed here: hide it, as on a node installed without the extra
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name)
    )
    with pytest.raises(ModelError, match=r'pip install "rtseg\[onnx\]"'):
        require_runtime("onnxruntime")
    assert resolve_runtime("auto", "cpu") in ("torch", "openvino")  # auto never picks a missing runtime
    require_runtime("torch")


def test_cache_keeps_the_exports_of_the_newest_models_only(tmp_path: Path) -> None:
    from rtseg.model.runtimes import KEEP_MODELS, ExportCache

    for n in range(KEEP_MODELS + 2):  # one export per model a registry swapped in
        ExportCache(tmp_path, f"{n:064x}", (1, 1, 8, 8, 8)).store(0, b"onnx bytes %d" % n)
    kept = sorted(p.name[:12] for p in tmp_path.iterdir())
    assert kept == [f"{n:064x}"[:12] for n in range(2, KEEP_MODELS + 2)]
    assert ExportCache(tmp_path, f"{KEEP_MODELS + 1:064x}", (1, 1, 8, 8, 8)).load(0) == b"onnx bytes %d" % (
        KEEP_MODELS + 1
    )


def test_each_fold_runs_its_own_export(phantom128: Path, tmp_path: Path) -> None:
    """Two folds with different weights: each sliding window must run its own fold's export."""
    import json
    import shutil

    from rtseg.model.checkpoints import load_checkpoint

    model = tmp_path / "model"
    shutil.copytree(default_model_dir(), model)
    (model / "fold_all").rename(model / "fold_0")
    shutil.copytree(model / "fold_0", model / "fold_1")
    checkpoint = load_checkpoint(model / "fold_1" / "checkpoint_final.pth")
    generator = torch.manual_seed(7)
    for value in checkpoint["network_weights"].values():
        if value.is_floating_point():  # a different fold: every weight moved by ~5 %
            value.mul_(1 + 0.05 * torch.randn(value.shape, generator=generator))
    torch.save(checkpoint, model / "fold_1" / "checkpoint_final.pth")
    manifest = json.loads((model / "rtseg-model.json").read_text())
    (model / "rtseg-model.json").write_text(json.dumps({**manifest, "folds": ["0", "1"]}))
    volume = load_series(phantom128)
    by_torch = NnunetSegmenter(model, device="cpu", threads=2).segment(volume).labels
    fold_0 = NnunetSegmenter(model, device="cpu", threads=2, folds=("0",)).segment(volume).labels
    exported = NnunetSegmenter(
        model, device="cpu", threads=2, runtime="onnxruntime", export_cache=tmp_path / "c"
    )
    assert len(list((tmp_path / "c").rglob("fold_*.onnx"))) == 2
    labels = exported.segment(volume).labels
    changed_by_fold_1 = int((fold_0 != by_torch).sum())
    assert changed_by_fold_1 > 100  # the second fold changes the ensemble's labels ...
    assert int((labels != by_torch).sum()) < changed_by_fold_1 / 20  # ... and the export ensembles both
