"""Loopback networking for the tests: the one place that finds a free TCP port."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago.

    Tests take the ``free_port`` fixture; helpers that need several ports (a node,
    Orthanc's DICOM and HTTP ports) call this function.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
