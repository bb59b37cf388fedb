"""Inference side by side: rtseg's path and stock ``nnUNetPredictor``, each in its own child process.

A child loads the model, predicts the canonical volume once and reports its
load and predict seconds and its own peak resident memory (``ru_maxrss``), so
that one variant's memory never counts against another. The parent compares
the label maps structure by structure (Dice).

Run as ``python -m rtseg_app.bench.inference SPEC.json`` (the child's side).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rtseg.errors import ModelError
from rtseg.metrics import dice
from rtseg.model.engines import RUNTIME_PACKAGES
from rtseg.structures import MIN_ISLAND_ML, Structure
from rtseg.volume import CTVolume, Orientation

log = logging.getLogger(__name__)

NNUNET_THREAD_CAPS = ("nnUNet_def_n_proc", "nnUNet_n_proc_DA")


@dataclass(frozen=True)
class Variant:
    """One way to run inference. ``stock``: ``nnUNetPredictor`` with its defaults, on ``device``."""

    name: str
    stock: bool = False
    tile_step_size: float = 0.5
    use_mirroring: bool = False
    engine: str = "rtseg"
    threads: int | None = None
    channels_last: bool = False
    bf16: bool = False
    min_island_ml: float = MIN_ISLAND_ML  # rtseg's speck removal; 0: nnU-Net's labels as they are
    runtime: str = "torch"  # the network's runtime: torch, compile (torch.compile), onnxruntime, openvino
    skip_air: bool = False  # air-only windows not run (rtseg.model.inference.logits_skipping_air)
    # the network replaced by one that returns zeros: what the rest of the path costs (stock's overhead)
    zero_network: bool = False
    # stock with these mirroring axes instead of the checkpoint's (nnU-Net's own trainer records (0, 1, 2))
    mirror_axes: tuple[int, ...] | None = None
    device: str = "cpu"  # "cuda": stock and rtseg on the GPU (nnU-Net's autocast and on-device path)


STOCK = Variant("stock nnU-Net (defaults)", stock=True, use_mirroring=True)
OURS = Variant("rtseg")
# the same fast path without the speck removal stock nnU-Net does not have: the agreement of the path itself
UNFILTERED = Variant("rtseg, speck removal off (min_island_ml 0)", min_island_ml=0.0)

LEVERS = (
    Variant("rtseg, nnU-Net's export path", engine="nnunet"),
    Variant("rtseg + mirroring", use_mirroring=True),
    Variant("rtseg, tile step 0.75", tile_step_size=0.75),
    Variant("rtseg, tile step 1.0", tile_step_size=1.0),
    Variant("rtseg, 1 thread", threads=1),
    Variant("rtseg, channels-last", channels_last=True),
    Variant("rtseg, bf16 autocast", bf16=True),
    Variant("rtseg, torch.compile", runtime="compile"),
    Variant("rtseg, ONNX Runtime", runtime="onnxruntime"),
    Variant("rtseg, OpenVINO (f32)", runtime="openvino"),
)
# what the node runs with each `[node] engine` (the export counts as load time)
ENGINES = (
    Variant("rtseg, engine onnxruntime", runtime="onnxruntime"),
    Variant("rtseg, engine openvino (f32)", runtime="openvino"),
)


@dataclass(frozen=True)
class Run:
    """What one child measured; ``labels`` is the ``.npy`` file of its label map."""

    variant: str
    load_s: float
    predict_s: float
    peak_rss_mb: float
    phases: dict[str, float]
    labels: str
    network_s: float = 0.0  # seconds inside the network's forward calls
    forwards: int = 0  # forward calls (windows × mirrorings × folds)
    params: int = 0  # parameters of the network (0: not a torch network)
    gpu_peak_mb: float | None = None  # torch's peak GPU memory allocated (None: on the CPU)


def on_device(variants: tuple[Variant, ...], device: str) -> tuple[Variant, ...]:
    """``variants`` with the network on ``device`` (``"cpu"`` or ``"cuda"``)."""
    return tuple(replace(v, device=device) for v in variants)


def save_input(volume_hu: npt.NDArray[Any], spacing_zyx: tuple[float, float, float], path: Path) -> Path:
    """The canonical ``[z, y, x]`` HU array and spacing every child reads."""
    np.savez(path, hu=np.asarray(volume_hu, dtype=np.float32), spacing=np.asarray(spacing_zyx))
    return path


def run_variant(variant: Variant, model_dir: Path, volume_npz: Path, out: Path, timeout: float) -> Run:
    """Measure ``variant`` in a fresh child process; raise :class:`ModelError` if the child fails."""
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in variant.name).strip("-")
    spec = {
        "variant": asdict(variant),
        "model": str(model_dir),
        "input": str(volume_npz),
        "out": str(out / slug),
    }
    spec_file = out / f"{slug}.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ)
    for name in NNUNET_THREAD_CAPS if variant.stock else ():
        env.pop(name, None)  # stock means nnU-Net as a user runs it: none of rtseg's settings
    run_child(
        "rtseg_app.bench.inference", str(spec_file), f"inference variant {variant.name!r}", timeout, env
    )
    result = json.loads((out / slug).with_suffix(".result.json").read_text())
    return Run(**result)


def agreement(
    a: npt.NDArray[np.integer], b: npt.NDArray[np.integer], structures: tuple[Structure, ...]
) -> dict[str, float | None]:
    """Dice per structure between two label maps (None where both are empty)."""
    return {s.name: dice(a == s.label, b == s.label) for s in structures}


def compare(
    model_dir: Path,
    volume: CTVolume,
    work: Path,
    variants: tuple[Variant, ...] = (STOCK, OURS),
    timeout: float = 3600.0,
    say: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Run ``variants`` (the first is the reference) on ``volume``; times, memory and Dice vs the first."""
    from rtseg.model.manifest import load_manifest

    work.mkdir(parents=True, exist_ok=True)
    orientation = Orientation.from_affine(volume.affine)
    spacing = orientation.canonical_spacing(volume.spacing)
    npz = save_input(orientation.to_canonical(np.asarray(volume.hu)), spacing, work / "input.npz")
    structures = load_manifest(model_dir).structures
    runs = run_variants(model_dir, npz, structures, work, variants, timeout, say)
    ours = runs[1] if len(runs) > 1 else runs[0]
    unfiltered = next((r for r in runs[1:] if r["variant"] == UNFILTERED.name), None)
    return {
        "shape": list(volume.shape),
        "spacing_zyx": [round(s, 3) for s in spacing],
        "model": str(model_dir),
        "runs": runs,
        "stock": runs[0],
        "ours": ours,
        "speedup": ours["speedup"],
        "min_dice": ours["min_dice"],
        "dice_vs_stock": ours["dice"],
        "min_dice_unfiltered": unfiltered["min_dice"] if unfiltered else None,
    }


def run_variants(
    model_dir: Path,
    npz: Path,
    structures: tuple[Structure, ...],
    work: Path,
    variants: tuple[Variant, ...],
    timeout: float,
    say: Callable[[str], None] = log.info,
    reference: npt.NDArray[np.uint8] | None = None,
) -> list[dict[str, Any]]:
    """Each variant on the input ``npz`` in its own child; Dice and speedup against the first one run.

    ``reference``: labels to compare against instead (speedup is then left out).
    """
    runs: list[dict[str, Any]] = []
    base: float | None = None
    for variant in variants:
        if variant.device == "cuda" and variant.runtime in RUNTIME_PACKAGES:
            say(f"inference: {variant.name}: not measured, {variant.runtime} runs on the CPU only")
            runs.append({"variant": variant.name, "skipped": f"{variant.runtime} runs on the CPU only"})
            continue
        missing = missing_modules(variant)
        if missing:
            say(f"inference: {variant.name}: not measured, {', '.join(missing)} not installed")
            runs.append({"variant": variant.name, "skipped": f"{', '.join(missing)} not installed"})
            continue
        say(f"inference: {variant.name} ...")
        run = run_variant(variant, model_dir, npz, work, timeout)
        labels = np.load(run.labels)
        entry: dict[str, Any] = asdict(run)
        if reference is None:
            reference, base = labels, run.predict_s
        dice_vs = agreement(labels, reference, structures)
        entry["speedup"] = base / run.predict_s if base is not None and run.predict_s > 0 else None
        entry["min_dice"] = _min(dice_vs)
        entry["dice"] = dice_vs
        runs.append(entry)
        say(
            f"  predict {run.predict_s:.1f} s (network {run.network_s:.1f} s, {run.forwards} forwards),"
            f" peak RSS {run.peak_rss_mb:.0f} MB, min Dice {_f4(entry['min_dice'])}"
        )
    return runs


def missing_modules(variant: Variant) -> list[str]:
    """The modules ``variant``'s runtime needs that this environment lacks."""
    import importlib.util

    modules = RUNTIME_PACKAGES.get(variant.runtime, ((), ""))[0]
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _min(values: dict[str, float | None]) -> float | None:
    present = [v for v in values.values() if v is not None]
    return min(present) if present else None


def _f4(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def run_child(
    module: str, argument: str, what: str, timeout: float, env: dict[str, str] | None = None
) -> str:
    """``python -m module argument`` in a fresh process; its stdout, or :class:`ModelError` with the
    last lines it wrote when it fails."""
    proc = subprocess.run(
        [sys.executable, "-m", module, argument], env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise ModelError(f"{what} failed: {' | '.join(tail)}")
    return proc.stdout


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    variant = Variant(**spec["variant"])
    data = np.load(spec["input"])
    image = data["hu"][None].astype(np.float32)
    spacing = tuple(float(s) for s in data["spacing"])
    started = time.perf_counter()
    if variant.stock:
        predict, predictor = _load_stock(
            spec["model"], variant.zero_network, variant.mirror_axes, variant.device
        )
    else:
        predict, predictor = _load_ours(spec["model"], variant)
    params = sum(p.numel() for p in predictor.network.parameters())
    cuda = variant.device == "cuda"
    timing = _time_forwards(predictor.network, synchronize=cuda)
    if cuda:
        _cuda_reset_peak()
    loaded = time.perf_counter()
    labels, phases = predict(image, spacing)
    done = time.perf_counter()  # the labels are on the host: the GPU's work is done
    np.save(spec["out"] + ".npy", labels.astype(np.uint8))
    return {
        "variant": variant.name,
        "load_s": loaded - started,
        "predict_s": done - loaded,
        "peak_rss_mb": _peak_rss_mb(),
        "phases": phases,
        "labels": spec["out"] + ".npy",
        "network_s": timing["seconds"],
        "forwards": int(timing["calls"]),
        "params": int(params),
        "gpu_peak_mb": _cuda_peak_mb() if cuda else None,
    }


def _cuda_reset_peak() -> None:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()


def _cuda_peak_mb() -> float:
    import torch

    return float(torch.cuda.max_memory_allocated()) / 2**20


def _time_forwards(network: Any, synchronize: bool = False) -> dict[str, float]:
    """Seconds spent in and calls of ``network``'s forward (hooks: the network itself is unchanged).

    ``synchronize``: wait for the GPU at each end, so that a forward's seconds are its kernels' and not
    only their launch (costs a little overlap; the whole prediction's seconds are measured either way).
    """
    import torch

    timing = {"seconds": 0.0, "calls": 0.0}
    started: list[float] = []

    def before(*_: Any) -> None:
        if synchronize:
            torch.cuda.synchronize()
        started.append(time.perf_counter())

    def after(*_: Any) -> None:
        if synchronize:
            torch.cuda.synchronize()
        timing["seconds"] += time.perf_counter() - started.pop()
        timing["calls"] += 1

    network.register_forward_pre_hook(before)
    network.register_forward_hook(after)
    return timing


def _load_stock(
    model: str, zeros: bool = False, mirror_axes: Sequence[int] | None = None, device: str = "cpu"
) -> tuple[Any, Any]:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from rtseg.model.manifest import load_manifest

    # nnU-Net's defaults otherwise: perform_everything_on_device=True matters on CUDA only
    predictor = nnUNetPredictor(device=torch.device(device), allow_tqdm=False)
    folds = load_manifest(Path(model)).folds  # the folder's own folds (auto-detection skips fold_all)
    predictor.initialize_from_trained_model_folder(model, use_folds=folds)
    if mirror_axes is not None:
        predictor.allowed_mirroring_axes = tuple(int(a) for a in mirror_axes)
    if zeros:
        predictor.network = zero_network(predictor.label_manager.num_segmentation_heads)

    def predict(image: Any, spacing: tuple[float, ...]) -> tuple[Any, dict[str, float]]:
        return np.asarray(predictor.predict_single_npy_array(image, {"spacing": list(spacing)})), {}

    return predict, predictor


def zero_network(heads: int) -> Any:
    """A stand-in for the network with logits of zeros: the cost of everything around the network."""
    import torch

    class ZeroNetwork(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros((x.shape[0], heads, *x.shape[2:]))

        def load_state_dict(self, *_: Any, **__: Any) -> Any:  # nnU-Net loads each fold's weights
            return torch.nn.modules.module._IncompatibleKeys([], [])

    return ZeroNetwork()


def _load_ours(model: str, variant: Variant) -> tuple[Any, Any]:
    import torch

    from rtseg.model.inference import predict_labels
    from rtseg.model.segmenter import NnunetSegmenter

    segmenter = NnunetSegmenter(
        Path(model),
        device=variant.device,
        threads=variant.threads,
        tile_step_size=variant.tile_step_size,
        use_mirroring=variant.use_mirroring,
        engine=variant.engine,
        min_island_ml=variant.min_island_ml,
        runtime="torch" if variant.runtime == "compile" else variant.runtime,  # exports: [node] engine
    )
    predictor = segmenter._predictor  # the bench tunes the loaded network in place
    if variant.channels_last:
        predictor.network = predictor.network.to(memory_format=torch.channels_last_3d)
    if variant.runtime == "compile":
        predictor.network = runtime_network(predictor, variant.runtime)

    def predict(image: Any, spacing: tuple[float, float, float]) -> tuple[Any, dict[str, float]]:
        with torch.autocast(variant.device, dtype=torch.bfloat16, enabled=variant.bf16):
            if variant.engine == "rtseg":
                prediction = predict_labels(
                    predictor, image, spacing, variant.min_island_ml, skip_air=variant.skip_air
                )
                return prediction.labels, prediction.phases
            return segmenter.predict_canonical(image[0], spacing), {}

    return predict, predictor


def runtime_network(predictor: Any, runtime: str) -> Any:
    """The predictor's network run by ``torch.compile``, warmed up on one patch (compiling is loading).

    The exported runtimes (ONNX Runtime, OpenVINO) are the node's own ``[node]
    engine`` (:mod:`rtseg.model.runtimes`), loaded by ``NnunetSegmenter``.
    """
    import torch

    if runtime != "compile":
        raise ModelError(f"unknown runtime {runtime!r}")
    network = getattr(predictor.network, "_orig_mod", predictor.network)
    channels = len(predictor.dataset_json["channel_names"])
    example = torch.zeros((1, channels, *predictor.configuration_manager.patch_size))
    wrapped: Any = torch.compile(network)
    with torch.inference_mode():
        wrapped(example)
    return wrapped


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    result = _child(spec)
    Path(spec["out"] + ".result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main(sys.argv[1:]))
