"""Widening a trained network: the trained channels compute as before, the new ones can learn."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from typing import Any

import pytest
import torch

from rtseg.errors import InputError, ModelError
from rtseg.model.checkpoints import load_checkpoint
from rtseg.model.default import default_model_dir
from rtseg.model.manifest import load_manifest
from rtseg.model.network import build_network
from rtseg.model.widen import arch_kwargs, features, widen_network_weights, widen_state, widened_plans
from rtseg.study.arms import STUDY_START_DIR


@pytest.fixture(scope="module")
def shipped() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Model 0.9.0 (8 → 128 features, trained), which recipe 1.0.0 widens; the package keeps it as the
    study's start."""
    model = STUDY_START_DIR
    plans = json.loads((model / "plans.json").read_text())
    dataset = json.loads((model / "dataset.json").read_text())
    assert arch_kwargs(plans)["features_per_stage"] == features(8, 128, 5)
    weights = load_checkpoint(model / "fold_all" / "checkpoint_final.pth")["network_weights"]
    return plans, dataset, weights


def _logits(plans: dict[str, Any], dataset: dict[str, Any], weights: dict[str, Any], x: torch.Tensor) -> Any:
    network = build_network(plans, dataset, deep_supervision=False)
    network.load_state_dict(weights)
    network.eval()
    with torch.no_grad():
        return network(x)


def test_the_widened_default_model_gives_the_same_logits(
    shipped: tuple[dict[str, Any], dict[str, Any], dict[str, Any]],
) -> None:
    plans, dataset, weights = shipped
    wide = widened_plans(plans, 16, 256)
    features = wide["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"]
    assert features == [16, 32, 64, 128, 256]
    widened = widen_network_weights(weights, plans, wide, dataset, seed=1)
    n_old = sum(v.numel() for k, v in weights.items() if not k.startswith("decoder.encoder."))
    n_new = sum(v.numel() for k, v in widened.items() if not k.startswith("decoder.encoder."))
    assert n_new > 3 * n_old

    x = torch.randn(1, 1, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    before, after = _logits(plans, dataset, weights, x), _logits(wide, dataset, widened, x)
    assert torch.allclose(before, after, atol=1e-3 * float(before.abs().max()))
    assert torch.equal(before.argmax(1), after.argmax(1))
    # the new channels are not dead: they compute something, and the next layer can learn to read them
    key = "encoder.stages.0.0.convs.0.conv.weight"
    first = widened[key]
    assert first[8:].abs().sum() > 0 and torch.equal(first[:8], weights[key])
    second = widened["encoder.stages.0.0.convs.1.conv.weight"]
    assert torch.count_nonzero(second[:8, 8:]) == 0 and second[8:, :8].abs().sum() > 0


def test_copying_old_weights_without_silencing_the_new_inputs_changes_the_logits(
    shipped: tuple[dict[str, Any], dict[str, Any], dict[str, Any]],
) -> None:
    """The check above can fail: keeping the new inputs' random weights into old channels breaks it."""
    plans, dataset, weights = shipped
    wide = widened_plans(plans, 16, 256)
    torch.manual_seed(1)
    fresh = build_network(wide, dataset).state_dict()
    careless = {}
    for key, new in fresh.items():
        out = new.clone()
        out[tuple(slice(0, n) for n in weights[key].shape)] = weights[key]
        careless[key] = out
    x = torch.randn(1, 1, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    before, after = _logits(plans, dataset, weights, x), _logits(wide, dataset, careless, x)
    assert not torch.allclose(before, after, atol=1e-3 * float(before.abs().max()))
    # while the right widening of the same fresh weights keeps them
    kept = _logits(wide, dataset, widen_state(weights, fresh), x)
    assert torch.allclose(before, kept, atol=1e-3 * float(before.abs().max()))


def test_narrowing_and_other_networks_are_refused(
    shipped: tuple[dict[str, Any], dict[str, Any], dict[str, Any]],
) -> None:
    plans, _, _ = shipped
    with pytest.raises(InputError, match="stage 0 would lose channels"):
        widened_plans(plans, 4, 128)
    other = copy.deepcopy(plans)
    other["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "my.own.Net"
    with pytest.raises(ModelError, match="only nnU-Net's PlainConvUNet can be widened"):
        widened_plans(other, 16, 256)
    with pytest.raises(ModelError, match="does not fit into"):
        widen_state({"w": torch.zeros(4, 4)}, {"w": torch.zeros(2, 8)})


def test_recipe_1_0_0_is_0_9_0_and_two_wider_stages() -> None:
    """The run itself is checked on a tiny scale in test_default_model (slow)."""
    from rtseg.cli_commands import DEFAULT_RECIPE_VERSION, RECIPE_VERSIONS
    from rtseg.model.default import DEFAULT_RECIPE, RECIPES, WIDE_RECIPE

    assert WIDE_RECIPE.stages[:7] == DEFAULT_RECIPE.stages and len(WIDE_RECIPE.stages) == 9
    for stage in WIDE_RECIPE.stages[7:]:
        assert (stage.base_features, stage.max_features) == (16, 256)
    assert WIDE_RECIPE.average == DEFAULT_RECIPE.average == (7, 0.7)
    assert (
        tuple(RECIPES) == RECIPE_VERSIONS
        and RECIPES[DEFAULT_RECIPE_VERSION].version == DEFAULT_RECIPE_VERSION
    )


def test_recipe_1_1_0_is_1_0_0_and_one_longer_stage_of_the_wide_network() -> None:
    from rtseg.model.default import LONGER_RECIPE, WIDE_RECIPE, WIDE_STAGE

    assert LONGER_RECIPE.stages[:9] == WIDE_RECIPE.stages and len(LONGER_RECIPE.stages) == 10
    last = LONGER_RECIPE.stages[-1]
    assert (last.base_features, last.max_features, last.epochs, last.learning_rate) == (16, 256, 22, 5e-4)
    assert last.seed not in {stage.seed for stage in WIDE_RECIPE.stages} and last == replace(
        WIDE_STAGE, epochs=22, seed=9, learning_rate=5e-4
    )
    assert LONGER_RECIPE.cases_for(10) == WIDE_RECIPE.cases_for(9) and LONGER_RECIPE.realistic_for(10) == 40


def test_recipe_1_2_0_adds_left_nephrectomies_with_a_sunken_spleen_to_a_stage_11() -> None:
    from rtseg.cli_commands import provenance_lines
    from rtseg.model.default import FOSSA_RECIPE, LONGER_RECIPE, WIDE_STAGE
    from rtseg.phantom.cohort import case_variant

    assert FOSSA_RECIPE.stages[:10] == LONGER_RECIPE.stages and len(FOSSA_RECIPE.stages) == 11
    assert FOSSA_RECIPE.stages[-1] == replace(WIDE_STAGE, epochs=22, seed=10, learning_rate=5e-4)
    assert FOSSA_RECIPE.case_ids(10) == LONGER_RECIPE.case_ids(10)  # stages 1-10 train on 1.1.0's cases
    added = FOSSA_RECIPE.case_ids(11) - LONGER_RECIPE.case_ids(10)
    assert len(added) == 20 and all(i.endswith("_couch_clinical-nopv-fossa") for i in added)
    for case in added:
        center, seed, index = case.split("_")[:3]
        assert case_variant(center, int(seed[1:]), int(index)) == "nephrectomy_L"
        assert int(index) >= 100  # not the anatomy of a plain (0-59) or realistic (60-99) training case
    assert FOSSA_RECIPE.fossa is not None
    shown = provenance_lines("m", "1.2.0", {"fossa": FOSSA_RECIPE.fossa.to_dict()})
    assert (
        "left nephrectomies with the spleen sunk into the empty fossa: 10 per center from stage 11"
        " (clinical-nopv-fossa)" in shown
    )


def test_recipe_1_3_0_is_1_2_0_and_a_quieter_stage_12_on_the_same_cases() -> None:
    """1.3.0 is the shipped model's recipe: what `rtseg model build-default` builds without --recipe."""
    from rtseg.cli_commands import DEFAULT_RECIPE_VERSION
    from rtseg.model.default import CONSOLIDATED_RECIPE, FOSSA_RECIPE, WIDE_STAGE

    assert DEFAULT_RECIPE_VERSION == CONSOLIDATED_RECIPE.version == load_manifest(default_model_dir()).version

    assert CONSOLIDATED_RECIPE.stages[:11] == FOSSA_RECIPE.stages and len(CONSOLIDATED_RECIPE.stages) == 12
    last = CONSOLIDATED_RECIPE.stages[-1]
    assert last == replace(WIDE_STAGE, epochs=22, seed=11, learning_rate=2.5e-4)
    assert last.seed not in {stage.seed for stage in FOSSA_RECIPE.stages}
    assert CONSOLIDATED_RECIPE.case_ids(12) == FOSSA_RECIPE.case_ids(11)
    assert CONSOLIDATED_RECIPE.fossa_for(12) == 10 and CONSOLIDATED_RECIPE.realistic_for(12) == 40


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_weights_saved_by_dataparallel_or_torch_compile_widen_alike(
    shipped: tuple[dict[str, Any], dict[str, Any], dict[str, Any]], prefix: str
) -> None:
    """A checkpoint from a DataParallel or compiled network carries key prefixes: the same widening."""
    plans, dataset, weights = shipped
    wide = widened_plans(plans, 12, 192)
    plain = widen_network_weights(weights, plans, wide, dataset, seed=3)
    prefixed = widen_network_weights(
        {prefix + k: v for k, v in weights.items()}, plans, wide, dataset, seed=3
    )
    assert plain.keys() == prefixed.keys()
    assert all(torch.equal(plain[k], prefixed[k]) for k in plain)
