"""RTSTRUCT build time: every structure of a label map contoured into a structure set."""

from __future__ import annotations

import time

import numpy as np
import numpy.typing as npt

from rtseg.rtstruct import ModelIdentity, build_rtstruct
from rtseg.structures import STRUCTURES
from rtseg.volume import CTVolume

IDENTITY = ModelIdentity("rtseg-bench", "0")


def rtstruct_build(volume: CTVolume, labels: npt.NDArray[np.uint8], repeats: int = 2) -> dict[str, object]:
    """Best-of-``repeats`` seconds to build the structure set of ``labels`` on ``volume``."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = build_rtstruct(volume, labels, STRUCTURES, IDENTITY)
        seconds.append(time.perf_counter() - started)
    return {
        "shape": list(volume.shape),
        "structures": len(result.included),
        "omitted": list(result.omitted),
        "contours": sum(r.n_contours for r in result.included),
        "seconds": min(seconds),
    }
