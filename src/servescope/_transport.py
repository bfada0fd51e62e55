"""The HTTP client under the request pool: keep-alive HTTP/1.1 connections, one per slot.

httpx's default connection pool scans its connection list on every request and
wake-up, so its cost grows with concurrency (measured here against hypercorn: ~650
requests/s at 8 in flight, ~180 at 256), and httpcore's connection still takes
several locks and timeouts per request. The request pool already bounds requests in
flight, so all this transport keeps is a stack of idle connections per origin: a
request pops one (or opens one), does one exchange on it, and pushes it back when
it is reusable. A whole exchange is one write and a few reads under one deadline.
``benchmarks/bench_pool.py`` measures it against httpx and against a new connection
per request.

The HTTP/1.1 itself is the front server's (``_httpserver``): a request is written by
hand (request line, the caller's headers, each checked as h11 would, and a
``content-length`` of ours), and a response is parsed by llhttp (httptools, the C
parser uvicorn uses), whose callbacks fill in the exchange's status, headers and body
pieces. h11, this transport's first parser, built, validated and state-checked an
event object in Python for every head, piece of body and end of message, which made it
the largest cost left in a proxied request. A connection is reused only after a whole
response that both sides let it outlive (HTTP/1.1, no ``Connection: close``); 1xx
heads are skipped; a body with neither a length nor chunking ends with the connection;
a response to HEAD ends with its head (and its connection, which llhttp cannot be told
to expect no body on); a head over ``MAX_HEAD`` bytes is an error.

``SlotTransport.post`` is the pool's fast path (bytes in, ``Reply`` out); it is also an
``httpx.AsyncBaseTransport``, so probes and users of ``httpx.AsyncClient`` get the same
connections. Errors are httpx's exception classes either way, nothing else: a URL
urllib cannot parse is ``InvalidURL``, a header HTTP cannot carry is
``LocalProtocolError`` naming the header (never its value, which may be a secret).
Bodies are read whole (completion responses are small, and capped at ``MAX_BODY``);
httpx gets them as a stream, so that a reader that wants only the status or the first
bytes does not have httpx decode the rest.

``SlotTransport.open_stream`` is the streamed path (``"stream": true``): it returns once
the response's head has come, and its ``ResponseStream`` hands out the body's pieces as
they arrive (chunked, content-length or close-delimited: llhttp frames them). A body read
to its end gives its connection back for reuse; one left unfinished (closed early, a
failed or cancelled read) closes it, which is how an engine learns that its client went
away and aborts the generation.
"""

from __future__ import annotations

import re
import select
import ssl
import time
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
import httptools
import httpx

__all__ = ["MAX_BODY", "MAX_HEAD", "Reply", "ResponseStream", "SlotTransport", "bad_header"]

MAX_BODY = 64 * 1024 * 1024
"""A response body larger than this is a protocol error (a server that lies about sizes)."""

MAX_HEAD = 64 * 1024
"""A response head larger than this is a protocol error."""

_READ_SIZE = 65536
_FRAMING, _HOST, _CONNECTION = "framing", "host", "connection"
_SPECIAL = {  # the request headers that are more than passed on
    b"content-length": _FRAMING,  # ours to set, from the body we send
    b"transfer-encoding": _FRAMING,
    b"host": _HOST,
    b"connection": _CONNECTION,
}
# h11's grammar (RFC 9110 token and field-value; a target of visible ASCII): what a
# request may carry, and which header is refused.
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
_TARGET = re.compile(rb"[\x21-\x7e]+").fullmatch
_NAMES: dict[bytes, bytes] = {}  # header names seen valid → lower case
_USER_AGENT = b"servescope"

Origin = tuple[str, str, int]  # scheme, host, port
Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class Reply:
    """One HTTP response, read whole."""

    status: int
    headers: Headers
    content: bytes

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lower case), if any."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None


class _Stop(Exception):
    """Raised in a parser callback to stop llhttp (a broken response, or its end)."""


class _Connection:
    """One HTTP/1.1 connection over an anyio byte stream: requests written by hand,
    responses parsed by llhttp (httptools), whose callbacks fill the exchange's state."""

    def __init__(self, stream: anyio.abc.ByteStream, sock: Any) -> None:
        self.stream = stream
        self.sock = sock
        self.parser = httptools.HttpResponseParser(self)
        # h11 (this transport's first parser) took any byte but NUL in a header value and
        # a bare LF as a line end; llhttp does so with these (NUL refused in on_header).
        self.parser.set_dangerous_leniencies(
            lenient_headers=True, lenient_optional_cr_before_lf=True
        )
        self.idle = True  # between exchanges, reusable as far as HTTP goes
        self.idle_since = time.monotonic()
        # poll, not select: select refuses descriptors past 1023, and every connection
        # would then look unusable after one request.
        self._poller: select.poll | None = None
        if sock is not None:
            self._poller = select.poll()
            self._poller.register(sock, select.POLLIN)
        # the exchange under way
        self.bodiless = False  # a HEAD: the response has no body, whatever its head says
        self.keep = False  # both sides allow another exchange (so far)
        self.head_done = False  # the final (not 1xx) head has come
        self.done = False  # the whole response has come
        self.status = 0
        self.headers: Headers = []
        self.body: list[bytes] = []  # pieces not handed out yet
        self.size = 0  # body bytes
        self.length: bytes | None = None  # the content-length header
        self.chunked = False
        self.head_bytes = 0  # received while the head was incomplete
        self.start = b""  # the response's first bytes, to quote if it is broken
        self.failure: httpx.RemoteProtocolError | None = None  # a broken body, raised next

    def reusable(self, keepalive_expiry: float) -> bool:
        """Idle, not expired, and not closed (or sending) from the server's side."""
        if not self.idle or time.monotonic() - self.idle_since > keepalive_expiry:
            return False
        if self._poller is None:
            return True
        try:  # readable (EOF or junk), hung up or in error while idle: not reusable
            return not self._poller.poll(0)
        except (OSError, ValueError):
            return False

    async def exchange(self, request: bytes, keep: bool, bodiless: bool = False) -> Reply:
        """Send one request (``send_request``'s arguments) and read its whole response."""
        await self.send_request(request, keep, bodiless)
        while not self.done:
            await self.receive()
            if self.size > MAX_BODY:
                raise httpx.RemoteProtocolError(f"response body over {MAX_BODY} bytes")
        self.end_exchange()
        pieces, self.body = self.body, []
        content = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return Reply(self.status, self.headers, content)

    async def send_request(self, request: bytes, keep: bool, bodiless: bool = False) -> None:
        """Write one whole request (``request_bytes``'s); ``keep``: the request lets the
        connection outlive the exchange; ``bodiless``: a HEAD, whose answer has no body."""
        self.idle = False
        self.bodiless = bodiless
        self.keep = keep
        self.head_done = self.done = False
        self.status = self.size = self.head_bytes = 0
        self.start = b""
        try:
            await self.stream.send(request)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise httpx.WriteError(f"sending the request failed: {exc!r}") from exc

    async def read_head(self) -> None:
        """Read until the response's (final) head has come; 1xx heads are skipped."""
        while not self.head_done:
            await self.receive()

    async def receive(self) -> None:
        """Read once and parse what came (its body pieces land in ``body``)."""
        if self.failure is not None:
            raise self.failure
        try:
            data = await self.stream.receive(_READ_SIZE)
        except anyio.EndOfStream:
            self._end_of_stream()
            return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise httpx.ReadError(f"reading the response failed: {exc!r}") from exc
        if len(self.start) < 100:
            self.start += data[: 100 - len(self.start)]
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not self.done:
                stop = exc.__context__
                reason = stop if isinstance(stop, _Stop) else exc
                line = self.start.split(b"\n", 1)[0].rstrip(b"\r")
                failure = httpx.RemoteProtocolError(
                    f"broken HTTP response: {reason}; it began {line!r}"
                )
                if not self.head_done:
                    raise failure from None
                self.failure = failure  # after the body pieces that came before it
                return
            self.keep = False  # bytes past the end of the response (or the end of a HEAD's)
        if not self.head_done:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD:
                raise httpx.RemoteProtocolError(f"response head over {MAX_HEAD} bytes")

    def _end_of_stream(self) -> None:
        """The server closed the connection: the end of a close-delimited body, or an
        error."""
        self.keep = False
        if self.done:
            return
        if not self.head_done:
            raise httpx.RemoteProtocolError("server closed the connection without answering")
        if self.length is None and not self.chunked:
            self.done = True  # no length, not chunked: the body ends with the connection
            return
        message = "server disconnected without a complete response"
        if self.length is not None and not self.chunked:
            message += f": received {self.size} bytes, expected {self.length.decode()}"
        raise httpx.RemoteProtocolError(message)

    def end_exchange(self) -> None:
        """After a whole response: ready for the next request if both sides allow it."""
        if self.done and self.keep:
            self.idle = True
            self.idle_since = time.monotonic()

    async def aclose(self) -> None:
        self.idle = False
        with anyio.CancelScope(shield=True):
            await self.stream.aclose()

    # -- llhttp's callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:  # a second response to one request
            raise _Stop("more bytes after the response")
        self.headers = []
        self.length = None
        self.chunked = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # a trailer (after a chunked body): dropped
        name = name.lower()
        value = value.rstrip(b" \t")
        if b"\x00" in value:
            raise _Stop(f"NUL in the value of header {name.decode('latin-1')!r}")
        self.headers.append((name, value))
        if name == b"content-length":
            self.length = value
        elif name == b"transfer-encoding":
            self.chunked = value.lower().endswith(b"chunked")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            return  # informational: skipped
        self.status = status
        self.head_done = True
        if self.bodiless:  # llhttp would read a body after a HEAD's head: stopped here
            self.done, self.keep = True, False
            raise _Stop("the end of a response to HEAD")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.size += len(body)

    def on_message_complete(self) -> None:
        if not self.head_done:
            return  # an informational response's end
        self.done = True
        parser = self.parser
        if not (parser.should_keep_alive() and parser.get_http_version() == "1.1"):
            self.keep = False


class ResponseStream:
    """A response read as it arrives: ``status`` and ``headers``, then ``receive()`` (or
    ``async for``) gives the body's pieces.

    Once the body is complete the connection goes back to its transport's idle stack; if
    reading fails, is cancelled, or stops early (``aclose`` before the end), the
    connection is closed instead — which is how a server learns that its client is gone
    (vLLM and SGLang then abort the generation).
    """

    def __init__(
        self,
        transport: SlotTransport,
        origin: Origin,
        connection: _Connection,
        status: int,
        headers: Headers,
    ) -> None:
        self._transport = transport
        self._origin = origin
        self._connection: _Connection | None = connection
        self.status = status
        self.headers = headers
        self.complete = False

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lower case), if any."""
        return Reply(self.status, self.headers, b"").header(name)

    async def receive(self) -> bytes:
        """The next piece of the body (never empty), or ``b""`` once it is complete.

        Errors are httpx's: ``ReadError``, ``RemoteProtocolError`` (a broken or cut
        body); after one, or after ``aclose``, the stream is closed and reads fail."""
        connection = self._connection
        if connection is None:
            if self.complete:
                return b""
            raise httpx.ReadError("the response stream is closed")
        try:
            while True:
                pieces = connection.body
                if pieces:
                    connection.body = []
                    return pieces[0] if len(pieces) == 1 else b"".join(pieces)
                if connection.done:
                    break
                await connection.receive()
        except BaseException:
            await self.aclose()
            raise
        self.complete, self._connection = True, None
        connection.end_exchange()
        if connection.idle:
            self._transport._idle.setdefault(self._origin, []).append(connection)
        else:
            await connection.aclose()
        return b""

    async def aclose(self) -> None:
        """Stop reading: an unfinished response's connection is closed (idempotent)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.aclose()

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> bytes:
        data = await self.receive()
        if not data:
            raise StopAsyncIteration
        return data


class SlotTransport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 connections reused last-in first-out, one request each at a time."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float | None = 10.0,
        keepalive_expiry: float = 4.0,
    ) -> None:
        # uvicorn (vLLM, SGLang) and hypercorn close idle connections after 5 s: expire first.
        self._ssl_context = ssl_context
        self._connect_timeout = connect_timeout
        self._keepalive_expiry = keepalive_expiry
        self._idle: dict[Origin, list[_Connection]] = {}
        self._origins: dict[str, tuple[Origin, bytes]] = {}

    def post(
        self,
        url: str,
        body: bytes,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> Coroutine[Any, Any, Reply]:
        """POST ``body`` (JSON) to ``url``; await the whole reply (the caller bounds the time).

        Not itself a coroutine: one frame less per request held in flight.
        """
        origin, target = self._split(url)
        request_headers = [
            (b"host", _host_header(origin)),
            (b"user-agent", _USER_AGENT),
            (b"content-type", b"application/json"),
            *headers,
        ]
        return self.send(origin, b"POST", target, request_headers, body)

    async def open_stream(
        self,
        url: str,
        body: bytes,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> ResponseStream:
        """POST ``body`` (JSON) to ``url``; return once the response's head has come.

        The body is then read with the stream's ``receive`` (the caller bounds the time
        of each call), and the stream must be closed (``aclose``) by whoever stops
        reading before its end. Anything failing before the head is back closes the
        connection and raises httpx's error, as ``post`` does.
        """
        origin, target = self._split(url)
        request_headers = [
            (b"host", _host_header(origin)),
            (b"user-agent", _USER_AGENT),
            (b"content-type", b"application/json"),
            *headers,
        ]
        request, keep = request_bytes(b"POST", target, request_headers, body)
        connection = await self._take(origin) or await self._connect(origin)
        try:
            await connection.send_request(request, keep)
            await connection.read_head()  # 1xx heads are skipped; an end before the head raises
        except BaseException:
            await connection.aclose()
            raise
        return ResponseStream(self, origin, connection, connection.status, connection.headers)

    async def send(
        self,
        origin: Origin,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: bytes,
    ) -> Reply:
        """One exchange on an idle connection to ``origin`` (or a new one).

        A failure after the request was sent is not retried here (the server may have
        acted on it): the pool decides. Connections the server closed while idle are
        found before reuse (their socket reads as readable) and dropped.
        """
        request, keep = request_bytes(method, target, headers, body)
        connection = await self._take(origin) or await self._connect(origin)
        try:
            reply = await connection.exchange(request, keep, method == b"HEAD")
        except BaseException:
            await connection.aclose()
            raise
        if connection.idle:
            self._idle.setdefault(origin, []).append(connection)
        else:
            await connection.aclose()
        return reply

    async def _take(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.reusable(self._keepalive_expiry):
                return connection
            await connection.aclose()
        return None

    async def _connect(self, origin: Origin) -> _Connection:
        scheme, host, port = origin
        context = None
        if scheme == "https":
            context = self._ssl_context = self._ssl_context or httpx.create_ssl_context()
        try:
            with anyio.fail_after(self._connect_timeout):
                stream: anyio.abc.ByteStream
                if context is None:
                    stream = await anyio.connect_tcp(host, port)
                else:
                    stream = await anyio.connect_tcp(
                        host, port, ssl_context=context, tls_standard_compatible=False
                    )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc
        except (OSError, anyio.BrokenResourceError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        return _Connection(stream, stream.extra(anyio.abc.SocketAttribute.raw_socket, None))

    def _split(self, url: str) -> tuple[Origin, bytes]:
        known = self._origins.get(url)
        if known is None:
            try:
                parts = urlsplit(url)
                port = parts.port  # checked only when read
            except ValueError as exc:  # a bad port, a broken IPv6 literal
                raise httpx.InvalidURL(f"malformed URL {url!r}: {exc}") from exc
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise httpx.UnsupportedProtocol(f"not an http(s) URL: {url!r}")
            port = _default_port(parts.scheme) if port is None else port
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            known = (parts.scheme, parts.hostname, port), target.encode()
            if len(self._origins) < 256:
                self._origins[url] = known
        return known

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """httpx's transport interface, over the same connections."""
        url = request.url
        origin = (url.scheme, url.host, url.port or _default_port(url.scheme))
        if origin[0] not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"not an http(s) URL: {url}", request=request)
        body = await request.aread()
        headers = list(request.headers.raw)
        timeouts: Mapping[str, float | None] = request.extensions.get("timeout", {})
        limit = timeouts.get("read")
        method = request.method.encode()
        if _TOKEN.fullmatch(method) is None:
            raise httpx.LocalProtocolError(
                "the request method is not an HTTP token", request=request
            )
        try:
            with anyio.fail_after(limit):
                reply = await self.send(origin, method, url.raw_path, headers, body)
        except TimeoutError as exc:
            message = f"no complete answer within {limit:g} s"
            raise httpx.ReadTimeout(message, request=request) from exc
        except httpx.TransportError as exc:
            exc.request = request
            raise
        # stream=, not content=: httpx reads (and so decodes) a content= body at once, and a
        # reader that only wants the status or the raw start must not inflate a gzip bomb.
        stream = httpx.ByteStream(reply.content)
        return httpx.Response(reply.status, headers=reply.headers, stream=stream)

    async def aclose(self) -> None:
        """Close every idle connection."""
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await connection.aclose()


def request_bytes(
    method: bytes, target: bytes, headers: Headers, body: bytes
) -> tuple[bytes, bool]:
    """One request as it goes on the wire, its framing ours (a ``content-length`` from
    ``body``; the caller's framing headers dropped), and whether it lets its connection
    outlive the exchange (no ``Connection: close``).

    What HTTP/1.1 cannot carry is ``httpx.LocalProtocolError``, as h11 would have it: a
    header name not a token, a value with a line break, NUL or whitespace at an end (the
    header named, never its value), a target with a space or control byte (not shown: a
    query may hold a key), no ``Host`` or two."""
    if _TARGET(target) is None:
        message = "the request target (the URL's path and query) has a byte HTTP cannot carry"
        raise httpx.LocalProtocolError(message)
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    keep, hosts = True, 0
    names = _NAMES
    for name, value in headers:
        lower = names.get(name)
        if lower is None:
            if _TOKEN.fullmatch(name) is None:
                raise _unsendable(headers)
            lower = name.lower()
            if len(names) < 1024:
                names[name] = lower
        if _FIELD_VALUE.fullmatch(value) is None:
            raise _unsendable(headers)
        special = _SPECIAL.get(lower)
        if special is not None:
            if special is _FRAMING:
                continue
            if special is _HOST:
                hosts += 1
            elif b"close" in value.lower():
                keep = False
        parts += (name, b": ", value, b"\r\n")
    if hosts != 1:  # as h11: one Host, neither none nor two that a proxy may read apart
        problem = "no Host header" if hosts == 0 else "found multiple Host headers"
        raise httpx.LocalProtocolError(f"HTTP/1.1 cannot carry this request: {problem}")
    parts += (b"content-length: %d\r\n\r\n" % len(body), body)
    return b"".join(parts), keep


def bad_header(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Which header HTTP/1.1 cannot carry, and why, or ``None`` if all can.

    Names the header but never shows its value (an API key may be the one with the
    line break), and shows a bad name only up to its first bad byte.
    """
    for name, value in headers:
        if not _TOKEN.fullmatch(name):
            valid = _TOKEN.match(name)
            prefix = valid.group() if valid else b""
            bad = name[len(prefix) : len(prefix) + 1]
            return f"header name {prefix.decode()!r} is followed by {bad!r}: not allowed in a name"
        if not _FIELD_VALUE.fullmatch(value):
            return (
                f"header {name.decode()!r} has a value HTTP cannot carry (a line break, NUL, "
                "or leading or trailing whitespace); the value is not shown"
            )
    return None


def _unsendable(headers: Headers) -> httpx.LocalProtocolError:
    return httpx.LocalProtocolError(bad_header(headers) or "HTTP/1.1 cannot carry a header")


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _host_header(origin: Origin) -> bytes:
    scheme, host, port = origin
    host = f"[{host}]" if ":" in host else host
    return (host if port == _default_port(scheme) else f"{host}:{port}").encode()
