"""The front's HTTP/1.1 server: httptools (llhttp, the C parser uvicorn uses) over anyio
streams, two tasks per connection, keep-alive, chunked streaming, and a client's
disconnect noticed at once.

hypercorn (the dummy's server) spends most of its time on ASGI plumbing: a task and a
dozen message dicts per request. h11 (this server's first parser; hypercorn's and httpx's)
costs less but still builds, validates and state-checks an event object for every head,
piece of body and end of message, in Python. A router front does little per request beyond
moving bytes, so this server is llhttp's callbacks (URL, headers, body, end of message) and
responses written by hand, with no layer between them and the handler: a handler gets the
whole ``Request`` (the body read, capped) and answers through a ``Responder``, whole
(``respond``: with its ``content-length``) or streamed (``start``, ``send``: chunked on
HTTP/1.1, close-delimited for an HTTP/1.0 client). The header names and values a handler
passes are checked (a token; no CR, LF or NUL in a value): a bad one is the handler's bug,
answered 500, never a split response.

Each connection has a reader task for its whole life: it feeds the parser what arrives,
queues the complete requests (pipelined ones are answered in order; it stops reading
while one waits behind a request being handled) and, when the client closes the
connection, cancels the connection, so a handler under way is cancelled at once: a proxied
request's upstream connection is closed and the engine aborts the generation instead of
decoding for nobody. The connection's own task answers the queued requests one by one. No
task, task group or cancel scope per request: one timer (a cancel scope around the reader)
is armed per connection and moved only when a request is left incomplete by a read; the
deadlines themselves are kept as plain numbers and checked when the timer goes off.

Limits, each answered as HTTP says (and the connection closed): a request head over
``MAX_HEAD`` bytes → 431, a body over ``max_body`` → 413, a request that does not parse
(or asks to upgrade the connection with a body) → 400, a request not complete
``REQUEST_TIMEOUT`` s after its first byte → 408 (a slow client cannot hold a connection
for ever), an idle keep-alive connection is closed after ``KEEPALIVE_TIMEOUT`` s. An
``Expect: 100-continue`` is answered before the body is read. A handler's bug is a 500 and a
logged traceback, never the end of the server; so is a handler that returns without
answering.
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from time import monotonic
from typing import TypeAlias

import anyio
import anyio.abc
import httptools
from anyio.abc import TaskStatus

__all__ = ["ClientGone", "Request", "Responder", "serve_http"]

logger = logging.getLogger("servescope.front")

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
REQUEST_TIMEOUT = 30.0
KEEPALIVE_TIMEOUT = 75.0  # longer than clients keep idle connections (httpx: 5 s)
_READ_SIZE = 65536
_MAX_QUEUED = 8  # complete requests read ahead (pipelined) before the reader waits
_SERVER = b"server: servescope\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

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

    def __init__(
        self, stream: anyio.abc.ByteStream, keep_alive: bool, http11: bool, bodiless: bool
    ) -> None:
        self._stream = stream
        self._http11 = http11
        self._bodiless = bodiless  # a HEAD request: heads only
        self._chunked = False
        self.keep_alive = keep_alive  # whether the connection can take another request
        self.ended = False  # the whole answer is out
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
        head, close = _head(status, headers)
        if close:
            self.keep_alive = False
        if status < 200 or status in (204, 304):
            framing = b""  # no body, no length
            body = b""
        else:
            framing = b"content-length: %d\r\n" % len(body)
        if not self.keep_alive:
            framing += b"connection: close\r\n"
        elif not self._http11:
            framing += b"connection: keep-alive\r\n"
        self.status, self.sent, self.ended = status, len(body), True
        if self._bodiless:
            body = b""
        await self._write(b"%s%s%s\r\n%s" % (head, framing, _SERVER, body))

    async def start(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """The status and headers of a streamed answer (chunked on HTTP/1.1)."""
        head, close = _head(status, headers)
        if close or not self._http11:
            self.keep_alive = False  # the body ends with the connection
        if self._http11:
            self._chunked = True
            framing = b"transfer-encoding: chunked\r\n"
            if close or not self.keep_alive:
                framing += b"connection: close\r\n"
        else:
            framing = b"connection: close\r\n"
        self.status = status
        await self._write(b"%s%s%s\r\n" % (head, framing, _SERVER))

    async def send(self, chunk: bytes) -> None:
        """A piece of a streamed answer's body."""
        if self.status is None or self.ended:
            raise RuntimeError("send() before start() or after the end of the answer")
        if chunk and not self._bodiless:
            self.sent += len(chunk)
            if self._chunked:
                await self._write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            else:
                await self._write(chunk)

    async def end(self) -> None:
        """The end of a streamed answer."""
        if self.ended:
            return
        self.ended = True
        if self._chunked and not self._bodiless:
            await self._write(b"0\r\n\r\n")

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


@dataclass(frozen=True)
class _Failure:
    """A request refused while it was read: answered in its turn, then the end."""

    status: int
    message: str


_CLOSE = _Failure(0, "")  # no more requests on this connection (it asked for an upgrade)
_Item: TypeAlias = tuple[Request, bool, bool] | _Failure  # (request, keep-alive, HTTP/1.1)
_DISCONNECTED = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ClientGone)


class _Refused(Exception):
    """Raised in a parser callback to stop the parser (the reason is in ``failure``)."""


class _Connection:
    """One client connection: ``run`` answers its requests, ``_read`` reads them."""

    def __init__(self, stream: anyio.abc.SocketStream, handler: Handler, max_body: int) -> None:
        self.stream = stream
        self.handler = handler
        self.max_body = max_body
        self.parser = httptools.HttpRequestParser(self)
        # llhttp refuses every control character in a header value, h11 (and this server
        # before it) only NUL: lenient here, NUL refused in ``on_header``. CR and LF stay
        # line ends, and the framing checks (one length, not with chunked) stay strict.
        self.parser.set_dangerous_leniencies(lenient_headers=True)
        self.ready: deque[_Item] = deque()  # complete requests, in order
        self.scope = anyio.CancelScope()  # the connection's: cancelled when it is done
        self.timer: anyio.CancelScope | None = None  # around the reader: its timeouts
        self.armed = math.inf  # when the timer goes off (monotonic)
        self.waiter: anyio.Event | None = None  # the answering task, waiting for a request
        self.resume: anyio.Event | None = None  # the reader, waiting for the queue to drain
        self.busy = False  # a request taken, not answered yet
        self.idle_since = monotonic()
        # the request being read
        self.in_message = False
        self.in_head = False
        self.began = 0.0
        self.head_bytes = 0  # received while the head is incomplete
        self.url = b""
        self.headers: Headers = []
        self.body: list[bytes] = []
        self.body_size = 0
        self.http11 = True
        self.has_body = False
        self.expect_continue = False
        self.failure: _Failure | None = None

    async def run(self) -> None:
        try:
            async with self.stream, anyio.create_task_group() as tg:
                with self.scope:
                    tg.start_soon(self._read)
                    await self._answer()
                tg.cancel_scope.cancel()
        except _DISCONNECTED:
            pass  # the client went away between requests: nothing to answer
        except Exception:  # a bug here must not take the server down
            logger.exception("front: a connection failed")

    # -- answering ----------------------------------------------------------------------

    async def _answer(self) -> None:
        """Answer the requests the reader queues, in order, until the connection is
        done (an error answered, a request without keep-alive, a handler's failure)."""
        ready = self.ready
        while True:
            if not ready:
                self.busy = False
                self.idle_since = monotonic()
                if self.in_message:  # a pipelined request under way: its time starts now
                    self._arm(self.idle_since + REQUEST_TIMEOUT)
                    if self.expect_continue:
                        self.expect_continue = False
                        await self.stream.send(_CONTINUE)
                        continue
                self.waiter = waiter = anyio.Event()
                await waiter.wait()
                self.waiter = None
                continue
            item = ready.popleft()
            self.busy = True
            if self.resume is not None:
                self.resume.set()
                self.resume = None
            if isinstance(item, _Failure):
                if item is not _CLOSE:
                    await self._error(item.status, item.message)
                return
            request, keep_alive, http11 = item
            responder = Responder(self.stream, keep_alive, http11, request.method == "HEAD")
            try:
                await self.handler(request, responder)
                if responder.status is None:
                    raise RuntimeError("the handler returned without answering")
                if not responder.ended:
                    await responder.end()
            except ClientGone:
                return
            except Exception as exc:
                logger.error("front: %s %s failed", request.method, request.path, exc_info=exc)
                if responder.status is None:
                    await self._error(500, "internal error in the front; see its log")
                return
            if not responder.keep_alive:
                return

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

    # -- reading ------------------------------------------------------------------------

    async def _read(self) -> None:
        """The reader, for the connection's life: ``_receive`` under the timer. When the
        timer goes off, the deadline of the moment decides: a request incomplete too long
        is a 408, a connection idle too long is closed, else the timer is armed again."""
        while True:
            now = monotonic()
            self.armed = min(self._deadline(), now + KEEPALIVE_TIMEOUT)
            offset = anyio.current_time() - now
            with anyio.CancelScope(deadline=self.armed + offset) as self.timer:
                await self._receive()
                return
            if monotonic() < self._deadline():
                continue  # early (the deadline moved on since): armed again
            if self.in_message:
                self._queue(_Failure(408, "the request was not complete in time"))
            else:
                self.scope.cancel()  # idle too long: closed, nothing sent
            return

    def _deadline(self) -> float:
        """When the connection times out, as things stand (monotonic)."""
        if self.busy or self.ready:
            return math.inf  # a request being answered: no limit on the handler
        if self.in_message:
            return max(self.began, self.idle_since) + REQUEST_TIMEOUT
        return self.idle_since + KEEPALIVE_TIMEOUT

    def _arm(self, deadline: float) -> None:
        """Have the timer go off by ``deadline`` (monotonic) at the latest."""
        if deadline < self.armed and self.timer is not None:
            self.armed = deadline
            self.timer.deadline = deadline + (anyio.current_time() - monotonic())

    async def _receive(self) -> None:
        stream, parser, ready = self.stream, self.parser, self.ready
        while True:
            while ready and (self.busy or len(ready) >= _MAX_QUEUED):
                self.resume = resume = anyio.Event()
                await resume.wait()
            try:
                data = await stream.receive(_READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                data = b""
            except anyio.ClosedResourceError:
                return
            if not data:
                if self.busy:
                    logger.debug(
                        "front: the client closed its connection; its request is cancelled"
                    )
                self.scope.cancel()
                return
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self._queue(_CLOSE)  # after the request that asked: answered, then closed
                return
            except httptools.HttpParserError as exc:
                self._queue(self.failure or _Failure(400, f"malformed request: {exc}"))
                return
            if self.in_message:
                if self.in_head:
                    self.head_bytes += len(data)
                    if self.head_bytes > MAX_HEAD:
                        self._queue(_Failure(431, f"request head over {MAX_HEAD} bytes"))
                        return
                if not self.busy and not ready:
                    self._arm(max(self.began, self.idle_since) + REQUEST_TIMEOUT)
                    if self.expect_continue and not self.body_size:
                        self.expect_continue = False
                        try:
                            await stream.send(_CONTINUE)
                        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                            self.scope.cancel()
                            return
            if ready and self.waiter is not None:
                self.waiter.set()

    def _queue(self, item: _Item) -> None:
        self.ready.append(item)
        if self.waiter is not None:
            self.waiter.set()

    # -- parser callbacks (llhttp's, through httptools) ---------------------------------

    def on_message_begin(self) -> None:
        self.in_message = self.in_head = True
        self.began = monotonic()
        self.head_bytes = 0
        self.url = b""
        self.headers = []
        self.body = []
        self.body_size = 0
        self.has_body = self.expect_continue = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        value = value.rstrip(b" \t")
        if b"\x00" in value:
            self._refuse(400, "malformed request: NUL in a header value")
        self.headers.append((name, value))
        if name == b"content-length":
            self.has_body = True
            if int(value) > self.max_body:  # llhttp checked it is a number
                self._refuse(413, f"request body over {self.max_body} bytes")
        elif name == b"transfer-encoding":
            self.has_body = True
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_continue = True

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > MAX_HEAD:
            self._refuse(431, f"request head over {MAX_HEAD} bytes")
        self.http11 = parser.get_http_version() not in ("1.0", "0.9")
        if not self.http11:
            self.expect_continue = False
        if self.has_body and parser.should_upgrade():
            self._refuse(400, "a request with a body cannot ask to upgrade the connection")

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.max_body:
            self._refuse(413, f"request body over {self.max_body} bytes")
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.in_message = self.expect_continue = False
        parser = self.parser
        path, _, query = self.url.decode("latin-1").partition("?")
        body = self.body
        request = Request(
            parser.get_method().decode("latin-1"),
            path,
            query,
            self.headers,
            body[0] if len(body) == 1 else b"".join(body),
        )
        self.ready.append((request, parser.should_keep_alive(), self.http11))

    def _refuse(self, status: int, message: str) -> None:
        self.failure = _Failure(status, message)
        raise _Refused(message)


_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
}
_STATUS_LINES = {
    int(status): b"HTTP/1.1 %d %s\r\n" % (status, status.phrase.encode()) for status in HTTPStatus
}
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]").search
_NAMES: dict[bytes, bytes] = {}  # header names seen valid → lower case
_FRAMING = (b"content-length", b"transfer-encoding")


def _head(status: int, headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes, bool]:
    """A response's status line and the handler's headers, checked; and whether they ask
    to close the connection. ``ValueError`` (the handler's bug) for a bad one."""
    line = _STATUS_LINES.get(status)
    if line is None:
        if not isinstance(status, int) or not 100 <= status <= 999:
            raise ValueError(f"not an HTTP status: {status!r}")
        line = b"HTTP/1.1 %d \r\n" % status
    parts = [line]
    close = False
    for name, value in headers:
        lower = _NAMES.get(name)
        if lower is None:
            if not isinstance(name, bytes) or _TOKEN.fullmatch(name) is None:
                raise ValueError(f"not a header name: {name!r}")
            lower = name.lower()
            if len(_NAMES) < 1024:
                _NAMES[name] = lower
        if _BAD_VALUE(value) is not None:
            raise ValueError(f"header {name!r}: CR, LF or NUL in {value!r}")
        if lower in _FRAMING:
            raise ValueError(f"header {name!r}: the server frames the body itself")
        if lower == b"connection" and b"close" in value.lower():
            close = True
        parts += (name, b": ", value, b"\r\n")
    return b"".join(parts), close


def _json_text(text: str) -> bytes:
    return json.dumps(text).encode()
