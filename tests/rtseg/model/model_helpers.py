"""Test helpers of the model tests: a phantom resliced thin, nnU-Net predictors with random weights."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy.ndimage import zoom

from rtseg.phantom.cohort import make_case

Case = tuple[npt.NDArray[np.int16], tuple[float, float, float]]


def resliced_phantom(slice_mm: float) -> Case:
    """A phantom case (center A, 96² matrix) resliced to ``slice_mm``: int16 HU as the loader holds them."""
    _, grid, body, _ = make_case("A", 3, 0, 96, position="HFS")
    hu = zoom(body.hu, (grid.spacing[0] / slice_mm, 1.0, 1.0), order=1, grid_mode=True, mode="nearest")
    spacing = (
        grid.spacing[0] * body.hu.shape[0] / hu.shape[0],
        float(grid.spacing[1]),
        float(grid.spacing[2]),
    )
    return np.round(hu).astype(np.int16), spacing


def random_predictor(base: Any, folds: int = 1, **configuration: Any) -> Any:
    """A predictor of ``folds`` random networks (seeds 1, 2, …) on ``base``'s plans with a small network;
    ``configuration`` overrides entries of the 3d_fullres configuration (``spacing``, ``patch_size``)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = copy.deepcopy(base.plans_manager.plans)
    config = plans["configurations"]["3d_fullres"]
    config.update(configuration)
    config["architecture"]["arch_kwargs"]["features_per_stage"] = [4, 8, 8, 8, 8]
    manager = PlansManager(plans)
    chosen = manager.get_configuration("3d_fullres")
    heads = manager.get_label_manager(base.dataset_json).num_segmentation_heads
    states = []
    for seed in range(1, folds + 1):  # several folds: nnU-Net averages them
        torch.manual_seed(seed)
        network = get_network_from_plans(
            chosen.network_arch_class_name,
            chosen.network_arch_init_kwargs,
            chosen.network_arch_init_kwargs_req_import,
            1,
            heads,
            allow_init=True,
            deep_supervision=False,
        )
        states.append(copy.deepcopy(network.state_dict()))
    predictor = nnUNetPredictor(
        tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False
    )
    predictor.manual_initialization(
        network, manager, chosen, states, base.dataset_json, "nnUNetTrainer", None
    )
    return predictor
