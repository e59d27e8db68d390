"""Network helpers shared by every layer (one definition each)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS says is free on ``host`` now (for tests, demos, benchmarks and local runs).

    The port is released before returning, so bind it promptly; loopback by default.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
