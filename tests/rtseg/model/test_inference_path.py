"""rtseg's slab-wise logits → labels step gives nnU-Net's own labels (its resampling rule, then argmax)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

from rtseg.model.inference import upsample_argmax


def _stock_labels(
    logits: np.ndarray, shape: tuple[int, int, int], model_spacing: list[float], ct_spacing: list[float]
) -> np.ndarray:
    resampled = resample_data_or_seg_to_shape(
        logits, shape, model_spacing, ct_spacing, is_seg=False, order=1, order_z=0, force_separate_z=None
    )
    return np.asarray(resampled).argmax(0)


@pytest.mark.parametrize(
    ("shape", "model_spacing", "ct_spacing", "z_mode"),
    [
        ((13, 23, 21), [3.0, 1.5, 1.5], [1.4, 0.7, 0.75], "linear"),  # isotropic enough: trilinear
        ((31, 20, 20), [5.0, 1.0, 1.0], [1.0, 0.5, 0.5], "nearest"),  # anisotropic model: z nearest
        ((6, 10, 10), [3.0, 1.5, 1.5], [3.0, 1.5, 1.5], "linear"),  # same grid
    ],
)
def test_labels_match_nnunet_resampling(
    shape: tuple[int, int, int], model_spacing: list[float], ct_spacing: list[float], z_mode: str
) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 6, 10, 10)).astype(np.float32)
    ours = upsample_argmax(torch.from_numpy(logits), shape, z_mode, slab=4)
    stock = _stock_labels(logits, shape, model_spacing, ct_spacing)
    assert ours.shape == shape and ours.dtype == np.uint8
    assert (ours == stock).mean() > 0.999


def _smooth_logits(classes: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Logits of blob-like structures: most cells agree on a label, boundaries are thin."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij"))
    centres = rng.uniform(0.15, 0.85, size=(classes, 3))
    return np.stack(
        [-np.sum((grid - c.reshape(3, 1, 1, 1)) ** 2, axis=0) * rng.uniform(20, 40) for c in centres]
    ).astype(np.float32)


@pytest.mark.parametrize(
    ("model_spacing", "ct_spacing", "z_mode"),
    [
        ([4.0, 3.0, 3.0], [1.6, 1.05, 1.1], "linear"),  # the default model's spacing: trilinear
        ([6.0, 1.0, 1.0], [1.0, 0.35, 0.37], "nearest"),  # anisotropic model: z nearest
    ],
)
def test_boundary_only_interpolation_equals_full_interpolation_on_organ_like_logits(
    model_spacing: list[float], ct_spacing: list[float], z_mode: str
) -> None:
    logits = _smooth_logits(8, (12, 40, 36), seed=3)
    shape = (29, 113, 97)
    ours = upsample_argmax(torch.from_numpy(logits), shape, z_mode, slab=5)
    stock = _stock_labels(logits, shape, model_spacing, ct_spacing)
    assert len(np.unique(stock)) == 8  # every structure shows up
    assert (ours == stock).mean() > 0.9999


def test_specks_of_a_structure_give_way_to_the_next_likely_class_and_real_pieces_stay() -> None:
    from rtseg.model.inference import suppress_islands

    scores = np.zeros((4, 20, 20, 20), dtype=np.float32)
    scores[0] = 1.0  # background
    scores[2, 2:18, 2:18, 2:10] = 3.0  # a big organ (class 2) ...
    scores[2, 2:18, 2:18, 12:18] = 3.0  # ... in two real pieces
    scores[3, 5, 5, 5] = 4.0  # a one-voxel speck of class 3 inside the organ
    scores[3, 10:14, 10:14, 13:17] = 4.0  # a real piece of class 3 (64 voxels)
    scores[1, 0, 0, 0] = 5.0  # a one-voxel body-outline piece: kept
    voxel_ml = 0.027  # 3 mm voxels; 0.2 ml ≈ 7.4 voxels
    labels_before = scores.argmax(0)
    out = suppress_islands(torch.from_numpy(scores), voxel_ml, 0.2, keep=frozenset({1})).argmax(0).numpy()
    assert labels_before[5, 5, 5] == 3 and out[5, 5, 5] == 2  # the speck took the organ's label
    assert (out[10:14, 10:14, 13:17] == 3).all()  # the real piece stays
    assert out[0, 0, 0] == 1  # the outline is never cut
    changed = out != labels_before
    assert changed.sum() == 1  # nothing else moved
    unchanged = suppress_islands(torch.from_numpy(scores), voxel_ml, 0.01, keep=frozenset({1}))
    assert (unchanged.argmax(0).numpy() == labels_before).all()  # below the threshold nothing is dropped
    kept = suppress_islands(torch.from_numpy(scores), voxel_ml, 0.0, keep=frozenset({1}))
    assert (kept.argmax(0).numpy() == labels_before).all()  # min_island_ml 0 (node setting): keep every speck


def test_a_speck_left_behind_by_a_dropped_speck_is_dropped_too() -> None:
    from rtseg.model.inference import suppress_islands

    scores = np.zeros((4, 12, 12, 12), dtype=np.float32)
    scores[2] = 3.0  # an organ fills the block
    scores[3, 6, 6, 6] = 5.0  # a speck of class 3 ...
    scores[1, 6, 6, 6] = 4.0  # ... whose runner-up, class 1, would be a speck as well
    out = suppress_islands(torch.from_numpy(scores), 0.027, 0.2).argmax(0).numpy()
    assert out[6, 6, 6] == 2 and (out == 2).all()


def test_half_precision_logits_tie_like_nnunet() -> None:
    """Two classes with nearly equal fp16 logits over a region: nnU-Net casts the resampled
    logits back to fp16, so they tie and the lower label wins; the boundary cells do the same."""
    rng = np.random.default_rng(5)
    base = _smooth_logits(4, (10, 16, 16), seed=7)
    logits = np.concatenate([base, base[3:4] + rng.normal(scale=1e-3, size=(1, 10, 16, 16))]).astype(
        np.float16
    )
    shape = (23, 41, 39)
    ours = upsample_argmax(torch.from_numpy(logits), shape, "linear", slab=5)
    stock = _stock_labels(logits, shape, [4.0, 3.0, 3.0], [1.7, 1.17, 1.23])
    assert {3, 4} <= set(np.unique(stock))  # the near-tie is real
    assert (ours == stock).mean() > 0.9999


@pytest.fixture(scope="module")
def default_predictor():  # type: ignore[no-untyped-def]
    from rtseg.model.default import default_model_dir
    from rtseg.model.segmenter import NnunetSegmenter

    return NnunetSegmenter(default_model_dir(), device="cpu", threads=1, runtime="torch")._predictor


def _count_forwards(network: torch.nn.Module) -> list[int]:
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    network.register_forward_pre_hook(hook)
    return calls


def test_windows_of_nothing_but_air_are_skipped_and_the_body_keeps_nnunets_logits(default_predictor) -> None:  # type: ignore[no-untyped-def]
    from rtseg.model.inference import air_floor, logits_skipping_air

    predictor = default_predictor
    floor = air_floor(predictor)
    assert floor is not None
    patch = predictor.configuration_manager.patch_size  # the default model: [48, 80, 80]
    shape = (patch[0], patch[1], 3 * patch[2])  # five windows along x at step 0.5
    rng = np.random.default_rng(0)
    data = np.full((1, *shape), floor, dtype=np.float32)
    body = (slice(None), slice(None), slice(8, shape[1] - 8), slice(0, patch[2] - 10))
    data[body] = rng.normal(0.0, 1.0, size=data[body].shape).astype(np.float32)
    tensor = torch.from_numpy(data)
    calls = _count_forwards(predictor.network)
    with torch.inference_mode():
        stock = predictor.predict_sliding_window_return_logits(tensor).float()
        ran_stock = calls[0]
        skipping = logits_skipping_air(predictor, tensor).float()
    ran_skipping = calls[0] - ran_stock
    assert (ran_stock, ran_skipping) == (5, 2)  # windows at x 0 and 40 hold body; 80, 120, 160 air only
    inside = torch.from_numpy(data[0] > floor + 1e-3)
    assert torch.equal(stock[:, inside], skipping[:, inside])
    far = skipping[:, :, :, 2 * patch[2] :]  # covered by skipped windows only
    assert bool((far.argmax(0) == 0).all())


def test_nothing_is_skipped_without_ct_normalisation(default_predictor) -> None:  # type: ignore[no-untyped-def]
    from rtseg.model.inference import window_slicers

    manager = default_predictor.configuration_manager
    saved = manager.configuration["normalization_schemes"]
    manager.configuration["normalization_schemes"] = ["ZScoreNormalization"]
    try:
        data = torch.full((1, *manager.patch_size), -5.0)
        _, slicers, busy = window_slicers(default_predictor, data)
    finally:
        manager.configuration["normalization_schemes"] = saved
    assert len(slicers) == 1 and busy == [True]


def test_skipping_air_puts_the_network_on_the_predictors_device(default_predictor, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """On a GPU the skip-air path ran a CPU network on CUDA windows (found by `rtseg bench --device cuda`):
    like nnU-Net's public sliding window, it moves the network to the predictor's device first."""
    from rtseg.model.inference import logits_skipping_air

    predictor = default_predictor
    network = predictor.network
    moved: list[object] = []

    def to(*args: object, **kwargs: object) -> torch.nn.Module:
        moved.append(args[0] if args else kwargs.get("device"))
        return network

    monkeypatch.setattr(network, "to", to)
    data = torch.zeros((1, *predictor.configuration_manager.patch_size))
    with torch.inference_mode():
        logits_skipping_air(predictor, data)
    assert moved == [predictor.device]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on these CPU machines)")
def test_skipping_air_on_cuda_keeps_nnunets_logits_in_the_body() -> None:
    from rtseg.model.default import default_model_dir
    from rtseg.model.inference import air_floor, logits_skipping_air
    from rtseg.model.segmenter import NnunetSegmenter

    predictor = NnunetSegmenter(default_model_dir(), device="cuda", runtime="torch")._predictor
    floor = air_floor(predictor)
    assert floor is not None
    patch = predictor.configuration_manager.patch_size
    data = np.full((1, patch[0], patch[1], 3 * patch[2]), floor, dtype=np.float32)
    data[:, :, 8:-8, : patch[2] - 10] = np.random.default_rng(0).normal(
        size=(patch[0], patch[1] - 16, patch[2] - 10)
    )
    tensor = torch.from_numpy(data)
    with torch.inference_mode():
        stock = predictor.predict_sliding_window_return_logits(tensor).float().cpu()
        skipping = logits_skipping_air(predictor, tensor).float()
    inside = torch.from_numpy(data[0] > floor + 1e-3)
    assert torch.allclose(stock[:, inside], skipping[:, inside], atol=1e-2)
