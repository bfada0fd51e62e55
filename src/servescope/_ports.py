"""Choosing a port for a launched server.

We cannot bind a port on the server's behalf, so there is always a window between
checking that a port is free and the server binding it. That race is made harmless
elsewhere: ``Address already in use`` is a retryable start failure and the next
attempt gets another port. Here we only make collisions rare: a random base per
process plus a per-rank offset (jobs starting together on one node spread out), below
the kernel's ephemeral range (which outgoing connections take from at any time).
"""

from __future__ import annotations

import errno
import random
import socket
from collections.abc import Container

__all__ = ["is_port_free", "pick_port"]

PORT_LOW = 20000
PORT_HIGH = 32000  # Linux's ephemeral range starts at 32768
SCAN = 200
RANK_STRIDE = 16


def is_port_free(port: int) -> bool:
    """Whether nothing listens on ``port`` on any IPv4 address (a check, not a claim)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def pick_port(
    rank: int = 0, *, avoid: Container[int] = (), rng: random.Random | None = None
) -> int:
    """A port that looked free just now, starting from a random base plus ``rank``'s offset."""
    rng = rng or random.Random()
    span = PORT_HIGH - PORT_LOW
    start = rng.randrange(span) + rank * RANK_STRIDE
    for step in range(SCAN):
        port = PORT_LOW + (start + step) % span
        if port not in avoid and is_port_free(port):
            return port
    raise OSError(
        errno.EADDRINUSE, f"no free port among {SCAN} tried from {PORT_LOW + start % span}"
    )
