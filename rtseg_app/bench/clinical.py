"""``rtseg bench --section clinical``: a stock-size nnU-Net, stock defaults vs rtseg's levers.

Stock ``nnUNetPredictor`` with its defaults (tile step 0.5, mirroring on,
Gaussian) takes hours on a few CPU cores for a 512² × 200 CT with a
31 M-parameter network, so it is not run whole. Instead:

* every variant (stock and each rtseg lever) runs on the same crop of the
  benchmark CT, sized so that stock takes a few minutes: that gives each
  variant's agreement with stock (Dice per structure), its seconds per window
  (time inside the network's forward calls) and its peak RSS on the crop;
* stock runs once on the whole CT with its network replaced by zeros: the
  measured cost of everything around the network (preprocessing, the window
  loop, nnU-Net's export at full resolution);
* the fastest rtseg setting and rtseg's plain torch path run on the whole CT
  (measured), which also gives rtseg's cost around the network and the number
  of windows each tile step (and air skipping) needs there;
* every other full-CT time is extrapolated: cost around the network + seconds
  per window × windows on the whole CT. ``basis`` says which figure is which.

On a GPU (``rtseg bench --device cuda``) nothing needs extrapolating: the
model is trained there (same recipe), and stock, stock with mirroring on 3
axes and each rtseg lever that runs on CUDA run on the whole CT, measured.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rtseg_app.bench.inference import Variant

STOCK = Variant("stock nnU-Net (defaults)", stock=True, use_mirroring=True)
# nnU-Net's own trainer records mirroring on all three axes (8 passes per window): stock as a model trained
# with stock nnU-Net runs. The bench model's checkpoint (rtseg's trainer) allows none, so STOCK has none.
STOCK_MIRRORED = replace(STOCK, name="stock nnU-Net (defaults, mirroring on 3 axes)", mirror_axes=(0, 1, 2))
STOCK_ZERO = replace(STOCK, name="stock nnU-Net, network returns zeros", zero_network=True)
# speck removal off everywhere: agreement is the path's own (speck removal deliberately changes labels)
TORCH = Variant("rtseg, torch (mirroring off, step 0.5)", min_island_ml=0.0)
FASTEST = replace(
    TORCH,
    name="rtseg, OpenVINO f32, step 1.0, skip air",
    runtime="openvino",
    tile_step_size=1.0,
    skip_air=True,
)
LEVERS = (
    TORCH,
    replace(TORCH, name="rtseg, tile step 0.75", tile_step_size=0.75),
    replace(TORCH, name="rtseg, tile step 1.0", tile_step_size=1.0),
    replace(TORCH, name="rtseg, skip air windows", skip_air=True),
    replace(TORCH, name="rtseg, 1 thread", threads=1),
    replace(TORCH, name="rtseg, channels-last", channels_last=True),
    replace(TORCH, name="rtseg, ONNX Runtime f32", runtime="onnxruntime"),
    replace(TORCH, name="rtseg, OpenVINO f32", runtime="openvino"),
    FASTEST,
)
FULL_RUNS = (FASTEST, TORCH)  # measured on the whole CT; the first gives rtseg's cost around the network
STEPS = (0.5, 0.75, 1.0)
NONTRIVIAL_ML = 5.0  # a structure stock draws with less than this on the crop: its Dice is noise
CROP_X_PATCHES = 1.6  # along x: 3 windows at step 0.5, 2 at 0.75 and 1.0 (so the steps differ on the crop)
NOT_TRIED = {
    "OpenVINO int8 (NNCF)": "not tried: NNCF is not installed and installing it would change the shared"
    " environment; int8 with ONNX Runtime was slower on this AVX2 CPU (no VNNI) and changed labels"
    " (min Dice 0.84) on the default model (docs/performance.md)",
    "batching windows": "not measured: nnU-Net's sliding window runs one window at a time; on a CPU a"
    " 2-million-voxel window already keeps both cores busy, so batching is expected to add memory, not"
    " throughput",
    "coarse-to-fine": "not measured: it needs a second (low-resolution) model and changes labels; not"
    " a lever that keeps stock's labels",
    "torch.compile": "not measured here (measured on the default model: docs/performance.md)",
    "CUDA": "run with --device cuda on a machine with a GPU (a separate table)",
}
# On CUDA: every variant on the whole CT. The exported runtimes run on the CPU only; bf16 autocast is no
# lever there (nnU-Net's sliding window already runs under CUDA autocast, float16), nor are threads or
# channels-last (cuDNN picks its layouts); step 0.75 has the window count of 1.0 on the bench CT.
GPU_VARIANTS = (
    STOCK,
    STOCK_MIRRORED,
    TORCH,
    replace(TORCH, name="rtseg, tile step 1.0", tile_step_size=1.0),
    replace(TORCH, name="rtseg, skip air windows", skip_air=True),
)


def windows_along(size: int, patch: int, step: float) -> int:
    """nnU-Net's window count along one axis (``compute_steps_for_sliding_window``; padded to the patch)."""
    size = max(size, patch)
    return 1 if size == patch else int(math.ceil((size - patch) / (patch * step))) + 1


def window_count(shape: Sequence[int], patch: Sequence[int], step: float) -> int:
    return math.prod(windows_along(s, p, step) for s, p in zip(shape, patch, strict=True))


def model_grid(shape: Sequence[int], spacing: Sequence[float], model_spacing: Sequence[float]) -> list[int]:
    """The shape nnU-Net resamples ``shape`` to (``compute_new_shape``)."""
    return [int(round(n * s / m)) for n, s, m in zip(shape, spacing, model_spacing, strict=True)]


def crop_box(
    shape: Sequence[int], spacing: Sequence[float], patch: Sequence[int], model_spacing: Sequence[float]
) -> tuple[slice, ...]:
    """A centred crop of one window in z and y and ``CROP_X_PATCHES`` windows in x at the model's grid."""
    want = [patch[0], patch[1], CROP_X_PATCHES * patch[2]]
    box = []
    for n, s, w, m in zip(shape, spacing, want, model_spacing, strict=True):
        size = min(n, int(math.floor(w * m / s)))
        start = (n - size) // 2
        box.append(slice(start, start + size))
    return tuple(box)


def extrapolate(per_window_s: float, windows_full: int, around_network_s: float) -> float:
    """Full-CT seconds: the measured cost around the network plus the network's seconds per window."""
    return around_network_s + per_window_s * windows_full


def per_window_seconds(run: dict[str, Any], mirrorings: int) -> float:
    """Network seconds per window of a run (``forwards`` counts each mirroring)."""
    windows = run["forwards"] / mirrorings
    return float(run["network_s"]) / windows if windows else 0.0


def min_dice_over(
    dice: dict[str, float | None], volumes: dict[str, float], min_ml: float = NONTRIVIAL_ML
) -> float | None:
    """The lowest Dice among structures of at least ``min_ml`` in the reference (None: no such structure)."""
    kept = [d for name, d in dice.items() if d is not None and volumes.get(name, 0.0) >= min_ml]
    return min(kept) if kept else None


def structure_volumes(
    labels: npt.NDArray[np.integer], spacing: Sequence[float], names: dict[int, str]
) -> dict[str, float]:
    """Millilitres per structure in a label map."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=max(names) + 1)
    return {name: round(float(counts[label]) * voxel_ml, 1) for label, name in names.items()}


def clinical_section(
    work: Path,
    slices: int,
    matrix: int,
    timeout: float,
    say: Callable[[str], None],
    device: str = "cpu",
) -> dict[str, Any]:
    """Build (or reuse) the stock-size model, run the crop and full-CT measurements, extrapolate.

    ``device`` ``"cuda"``: the model is built under ``work/clinical-cuda`` (trained on the GPU) and every
    variant runs on the whole CT (:func:`_gpu_figures`).
    """
    from rtseg.model.manifest import load_manifest
    from rtseg_app.bench.clinical_model import clinical_model, describe_plans
    from rtseg_app.bench.volume import bench_volume

    cuda = device == "cuda"
    model = clinical_model(work / ("clinical-cuda" if cuda else "clinical"), say)
    plans = describe_plans(json.loads((model / "plans.json").read_text()))
    say(f"   model {model}: {plans}")
    structures = load_manifest(model).structures
    volume, _ = bench_volume(work, slices, matrix)
    hu, spacing = _canonical(volume)
    if cuda:
        variants = tuple(replace(v, device="cuda") for v in GPU_VARIANTS)
        say(f"   whole CT {list(hu.shape)} on the GPU: stock and every lever that runs on CUDA")
        runs = _runs(variants, model, hu, spacing, structures, work / "clinical-runs-cuda", timeout, say)
        figures = _gpu_figures(plans, hu.shape, spacing, runs, structures)
        figures["model"] = {"folder": str(model), **plans, "params": runs[0].get("params")}
        return figures
    box = crop_box(hu.shape, spacing, plans["patch_size"], plans["spacing"])
    root = work / "clinical-runs"
    root.mkdir(parents=True, exist_ok=True)
    say(f"   crop {list(hu[box].shape)}: stock and every lever")
    variants = (STOCK, *LEVERS, STOCK_MIRRORED)
    crop = _runs(variants, model, hu[box], spacing, structures, root / "crop", timeout, say)
    full = _full_runs(model, hu, spacing, structures, root / "full", timeout, say)
    figures = _figures(plans, hu.shape, spacing, box, crop, full, structures)
    figures["model"] = {"folder": str(model), **plans, "params": crop[0].get("params")}
    return figures


def _canonical(volume: Any) -> tuple[npt.NDArray[np.float32], tuple[float, float, float]]:
    from rtseg.volume import Orientation

    orientation = Orientation.from_affine(volume.affine)
    spacing = orientation.canonical_spacing(volume.spacing)
    return np.asarray(orientation.to_canonical(np.asarray(volume.hu)), dtype=np.float32), spacing


def _runs(
    variants: tuple[Any, ...],
    model: Path,
    hu: npt.NDArray[np.float32],
    spacing: tuple[float, float, float],
    structures: Any,
    work: Path,
    timeout: float,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """``variants`` on ``hu``, each in its own child process, with ``hu`` saved once under ``work``."""
    from rtseg_app.bench.inference import run_variants, save_input

    work.mkdir(parents=True, exist_ok=True)
    npz = save_input(hu, spacing, work / "input.npz")
    return run_variants(model, npz, structures, work, variants, timeout, say)


def _full_runs(
    model: Path,
    hu: npt.NDArray[np.float32],
    spacing: tuple[float, float, float],
    structures: Any,
    work: Path,
    timeout: float,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    say(f"   whole CT {list(hu.shape)}: stock around a zero network, then {len(FULL_RUNS)} rtseg runs")
    runs = _runs((STOCK_ZERO, *FULL_RUNS), model, hu, spacing, structures, work, timeout, say)
    for run in runs:  # the zero network's labels are all background: no agreement to speak of
        run.pop("speedup", None)
        run.pop("min_dice", None)
        run.pop("dice", None)
    return runs


def _figures(
    plans: dict[str, Any],
    shape: Sequence[int],
    spacing: Sequence[float],
    box: tuple[slice, ...],
    crop: list[dict[str, Any]],
    full: list[dict[str, Any]],
    structures: Any,
) -> dict[str, Any]:
    patch, model_spacing = plans["patch_size"], plans["spacing"]
    crop_shape = [b.stop - b.start for b in box]
    grid = model_grid(shape, spacing, model_spacing)
    stock, zero, fastest = crop[0], full[0], full[1]
    stock_around = zero["predict_s"] - zero["network_s"]
    rtseg_around = fastest["predict_s"] - fastest["network_s"]
    windows = window_count(grid, patch, 0.5)
    stock_full = extrapolate(per_window_seconds(stock, 1), windows, stock_around)
    mirrored = crop[-1]
    mirrored_full = extrapolate(per_window_seconds(mirrored, 8), windows, stock_around)
    measured = {run["variant"]: run for run in full[1:]}
    rows = [_row(stock, stock_full, None, stock_full, "extrapolated")]
    for variant, run in zip(LEVERS, crop[1:-1], strict=True):
        rows.append(_lever_row(variant, run, grid, patch, rtseg_around, stock_full, measured))
    rows.append(_row(mirrored, mirrored_full, None, stock_full, "extrapolated"))
    for row in rows:
        row["speedup_vs_mirrored"] = round(mirrored_full / row["predict_s"], 2) if row["predict_s"] else None
    names = {s.label: s.name for s in structures}
    volumes = _volumes(crop, full, spacing, names)
    for row, run in zip(rows[1:], crop[1:], strict=True):  # the same order as the crop runs
        if "dice" in run:
            row["min_dice_nontrivial"] = min_dice_over(run["dice"], volumes["stock_crop"])
    return {
        "ct": {"shape": list(shape), "spacing_zyx": [round(s, 3) for s in spacing], "model_grid": grid},
        "crop": {
            "box_zyx": [[b.start, b.stop] for b in box],
            "shape": crop_shape,
            "model_grid": model_grid(crop_shape, spacing, model_spacing),
        },
        "windows_full": {str(s): window_count(grid, patch, s) for s in STEPS},
        "stock_around_network_s": stock_around,
        "rtseg_around_network_s": rtseg_around,
        "stock_crop_s": stock["predict_s"],
        "variants": rows,
        "crop_runs": crop,
        "full_runs": full,
        "structures_ml": volumes,
        "nontrivial_ml": NONTRIVIAL_ML,
        "not_tried": NOT_TRIED,
        "method": __doc__,
    }


def _gpu_figures(
    plans: dict[str, Any],
    shape: Sequence[int],
    spacing: Sequence[float],
    runs: list[dict[str, Any]],
    structures: Any,
) -> dict[str, Any]:
    """Rows of whole-CT runs on the GPU: all measured; speedups against stock with and without mirroring."""
    stock, mirrored = runs[0], runs[1]
    names = {s.label: s.name for s in structures}
    stock_ml = structure_volumes(np.load(stock["labels"]), spacing, names)
    rows = []
    for run in runs:
        if "skipped" in run:
            rows.append({"variant": run["variant"], "skipped": run["skipped"]})
            continue
        seconds = float(run["predict_s"])
        rows.append(
            {
                "variant": run["variant"],
                "predict_s": round(seconds, 2),
                "basis": "measured",
                "peak_rss_mb": round(run["peak_rss_mb"]),
                "rss_basis": "whole CT",
                "gpu_peak_mb": round(run["gpu_peak_mb"]) if run.get("gpu_peak_mb") is not None else None,
                "speedup": round(stock["predict_s"] / seconds, 2) if seconds > 0 else None,
                "speedup_vs_mirrored": round(mirrored["predict_s"] / seconds, 2) if seconds > 0 else None,
                "min_dice": run.get("min_dice"),
                "min_dice_nontrivial": min_dice_over(run.get("dice", {}), stock_ml),
                "network_s": round(run["network_s"], 2),
                "forwards": run["forwards"],
                "load_s": round(run["load_s"], 1),
            }
        )
    grid = model_grid(shape, spacing, plans["spacing"])
    return {
        "device": "cuda",
        "ct": {"shape": list(shape), "spacing_zyx": [round(s, 3) for s in spacing], "model_grid": grid},
        "windows_full": {str(s): window_count(grid, plans["patch_size"], s) for s in STEPS},
        "variants": rows,
        "full_runs": runs,
        "structures_ml": {"stock_whole_ct": stock_ml},
        "nontrivial_ml": NONTRIVIAL_ML,
        "method": __doc__,
    }


def _lever_row(
    variant: Variant,
    run: dict[str, Any],
    grid: list[int],
    patch: Sequence[int],
    around_s: float,
    stock_full: float,
    measured: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    if "skipped" in run:
        return {"variant": run["variant"], "skipped": run["skipped"]}
    # air skipping not measured on the whole CT at this step: every window counted (an upper bound)
    windows = window_count(grid, patch, variant.tile_step_size)
    estimate = extrapolate(per_window_seconds(run, 1), windows, around_s)
    full = measured.get(run["variant"])
    if full is None:
        return _row(run, estimate, None, stock_full, "extrapolated")
    row = _row(run, full["predict_s"], full["peak_rss_mb"], stock_full, "measured")
    row["extrapolated_s"] = round(estimate, 1)  # how far the extrapolation is from the measurement
    return row


def _row(
    run: dict[str, Any], full_s: float, full_rss: float | None, stock_full: float, basis: str
) -> dict[str, Any]:
    return {
        "variant": run["variant"],
        "predict_s": round(full_s, 1),
        "basis": basis,
        "peak_rss_mb": round(full_rss if full_rss is not None else run["peak_rss_mb"]),
        "rss_basis": "whole CT" if full_rss is not None else "crop",
        "speedup": round(stock_full / full_s, 2) if full_s > 0 else None,
        "min_dice": run.get("min_dice"),
        "crop_predict_s": round(run["predict_s"], 1),
        "crop_network_s": round(run["network_s"], 1),
        "crop_forwards": run["forwards"],
        "load_s": round(run["load_s"], 1),
    }


def _volumes(
    crop: list[dict[str, Any]], full: list[dict[str, Any]], spacing: Sequence[float], names: dict[int, str]
) -> dict[str, dict[str, float]]:
    """Structure volumes in stock's crop labels and in the fastest setting's whole-CT labels."""
    return {
        "stock_crop": structure_volumes(np.load(crop[0]["labels"]), spacing, names),
        "fastest_whole_ct": structure_volumes(np.load(full[1]["labels"]), spacing, names),
    }
