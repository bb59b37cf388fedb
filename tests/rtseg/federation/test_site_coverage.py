"""The coordinator learns per site how many cases carry each structure, and never which case.

The site side counts its cases' ``case.json`` states into the train reply;
the coordinator's ``run_round`` (driven with real replies as rtseg's ``Grid``
hands them over, the stand-in grid of test_bad_sites only replaces the network) writes them per
site into ``rounds.jsonl`` and ``coordinator.log``, leaves them out of the
weights, and drops counts no case can have.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from test_bad_sites import ReplayGrid

from rtseg.federation.flower import Payload, Reply
from rtseg.federation.server_app import CoordinatorConfig, Plan, run_round
from rtseg.federation.simulate import SimulationSpec, rounds_log
from rtseg.federation.task import Site, coverage_config
from rtseg.phantom.cohort import write_case
from rtseg.structures import STRUCTURES
from rtseg.study.partial import drop_structures

LABEL = {s.name: s.label for s in STRUCTURES}
PLAN = Plan(
    {"plans_name": "tiny"}, {"labels": {"background": 0, "Liver": 1}, "channel_names": {"0": "CT"}}, {}, {}
)


def _site(root: Path, partial: bool) -> Site:
    """Two phantom cases; with ``partial`` the second keeps only Liver and Kidney_L (as imported)."""
    data = root / "cases"
    write_case("A", 5, 0, data, matrix=48)
    second = write_case("A", 5, 1, data, matrix=48).case_id
    if partial:
        drop_structures(data / second, {"Liver", "Kidney_L"}, LABEL)
    return Site(root.name, data, root / "work")


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, int]]:
    root = tmp_path_factory.mktemp("sites")
    return {
        name: coverage_config(_site(root / name, partial=name == "partial")) for name in ("full", "partial")
    }


def test_a_site_reports_counts_per_structure_and_state_and_nothing_else(
    sites: dict[str, dict[str, int]],
) -> None:
    full, partial = sites["full"], sites["partial"]
    assert set(full) == {
        f"coverage.{s.name}.{state}" for s in STRUCTURES for state in ("contoured", "filled", "unknown")
    }
    assert all(isinstance(v, int) for v in full.values())  # numbers only: no case id, no name
    assert full["coverage.Stomach.contoured"] == 2 and full["coverage.Stomach.unknown"] == 0
    assert partial["coverage.Liver.contoured"] == partial["coverage.Kidney_L.contoured"] == 2
    assert partial["coverage.Stomach.contoured"] == 1 and partial["coverage.Stomach.unknown"] == 1


def test_the_coordinator_records_each_sites_coverage_per_round(
    sites: dict[str, dict[str, int]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    arrays = {"w": np.zeros((2, 3), np.float32)}
    forged = {"coverage.Liver.contoured": 10**9, "coverage.PatientName.contoured": 1, "coverage.Spleen.x": 1}
    replies = [
        Reply(1, Payload({"w": np.ones((2, 3), np.float32)}, _train(sites["full"])), None, 100),
        Reply(
            2, Payload({"w": np.ones((2, 3), np.float32)}, _train({**sites["partial"], **forged})), None, 100
        ),
    ]
    rc = SimulationSpec(min_sites=1).run_config(tmp_path)
    with caplog.at_level(logging.INFO, logger="rtseg.federation"):
        run_round(ReplayGrid(replies), CoordinatorConfig.from_run_config(rc), PLAN, arrays, 1)  # type: ignore[arg-type]
    (record,) = rounds_log(tmp_path)
    full, partial = record["sites"]["1"]["coverage"], record["sites"]["2"]["coverage"]
    assert full["Stomach"] == {"contoured": 2, "filled": 0, "unknown": 0}
    assert partial["Stomach"] == {
        "contoured": 1,
        "filled": 0,
        "unknown": 1,
    }  # fewer cases for the missing one
    assert partial["Kidney_L"]["contoured"] == 2
    assert "contoured" not in partial["Liver"] and "PatientName" not in partial  # forged counts left out
    assert "Spleen" in partial and "x" not in partial["Spleen"]
    assert record["sites"]["1"]["weight"] == record["sites"]["2"]["weight"] == 2.0  # counts weigh nothing
    assert "site 2 structures (contoured+filled of 2 cases): " in caplog.text
    assert "Stomach 1" in caplog.text and "Stomach 2" in caplog.text
    assert json.dumps(record).count("site-") == 0  # no case ids in the round record


def _train(coverage: dict[str, int]) -> dict[str, object]:
    return {"round": 1, "plans-hash": PLAN.hash, "cases": 2, "train-seconds": 1.0, **coverage}
