"""`rtseg model`: no state without a data directory; provenance a reviewer can read (issue 19 point 6)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RTSEG = [sys.executable, "-m", "rtseg_app"]


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RTSEG, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def test_model_list_without_a_data_directory_writes_nothing(tmp_path: Path) -> None:
    run = _run(tmp_path, "model", "list")
    assert run.returncode == 0, run.stderr
    assert _files(tmp_path) == []  # no ./rtseg-data, no registry copy of the 5.5 MB model
    assert "no data directory given; a node starts with the embedded default model" in run.stdout
    rows = [line for line in run.stdout.splitlines() if "rtseg-peds-abdomen" in line]
    assert len(rows) == 1 and rows[0].startswith("* local/r0/")


def test_model_list_of_a_data_directory_without_registry_writes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    run = _run(tmp_path, "model", "list", "--data-dir", str(data))
    assert run.returncode == 0, run.stderr
    assert f"no registry yet in {data.resolve() / 'models'}" in run.stdout
    assert _files(tmp_path) == [data]


@pytest.mark.parametrize(
    "args", [("promote", "local/r0/0123456789ab"), ("rollback",), ("gate", "--candidate", "m", "--data", "d")]
)
def test_mutating_model_commands_need_a_data_directory(tmp_path: Path, args: tuple[str, ...]) -> None:
    run = _run(tmp_path, "model", *args)
    assert run.returncode == 2
    assert (
        f"rtseg model: error: `model {args[0]}` changes a node's model registry" in run.stderr
        and "--data-dir DIR or --config FILE" in run.stderr
    )
    assert "Traceback" not in run.stderr
    assert _files(tmp_path) == []


def test_model_info_prints_readable_provenance(tmp_path: Path) -> None:
    run = _run(tmp_path, "model", "info")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "{" not in out and "}" not in out  # no raw Python dicts
    assert "made by: rtseg model build-default" in out
    assert "training data: rtseg phantom, centers A, B, 60 cases per center, matrix 256" in out
    assert "federation: none (trained at one place)" in out
    assert "gate: not recorded in the model" in out
    assert "realistic phantoms: 40 per center from stage 7 (clinical-nopv, on a couch)" in out
    assert "left nephrectomies with the spleen sunk into the empty fossa: 10 per center from stage 11" in out
    assert "accuracy: mean OAR Dice 0.912, 0.904 and 0.898 on three sets of 10 fresh phantom cases" in out
    assert "NOT FOR CLINICAL USE: trained on synthetic phantoms only" in out
    assert _files(tmp_path) == []


def test_a_federated_rounds_start_model_is_printed_readably() -> None:
    from rtseg.cli_commands import provenance_lines

    start = {"name": "rtseg-peds-abdomen", "version": "0.9.0", "hash": "0123456789ab"}
    lines = provenance_lines(
        "fl", "rtseg-r3-abcdef", {"federation": "rtseg", "federation_round": 3, "started_from": start}
    )
    assert "started from: rtseg-peds-abdomen 0.9.0 (hash 0123456789ab)" in lines
    recipe = provenance_lines("m", "1", {"started_from": "rtseg-peds-abdomen 0.8.0 (stages 1-6)"})
    assert "started from: rtseg-peds-abdomen 0.8.0 (stages 1-6)" in recipe


def test_models_of_the_later_recipes_show_their_measured_accuracy() -> None:
    """A model built with ``build-default --recipe 1.x`` says what docs/model.md measured for it."""
    from rtseg.cli_commands import provenance_lines

    for version, figure in (("1.0.0", "0.893"), ("1.1.0", "0.903"), ("1.2.0", "0.909"), ("1.3.0", "0.912")):
        lines = provenance_lines("rtseg-peds-abdomen", version, {})
        assert any(line.startswith(f"accuracy: mean OAR Dice {figure}") for line in lines), version
    assert "accuracy: not documented" in " ".join(provenance_lines("rtseg-peds-abdomen", "1.4.0", {}))
