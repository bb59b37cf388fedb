"""A federation that starts from a model: round 0 is that model's plans, label table and weights.

The coordinator's ``initialise`` is driven with real fingerprints as rtseg's
``Grid`` hands them over (the stand-in grid only replaces the network); the
weights come out of the shipped default model's checkpoint through rtseg's
restricted loader, in an nnU-Net child process, and round 0 is written as a
real checkpoint into ``tmp_path``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_bad_sites import GOOD, ReplayGrid, _arrays, _plan

from rtseg.errors import FederationError
from rtseg.federation.fingerprint import FingerprintAccumulator
from rtseg.federation.flower import Payload, Reply
from rtseg.federation.server_app import CoordinatorConfig, initialise, load_plan, run_round
from rtseg.federation.simulate import SimulationSpec, rounds_log
from rtseg.federation.start_model import load_start_model
from rtseg.model.checkpoints import load_checkpoint
from rtseg.model.default import default_model_dir
from rtseg.model.manifest import MANIFEST_NAME, load_manifest, model_hash
from rtseg.model.weights import load_arrays
from rtseg.structures import dataset_labels


class FingerprintGrid:
    """Answers the fingerprint query with given fingerprints and the prepare query with a time."""

    run_id = 7

    def __init__(self, labels: dict[int, dict[str, int]]) -> None:
        self.labels = labels
        self.sent: dict[str, list[Payload]] = {}

    def wait_for_nodes(self, minimum: int, timeout: float) -> list[int]:
        return list(self.labels)

    def send(self, kind: str, payloads: dict[int, Payload], timeout: float) -> list[Reply]:
        self.sent.setdefault(kind, []).extend(payloads.values())
        if kind == "query.fingerprint":
            return [Reply(n, Payload(config=_fingerprint(self.labels[n])), None, 100) for n in payloads]
        return [Reply(n, Payload(config={"seconds": 0.5}), None, 100) for n in payloads]


def _fingerprint(labels: dict[str, int]) -> dict[str, object]:
    rng = np.random.default_rng(0)
    accumulator = FingerprintAccumulator(labels)
    for _ in range(2):
        image = rng.integers(-1000, 1500, (8, 16, 16)).astype(np.int16)
        accumulator.add(image, (4.0, 3.0, 3.0), (image > -200).astype(np.uint8))
    return accumulator.result().to_record()


def _config(state: Path, min_sites: int) -> CoordinatorConfig:
    rc = SimulationSpec(min_sites=min_sites).run_config(state)
    rc["start-model"] = str(default_model_dir())
    return CoordinatorConfig.from_run_config(rc)


def test_round_0_is_the_start_models_weights_and_plans_and_other_labels_are_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = default_model_dir()
    other = {"background": 0, "Liver": 1}
    grid = FingerprintGrid({1: dataset_labels(), 2: dataset_labels(), 3: other})
    cfg = _config(tmp_path / "state", min_sites=2)
    with caplog.at_level(logging.WARNING, logger="rtseg"):
        plan = initialise(grid, [1, 2, 3], cfg)  # type: ignore[arg-type]

    model_plans = json.loads((model / "plans.json").read_text())
    # the model's plans (its network, patch, normalisation), for the sites' own dataset folder
    assert {**plan.plans, "dataset_name": model_plans["dataset_name"]} == model_plans
    assert plan.plans["dataset_name"] == "Dataset601_RtsegFederated"
    assert json.loads((tmp_path / "state" / "plans.json").read_text()) == plan.plans
    assert plan.dataset_json == json.loads((model / "dataset.json").read_text())
    # the sites resample to the model's spacing and preprocess with its plans
    (query,) = {json.dumps(p.config) for p in grid.sent["query.fingerprint"]}
    assert json.loads(query)["spacing"] == [4.0, 3.0, 3.0]
    assert {json.loads(str(p.config["plans"]))["dataset_name"] for p in grid.sent["query.prepare"]} == {
        "Dataset601_RtsegFederated"
    }
    # round 0: exactly the model's weights, every tensor (aliases restored in the checkpoint)
    start = load_arrays(tmp_path / "state" / "rounds" / "round_000.npz")
    weights = load_checkpoint(model / "fold_all" / "checkpoint_final.pth")["network_weights"]
    assert set(start) | set(plan.aliases) == set(weights)
    for key, array in start.items():
        np.testing.assert_array_equal(array, weights[key].numpy(), err_msg=key)
    written = load_checkpoint(
        tmp_path / "state" / "models" / "round_000" / "fold_all" / "checkpoint_final.pth"
    )
    for key, tensor in weights.items():
        np.testing.assert_array_equal(written["network_weights"][key].numpy(), tensor.numpy(), err_msg=key)
    # the site whose label table is not the model's is left out, with the reason
    assert plan.declared == {"1": 2, "2": 2}
    assert "site 3 refused: its labels {'background': 0, 'Liver': 1} are not the start model's" in caplog.text
    # which model round 0 is: in the state (a resumed coordinator keeps it) and round 0's manifest
    record = load_start_model(model).record
    assert plan.started_from == record == load_plan(tmp_path / "state").started_from
    assert load_manifest(tmp_path / "state" / "models" / "round_000").provenance["started_from"] == record


def test_the_start_model_record_is_its_manifest_name_version_and_hash() -> None:
    model = default_model_dir()
    manifest = load_manifest(model)
    assert load_start_model(model).record == {
        "name": manifest.name,
        "version": manifest.version,
        "hash": model_hash(model),
    }


@pytest.mark.parametrize(
    "started_from", [None, {"name": "rtseg-peds-abdomen", "version": "0.9.0", "hash": "0123456789ab"}]
)
def test_every_round_records_the_model_the_federation_started_from(
    tmp_path: Path, started_from: dict[str, str] | None
) -> None:
    """``rounds.jsonl`` and each round's manifest say it (null in ``rounds.jsonl``: random weights)."""
    rc = SimulationSpec(min_sites=1).run_config(tmp_path)
    plan = replace(_plan(), started_from=started_from)
    run_round(ReplayGrid(GOOD), CoordinatorConfig.from_run_config(rc), plan, _arrays(0.0), 1)  # type: ignore[arg-type]

    (line,) = rounds_log(tmp_path)
    assert line["started_from"] == started_from
    manifest = json.loads((tmp_path / "models" / "round_001" / MANIFEST_NAME).read_text())
    assert (
        manifest["provenance"].get("started_from") == started_from
    )  # (the stand-in plans fail load_manifest)


def test_too_few_sites_with_the_models_labels_stop_the_run_naming_the_reason(tmp_path: Path) -> None:
    grid = FingerprintGrid({1: dataset_labels(), 2: {"background": 0, "Liver": 1}})
    with pytest.raises(FederationError) as caught:
        initialise(grid, [1, 2], _config(tmp_path / "state", min_sites=2))  # type: ignore[arg-type]
    assert "1 fingerprints, fewer than min-sites 2" in str(caught.value)
    assert "site 2: its labels {'background': 0, 'Liver': 1} are not the start model's" in str(caught.value)
    assert not (tmp_path / "state" / "rounds").exists()  # nothing planned, no round 0


def test_a_start_model_that_is_not_a_model_folder_is_refused_before_any_site_is_asked(tmp_path: Path) -> None:
    grid = FingerprintGrid({1: dataset_labels()})
    rc = SimulationSpec(min_sites=1).run_config(tmp_path / "state")
    rc["start-model"] = str(tmp_path / "nothing")
    with pytest.raises(FederationError, match="start model"):
        initialise(grid, [1], CoordinatorConfig.from_run_config(rc))  # type: ignore[arg-type]
    assert not grid.sent


def test_the_coordinator_command_refuses_a_bad_start_model_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-model"
    run = subprocess.run(
        [sys.executable, "-m", "rtseg_app", "federation", "coordinator", "--state", str(tmp_path / "c")]
        + ["--insecure", "--start-model", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert str(missing) in line and "the start model cannot be used: model folder does not exist" in line
    assert not (tmp_path / "c").exists()  # refused before a SuperLink or state folder
