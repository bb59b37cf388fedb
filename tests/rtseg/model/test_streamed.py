"""The sliding window streamed along z to a file: nnU-Net's logits bit for bit, the one-piece labels."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from model_helpers import Case, random_predictor, resliced_phantom

from rtseg.model.default import default_model_dir
from rtseg.model.inference import predict_labels, preprocess, sliding_window_logits, window_slicers
from rtseg.model.segmenter import NnunetSegmenter
from rtseg.model.streamed import LogitFile, remove_left_behind, stream_to_file


@pytest.fixture(scope="module")
def phantom() -> Case:
    """A phantom case resliced to 2 mm, as int16 HU."""
    return resliced_phantom(2.0)


def _random_predictor(folds: int, patch: list[int]) -> Any:
    """An nnU-Net predictor with random weights at the default model's plans, a small patch."""
    base = NnunetSegmenter(default_model_dir(), device="cpu", threads=2)._predictor
    return random_predictor(base, folds=folds, patch_size=patch)


def _streamed(predictor: Any, data: torch.Tensor, folder: Path, skip_air: bool = False) -> torch.Tensor:
    (padded, revert), slicers, busy = window_slicers(predictor, data, skip_air)
    kept = [s for s, b in zip(slicers, busy, strict=True) if b]
    heads = predictor.label_manager.num_segmentation_heads
    with LogitFile(folder, heads, tuple(int(s) for s in data.shape[1:])) as store:  # type: ignore[arg-type]
        stream_to_file(predictor, padded, revert, kept, store)
        logits = store.read(0, int(data.shape[1])).clone()
        assert np.array_equal(store.coarse, logits.argmax(dim=0).numpy())
        assert store.minimum == float(logits.min())
    return logits


@pytest.mark.parametrize(("folds", "patch"), [(1, [16, 32, 32]), (2, [16, 32, 32]), (1, [16, 32, 128])])
def test_streamed_logits_are_nnunets_bit_for_bit(
    phantom: Case, tmp_path: Path, folds: int, patch: list[int]
) -> None:
    hu, spacing = phantom
    predictor = _random_predictor(folds, patch)
    data, _ = preprocess(predictor, hu[None].astype(np.float32), spacing)
    assert data.shape[1] >= 3 * patch[0]  # several window rows along z: rows leave the buffer early
    with torch.inference_mode():
        whole = sliding_window_logits(predictor, data)
    streamed = _streamed(predictor, data, tmp_path)
    assert streamed.dtype == whole.dtype == torch.float16
    assert torch.equal(streamed, whole)  # bit for bit, not close
    assert list(tmp_path.iterdir()) == []  # the file went with the store
    if patch[2] > data.shape[3]:  # the third case: nnU-Net pads x to the patch and crops it back
        assert streamed.shape[3] == data.shape[3]


def test_streamed_logits_skipping_air_are_the_one_piece_ones(phantom: Case, tmp_path: Path) -> None:
    hu, spacing = phantom
    predictor = _random_predictor(1, [16, 32, 32])
    padded_hu = np.pad(hu, ((0, 0), (0, 0), (0, 64)), constant_values=-1000)  # air beside the body
    data, _ = preprocess(predictor, padded_hu[None].astype(np.float32), spacing)
    _, _, busy = window_slicers(predictor, data)
    assert not all(busy)
    with torch.inference_mode():
        whole = sliding_window_logits(predictor, data, skip_air=True)
    assert torch.equal(_streamed(predictor, data, tmp_path, skip_air=True), whole)


@pytest.mark.parametrize("folds", [1, 2])
def test_streamed_labels_equal_the_one_piece_labels_specks_and_all(
    phantom: Case,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    folds: int,
) -> None:
    """Random weights scatter specks: island removal runs on the file's argmax and reads their scores back."""
    hu, spacing = phantom
    predictor = _random_predictor(folds, [16, 32, 32])
    with caplog.at_level(logging.INFO, logger="rtseg.model.inference"):
        one_piece = predict_labels(predictor, hu[None], spacing, min_island_ml=2.0).labels
    assert "dropped islands" in caplog.text
    caplog.clear()
    monkeypatch.setattr(
        "rtseg.model.inference.BLOCK_BYTES", 3 * 20 * 40 * 40 * 4
    )  # boundary cells a few rows at a time
    with caplog.at_level(logging.INFO):
        streamed = predict_labels(
            predictor, hu[None], spacing, min_island_ml=2.0, stream_mb=0, scratch=tmp_path
        )
    assert "streamed in z" in caplog.text and "dropped islands" in caplog.text
    assert len(np.unique(one_piece)) > 3
    assert np.array_equal(streamed.labels, one_piece)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_the_default_model_streams_only_above_the_size_limit(
    phantom: Case, tmp_path: Path, caplog: pytest.LogCaptureFixture, runtime: str
) -> None:
    """Also through an exported runtime, which picks its fold by the weights nnU-Net loads."""
    pytest.importorskip(runtime)
    hu, spacing = phantom
    segmenter = NnunetSegmenter(default_model_dir(), device="cpu", threads=2, runtime=runtime)
    predictor = segmenter._predictor
    one_piece = predict_labels(predictor, hu[None], spacing).labels
    with caplog.at_level(logging.INFO):
        big_limit = predict_labels(predictor, hu[None], spacing, stream_mb=1024, scratch=tmp_path).labels
    assert "streamed in z" not in caplog.text
    with caplog.at_level(logging.INFO):
        streamed = predict_labels(predictor, hu[None], spacing, stream_mb=0, scratch=tmp_path).labels
    assert "streamed in z" in caplog.text
    assert np.array_equal(big_limit, one_piece) and np.array_equal(streamed, one_piece)
    assert len(np.unique(one_piece)) > 10


def test_logit_files_left_by_a_killed_process_are_removed_by_its_id_or_all(tmp_path: Path) -> None:
    for name in ("rtseg-logits-123-a", "rtseg-logits-1234-b", "rtseg-logits-456-c", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "logits.f16").write_bytes(b"\0" * 8)
    assert remove_left_behind(tmp_path, 123) == 1
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["other", "rtseg-logits-1234-b", "rtseg-logits-456-c"]
    assert remove_left_behind(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["other"]
    assert remove_left_behind(tmp_path / "absent") == 0
    with LogitFile(tmp_path, 2, (1, 2, 2)) as store:
        assert store.path.parent.name.startswith(f"rtseg-logits-{os.getpid()}-")


def test_a_scratch_folder_without_room_for_the_logits_fails_the_job_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from rtseg.errors import ModelError

    monkeypatch.setattr(shutil, "disk_usage", lambda _: type("U", (), {"free": 100 << 20})())
    with pytest.raises(ModelError, match=r"need 0\.3 GB of disk in the scratch folder, 0\.1 GB are free"):
        LogitFile(tmp_path, 19, (100, 100, 100))  # 38 MB of logits + the 256 MB margin
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_of_the_logit_file_is_a_model_error_not_an_internal_one(tmp_path: Path) -> None:
    from rtseg.errors import ModelError

    with LogitFile(tmp_path, 2, (2, 2, 2)) as store:
        store._file.close()
        store._file = open("/dev/full", "wb", buffering=0)  # noqa: SIM115 - every write: no space left
        with pytest.raises(
            ModelError, match="cannot write the model's logits to the scratch folder: No space"
        ):
            store.write(0, torch.zeros((2, 2, 2, 2), dtype=torch.half), final=True)
