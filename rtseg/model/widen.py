"""Widen a trained U-Net without changing what it computes, so training can go on with more capacity.

The default model's network (8 → 128 features) fits its own training cases hardly better than
fresh ones (docs/model.md): it lacks capacity, not data. Training a wider network from random
weights costs the whole recipe again, hours of these 2 cores. Instead the trained network is
widened in place, function-preserving (in the spirit of Net2Net, Chen et al., ICLR 2016, with
zero-initialised outgoing weights instead of copied channels):

* every old channel keeps its weights, and the weights from a *new* input channel into an *old*
  output channel are zero, so the old channels compute exactly what they did;
* a new channel gets the random initial weights nnU-Net gives any network of the wider plans
  (it reads the old and new inputs), and its own normalisation starts at weight 1, bias 0;
* the segmentation heads read the new channels with zero weights.

The widened network therefore gives the same logits as the trained one (up to float rounding),
and gradient descent then puts the new channels to use: their outgoing weights receive gradient
from the first step. Only nnU-Net's ``PlainConvUNet`` is handled; its decoder's first convolution
of each stage reads the concatenation [upsampled, skip], which is widened block by block.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from rtseg.errors import InputError, ModelError
from rtseg.model.cpu import CONFIGURATION
from rtseg.model.network import build_network, plain_state_dict

PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
# ConvTranspose weights are (in, out, k…); every other weight is (out, in, k…)
_TRANSPOSED = re.compile(r"(^|\.)transpconvs\.\d+\.weight$")
# the first convolution of a decoder stage reads [upsampled, skip], two blocks of equal width
_CONCAT = re.compile(r"(^|\.)decoder\.stages\.\d+\.convs\.0\.(conv|all_modules\.0)\.weight$")


def arch_kwargs(plans: dict[str, Any]) -> dict[str, Any]:
    """The architecture arguments of the CPU configuration; a clear error for any other network."""
    try:
        arch = plans["configurations"][CONFIGURATION]["architecture"]
    except (KeyError, TypeError) as exc:
        raise ModelError(f"the plans have no {CONFIGURATION} architecture to widen") from exc
    if arch.get("network_class_name") != PLAIN_UNET:
        raise ModelError(
            f"only nnU-Net's PlainConvUNet can be widened, not {arch.get('network_class_name')!r}"
        )
    return dict(arch["arch_kwargs"])


def features(base: int, maximum: int, n_stages: int) -> list[int]:
    """nnU-Net's rule: ``base`` features doubling per stage, capped at ``maximum``."""
    return [min(base * 2**s, maximum) for s in range(n_stages)]


def widened_plans(plans: dict[str, Any], base: int, maximum: int) -> dict[str, Any]:
    """A copy of ``plans`` whose network has ``base`` → ``maximum`` features; nothing else changes.

    Refuses to narrow: a stage with fewer features than now would drop trained channels.
    """
    old = [int(f) for f in arch_kwargs(plans)["features_per_stage"]]
    new = features(base, maximum, len(old))
    narrower = [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if b < a]
    if narrower:
        raise InputError(f"cannot widen features {old} to {new}: stage {narrower[0]} would lose channels")
    out = copy.deepcopy(plans)
    out["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]["features_per_stage"] = new
    return out


def widen_state(old: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    """Old weights placed into a freshly initialised wider network's ``fresh`` state dict.

    Keys must be the same; every old dimension must fit into the new one.
    """
    import torch

    if set(old) != set(fresh):
        missing = sorted(set(old) ^ set(fresh))[:3]
        raise ModelError(f"the wider network has other tensors than the trained one ({', '.join(missing)} …)")
    out: dict[str, Any] = {}
    for key, new in fresh.items():
        was = old[key]
        if was.dim() != new.dim() or any(a > b for a, b in zip(was.shape, new.shape, strict=True)):
            raise ModelError(f"{key}: {tuple(was.shape)} does not fit into {tuple(new.shape)}")
        result = new.detach().clone()
        if was.shape == new.shape:
            out[key] = was.detach().clone()
            continue
        if was.dim() == 1:  # bias or normalisation: old channels keep theirs, new ones their init
            result[: was.shape[0]] = was
            out[key] = result
            continue
        out_dim, in_dim = (1, 0) if _TRANSPOSED.search(key) else (0, 1)
        n_out = was.shape[out_dim]
        with torch.no_grad():
            old_rows = result.narrow(out_dim, 0, n_out)
            old_rows.zero_()  # old outputs ignore every new input …
            for src, dst, width in _input_blocks(key, was.shape[in_dim], new.shape[in_dim]):
                # … and read their old inputs with their old weights
                old_rows.narrow(in_dim, dst, width).copy_(was.narrow(in_dim, src, width))
        out[key] = result
    return out


def _input_blocks(key: str, old_in: int, new_in: int) -> list[tuple[int, int, int]]:
    """(start in old, start in new, width) of the old input channels within the new input."""
    if _CONCAT.search(key):
        if old_in % 2 or new_in % 2:
            raise ModelError(f"{key}: a concatenation of two equal blocks must have an even width")
        half_old, half_new = old_in // 2, new_in // 2
        return [(0, 0, half_old), (half_old, half_new, half_old)]
    return [(0, 0, old_in)]


def widen_network_weights(
    weights: dict[str, Any],
    plans: dict[str, Any],
    wide_plans: dict[str, Any],
    dataset_json: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """``weights`` (a state dict of ``plans``' network) widened to the network of ``wide_plans``.

    The new channels' initial weights are nnU-Net's own initialisation of that network, seeded.
    """
    import torch

    arch_kwargs(plans)
    arch_kwargs(wide_plans)
    torch.manual_seed(seed)
    network = build_network(wide_plans, dataset_json)
    fresh = network.state_dict()
    widened = widen_state(plain_state_dict(weights), fresh)
    network.load_state_dict(widened)  # aliased keys (decoder.encoder.*) hold one tensor again
    return dict(network.state_dict())
