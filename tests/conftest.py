"""Fixtures shared by the test folders: a phantom series, a free loopback port, a running node."""

import os as _os
from pathlib import Path as _Path

import pytest as _pytest

from rtseg import net as _net

# Nodes and HTTP services started by the tests run the network on torch unless a test picks an
# engine: "auto" would export the model to OpenVINO in every new data directory (seconds per node
# start, hundreds of starts), and label assertions written against torch would then hold to Dice
# 0.99 only. The engines themselves are tested in tests/rtseg/model/test_runtimes.py, "auto"'s
# choice there and in tests/rtseg/test_worker.py.
_os.environ.setdefault("RTSEG_NODE_ENGINE", "torch")


@_pytest.fixture(scope="session")
def phantom_ct96(tmp_path_factory: _pytest.TempPathFactory) -> _Path:
    """A realistic phantom CT series (center A, seed 3, 96×96 matrix): the folder of its DICOM files."""
    from rtseg.phantom.cohort import case_id, write_case

    root = tmp_path_factory.mktemp("phantom96")
    write_case("A", 3, 0, root, matrix=96)
    return root / case_id("A", 3, 0) / "ct"


@_pytest.fixture
def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    return _net.free_port()


@_pytest.fixture
def running_node(tmp_path: _Path):  # type: ignore[no-untyped-def]
    """Factory: ``start(destinations, name="node", dicom={...}, node={...}, selection={...})``.

    Starts ``rtseg serve`` as a real child process (SCP on a free loopback port,
    worker with the default model, sender) with its own data directory and
    returns its ``NodeProcess`` (port, data_dir, log(), kill(), stop(), start()).
    Every node still running is stopped at teardown.
    """
    from node_helpers import NodeProcess

    nodes = []

    def start(destinations=None, name="node", **overrides):  # type: ignore[no-untyped-def]
        root = tmp_path / name
        root.mkdir()
        nodes.append(NodeProcess(root, destinations, **overrides).start())
        return nodes[-1]

    yield start
    for node in nodes:
        if node.proc is not None:
            node.stop()


# real CT series live in ../shared/realct beside the repository, never copied into the project
REALCT = _Path(__file__).resolve().parents[1].parent / "shared" / "realct"


@_pytest.fixture
def realct() -> _Path:
    """``../shared/realct`` beside the repository (public real series; see its README); skips where absent."""
    if not (REALCT / "README.md").is_file():
        _pytest.skip(f"real CT fixtures not found at {REALCT} (the shared folder beside the repository)")
    return REALCT
