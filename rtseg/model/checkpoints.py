"""Reading nnU-Net checkpoints without running code a model folder could carry.

A checkpoint is a pickle. nnU-Net (and ``torch.load(weights_only=False)``)
unpickles it whole, so a crafted ``checkpoint_final.pth`` in a model folder,
whether received from a federation, a registry or a colleague, could run
arbitrary code in the node. rtseg reads every checkpoint first with torch's
restricted unpickler: tensors, numbers, strings, containers, ``torch.device``
and the NumPy scalars nnU-Net's logger stores. The names nnU-Net resolves from
it (the trainer class, the plans in ``init_args``) are checked too
(:mod:`rtseg.model.plans_check`). Only a checkpoint that passes is handed to
nnU-Net's own loader.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

from rtseg.errors import ModelError
from rtseg.model.plans_check import check_plans, check_trainer_name


def _numpy_globals() -> list[Any]:
    """NumPy scalar reconstruction and dtypes, under NumPy 2's and NumPy 1's module names."""
    import numpy as np

    core = "numpy._core" if hasattr(np, "_core") else "numpy.core"
    multiarray = importlib.import_module(f"{core}.multiarray")
    scalar = multiarray.scalar
    dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """An nnU-Net checkpoint as plain data; :class:`ModelError` if it holds anything else or is unreadable."""
    import torch

    # process-wide and idempotent: torch's safe_globals() context manager removes its entries on exit,
    # which breaks a load running at the same time in another thread (the study trains arms in threads)
    torch.serialization.add_safe_globals(_numpy_globals())
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        why = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), "")
        raise ModelError(
            "the checkpoint holds pickled objects other than tensors, numbers and containers; rtseg does"
            f" not unpickle them, they could run code ({why[:300] or 'restricted unpickling failed'})",
            source=str(path),
        ) from exc
    except (OSError, EOFError, RuntimeError) as exc:
        raise ModelError(f"unreadable checkpoint ({exc!r})", source=str(path)) from exc
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise ModelError("not an nnU-Net checkpoint (no network_weights)", source=str(path))
    _check_names(checkpoint, path)
    return checkpoint


def _check_names(checkpoint: dict[str, Any], path: Path) -> None:
    """nnU-Net looks the trainer up by name and keeps the training plans: both must be harmless."""
    if "trainer_name" in checkpoint:
        check_trainer_name(checkpoint["trainer_name"], source=str(path))
    init_args = checkpoint.get("init_args")
    if isinstance(init_args, dict) and init_args.get("plans") is not None:
        check_plans(init_args["plans"], source=f"{path} (init_args.plans)")
