"""Serving an ASGI app with hypercorn inside the caller's task group.

hypercorn's asyncio and trio ``serve`` differ in how they report their address, so
we bind and listen on the socket ourselves (the port is known before hypercorn
starts, and connections queue in the backlog meanwhile) and hand it over by
overriding ``Config.create_sockets``. Binding and listening are separate steps
(``bound_socket``, then ``listen``) for a server that holds its port before it accepts.
A ``shutdown_trigger`` is always passed: without one hypercorn installs process signal
handlers, which a library must not.
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
from typing import Any

import anyio
from anyio.abc import TaskStatus
from hypercorn.config import Config, Sockets

__all__ = ["bound_socket", "listen_socket", "serve_asgi"]

logger = logging.getLogger("servescope.dummy")


def bound_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A TCP socket bound to ``(host, port)``, not listening: the port is held, connections
    are refused. ``SO_REUSEADDR`` lets it bind while the port's old connections linger in
    TIME_WAIT (~60 s after a restart); ``TCP_NODELAY`` because keep-alive replies otherwise
    wait ~40 ms for delayed ACKs on loopback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def listen_socket(host: str = "127.0.0.1", port: int = 0, *, backlog: int = 1024) -> socket.socket:
    """A ``bound_socket`` listening with a backlog sized for the expected load."""
    sock = bound_socket(host, port)
    try:
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class _SocketConfig(Config):
    def __init__(self, sock: socket.socket, tls: ssl.SSLContext | None, backlog: int) -> None:
        super().__init__()
        self._sock = sock
        self._tls = tls
        self.backlog = backlog  # hypercorn calls listen() again with this
        self.accesslog = None
        self.errorlog = logger
        self.keep_alive_timeout = 75.0

    @property
    def ssl_enabled(self) -> bool:
        return self._tls is not None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._tls

    def create_sockets(self) -> Sockets:
        if self._tls is not None:
            return Sockets([self._sock], [], [])
        return Sockets([], [self._sock], [])


async def serve_asgi(
    app: Any,
    sock: socket.socket,
    *,
    tls: ssl.SSLContext | None = None,
    backlog: int = 1024,
    shutdown_grace: float = 5.0,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on the listening ``sock`` until cancelled, then shut down gracefully.

    hypercorn runs shielded so that cancellation becomes its own graceful shutdown
    (bounded by ``shutdown_grace``) instead of an abrupt stop in the middle of a reply.
    """
    config = _SocketConfig(sock, tls, backlog)
    config.graceful_timeout = shutdown_grace
    if _running_trio():
        from hypercorn.trio import serve as serve_on_loop
    else:
        from hypercorn.asyncio import serve as serve_on_loop  # type: ignore[assignment]
    stop = anyio.Event()
    serving = anyio.CancelScope(shield=True)

    async def run() -> None:
        with serving:
            await serve_on_loop(app, config, shutdown_trigger=stop.wait)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            stop.set()
            serving.deadline = anyio.current_time() + shutdown_grace + 1.0


def _running_trio() -> bool:
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True
