"""A long series predicted in z-chunks gives the one-piece path's logits and labels, bit for bit."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from scipy.ndimage import zoom

from rtseg.model import inference
from rtseg.model.chunked import plan_chunks
from rtseg.model.default import default_model_dir
from rtseg.model.inference import predict_labels, preprocess, suppress_islands
from rtseg.model.segmenter import NnunetSegmenter
from rtseg.phantom.cohort import make_case

Case = tuple[npt.NDArray[np.int16], tuple[float, float, float]]


@pytest.fixture(scope="module")
def long_phantom() -> Case:
    """A phantom case (96² matrix) resliced to 1 mm: 232 slices of int16 HU, as the loader holds them."""
    _, grid, body, _ = make_case("A", 3, 0, 96, position="HFS")
    factor = grid.spacing[0] / 1.0
    hu = zoom(body.hu, (factor, 1.0, 1.0), order=1, grid_mode=True, mode="nearest")
    spacing = (
        grid.spacing[0] * body.hu.shape[0] / hu.shape[0],
        float(grid.spacing[1]),
        float(grid.spacing[2]),
    )
    return np.round(hu).astype(np.int16), spacing


def _small_patch_model(tmp: Path, patch: list[int]) -> Path:
    """The default model's folder with a smaller sliding-window patch (the network is fully convolutional)."""
    model = tmp / "model"
    shutil.copytree(default_model_dir(), model)
    plans = json.loads((model / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["patch_size"] = patch
    (model / "plans.json").write_text(json.dumps(plans, indent=1))
    return model


def _assert_chunked_equals_one_piece(
    predictor: Any, hu: npt.NDArray[np.int16], spacing: Any, slices: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = hu[None]
    plan = plan_chunks(predictor, image, spacing, slices)
    assert plan is not None and len(plan.chunks) >= 4  # many chunks, their borders inside the anatomy
    _, properties = preprocess(predictor, image.astype(np.float32), spacing)
    assert plan.properties == properties
    seen: list[torch.Tensor] = []  # the logits each run hands to island suppression

    def recording(scores: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(scores)
        return suppress_islands(scores, *args, **kwargs)

    monkeypatch.setattr(inference, "suppress_islands", recording)
    one_piece = predict_labels(predictor, image.astype(np.float32), spacing).labels
    labels = predict_labels(predictor, image, spacing, chunk_slices=slices).labels
    whole, chunked = seen
    assert chunked.dtype == whole.dtype and chunked.shape == whole.shape
    assert torch.equal(chunked, whole)  # bit for bit, not close
    assert labels.shape == hu.shape and len(np.unique(one_piece)) > 5
    assert np.array_equal(labels, one_piece)


def test_default_model_in_many_chunks_gives_the_one_piece_labels(
    long_phantom: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hu, spacing = long_phantom
    segmenter = NnunetSegmenter(_small_patch_model(tmp_path, [16, 80, 80]), device="cpu", threads=2)
    # 232 slices at 1 mm → 58 rows at 4 mm: 7 tile rows of 16, each its own chunk; the
    # 3-D cubic zoom's slabs are cut inside the series (48-slice margins)
    _assert_chunked_equals_one_piece(segmenter._predictor, hu, spacing, slices=12, monkeypatch=monkeypatch)


def _random_anisotropic_predictor(base: Any) -> Any:
    """An nnU-Net predictor with random weights (two folds) at 10 × 3 × 3 mm: nnU-Net's separate z."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = copy.deepcopy(base.plans_manager.plans)
    config = plans["configurations"]["3d_fullres"]
    config.update(spacing=[10.0, 3.0, 3.0], patch_size=[8, 64, 64])
    config["architecture"]["arch_kwargs"]["features_per_stage"] = [4, 8, 8, 8, 8]
    manager = PlansManager(plans)
    configuration = manager.get_configuration("3d_fullres")
    heads = manager.get_label_manager(base.dataset_json).num_segmentation_heads
    folds = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        network = get_network_from_plans(
            configuration.network_arch_class_name,
            configuration.network_arch_init_kwargs,
            configuration.network_arch_init_kwargs_req_import,
            1,
            heads,
            allow_init=True,
            deep_supervision=False,
        )
        folds.append(copy.deepcopy(network.state_dict()))
    predictor = nnUNetPredictor(
        tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False
    )
    predictor.manual_initialization(
        network, manager, configuration, folds, base.dataset_json, "nnUNetTrainer", None
    )
    return predictor


def test_random_anisotropic_nnunet_in_chunks_gives_the_one_piece_labels(
    long_phantom: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    hu, spacing = long_phantom
    base = NnunetSegmenter(default_model_dir(), device="cpu", threads=2)._predictor
    predictor = _random_anisotropic_predictor(base)
    # 232 slices → 23 rows at 10 mm: 5 tile rows of 8 (2 × 2 tiles each); z nearest, in-plane cubic
    _assert_chunked_equals_one_piece(predictor, hu, spacing, slices=40, monkeypatch=monkeypatch)


def test_short_series_and_unsplittable_grids_stay_one_piece(long_phantom: Case, tmp_path: Path) -> None:
    hu, spacing = long_phantom
    predictor = NnunetSegmenter(default_model_dir(), device="cpu", threads=1)._predictor
    assert plan_chunks(predictor, hu[None], spacing, 0) is None  # chunking off
    assert plan_chunks(predictor, hu[None], spacing, hu.shape[0]) is None  # not longer than a chunk
    # the default model's patch (48 rows at 4 mm) covers 160 mm: one tile row, nothing to cut
    assert plan_chunks(predictor, hu[None, :160], spacing, 12) is None
    assert plan_chunks(predictor, hu[None], spacing, 12) is not None  # 232 mm: two tile rows
