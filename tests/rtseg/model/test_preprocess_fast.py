"""rtseg's fast preprocessing gives nnU-Net's ``run_case_npy`` data and properties, or falls back."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from rtseg.model import preprocess as fast
from rtseg.model.default import default_model_dir
from rtseg.model.inference import preprocess
from rtseg.model.segmenter import NnunetSegmenter

TOLERANCE = 1e-4  # max abs difference on the normalised data


@pytest.fixture(scope="module")
def predictor() -> Any:
    return NnunetSegmenter(default_model_dir(), device="cpu", threads=1)._predictor


def _variant(
    predictor: Any, plans: dict[str, Any] | None = None, config: dict[str, Any] | None = None
) -> SimpleNamespace:
    """A predictor-like object with changed plans and/or configuration (the shipped ones are left alone)."""
    plans_dict = copy.deepcopy(predictor.plans_manager.plans)
    plans_dict.update(plans or {})
    config_dict = copy.deepcopy(predictor.configuration_manager.configuration)
    config_dict.update(config or {})
    return SimpleNamespace(
        plans_manager=PlansManager(plans_dict),
        configuration_manager=ConfigurationManager(config_dict),
        dataset_json=predictor.dataset_json,
    )


def _ct(shape: tuple[int, ...], seed: int, zero_border: int = 0) -> npt.NDArray[np.float32]:
    """A CT-like ``[c, z, y, x]`` volume in HU: air (−1000) around a noisy body, optionally a zero frame."""
    rng = np.random.default_rng(seed)
    _, nz, ny, nx = shape
    y, x = np.ogrid[:ny, :nx]
    body = ((y - ny / 2) / (0.4 * ny)) ** 2 + ((x - nx / 2) / (0.45 * nx)) ** 2 < 1
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[:, :, body] = 40.0
    image += rng.normal(0, 150, size=shape).astype(np.float32)
    image[:, nz // 3 : nz // 2, ny // 3 : ny // 2, nx // 3 : nx // 2] = 1200.0  # bone: beyond the clip range
    if zero_border:
        b = zero_border
        image[:, :b] = 0
        image[:, -b - 1 :] = 0
        image[:, :, : b + 2] = 0
        image[:, :, :, -b:] = 0
        image[:, nz // 2, ny // 2, nx // 2] = 0  # a hole: filled by nnU-Net, no change to the box
    return image


def _stock(predictor: Any, image: npt.NDArray[np.float32], spacing: tuple[float, ...]) -> tuple[Any, Any]:
    manager = predictor.configuration_manager
    data, _, properties = manager.preprocessor_class(verbose=False).run_case_npy(
        image, None, {"spacing": list(spacing)}, predictor.plans_manager, manager, predictor.dataset_json
    )
    return data, properties


def _assert_same_as_nnunet(predictor: Any, image: npt.NDArray[np.float32], spacing: tuple[float, ...]) -> Any:
    before = image.copy()
    tensor, properties = preprocess(predictor, image, spacing)
    assert np.array_equal(image, before)  # the caller's image is left alone
    stock, stock_properties = _stock(predictor, image, spacing)
    ours = tensor.numpy()
    assert ours.dtype == stock.dtype == np.float32 and ours.shape == stock.shape
    assert float(np.abs(ours.astype(np.float64) - stock).max()) <= TOLERANCE
    assert properties == stock_properties
    assert {k: type(v) for k, v in properties.items()} == {k: type(v) for k, v in stock_properties.items()}
    return stock_properties


@pytest.mark.parametrize(
    ("shape", "spacing", "zero_border", "separate_z"),
    [
        ((1, 40, 96, 96), (1.0, 0.7, 0.7), 0, False),  # isotropic-ish: one 3-D cubic zoom
        ((1, 40, 96, 96), (3.0, 0.7, 0.7), 0, True),  # anisotropic: in-plane cubic, z nearest
        ((1, 37, 95, 101), (5.0, 0.9, 0.9), 0, True),  # odd sizes, z upsampled by nearest
        ((1, 41, 97, 93), (1.0, 0.7, 0.7), 5, False),  # zero frame: nnU-Net really crops
        ((1, 23, 61, 59), (6.0, 2.5, 2.5), 0, False),  # coarser slices than the model's: z upsampled cubic
        ((1, 40, 30, 30), (1.0, 3.0, 3.0), 0, False),  # only z changes
        ((1, 12, 49, 47), (4.0, 3.0, 3.0), 3, False),  # the model's grid: cropped, normalised, not resampled
    ],
)
def test_fast_preprocessing_equals_nnunet(
    predictor: Any, shape: tuple[int, ...], spacing: tuple[float, ...], zero_border: int, separate_z: bool
) -> None:
    kwargs = predictor.configuration_manager.configuration["resampling_fn_data_kwargs"]
    current = list(spacing)
    assert determine_do_sep_z_and_axis(kwargs["force_separate_z"], current, [4.0, 3.0, 3.0])[0] == separate_z
    image = _ct(shape, seed=shape[1], zero_border=zero_border)
    assert fast.fast_path_applies(predictor, predictor.configuration_manager.preprocessor_class, image)
    properties = _assert_same_as_nnunet(predictor, image, spacing)
    cropped = properties["shape_after_cropping_and_before_resampling"] != properties["shape_before_cropping"]
    assert cropped == bool(zero_border)


def test_linear_z_and_zscore_channels_equal_nnunet(predictor: Any) -> None:
    """``order_z`` 1 along the anisotropic axis, and two channels with another normalisation scheme."""
    plans = copy.deepcopy(predictor.plans_manager.plans)
    intensities = plans["foreground_intensity_properties_per_channel"]
    intensities["1"] = dict(intensities["0"])
    kwargs = dict(predictor.configuration_manager.configuration["resampling_fn_data_kwargs"], order_z=1)
    variant = _variant(
        predictor,
        plans={"foreground_intensity_properties_per_channel": intensities},
        config={
            "resampling_fn_data_kwargs": kwargs,
            "normalization_schemes": ["CTNormalization", "ZScoreNormalization"],
            "use_mask_for_norm": [False, False],
        },
    )
    image = np.concatenate([_ct((1, 29, 64, 70), 1, zero_border=2), _ct((1, 29, 64, 70), 2) * 0.01])
    assert fast.fast_path_applies(variant, variant.configuration_manager.preprocessor_class, image)
    _assert_same_as_nnunet(variant, image, (5.0, 0.8, 0.8))


def test_transposed_plans_equal_nnunet(predictor: Any) -> None:
    """Plans whose ``transpose_forward`` moves axes: nnU-Net transposes before it crops and resamples."""
    variant = _variant(predictor, plans={"transpose_forward": [2, 0, 1], "transpose_backward": [1, 2, 0]})
    _assert_same_as_nnunet(variant, _ct((1, 31, 48, 40), 3, zero_border=2), (1.2, 0.9, 3.5))
    _assert_same_as_nnunet(variant, _ct((1, 30, 50, 44), 4), (3.0, 0.8, 0.8))  # separate z along axis 1


def test_unsupported_configuration_goes_through_nnunet(
    predictor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    kwargs = dict(predictor.configuration_manager.configuration["resampling_fn_data_kwargs"], order=1)
    variant = _variant(predictor, config={"resampling_fn_data_kwargs": kwargs})
    image = _ct((1, 33, 72, 70), 5, zero_border=2)
    manager = variant.configuration_manager
    assert not fast.fast_path_applies(variant, manager.preprocessor_class, image)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the fast path ran for a configuration it does not cover")

    monkeypatch.setattr(fast, "preprocess_fast", refuse)
    _assert_same_as_nnunet(variant, image, (1.0, 0.7, 0.7))


def test_fast_path_refuses_what_it_does_not_cover(predictor: Any) -> None:
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    image = _ct((1, 8, 16, 16), 6)
    assert fast.fast_path_applies(predictor, DefaultPreprocessor, image)

    class Custom(DefaultPreprocessor):
        pass

    assert not fast.fast_path_applies(predictor, Custom, image)
    assert not fast.fast_path_applies(predictor, DefaultPreprocessor, image[0])  # not [c, z, y, x]
    kwargs = predictor.configuration_manager.configuration["resampling_fn_data_kwargs"]
    for config in (
        {"use_mask_for_norm": [True]},
        {"spacing": [3.0, 3.0]},
        {"resampling_fn_data": "resample_data_or_seg_to_spacing"},
        {"resampling_fn_data_kwargs": dict(kwargs, order_z=3)},
        {"resampling_fn_data_kwargs": dict(kwargs, is_seg=True)},
        {"resampling_fn_data_kwargs": dict(kwargs, dtype_out="float16")},
        {"normalization_schemes": ["NoSuchNormalization"]},
    ):
        assert not fast.fast_path_applies(_variant(predictor, config=config), DefaultPreprocessor, image), (
            config
        )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nonzero_box_equals_the_box_of_the_filled_mask(seed: int) -> None:
    rng = np.random.default_rng(seed)
    data = np.zeros((2, 17, 23, 19), dtype=np.float32)
    data[0, 3:12, 5:20, 2:9] = rng.normal(size=(9, 15, 7))
    data[0, 6:9, 9:14, 4:7] = 0  # an enclosed hole
    data[1, 14, 1, 17] = -3.0  # the other channel widens the box
    _, _, expected = crop_to_nonzero(data.copy())
    assert fast.nonzero_bbox(data) == expected
    _, _, everything = crop_to_nonzero(np.zeros_like(data))
    assert fast.nonzero_bbox(np.zeros_like(data)) == everything == [[0, 17], [0, 23], [0, 19]]


@pytest.mark.parametrize("length", [25, 26, 40, 41, 300])
def test_row_prefilter_equals_scipy_spline_filter1d(length: int) -> None:
    from scipy.ndimage import spline_filter1d

    lines = np.random.default_rng(length).normal(size=(7, length)) * 100
    rows = np.ascontiguousarray(lines.T)
    fast._spline_filter_rows(rows)
    expected = spline_filter1d(lines, 3, axis=1, output=np.float64, mode="nearest")
    assert np.abs(rows.T - expected).max() <= 1e-10


def test_a_ct_in_its_stored_int16_is_preprocessed_as_its_float32_copy(predictor: Any) -> None:
    """rtseg's path hands the CT over in its stored dtype and converts only the crop (issue 18: the
    whole-series float32 copy cost 0.7 s of a 512² × 200 job); the result is that of float32 input."""
    image = np.round(_ct((1, 41, 97, 93), seed=3, zero_border=5)).astype(np.int16)
    ours, properties = preprocess(predictor, image, (1.0, 0.7, 0.7))
    stock, stock_properties = _stock(predictor, image.astype(np.float32), (1.0, 0.7, 0.7))
    assert float(np.abs(ours.numpy().astype(np.float64) - stock).max()) <= TOLERANCE
    assert properties == stock_properties
