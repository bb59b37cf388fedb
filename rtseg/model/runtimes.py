"""The network's runtime: torch, or its weights exported to ONNX and run by ONNX Runtime or OpenVINO.

nnU-Net's sliding window (tiling, Gaussian weighting, mirroring) stays
nnU-Net's: only ``predictor.network`` is replaced by an :class:`ExportedNetwork`,
a ``torch.nn.Module`` whose forward hands each tile to the runtime. The export
(torch's TorchScript exporter, the fixed patch size of the plans, one file per
fold) is made once per model and cached under the node's data directory (the
model folder may be read-only), keyed by the model's hash and the export
settings; a cache file whose recorded SHA-256 does not match is rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rtseg.errors import ModelError
from rtseg.model.engines import require_runtime

log = logging.getLogger(__name__)

OPSET = 17
EXPORT_FORMAT = 1  # bump when the export changes, so old cache files are not reused
KEEP_MODELS = 3  # models whose exports the cache keeps (the current one and the last ones swapped out)

Runner = Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]]


class ExportedNetwork(torch.nn.Module):
    """Stands in for nnU-Net's network: each fold's exported weights, run by a runtime.

    nnU-Net (and :func:`rtseg.model.inference.sliding_window_logits`) call
    ``load_state_dict(params)`` with one of ``predictor.list_of_parameters``
    before each fold's sliding window: that selects the fold's runner.
    """

    def __init__(self, parameters: Sequence[dict[str, Any]], runners: Sequence[Runner]) -> None:
        super().__init__()
        self._parameters_of_folds = list(parameters)
        self._runners = list(runners)
        self._active = 0

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Select the fold whose weights are ``state_dict`` (exported ones only)."""
        for index, params in enumerate(self._parameters_of_folds):
            if params is state_dict or _same_weights(params, state_dict):
                self._active = index
                return torch.nn.modules.module._IncompatibleKeys([], [])
        raise ModelError("these weights were not exported for the engine: reload the model")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self._runners[self._active](array))


def _same_weights(a: dict[str, Any], b: Any) -> bool:
    if not isinstance(b, dict) or a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def exported_network(
    network: torch.nn.Module,
    parameters: Sequence[dict[str, Any]],
    runtime: str,
    *,
    input_shape: tuple[int, ...],
    threads: int,
    cache: ExportCache | None,
) -> ExportedNetwork:
    """``network`` with each fold's ``parameters`` exported to ONNX and loaded into ``runtime``.

    Parameters
    ----------
    network
        The torch network nnU-Net built (its weights are overwritten fold by fold).
    parameters
        The state dicts of the folds, in ``predictor.list_of_parameters`` order.
    runtime
        ``"onnxruntime"`` or ``"openvino"``.
    input_shape
        ``(1, channels, *patch_size)``: nnU-Net's sliding window feeds tiles of this shape.
    threads
        Intra-op threads of the runtime (the worker's inference threads).
    cache
        Where exports are kept between loads; None exports in memory every time.
    """
    require_runtime(runtime)
    runners = []
    for fold, params in enumerate(parameters):
        network.load_state_dict(params)
        model = cache.load(fold) if cache is not None else None
        if model is None:
            model = export_onnx(network, input_shape)
            if cache is not None:
                cache.store(fold, model)
        runners.append(_runner(runtime, model, threads))
    exported = ExportedNetwork(parameters, runners)
    exported.forward(torch.zeros(input_shape))  # warm-up: the runtime's first call allocates and plans
    return exported


def export_onnx(network: torch.nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """The ONNX model of ``network`` for inputs of ``input_shape`` (batch axis dynamic)."""
    buffer = io.BytesIO()
    network.eval()
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated in torch 2.9+, but the dynamo one needs
        # onnxscript; its tracer warnings concern Python branches on shapes, fixed by the patch size
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(
                network,
                (torch.zeros(input_shape),),
                buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to any binary file
                dynamo=False,
                input_names=["x"],
                output_names=["y"],
                opset_version=OPSET,
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            )
    return buffer.getvalue()


def _runner(runtime: str, model: bytes, threads: int) -> Runner:
    if runtime == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        return lambda x: np.asarray(session.run(None, {"x": x})[0])
    if runtime == "openvino":
        import openvino as ov

        core = ov.Core()
        # f32: OpenVINO lowers precision to bf16 on CPUs that have it, which changes labels
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
        compiled = core.compile_model(core.read_model(model=model, weights=b""), "CPU", config)
        return lambda x: np.array(compiled(x)[0])
    raise ModelError(f"engine {runtime!r} does not run an exported network")


class ExportCache:
    """Exported folds of one model under ``root``, keyed by the model hash and the export settings.

    Each ``fold_<n>.onnx`` has a ``fold_<n>.json`` beside it that records the key
    and the file's SHA-256; a file that does not match is exported again.
    """

    def __init__(self, root: Path, model_hash: str, input_shape: tuple[int, ...]) -> None:
        self.key = {
            "model_hash": model_hash,
            "input_shape": list(input_shape),
            "opset": OPSET,
            "exporter": "torchscript",
            "torch": torch.__version__,
            "format": EXPORT_FORMAT,
        }
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(root) / f"{model_hash[:12]}-{digest}"

    def load(self, fold: int) -> bytes | None:
        """The cached export of ``fold``, or None when it is missing, foreign or corrupt."""
        path, meta = self._paths(fold)
        if not path.is_file() or not meta.is_file():
            return None
        try:
            record = json.loads(meta.read_text())
            data = path.read_bytes()
        except (OSError, ValueError) as exc:
            log.warning("engine cache %s unreadable (%s): exporting again", path.name, exc)
            return None
        if record.get("key") != self.key or record.get("sha256") != hashlib.sha256(data).hexdigest():
            log.warning("engine cache %s does not match its record: exporting again", path.name)
            return None
        log.info("engine cache: reusing %s", path.name)
        return data

    def store(self, fold: int, data: bytes) -> None:
        """Write ``data`` atomically (another worker may export the same fold at once)."""
        path, meta = self._paths(fold)
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"key": self.key, "sha256": hashlib.sha256(data).hexdigest()}
        for target, content in ((path, data), (meta, json.dumps(record).encode())):
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(content)
            os.replace(tmp, target)
        log.info("engine cache: exported %s", path.name)
        self._prune()

    def _prune(self) -> None:
        """Drop the exports of all but the newest :data:`KEEP_MODELS` models (each swap adds one)."""
        folders = sorted(
            (p for p in self.folder.parent.iterdir() if p.is_dir() and p != self.folder),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for old in folders[KEEP_MODELS - 1 :]:
            for file in old.iterdir():
                file.unlink(missing_ok=True)  # a worker that loaded it holds its runtime in memory
            old.rmdir()
            log.info("engine cache: removed the exports of an older model (%s)", old.name)

    def _paths(self, fold: int) -> tuple[Path, Path]:
        return self.folder / f"fold_{fold}.onnx", self.folder / f"fold_{fold}.json"
