"""The clinical-scale section's arithmetic: window counts, the crop, extrapolation, its report table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtseg_app.bench.clinical import (
    LEVERS,
    STOCK,
    crop_box,
    extrapolate,
    min_dice_over,
    model_grid,
    per_window_seconds,
    structure_volumes,
    window_count,
    windows_along,
)

PATCH, SPACING = [80, 160, 160], [1.5, 0.8, 0.8]  # what nnU-Net's planner gave the bench model


@pytest.mark.parametrize("size", [40, 80, 81, 116, 200, 257, 400])
@pytest.mark.parametrize("step", [0.5, 0.75, 1.0])
def test_window_counts_are_nnunets(size: int, step: float) -> None:
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    padded = max(size, 80)
    steps = compute_steps_for_sliding_window((padded, padded, padded), (80, 80, 80), step)
    assert windows_along(size, 80, step) == len(steps[0])


def test_the_crop_has_one_window_in_z_and_y_and_tile_steps_differ_along_x() -> None:
    shape, spacing = (200, 512, 512), (0.87, 0.4016, 0.4016)  # the benchmark CT
    box = crop_box(shape, spacing, PATCH, SPACING)
    crop = [b.stop - b.start for b in box]
    grid = model_grid(crop, spacing, SPACING)
    assert all(0 <= b.start < b.stop <= n for b, n in zip(box, shape, strict=True))
    assert grid[0] <= PATCH[0] and grid[1] <= PATCH[1]
    assert window_count(grid, PATCH, 0.5) == 3 and window_count(grid, PATCH, 1.0) == 2
    full = model_grid(shape, spacing, SPACING)
    # 2 × 3 × 3 windows at step 0.5; 2 × 2 × 2 at 0.75 and at 1.0 (257 voxels need two 160-voxel windows)
    assert [window_count(full, PATCH, s) for s in (0.5, 0.75, 1.0)] == [18, 8, 8]


def test_extrapolation_counts_each_window_once_and_stock_divides_out_its_mirrorings() -> None:
    stock = {"network_s": 240.0, "forwards": 24}  # 3 windows × 8 mirrorings
    assert per_window_seconds(stock, 8) == pytest.approx(80.0)
    assert extrapolate(per_window_seconds(stock, 8), 18, 90.0) == pytest.approx(90.0 + 18 * 80.0)
    assert per_window_seconds({"network_s": 0.0, "forwards": 0}, 1) == 0.0


def test_structure_volumes_in_millilitres() -> None:
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:2] = 1
    volumes = structure_volumes(labels, (2.0, 1.0, 1.0), {1: "Liver", 2: "Spleen"})
    assert volumes == {"Liver": 0.4, "Spleen": 0.0}


def test_every_lever_keeps_stocks_labels_apart_from_its_one_change() -> None:
    assert STOCK.stock and STOCK.use_mirroring and STOCK.tile_step_size == 0.5
    for lever in LEVERS:
        assert not lever.stock and not lever.use_mirroring and lever.min_island_ml == 0.0, lever.name
    assert len({lever.name for lever in LEVERS}) == len(LEVERS)


def test_forward_timing_hooks_count_calls_and_leave_outputs_alone() -> None:
    from rtseg_app.bench.inference import _time_forwards, zero_network

    network = torch.nn.Conv3d(1, 2, 3, padding=1)
    x = torch.ones((1, 1, 4, 4, 4))
    before = network(x)
    timing = _time_forwards(network)
    after = network(x)
    network(x)
    assert torch.equal(before, after) and timing["calls"] == 2 and timing["seconds"] > 0
    zeros = zero_network(5)(x)
    assert zeros.shape == (1, 5, 4, 4, 4) and not zeros.any()


def test_the_report_has_a_clinical_table() -> None:
    from rtseg_app.bench.report import markdown

    row = {
        "variant": "rtseg, tile step 1.0",
        "predict_s": 120.0,
        "basis": "extrapolated",
        "speedup": 30.0,
        "peak_rss_mb": 2000,
        "rss_basis": "crop",
        "min_dice": 0.995,
        "min_dice_nontrivial": 0.998,
        "crop_predict_s": 30.0,
        "crop_forwards": 2,
    }
    results = {
        "clinical_scale": {
            "model": {"patch_size": PATCH, "spacing": SPACING, "n_stages": 6, "features_per_stage": [32]},
            "ct": {"shape": [200, 512, 512], "model_grid": [116, 257, 257]},
            "crop": {"shape": [138, 319, 512], "model_grid": [80, 160, 257]},
            "windows_full": {"0.5": 18},
            "variants": [row, {"variant": "rtseg, OpenVINO f32", "skipped": "openvino not installed"}],
            "not_tried": {"CUDA": "not measured: no GPU"},
        }
    }
    text = markdown(results)
    assert "## Clinical-scale model" in text
    assert (
        "| rtseg, tile step 1.0 | 120.0 | extrapolated | 30.00 | 2000 | crop | 0.9950 | 0.9980 | 30.0 | 2 |"
        in text
    )
    assert "not measured: openvino not installed" in text and "- CUDA: not measured: no GPU" in text


def test_min_dice_leaves_out_structures_stock_hardly_draws() -> None:
    dice = {"External": 0.999, "Liver": 0.991, "Colon": 0.4, "Heart": None}
    volumes = {"External": 900.0, "Liver": 300.0, "Colon": 0.8, "Heart": 0.0}
    assert min_dice_over(dice, volumes) == 0.991
    assert min_dice_over(dice, volumes, min_ml=0.5) == 0.4
    assert min_dice_over({"Heart": None}, volumes) is None


def _run(tmp_path, name: str, predict_s: float, network_s: float, forwards: int, dice: float = 1.0) -> dict:  # type: ignore[no-untyped-def]
    labels = np.zeros((4, 8, 8), np.uint8)
    labels[:2] = 1
    path = tmp_path / f"{len(list(tmp_path.iterdir()))}.npy"
    np.save(path, labels)
    return {
        "variant": name,
        "load_s": 1.0,
        "predict_s": predict_s,
        "network_s": network_s,
        "forwards": forwards,
        "peak_rss_mb": 1000.0,
        "labels": str(path),
        "params": 30_000_000,
        "min_dice": dice,
        "dice": {"External": dice, "Liver": None},
    }


def test_figures_extrapolate_from_the_crop_and_keep_measured_rows(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from rtseg.structures import STRUCTURES
    from rtseg_app.bench.clinical import FASTEST, STOCK_MIRRORED, STOCK_ZERO, TORCH, _figures

    plans = {"patch_size": PATCH, "spacing": SPACING}
    shape, spacing = (200, 512, 512), (0.87, 0.4016, 0.4016)
    box = crop_box(shape, spacing, PATCH, SPACING)
    crop = [_run(tmp_path, STOCK.name, 60.0, 30.0, 3)]  # 10 s per window, 30 s around the network
    crop += [
        _run(tmp_path, lever.name, 20.0, 15.0, 3 if lever.tile_step_size == 0.5 else 2) for lever in LEVERS
    ]
    crop.append(_run(tmp_path, STOCK_MIRRORED.name, 270.0, 240.0, 24))  # 8 passes of 10 s per window
    full = [
        _run(tmp_path, STOCK_ZERO.name, 100.0, 0.5, 144),
        _run(tmp_path, FASTEST.name, 50.0, 40.0, 8),
        _run(tmp_path, TORCH.name, 110.0, 90.0, 18),
    ]
    fig = _figures(plans, shape, spacing, box, crop, full, STRUCTURES)
    rows = {row["variant"]: row for row in fig["variants"]}
    stock_full = 99.5 + 18 * 10.0
    assert rows[STOCK.name]["predict_s"] == pytest.approx(stock_full, abs=0.1)
    assert rows[STOCK_MIRRORED.name]["predict_s"] == pytest.approx(99.5 + 18 * 80.0, abs=0.1)
    assert rows[TORCH.name]["basis"] == "measured" and rows[TORCH.name]["predict_s"] == 110.0
    assert rows[TORCH.name]["extrapolated_s"] == pytest.approx(10.0 + 18 * 5.0, abs=0.1)  # 50 - 40 around
    step = rows["rtseg, tile step 1.0"]
    assert step["basis"] == "extrapolated" and step["predict_s"] == pytest.approx(10.0 + 8 * 7.5, abs=0.1)
    assert step["speedup"] == pytest.approx(stock_full / step["predict_s"], abs=0.01)
    assert rows[FASTEST.name]["basis"] == "measured" and rows[FASTEST.name]["rss_basis"] == "whole CT"
    assert fig["windows_full"] == {"0.5": 18, "0.75": 8, "1.0": 8}
    assert set(fig["structures_ml"]["stock_crop"]) == {s.name for s in STRUCTURES}


def test_the_clinical_section_runs_only_when_named() -> None:
    import argparse

    from rtseg_app.bench.cli import register
    from rtseg_app.bench.suite import RESULT_KEYS, wanted_sections

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(), {})
    quick = parser.parse_args(["bench", "--quick", "--out", "x"])
    named = parser.parse_args(["bench", "--out", "x", "--section", "clinical"])
    assert "clinical" not in wanted_sections(quick)
    assert wanted_sections(named) == ["clinical"] and RESULT_KEYS["clinical"] == "clinical_scale"


def test_on_the_gpu_every_figure_is_measured_on_the_whole_ct(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from rtseg.structures import STRUCTURES
    from rtseg_app.bench.clinical import GPU_VARIANTS, STOCK_MIRRORED, _gpu_figures
    from rtseg_app.bench.report import markdown

    plans = {"patch_size": PATCH, "spacing": SPACING, "n_stages": 6, "features_per_stage": [32, 64]}
    shape, spacing = (200, 512, 512), (0.87, 0.4016, 0.4016)
    runs = [_run(tmp_path, STOCK.name, 8.0, 1.0, 18), _run(tmp_path, STOCK_MIRRORED.name, 16.0, 8.0, 144)]
    runs += [_run(tmp_path, v.name, 4.0, 0.5, 18, dice=0.999) for v in GPU_VARIANTS[2:]]
    runs[2]["gpu_peak_mb"] = 2500.0
    fig = _gpu_figures(plans, shape, spacing, runs, STRUCTURES)
    rows = {row["variant"]: row for row in fig["variants"]}
    torch_row = rows[GPU_VARIANTS[2].name]
    assert torch_row["basis"] == "measured" and torch_row["predict_s"] == 4.0
    assert torch_row["speedup"] == 2.0 and torch_row["speedup_vs_mirrored"] == 4.0
    assert torch_row["gpu_peak_mb"] == 2500 and rows[STOCK.name]["gpu_peak_mb"] is None
    # _run's labels hold a speck of External (< 5 ml): no structure is large enough to be judged
    assert set(fig["structures_ml"]["stock_whole_ct"]) == {s.name for s in STRUCTURES}
    assert torch_row["min_dice"] == 0.999 and torch_row["min_dice_nontrivial"] is None
    assert fig["windows_full"] == {"0.5": 18, "0.75": 8, "1.0": 8}
    fig["model"] = {**plans, "params": 30_800_000}
    text = markdown({"clinical_scale": fig})
    assert "## Clinical-scale model on the GPU" in text
    assert f"| {GPU_VARIANTS[2].name} | 4.00 | 2.00 | 4.00 | 0.50 | 18 | 1000 | 2500 | 0.9990 |" in text


def test_cuda_variants_leave_out_the_cpu_only_runtimes_without_starting_a_child(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from rtseg.structures import STRUCTURES
    from rtseg_app.bench.inference import ENGINES, on_device, run_variants

    variants = on_device(ENGINES, "cuda")
    assert {v.device for v in variants} == {"cuda"} and {v.runtime for v in variants} == {
        "onnxruntime",
        "openvino",
    }
    said: list[str] = []
    runs = run_variants(
        tmp_path / "no-model", tmp_path / "no-input.npz", STRUCTURES, tmp_path, variants, 1.0, said.append
    )
    assert [r["skipped"] for r in runs] == [
        "onnxruntime runs on the CPU only",
        "openvino runs on the CPU only",
    ]
    assert all("not measured" in line for line in said)


def test_bench_device_reaches_the_plan() -> None:
    import argparse

    from rtseg_app.bench.cli import register
    from rtseg_app.bench.suite import plan_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(), {})
    assert plan_from_args(parser.parse_args(["bench", "--out", "x"])).device == "cpu"
    cuda = parser.parse_args(["bench", "--out", "x", "--device", "cuda", "--section", "clinical"])
    assert plan_from_args(cuda).device == "cuda"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--out", "x", "--device", "tpu"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on these CPU machines)")
def test_the_default_model_on_cuda_agrees_with_the_cpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from rtseg.model.default import default_model_dir
    from rtseg.model.manifest import load_manifest
    from rtseg_app.bench.clinical import _canonical
    from rtseg_app.bench.inference import OURS, on_device, run_variants, save_input
    from rtseg_app.bench.volume import bench_volume

    volume, _ = bench_volume(tmp_path, 48, 128)
    hu, spacing = _canonical(volume)
    npz = save_input(hu, spacing, tmp_path / "input.npz")
    model = default_model_dir()
    variants = (OURS, *on_device((OURS,), "cuda"))
    runs = run_variants(model, npz, load_manifest(model).structures, tmp_path, variants, 600.0)
    assert runs[1]["gpu_peak_mb"] > 0 and runs[0]["gpu_peak_mb"] is None
    assert runs[1]["min_dice"] >= 0.99


def test_a_report_without_the_robust_section_needs_no_federation_packages() -> None:
    """On the GPU machine (no flwr, no cryptography) the report crashed after the inference section."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from rtseg_app.bench.report import markdown\n"
        "markdown({'mode': 'full', 'inference': {}})\n"
        "federation = ('rtseg.federation', 'flwr', 'cryptography')\n"
        "print(sorted(m for m in sys.modules if m.startswith(federation)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_long_series_rows_say_not_measured_without_the_stock_size_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from rtseg_app.bench.long_series import long_series_section
    from rtseg_app.bench.report import _stock_size

    figures = long_series_section(tmp_path, [800], 512, lambda _: None)
    assert "--section clinical" in figures["not_measured"]
    assert "Not measured" in "\n".join(_stock_size(figures))


def test_long_series_one_piece_and_streamed_runs_report_memory_and_the_same_labels(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The section's real child processes on the default model standing in for the stock-size one."""
    import shutil

    from rtseg.model.default import default_model_dir
    from rtseg_app.bench.long_series import long_series_section
    from rtseg_app.bench.report import _stock_size

    shutil.copytree(default_model_dir(), tmp_path / "clinical" / "model")
    said: list[str] = []
    figures = long_series_section(tmp_path, [300], 64, said.append)
    rows = figures["rows"]
    assert [(r["slices"], r["mode"]) for r in rows] == [(300, "one piece"), (300, "streamed")]
    assert all(r["same_labels"] and r["labels_present"] > 2 for r in rows)  # the stand-in draws bands
    assert figures["window"]["activations_mb"] > 0  # measured from the peak reset just before the forward
    assert all(
        r["with_activations_mb"] == r["peak_rss_mb"] + figures["window"]["activations_mb"] for r in rows
    )
    assert rows[0]["model_grid"][0] > 44  # the 200-slice CT repeated along z: a longer model grid
    assert list((tmp_path / "scratch").iterdir()) == []  # the streamed run's logit file is gone
    table = "\n".join(_stock_size(figures))
    assert "| 300 | streamed |" in table and "**no**" not in table
    assert len(said) == 3
