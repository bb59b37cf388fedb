"""A long series preprocessed in z-chunks: the one-piece model-grid data bit for bit, and the same labels."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from model_helpers import Case, random_predictor, resliced_phantom

from rtseg.model.chunked import plan_chunks, preprocess_chunked
from rtseg.model.default import default_model_dir
from rtseg.model.inference import predict_labels, preprocess
from rtseg.model.segmenter import NnunetSegmenter


@pytest.fixture(scope="module")
def long_phantom() -> Case:
    """A phantom case resliced to 1 mm: 232 slices of int16 HU."""
    return resliced_phantom(1.0)


def _assert_chunked_equals_one_piece(
    predictor: Any, hu: npt.NDArray[np.int16], spacing: Any, slices: int
) -> None:
    image = hu[None]
    plan = plan_chunks(predictor, image, spacing, slices)
    assert plan is not None and len(plan.chunks) >= 5  # many chunks, their borders inside the anatomy
    whole, properties = preprocess(predictor, image.astype(np.float32), spacing)
    chunked, chunked_properties = preprocess_chunked(predictor, image, plan)
    assert chunked_properties == properties
    assert chunked.dtype == whole.dtype and chunked.shape == whole.shape
    assert torch.equal(chunked, whole)  # bit for bit, not close
    one_piece = predict_labels(predictor, image.astype(np.float32), spacing).labels
    labels = predict_labels(predictor, image, spacing, chunk_slices=slices).labels
    assert labels.shape == hu.shape and len(np.unique(one_piece)) > 5
    assert np.array_equal(labels, one_piece)


def test_default_model_in_many_chunks_gives_the_one_piece_labels(long_phantom: Case) -> None:
    hu, spacing = long_phantom
    segmenter = NnunetSegmenter(default_model_dir(), device="cpu", threads=2)
    # 232 slices at 1 mm → 58 rows at 4 mm, 3 rows (12 slices) a chunk: the 3-D cubic
    # zoom's slabs (taps and 48-slice margins) are cut inside the anatomy
    _assert_chunked_equals_one_piece(segmenter._predictor, hu, spacing, slices=12)


def _random_anisotropic_predictor(base: Any) -> Any:
    """An nnU-Net predictor with random weights (two folds) at 10 × 3 × 3 mm: nnU-Net's separate z."""
    return random_predictor(base, folds=2, spacing=[10.0, 3.0, 3.0], patch_size=[8, 64, 64])


def test_random_anisotropic_nnunet_in_chunks_gives_the_one_piece_labels(long_phantom: Case) -> None:
    hu, spacing = long_phantom
    base = NnunetSegmenter(default_model_dir(), device="cpu", threads=2)._predictor
    predictor = _random_anisotropic_predictor(base)
    # 232 slices → 23 rows at 10 mm, 2 rows (20 slices) a chunk; z nearest, in-plane cubic
    _assert_chunked_equals_one_piece(predictor, hu, spacing, slices=20)


def test_short_series_and_other_preprocessing_stay_one_piece(long_phantom: Case) -> None:
    hu, spacing = long_phantom
    predictor = NnunetSegmenter(default_model_dir(), device="cpu", threads=1)._predictor
    assert plan_chunks(predictor, hu[None], spacing, 0) is None  # chunking off
    assert plan_chunks(predictor, hu[None], spacing, hu.shape[0]) is None  # not longer than a chunk
    assert plan_chunks(predictor, hu[None], spacing, 100) is not None
    zscore = copy.copy(predictor)
    zscore.configuration_manager = copy.deepcopy(predictor.configuration_manager)
    zscore.configuration_manager.configuration["normalization_schemes"] = ["ZScoreNormalization"]
    assert plan_chunks(zscore, hu[None], spacing, 100) is None  # needs the whole image's mean and std
