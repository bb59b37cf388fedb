"""Long series through a stock-size nnU-Net in bounded memory (issue 18 point 4): part of ``--scaling``.

The stock-size model that ``--section clinical`` makes (cached under the
work folder) predicts the benchmark CT repeated along z to each length (its
0.87 mm slices kept: a longer body, not thinner slices), once with the model
grid's logits held whole and once streamed to a file
(:mod:`rtseg.model.streamed`), each in its own process. The real network
would take about 85 min for 1,500 slices on 2 cores, so it is replaced by a
1 × 1 × 1 convolution with fixed random weights: each class a linear function
of the CT number, so labels change wherever the intensity crosses a band and
specks sit in the noise, and the island removal and the labels do real work
at no network cost. The real network's activations (one window at a time)
are measured apart, on one window, and come on top of the network phase.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

MODES = ("one piece", "streamed")
TIMEOUT_S = 1800.0


def long_series_section(
    work: Path, slices: list[int], matrix: int, say: Callable[[str], None]
) -> dict[str, Any]:
    """Peak RSS and seconds of the stock-size model at each length, one piece and streamed."""
    model = work / "clinical" / "model"
    if not (model / "rtseg-model.json").is_file():
        return {"not_measured": "no stock-size model: `rtseg bench --section clinical` makes it (~30 min)"}
    from rtseg_app.bench.volume import bench_series

    bench_series(work, 200, matrix)  # the 200-slice benchmark CT, drawn once
    rows = []
    window = _run({"kind": "window", "model": str(model)})
    say(f"   stock-size, one real window: +{window['activations_mb']:.0f} MB, {window['forward_s']:.1f} s")
    for n in slices:
        for mode in MODES:
            spec = {"kind": "series", "model": str(model), "work": str(work), "slices": n, "matrix": matrix}
            row = {"slices": n, "mode": mode, **_run({**spec, "streamed": mode == "streamed"})}
            row["with_activations_mb"] = row["peak_rss_mb"] + window["activations_mb"]
            say(
                f"   stock-size, {n} slices, {mode}: {row['predict_s']:.1f} s,"
                f" peak {row['peak_rss_mb']:.0f} MB (+ activations: {row['with_activations_mb']:.0f} MB)"
            )
            rows.append(row)
    for n in slices:
        pair = [r for r in rows if r["slices"] == n]
        for r in pair:
            r["same_labels"] = len({p["labels_sha256"] for p in pair}) == 1
    return {"model": str(model), "window": window, "rows": rows}


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    from rtseg_app.bench.inference import run_child

    out = run_child(
        "rtseg_app.bench.long_series", json.dumps(spec), f"long-series run {spec['kind']}", TIMEOUT_S
    )
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _peak_mb() -> float:
    """This process's peak RSS (VmHWM: resettable, unlike ``ru_maxrss``)."""
    from rtseg_app.bench.http import peak_rss_mb

    return peak_rss_mb(os.getpid())


def band_network(heads: int) -> Any:
    """A 1 × 1 × 1 convolution with fixed random weights standing in for the network (costs nothing)."""
    import torch

    class BandNetwork(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            generator = torch.Generator().manual_seed(0)
            self.weight = torch.randn((heads, 1, 1, 1, 1), generator=generator)
            self.bias = torch.randn((heads,), generator=generator)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.conv3d(x, self.weight, self.bias)

        def load_state_dict(self, *_: Any, **__: Any) -> Any:  # nnU-Net loads each fold's weights
            return torch.nn.modules.module._IncompatibleKeys([], [])

    return BandNetwork()


def _series_hu(work: Path, slices: int, matrix: int) -> tuple[npt.NDArray[np.int16], tuple[float, ...]]:
    from rtseg_app.bench.clinical import _canonical
    from rtseg_app.bench.volume import bench_volume

    volume, _ = bench_volume(work, 200, matrix)
    canonical, spacing = _canonical(volume)
    del volume
    hu = np.rint(canonical).astype(np.int16)  # as the loader holds it
    return np.concatenate([hu] * -(-slices // hu.shape[0]))[:slices], spacing


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from rtseg.model.segmenter import NnunetSegmenter

    if spec["kind"] == "window":
        segmenter = NnunetSegmenter(Path(spec["model"]), device="cpu", runtime="torch")
        patch = segmenter._predictor.configuration_manager.patch_size
        window = torch.zeros((1, 1, *patch))
        from rtseg_app.bench.node import reset_peaks

        reset_peaks([os.getpid()])  # loading the model may have peaked higher than the forward will
        before = _peak_mb()  # just reset: the RSS now
        started = time.perf_counter()
        with torch.inference_mode():
            segmenter._predictor.network(window)
        seconds = time.perf_counter() - started
        return {"patch": list(patch), "forward_s": seconds, "activations_mb": max(_peak_mb() - before, 0.0)}
    work = Path(spec["work"])
    hu, spacing = _series_hu(work, int(spec["slices"]), int(spec["matrix"]))
    segmenter = NnunetSegmenter(
        Path(spec["model"]),
        device="cpu",
        runtime="torch",
        stream_mb=0.0 if spec["streamed"] else None,  # streamed whatever the size, or never
        scratch=work / "scratch",
    )
    predictor = segmenter._predictor
    heads = predictor.label_manager.num_segmentation_heads
    predictor.network = band_network(heads)
    model_spacing = predictor.configuration_manager.spacing
    grid = [round(n * s / m) for n, s, m in zip(hu.shape, spacing, model_spacing, strict=True)]
    started = time.perf_counter()
    labels = segmenter.predict_canonical(hu, (spacing[0], spacing[1], spacing[2]))
    seconds = time.perf_counter() - started
    return {
        "predict_s": seconds,
        "peak_rss_mb": _peak_mb(),
        "input_mb": hu.nbytes / 2**20,
        "model_grid": grid,
        "logits_mb": heads * float(np.prod(grid)) * 2 / 2**20,
        "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
        "labels_present": int(len(np.unique(labels))),
    }


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
