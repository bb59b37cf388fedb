"""Which runtime runs the network (``[node] engine``), and whether it is installed; imports no torch.

The node's main process checks the setting at startup with these (a missing
package is named with the extra that installs it); the workers resolve
``auto`` when they load the model (:mod:`rtseg.model.runtimes` does the export).
"""

from __future__ import annotations

import importlib.util

from rtseg.errors import ModelError
from rtseg.settings import ENGINES as RUNTIMES

# what each exported runtime imports (torch's ONNX exporter needs onnx), and the extra that installs it
RUNTIME_PACKAGES = {
    "onnxruntime": (("onnx", "onnxruntime"), "onnx"),
    "openvino": (("onnx", "openvino"), "openvino"),
}
# "auto" on a CPU: the first of these that is installed, else torch. Measured on the default model
# (docs/performance.md, "Network engines"): network phase median 0.78-1.26 s OpenVINO, 0.97-1.74 s
# ONNX Runtime, 2.79-3.82 s torch on 2 busy cores, labels Dice >= 0.99 against torch.
CPU_AUTO = ("openvino", "onnxruntime")


def resolve_runtime(name: str, device_type: str) -> str:
    """The runtime ``name`` means on ``device_type``: ``auto`` is torch on CUDA, else see :data:`CPU_AUTO`.

    An exported runtime asked for on CUDA is refused: the exports here run on the CPU.
    """
    if name not in RUNTIMES:
        raise ModelError(f"unknown engine {name!r}: choose one of {', '.join(RUNTIMES)}")
    if name == "auto":
        return "torch" if device_type == "cuda" else _fastest_installed()
    if name != "torch" and device_type == "cuda":
        raise ModelError(f"engine {name!r} runs on the CPU; use engine 'torch' or 'auto' with CUDA")
    return name


def require_runtime(name: str) -> None:
    """Raise :class:`ModelError` naming the extra to install when ``name``'s package is missing."""
    if name not in RUNTIMES:
        raise ModelError(f"unknown engine {name!r}: choose one of {', '.join(RUNTIMES)}")
    modules, extra = RUNTIME_PACKAGES.get(name, ((), ""))
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(
            f"engine {name!r} needs {', '.join(missing)}, which is not installed:"
            f' pip install "rtseg[{extra}]" (or set [node] engine = "torch")'
        )


def _fastest_installed() -> str:
    for name in CPU_AUTO:
        if all(importlib.util.find_spec(m) for m in RUNTIME_PACKAGES[name][0]):
            return name
    return "torch"
