"""The HTTP client under the request pool: keep-alive HTTP/1.1 connections, one per slot.

httpx's default connection pool scans its connection list on every request and
wake-up, so its cost grows with concurrency (measured here against hypercorn: ~650
requests/s at 8 in flight, ~180 at 256), and httpcore's connection still takes
several locks and timeouts per request. The request pool already bounds requests in
flight, so all this transport keeps is a stack of idle connections per origin: a
request pops one (or opens one), does one exchange on it, and pushes it back when
it is reusable. Each connection is h11's HTTP/1.1 state machine (the one httpx uses)
over an anyio byte stream; a whole exchange is one write and a few reads under one
deadline. ``benchmarks/bench_pool.py`` measures it against httpx and against a new
connection per request.

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
they arrive (chunked, content-length or close-delimited: h11 frames them). A body read
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
import h11
import httpx

__all__ = ["MAX_BODY", "Reply", "ResponseStream", "SlotTransport", "bad_header"]

MAX_BODY = 64 * 1024 * 1024
"""A response body larger than this is a protocol error (a server that lies about sizes)."""

_READ_SIZE = 65536
_FRAMING = (b"content-length", b"transfer-encoding")  # ours to set, from the body we send
# h11's grammar (RFC 9110 token and field-value), to say which header it refused.
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
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


class _Connection:
    """One HTTP/1.1 connection: h11's state machine over an anyio byte stream."""

    def __init__(self, stream: anyio.abc.ByteStream, sock: Any) -> None:
        self.stream = stream
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        self.idle_since = time.monotonic()
        # poll, not select: select refuses descriptors past 1023, and every connection
        # would then look unusable after one request.
        self._poller: select.poll | None = None
        if sock is not None:
            self._poller = select.poll()
            self._poller.register(sock, select.POLLIN)

    @property
    def idle(self) -> bool:
        """Between exchanges, with the keep-alive cycle restarted."""
        return self.h11.our_state is h11.IDLE and self.h11.their_state is h11.IDLE

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

    async def exchange(self, method: bytes, target: bytes, headers: Headers, body: bytes) -> Reply:
        """Send one request and read its whole response."""
        await self.send_request(method, target, headers, body)
        status, response_headers, chunks, size = 0, [], [], 0
        while True:
            event = await self.next_event(answered=status != 0)
            if isinstance(event, h11.Response):
                status, response_headers = event.status_code, list(event.headers)
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY:
                    raise httpx.RemoteProtocolError(f"response body over {MAX_BODY} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError("server disconnected without a complete response")
        self.end_exchange()
        return Reply(status, response_headers, b"".join(chunks))

    async def send_request(
        self, method: bytes, target: bytes, headers: Headers, body: bytes
    ) -> None:
        """Write one whole request (its framing headers ours, from ``body``)."""
        conn = self.h11
        headers = [item for item in headers if item[0].lower() not in _FRAMING]
        headers.append((b"content-length", str(len(body)).encode()))
        try:
            events: list[h11.Event] = [h11.Request(method=method, target=target, headers=headers)]
        except h11.LocalProtocolError as exc:
            # Not chained: h11's message quotes the bad header's value, which may be a secret.
            problem = bad_header(headers) or f"HTTP/1.1 cannot carry this request: {exc}"
            raise httpx.LocalProtocolError(problem) from None
        if body:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        data = b"".join(conn.send(event) or b"" for event in events)
        try:
            await self.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise httpx.WriteError(f"sending the request failed: {exc!r}") from exc

    async def next_event(self, answered: bool) -> h11.Event:
        """The next response event, reading as needed (``answered``: its head has come)."""
        conn = self.h11
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(f"broken HTTP response: {exc}") from exc
            if event is h11.PAUSED:  # never: nothing reads past the end of its response
                raise httpx.RemoteProtocolError("read past the end of the response")
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                received = await self.stream.receive(_READ_SIZE)
            except anyio.EndOfStream:
                received = b""
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise httpx.ReadError(f"reading the response failed: {exc!r}") from exc
            if not received and not answered:
                raise httpx.RemoteProtocolError("server closed the connection without answering")
            conn.receive_data(received)

    def end_exchange(self) -> None:
        """After a whole response: ready for the next request if both sides allow it."""
        conn = self.h11
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            self.idle_since = time.monotonic()

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.stream.aclose()


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
                event = await connection.next_event(answered=True)
                if isinstance(event, h11.Data):
                    if event.data:
                        return bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    message = "server disconnected without a complete response"
                    raise httpx.RemoteProtocolError(message)
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
        connection = await self._take(origin) or await self._connect(origin)
        try:
            await connection.send_request(b"POST", target, request_headers, body)
            while True:  # 1xx heads are skipped; an end before the head raises
                event = await connection.next_event(answered=False)
                if isinstance(event, h11.Response):
                    break
        except BaseException:
            await connection.aclose()
            raise
        return ResponseStream(self, origin, connection, event.status_code, list(event.headers))

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
        connection = await self._take(origin) or await self._connect(origin)
        try:
            reply = await connection.exchange(method, target, headers, body)
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


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _host_header(origin: Origin) -> bytes:
    scheme, host, port = origin
    host = f"[{host}]" if ":" in host else host
    return (host if port == _default_port(scheme) else f"{host}:{port}").encode()
