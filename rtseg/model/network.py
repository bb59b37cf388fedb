"""nnU-Net's network built from a model's plans: one place for the training, widening and inference paths."""

from __future__ import annotations

import copy
from typing import Any

from rtseg.model.cpu import CONFIGURATION


def build_network(plans: dict[str, Any], dataset_json: dict[str, Any], deep_supervision: bool = True) -> Any:
    """nnU-Net's network of the CPU configuration of ``plans``, freshly initialised."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from rtseg.model.plans_check import check_plans

    check_plans(plans, "plans to build the network of")
    manager = PlansManager(copy.deepcopy(plans))
    configuration = manager.get_configuration(CONFIGURATION)
    return get_network_from_plans(
        configuration.network_arch_class_name,
        configuration.network_arch_init_kwargs,
        configuration.network_arch_init_kwargs_req_import,
        determine_num_input_channels(manager, configuration, dataset_json),
        manager.get_label_manager(dataset_json).num_segmentation_heads,
        allow_init=True,
        deep_supervision=deep_supervision,
    )
