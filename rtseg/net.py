"""Loopback networking: the one place that finds a free TCP port.

Used where rtseg starts its own local peers (a simulated federation's SuperLink,
the benchmark's node and receiver) and by the tests' ``free_port`` fixture.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
