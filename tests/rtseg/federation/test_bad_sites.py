"""The coordinator survives bad sites: malformed replies are dropped with a reason, weights are bounded.

``run_round`` is driven with real replies as rtseg's ``Grid`` hands them over
(Flower delivers whatever a site sends); the stand-in grid only replaces the
network. The round writes a real checkpoint and round record into ``tmp_path``.
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from rtseg.errors import FederationError
from rtseg.federation.aggregate import (
    AggregationPolicy,
    Rejection,
    Update,
    aggregate,
    screen,
    site_weights,
)
from rtseg.federation.flower import Payload, Reply
from rtseg.federation.server_app import CoordinatorConfig, Plan, run_round
from rtseg.federation.simulate import SimulationSpec, rounds_log

PLANS = {"plans_name": "tiny"}
DATASET = {"labels": {"background": 0, "Liver": 1}, "channel_names": {"0": "CT"}}


class ReplayGrid:
    """Stands in for the network: every ``train`` message is answered with the given replies."""

    run_id = 7

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies

    def wait_for_nodes(self, minimum: int, timeout: float) -> list[int]:
        return [r.node_id for r in self.replies]

    def send(self, kind: str, payloads: dict[int, Payload], timeout: float) -> list[Reply]:
        return self.replies


def _arrays(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), value, np.float32), "b": np.full(3, value, np.float32)}


def _plan(declared: dict[str, int] | None = None) -> Plan:
    return Plan(PLANS, DATASET, {}, declared or {"1": 10, "2": 10, "3": 10})


def _config(state: Path, **overrides: Any) -> CoordinatorConfig:
    rc = SimulationSpec(min_sites=1).run_config(state)
    rc.update(overrides)
    return CoordinatorConfig.from_run_config(rc)


def _reply(node: int, arrays: dict[str, np.ndarray], r: int = 1, **config: Any) -> Reply:
    plan = _plan()
    values = {"round": r, "plans-hash": plan.hash, "cases": 10, "train-seconds": 1.0, **config}
    return Reply(node, Payload(arrays, values), None, 1000)


GOOD = [_reply(1, _arrays(1.0)), _reply(2, _arrays(3.0))]

BAD_CONFIG: dict[str, tuple[dict[str, Any], str]] = {
    "negative cases": ({"cases": -5}, "cases"),
    "NaN cases": ({"cases": math.nan}, "cases"),
    "string cases": ({"cases": "12"}, "cases"),
    "bool cases": ({"cases": True}, "cases"),
    "10**30 cases": ({"cases": 10**30}, "cases"),
    "list cases": ({"cases": [1, 2]}, "cases"),
    "string round": ({"round": "one"}, "round"),
    "string train-seconds": ({"train-seconds": "fast"}, "train-seconds"),
    "NaN train-seconds": ({"train-seconds": math.nan}, "train-seconds"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CONFIG))
def test_a_reply_with_bad_numbers_is_dropped_with_its_reason_and_the_round_completes(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    values, word = BAD_CONFIG[kind]
    grid = ReplayGrid([*GOOD, _reply(3, _arrays(2.6), **values)])  # arrays that pass screening
    with caplog.at_level(logging.WARNING, logger="rtseg.federation"):
        new = run_round(grid, _config(tmp_path), _plan(), _arrays(0.0), 1)  # type: ignore[arg-type]
    np.testing.assert_allclose(new["w"], 2.0)  # the mean of the two good sites only
    (record,) = rounds_log(tmp_path)
    assert sorted(record["sites"]) == ["1", "2"]
    assert word in record["rejected"]["3"]
    assert f"site 3 rejected: {record['rejected']['3']}" in caplog.text


BAD_ARRAYS = {
    "int64 instead of float32": lambda a: {k: v.astype(np.int64) for k, v in a.items()},
    "float64 instead of float32": lambda a: {k: v.astype(np.float64) for k, v in a.items()},
    "complex": lambda a: {k: v.astype(np.complex64) for k, v in a.items()},
    "strings": lambda a: {k: np.full(v.shape, "x") for k, v in a.items()},
    "object array": lambda a: {k: np.array(v.tolist(), dtype=object) for k, v in a.items()},
    "+Inf": lambda a: {**a, "b": np.full(3, np.inf, np.float32)},
    "transposed": lambda a: {**a, "w": a["w"].T.copy()},
}


@pytest.mark.parametrize("kind", sorted(BAD_ARRAYS))
def test_an_update_with_bad_arrays_is_dropped_with_its_reason_and_the_round_completes(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    grid = ReplayGrid([*GOOD, _reply(3, BAD_ARRAYS[kind](_arrays(5.0)))])
    with caplog.at_level(logging.WARNING, logger="rtseg.federation"):
        new = run_round(grid, _config(tmp_path), _plan(), _arrays(0.0), 1)  # type: ignore[arg-type]
    np.testing.assert_allclose(new["w"], 2.0)
    assert new["w"].dtype == np.float32
    (record,) = rounds_log(tmp_path)
    assert sorted(record["sites"]) == ["1", "2"] and "3" in record["rejected"]
    assert "update of site 3 rejected" in caplog.text


def test_an_object_array_on_the_wire_becomes_a_failed_reply_not_an_exception(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    from rtseg.federation.flower import Grid, payload_from_content

    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, 2], dtype=object), allow_pickle=True)  # a site can send this
    pickled = Array(dtype="object", shape=(2,), stype="numpy.ndarray", data=buf.getvalue())
    content = RecordDict({"arrays": ArrayRecord({"w": pickled}), "config": ConfigRecord({"cases": 1})})
    with pytest.raises(FederationError, match=r"array 'w' \(dtype object\) is unreadable"):
        payload_from_content(content)
    # real Flower messages need the identity Flower's runtime sets in its processes
    for name in ("run_id", "node_id", "task_id"):
        monkeypatch.setattr(TaskIdentity, f"_{name}", 1)
    sent = Message(RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=5, message_type="train")
    good = Message(RecordDict({"config": ConfigRecord({"cases": 1})}), reply_to=sent)
    bad = Message(content, reply_to=sent)

    class Network:  # what Flower's grid hands back: one readable reply, one with a pickled array
        def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
            return [good, bad]

    ok, failed = Grid(Network()).send("train", {5: Payload()}, 1.0)  # type: ignore[arg-type]
    assert ok.payload is not None and ok.payload.config == {"cases": 1}
    assert failed.node_id == 5 and failed.payload is None and "unreadable" in str(failed.error)


@pytest.mark.parametrize(
    "record",
    [
        {"labels": "{not json"},
        {"labels": '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}"},  # json: RecursionError; the run stopped
        {"spacings": "abc"},
        {"histogram": None},
        {"count": "many"},
    ],
    ids=["bad-json", "nested-json", "string-spacings", "no-histogram", "string-count"],
)
def test_a_malformed_fingerprint_is_rejected_with_its_reason(record: dict[str, Any]) -> None:
    from rtseg.federation.fingerprint import N_BINS
    from rtseg.federation.server_app import fingerprint_from_reply

    good = {
        "labels": json.dumps(DATASET["labels"]),
        "spacings": [3.0, 1.0, 1.0],
        "shapes": [9, 11, 13],
        "histogram": [0] * N_BINS,
        "count": 0,
        "total": 0.0,
        "total-sq": 0.0,
    }
    assert fingerprint_from_reply(Payload(config=good), "4").n_cases == 1  # type: ignore[union-attr]
    got = fingerprint_from_reply(Payload(config={**good, **record}), "4")
    assert isinstance(got, Rejection) and got.site == "4" and "fingerprint" in got.reason


def test_too_few_usable_replies_fail_the_round_with_the_reasons(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    grid = ReplayGrid([_reply(1, _arrays(1.0)), _reply(2, _arrays(3.0), cases="many")])
    with pytest.raises(
        FederationError, match=r"round 1: 1 usable updates?, fewer than min-sites 2.*site 2: cases"
    ):
        run_round(grid, _config(tmp_path, **{"min-sites": 2}), _plan(), _arrays(0.0), 1)  # type: ignore[arg-type]
    assert not (tmp_path / "rounds").exists()


def test_a_site_claiming_a_billion_cases_gets_at_most_the_bounded_share(tmp_path: Path) -> None:
    # it also declared a billion in the fingerprint round, so the declared cap does not help
    plan = _plan({"1": 30, "2": 10**9})
    grid = ReplayGrid([_reply(1, _arrays(1.0), cases=30), _reply(2, _arrays(9.0), cases=10**9)])
    new = run_round(grid, _config(tmp_path, **{"max-cases": 10**12}), plan, _arrays(0.0), 1)  # type: ignore[arg-type]
    share = (float(new["w"][0, 0]) - 1.0) / (9.0 - 1.0)
    assert share == pytest.approx(0.5, abs=1e-6)  # default max-share
    (record,) = rounds_log(tmp_path)
    assert record["sites"]["2"]["share"] == pytest.approx(0.5)


def test_the_share_bound_holds_for_every_number_of_sites() -> None:
    from rtseg.federation.aggregate import bounded_shares

    for weights, bound in (([1.0, 1e9], 0.5), ([5.0, 1.0, 1e12], 0.4), ([3.0, 1.0, 1.0, 1e6], 0.3)):
        shares = bounded_shares(weights, bound)
        assert sum(shares) == pytest.approx(1.0) and max(shares) <= bound + 1e-12
    assert bounded_shares([3.0, 1.0, 1.0, 1.0], 0.5) == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6])
    assert bounded_shares([3.0, 1.0], 1.0) == pytest.approx([0.75, 0.25])  # bound 1: plain FedAvg


@pytest.mark.parametrize("method", ["median", "trimmed-mean"])
@pytest.mark.parametrize("factor", [-1.0, -3.0, 3.0])
def test_robust_methods_with_one_poisoned_site_of_three_stay_near_the_honest_mean(
    method: str, factor: float
) -> None:
    rng = np.random.default_rng(0)
    reference = {"w": rng.normal(0, 1, (64, 32)).astype(np.float32)}
    step = rng.normal(0, 0.05, (64, 32))
    honest = [
        {"w": (reference["w"] + step + rng.normal(0, 0.01, step.shape)).astype(np.float32)} for _ in range(3)
    ]
    policy = AggregationPolicy(method)
    ideal = aggregate([Update(str(i), a, 10) for i, a in enumerate(honest)], [1.0] * 3, reference, policy)
    poisoned = {"w": (reference["w"] + factor * (honest[2]["w"] - reference["w"])).astype(np.float32)}
    updates = [Update("0", honest[0], 10), Update("1", honest[1], 10), Update("2", poisoned, 10)]
    fit, _ = screen(updates, reference, policy)
    new = aggregate(fit, site_weights(fit, {}, policy), reference, policy)
    error = np.linalg.norm(new["w"] - ideal["w"]) / np.linalg.norm(ideal["w"] - reference["w"])
    fedavg = aggregate(fit, site_weights(fit, {}, policy), reference, AggregationPolicy())
    assert error < 0.25, error  # the honest sites differ from each other by ~0.2 of the step
    assert np.linalg.norm(fedavg["w"] - ideal["w"]) > np.linalg.norm(new["w"] - ideal["w"])


def test_robust_aggregation_is_selected_from_the_run_config(tmp_path: Path) -> None:
    for method in ("median", "trimmed-mean"):
        cfg = _config(tmp_path, aggregation=method, **{"max-share": 0.4})
        assert cfg.policy.method == method and cfg.policy.max_share == 0.4
    assert (
        json.loads(json.dumps(SimulationSpec(aggregation="median").run_config(tmp_path)))["max-share"] == 0.5
    )
