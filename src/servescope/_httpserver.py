"""The front's HTTP/1.1 server: h11's state machine over anyio streams, a task per
connection, keep-alive, chunked streaming, and a client's disconnect noticed at once.

hypercorn (the dummy's server) spends most of its time on ASGI plumbing: a task and a
dozen message dicts per request. A router front does little per request beyond moving
bytes, so this server is h11 — the parser hypercorn and httpx use — with no layer
between it and the handler: a handler gets the whole ``Request`` (the body read, capped)
and answers through a ``Responder``, whole (``respond``) or streamed (``start``,
``send``). While the handler runs, a watcher reads the connection: the client closing
it cancels the handler at once, so a proxied request's upstream connection is closed
and the engine aborts the generation instead of decoding for nobody.

Limits, each answered as HTTP says (and the connection closed): a request head over
``MAX_HEAD`` bytes → 431, a body over ``max_body`` → 413, a request that does not
parse → 400, a request not complete ``REQUEST_TIMEOUT`` s after its first byte → 408
(a slow client cannot hold a connection for ever), an idle keep-alive connection is
closed after ``KEEPALIVE_TIMEOUT`` s. A handler's bug is a 500 and a logged traceback,
never the end of the server.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import anyio
import anyio.abc
import h11
from anyio.abc import TaskStatus

__all__ = ["ClientGone", "Request", "Responder", "serve_http"]

logger = logging.getLogger("servescope.front")

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
REQUEST_TIMEOUT = 30.0
KEEPALIVE_TIMEOUT = 75.0  # longer than clients keep idle connections (httpx: 5 s)
_READ_SIZE = 65536
_SERVER = (b"server", b"servescope")

Headers = list[tuple[bytes, bytes]]


class ClientGone(Exception):
    """The client closed the connection (or it broke) before the answer was sent."""


@dataclass(frozen=True)
class Request:
    """One HTTP request, its body read whole."""

    method: str
    path: str
    query: str
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lower case), if any."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None


class Responder:
    """How a handler answers: ``respond`` (a whole body) or ``start`` + ``send`` (a
    streamed body, chunked). ``ClientGone`` if the client is no longer there."""

    def __init__(self, stream: anyio.abc.ByteStream, conn: h11.Connection) -> None:
        self._stream = stream
        self._conn = conn
        self.status: int | None = None  # once started
        self.sent = 0  # body bytes

    @property
    def started(self) -> bool:
        """Whether the status line has gone out."""
        return self.status is not None

    async def respond(
        self, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]]
    ) -> None:
        """The whole answer at once, with its length."""
        head = [*headers, (b"content-length", b"%d" % len(body)), _SERVER]
        conn = self._conn
        data = conn.send(h11.Response(status_code=status, headers=head)) or b""
        if body:
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        self.status, self.sent = status, len(body)
        await self._write(data)

    async def start(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """The status and headers of a streamed answer (chunked on HTTP/1.1)."""
        self.status = status
        await self._write(
            self._conn.send(h11.Response(status_code=status, headers=[*headers, _SERVER])) or b""
        )

    async def send(self, chunk: bytes) -> None:
        """A piece of a streamed answer's body."""
        if chunk:
            self.sent += len(chunk)
            await self._write(self._conn.send(h11.Data(data=chunk)) or b"")

    async def end(self) -> None:
        """The end of a streamed answer."""
        await self._write(self._conn.send(h11.EndOfMessage()) or b"")

    async def _write(self, data: bytes) -> None:
        try:
            await self._stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise ClientGone(f"the client went away: {exc!r}") from None


Handler = Callable[[Request, Responder], Awaitable[None]]


async def serve_http(
    handler: Handler,
    sock: socket.socket,
    *,
    max_body: int = MAX_BODY,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on the listening ``sock`` until cancelled (connections are
    then closed, their handlers cancelled)."""
    listener = await anyio.abc.SocketListener.from_socket(sock)
    async with listener, anyio.create_task_group() as tg:
        task_status.started()
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # out of descriptors: wait, do not spin
                logger.warning("front: accept failed: %s", exc)
                await anyio.sleep(0.1)
                continue
            tg.start_soon(_Connection(stream, handler, max_body).run)


class _Connection:
    def __init__(self, stream: anyio.abc.SocketStream, handler: Handler, max_body: int) -> None:
        self.stream = stream
        self.handler = handler
        self.max_body = max_body
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.client_closed = False

    async def run(self) -> None:
        try:
            async with self.stream:
                while await self._one():
                    self.conn.start_next_cycle()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ClientGone):
            pass  # the client went away between requests: nothing to answer

    async def _one(self) -> bool:
        """Serve one request; whether the connection can take another."""
        request = await self._read()
        if request is None:
            return False
        responder = Responder(self.stream, self.conn)
        failure: Exception | None = None
        self.client_closed = False
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch, tg.cancel_scope)
            try:
                await self.handler(request, responder)
                if not responder.started:
                    raise RuntimeError("the handler returned without answering")
                if self.conn.our_state is h11.SEND_BODY:
                    await responder.end()
            except Exception as exc:  # raised after the group, where it cannot be wrapped
                failure = exc
            tg.cancel_scope.cancel()
        if self.client_closed or isinstance(failure, ClientGone):
            return False
        if failure is not None:
            logger.error("front: %s %s failed", request.method, request.path, exc_info=failure)
            if not responder.started:
                await self._error(500, "internal error in the front; see its log")
            return False
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    async def _watch(self, scope: anyio.CancelScope) -> None:
        """Until the client closes the connection (the handler is then cancelled) or
        sends more (a pipelined request, kept for later)."""
        try:
            data = await self.stream.receive(_READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            data = b""
        except anyio.ClosedResourceError:
            return
        if data:
            self.conn.receive_data(data)
            return
        self.client_closed = True
        logger.debug("front: the client closed its connection; its request is cancelled")
        scope.cancel()

    async def _read(self) -> Request | None:
        """The next request, or ``None`` when the connection is done (closed, idle too
        long, or answered with an error)."""
        conn = self.conn
        head: h11.Request | None = None
        body = bytearray()
        deadline: float | None = None
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._error(exc.error_status_hint, f"malformed request: {exc}")
                return None
            if event is h11.NEED_DATA:
                if head is not None and conn.they_are_waiting_for_100_continue:
                    await self.stream.send(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                    )
                if deadline is None and (head is not None or conn.trailing_data[0]):
                    deadline = anyio.current_time() + REQUEST_TIMEOUT
                limit = KEEPALIVE_TIMEOUT if deadline is None else deadline - anyio.current_time()
                data = None
                with anyio.move_on_after(max(0.0, limit)):
                    try:
                        data = await self.stream.receive(_READ_SIZE)
                    except anyio.EndOfStream:
                        data = b""
                if data is None:
                    if deadline is not None:
                        await self._error(408, "the request was not complete in time")
                    return None
                if deadline is None and data:
                    deadline = anyio.current_time() + REQUEST_TIMEOUT
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                head = event
                # h11 checks the size of an incomplete head only: one read whole is not.
                size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
                if size > MAX_HEAD:
                    await self._error(431, f"request head over {MAX_HEAD} bytes")
                    return None
                length = _content_length(event.headers)
                if length is not None and length > self.max_body:
                    await self._error(413, f"request body over {self.max_body} bytes")
                    return None
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.max_body:
                    await self._error(413, f"request body over {self.max_body} bytes")
                    return None
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                target = head.target.decode("latin-1")
                path, _, query = target.partition("?")
                return Request(
                    head.method.decode("latin-1"), path, query, list(head.headers), bytes(body)
                )
            else:  # ConnectionClosed, PAUSED: nothing more to read
                return None

    async def _error(self, status: int, message: str) -> None:
        """A plain error answer, then the connection is closed."""
        body = b'{"error": {"message": %s, "type": "invalid_request_error", "code": %d}}' % (
            _json_text(message),
            status,
        )
        reason = _REASONS.get(status, b"Error")
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n" % (status, reason)
        head += b"content-length: %d\r\nconnection: close\r\nserver: servescope\r\n\r\n" % len(body)
        try:
            await self.stream.send(head + body)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass


_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
}


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _json_text(text: str) -> bytes:
    return json.dumps(text).encode()
