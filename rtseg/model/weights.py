"""Network weights as plain arrays, the only form in which they cross process and site boundaries.

Weights cross process (and site) boundaries only as ``.npz`` files of plain numeric arrays, read
with ``allow_pickle=False``. Their keys are the network's ``state_dict`` keys without
``_orig_mod.`` prefixes and without aliased keys (nnU-Net's decoder repeats ``encoder.*`` as
``decoder.encoder.*``; see :func:`rtseg.model.trainer.network_arrays`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rtseg.errors import ModelError
from rtseg.model.cpu import CONFIGURATION


def load_arrays(path: Path) -> dict[str, Any]:
    """Arrays of a weights file; refuses anything that is not plain numeric data (no pickles)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    for key, value in arrays.items():
        if value.dtype.kind not in "fiub":
            raise ModelError(f"array {key!r} has non-numeric dtype {value.dtype}", source=str(path))
    return arrays


def save_arrays(path: Path, arrays: dict[str, Any]) -> Path:
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez(handle, **arrays)
    return path


def write_checkpoint(
    arrays: dict[str, Any],
    aliases: dict[str, str],
    plans: dict[str, Any],
    dataset_json: dict[str, Any],
    out_dir: Path,
    epoch: int = 0,
) -> Path:
    """A standard nnU-Net v2 results folder (``fold_all/checkpoint_final.pth``) from plain arrays.

    Aliased keys are restored, so nnU-Net's predictor loads the state dict strictly.
    """
    from collections import OrderedDict

    import torch

    from rtseg.model.trainer import SAVED_TRAINER_NAME

    out_dir = Path(out_dir)
    (out_dir / "fold_all").mkdir(parents=True, exist_ok=True)
    weights: OrderedDict[str, Any] = OrderedDict((k, torch.from_numpy(v.copy())) for k, v in arrays.items())
    for alias, key in aliases.items():
        weights[alias] = weights[key]
    checkpoint = {
        "network_weights": weights,
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": None,
        "_best_ema": None,
        "current_epoch": epoch,
        "init_args": {
            "plans": plans,
            "configuration": CONFIGURATION,
            "fold": "all",
            "dataset_json": dataset_json,
            "device": "cpu",
        },
        "trainer_name": SAVED_TRAINER_NAME,
        "inference_allowed_mirroring_axes": None,  # lateralised labels: never mirror
    }
    torch.save(checkpoint, out_dir / "fold_all" / "checkpoint_final.pth")
    (out_dir / "plans.json").write_text(json.dumps(plans, indent=2))
    (out_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return out_dir
