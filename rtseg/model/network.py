"""nnU-Net's network built from a model's plans: one place for the training, widening and inference paths."""

from __future__ import annotations

import copy
from typing import Any

from rtseg.model.cpu import CONFIGURATION


def build_network(
    plans: dict[str, Any],
    dataset_json: dict[str, Any],
    deep_supervision: bool = True,
    purpose: str = "plans to build the network of",
) -> Any:
    """nnU-Net's network of the CPU configuration of ``plans``, freshly initialised.

    The plans are checked first (:func:`rtseg.model.plans_check.check_plans`: they name
    the network's class, and a peer's plans are code until proven otherwise); ``purpose``
    says in the error what they were for.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from rtseg.model.plans_check import check_plans

    check_plans(plans, purpose)
    return plans_network(PlansManager(copy.deepcopy(plans)), CONFIGURATION, dataset_json, deep_supervision)


def plans_network(
    manager: Any, configuration: str, dataset_json: dict[str, Any], deep_supervision: bool = True
) -> Any:
    """The network of ``configuration`` in ``manager`` (nnU-Net's ``PlansManager``), freshly initialised."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    config = manager.get_configuration(configuration)
    return get_network_from_plans(
        config.network_arch_class_name,
        config.network_arch_init_kwargs,
        config.network_arch_init_kwargs_req_import,
        determine_num_input_channels(manager, config, dataset_json),
        manager.get_label_manager(dataset_json).num_segmentation_heads,
        allow_init=True,
        deep_supervision=deep_supervision,
    )


def plain_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Drop the prefixes DataParallel (``module.``) and torch.compile (``_orig_mod.``) add."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out
