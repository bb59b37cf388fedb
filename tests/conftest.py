# --- shared fixtures added by the HTTP service (tests/service) -------------------------------
import socket as _socket
from pathlib import Path as _Path

import pytest as _pytest


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
    with _socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
