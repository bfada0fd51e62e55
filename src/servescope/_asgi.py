"""Serving an ASGI app with hypercorn inside the caller's task group.

hypercorn's asyncio and trio ``serve`` differ in how they report their address, so
we bind and listen on the socket ourselves (the port is known before hypercorn
starts, and connections queue in the backlog meanwhile) and hand it over by
overriding ``Config.create_sockets``. Binding and listening are separate steps
(``bound_socket``, then ``listen``) for a server that holds its port before it accepts.
A ``shutdown_trigger`` is always passed: without one hypercorn installs process signal
handlers, which a library must not.

Out of file descriptors, both loops' accept loops log a traceback per failed
``accept()``: asyncio's (``selector_events``) through the loop's exception handler, which
logs "socket.accept() out of system resource" on the ``asyncio`` logger ``backlog`` times
per wake-up (thousands a second); trio's (``serve_listeners``) "accept returned EMFILE ..."
on ``trio.serve_listeners`` every 100 ms. asyncio also schedules a retry per failed accept
(python/cpython#151615); those that fire once the socket is closed log "Exception in
callback BaseSelectorEventLoop._start_serving(...)" with a ValueError each. While
``serve_asgi`` runs, a filter on those two loggers lets one such record a minute through
(the first with its traceback) and touches no other record; when hypercorn has closed the
socket, the retries still pending are cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    on_trio = _running_trio()
    if on_trio:
        from hypercorn.trio import serve as serve_on_loop
    else:
        from hypercorn.asyncio import serve as serve_on_loop  # type: ignore[assignment]
    stop = anyio.Event()
    serving = anyio.CancelScope(shield=True)

    async def run() -> None:
        with serving:
            try:
                await serve_on_loop(app, config, shutdown_trigger=stop.wait)
            finally:
                if not on_trio:
                    _cancel_accept_retries(sock)

    with _ACCEPT_ERRORS_QUIETED.installed():
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                stop.set()
                serving.deadline = anyio.current_time() + shutdown_grace + 1.0


#: How each loop's accept loop words "accept() failed for want of descriptors or memory",
#: by logger (asyncio's ``selector_events``, trio's ``_highlevel_serve_listeners``), and
#: how asyncio words the failure of a retry that fired after the socket was closed.
ACCEPT_ERRORS = {
    "asyncio": (
        "socket.accept() out of system resource",
        "Exception in callback BaseSelectorEventLoop._start_serving(",
    ),
    "trio.serve_listeners": ("accept returned ",),
}
#: At most one accept error is logged per this many seconds.
ACCEPT_ERROR_INTERVAL = 60.0


def is_accept_error(record: logging.LogRecord) -> bool:
    """Whether ``record`` is a loop's report that ``accept()`` ran out of resources."""
    prefixes = ACCEPT_ERRORS.get(record.name, ())
    return isinstance(record.msg, str) and record.msg.startswith(prefixes)


class AcceptErrorThrottle(logging.Filter):
    """Lets one accept error per ``interval`` through, the first with its traceback and
    later ones with a count of those dropped instead; passes every other record untouched."""

    def __init__(
        self,
        interval: float = ACCEPT_ERROR_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()  # loops in several threads may log at once
        self._next: float | None = None
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not is_accept_error(record):
            return True
        now = self._clock()
        with self._lock:
            first = self._next is None
            if self._next is not None and now < self._next:
                self._dropped += 1
                return False
            self._next = now + self._interval
            dropped, self._dropped = self._dropped, 0
        if not first:
            record.exc_info = record.exc_text = None
            record.msg = f"{record.msg} ({dropped} more since the last, not logged)"
        return True


class SharedFilter:
    """A filter on some loggers while anyone uses it: added by the first user, removed by
    the last (several servers may run at once, on loops in several threads)."""

    def __init__(self, logger_names: tuple[str, ...], make: Callable[[], logging.Filter]) -> None:
        self._loggers = [logging.getLogger(name) for name in logger_names]
        self._make = make
        self._lock = threading.Lock()
        self._users = 0
        self._filter: logging.Filter | None = None

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Keeps the filter on the loggers for the duration of the ``with`` block."""
        with self._lock:
            if self._users == 0:
                self._filter = self._make()
                for logger in self._loggers:
                    logger.addFilter(self._filter)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._filter is not None:
                    for logger in self._loggers:
                        logger.removeFilter(self._filter)
                    self._filter = None


_ACCEPT_ERRORS_QUIETED = SharedFilter(tuple(ACCEPT_ERRORS), AcceptErrorThrottle)


def _cancel_accept_retries(sock: socket.socket) -> None:
    """Cancel the accept retries asyncio still holds for ``sock``, closed by now: each
    would log a ValueError traceback (python/cpython#151615). Private loop attributes,
    read defensively: a loop without them (or without the bug) has nothing to cancel."""
    loop = asyncio.get_running_loop()
    start_serving = getattr(loop, "_start_serving", None)
    for handle in list(getattr(loop, "_scheduled", ())):
        args = getattr(handle, "_args", None) or ()
        if getattr(handle, "_callback", None) == start_serving and any(a is sock for a in args):
            handle.cancel()


def _running_trio() -> bool:
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True
