"""The slot transport against a raw TCP server that answers exactly what a test scripts."""

from __future__ import annotations

import functools
import os
import resource
import socket
import threading
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import anyio
import anyio.abc
import httpx
import psutil
import pytest

from servescope import _transport
from servescope._http import PROBE_BYTES, fetch_excerpt, probe_status
from servescope._transport import SlotTransport

pytestmark = pytest.mark.anyio

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"

# Given the connection number (0, 1, ...) and the request number on it, the bytes to
# send back and whether to close the connection afterwards.
Script = Callable[[int, int], tuple[bytes, bool]]


class RawServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        number, served = self.connections, 0
        self.connections += 1
        buffer = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        buffer += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    key, _, value = line.partition(b":")
                    if key.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    buffer += await stream.receive()
                self.requests.append(head)
                buffer = buffer[length:]
                answer, close = self.script(number, served)
                served += 1
                try:
                    await stream.send(answer)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return  # the client stopped reading (a capped body) and closed
                if close:
                    return


@asynccontextmanager
async def raw_server(script: Script) -> AsyncIterator[RawServer]:
    server = RawServer(script)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    server.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, server.handle)
        yield server
        tg.cancel_scope.cancel()


def always(answer: bytes, close: bool = False) -> Script:
    return lambda connection, request: (answer, close)


async def test_keep_alive_reuses_one_connection() -> None:
    async with raw_server(always(OK)) as server:
        transport = SlotTransport()
        for _ in range(3):
            reply = await transport.post(f"http://127.0.0.1:{server.port}/v1/x", b"{}")
            assert (reply.status, reply.content) == (200, b"{}")
        await transport.aclose()
    assert server.connections == 1
    assert server.requests[0].startswith(b"POST /v1/x HTTP/1.1")
    assert f"host: 127.0.0.1:{server.port}".encode() in server.requests[0]


@contextmanager
def descriptors_past_1023() -> Iterator[None]:
    """Hold enough descriptors open that new sockets get numbers past select's 1023."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 1024 + 1200
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {needed}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    held = [os.open(os.devnull, os.O_RDONLY)]
    try:
        while held[-1] < 1100:
            held.append(os.dup(held[0]))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_keep_alive_with_descriptors_past_1023() -> None:
    with descriptors_past_1023():
        async with raw_server(always(OK)) as server:
            transport = SlotTransport()
            for _ in range(3):
                await transport.post(f"http://127.0.0.1:{server.port}/", b"{}")
            (connection,) = transport._idle[("http", "127.0.0.1", server.port)]
            assert connection.sock.fileno() > 1023
            await transport.aclose()
    assert server.connections == 1


async def test_connection_closed_by_server_while_idle_is_not_reused() -> None:
    async with raw_server(always(OK, close=True)) as server:
        transport = SlotTransport()
        for _ in range(3):
            await anyio.sleep(0.05)  # let the server's FIN arrive
            reply = await transport.post(f"http://127.0.0.1:{server.port}/", b"{}")
            assert reply.status == 200
        await transport.aclose()
    assert server.connections == 3


async def test_connection_close_header_is_honoured() -> None:
    answer = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    async with raw_server(always(answer)) as server:
        transport = SlotTransport()
        await transport.post(f"http://127.0.0.1:{server.port}/", b"{}")
        assert transport._idle.get(("http", "127.0.0.1", server.port), []) == []
        await transport.aclose()


async def test_expired_connection_is_replaced() -> None:
    async with raw_server(always(OK)) as server:
        transport = SlotTransport(keepalive_expiry=0.05)
        await transport.post(f"http://127.0.0.1:{server.port}/", b"{}")
        await anyio.sleep(0.1)
        await transport.post(f"http://127.0.0.1:{server.port}/", b"{}")
        await transport.aclose()
    assert server.connections == 2


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", "broken HTTP response"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}", "received 2 bytes, expected 10"),
        (b"", "closed the connection without answering"),
    ],
    ids=["garbage", "truncated", "nothing"],
)
async def test_broken_responses_are_protocol_errors(answer: bytes, message: str) -> None:
    async with raw_server(always(answer, close=True)) as server:
        transport = SlotTransport()
        with pytest.raises(httpx.RemoteProtocolError, match=message):
            await transport.post(f"http://127.0.0.1:{server.port}/", b"{}")
        await transport.aclose()


async def test_body_larger_than_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_transport, "MAX_BODY", 1000)
    body = b"x" * 5000
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n" + body
    async with raw_server(always(answer)) as server:
        transport = SlotTransport()
        with pytest.raises(httpx.RemoteProtocolError, match="over 1000 bytes"):
            await transport.post(f"http://127.0.0.1:{server.port}/", b"{}")
        await transport.aclose()


async def test_huge_header_is_a_protocol_error() -> None:
    answer = b"HTTP/1.1 200 OK\r\nx-junk: " + b"a" * 200_000 + b"\r\n\r\n"
    async with raw_server(always(answer, close=True)) as server:
        transport = SlotTransport()
        with pytest.raises(httpx.RemoteProtocolError):
            await transport.post(f"http://127.0.0.1:{server.port}/", b"{}")
        await transport.aclose()


async def test_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        transport = SlotTransport()
        with pytest.raises(httpx.ConnectError, match=f"127.0.0.1:{port}"):
            await transport.post(f"http://127.0.0.1:{port}/", b"{}")


async def test_not_an_http_url() -> None:
    with pytest.raises(httpx.UnsupportedProtocol, match="ftp://"):
        await SlotTransport().post("ftp://example.invalid/x", b"{}")


async def test_as_an_httpx_transport() -> None:
    answer = b"HTTP/1.1 404 Not Found\r\nx-a: 1\r\ncontent-length: 4\r\n\r\nnope"
    async with (
        raw_server(always(answer)) as server,
        httpx.AsyncClient(transport=SlotTransport(), timeout=5) as client,
    ):
        response = await client.get(f"http://127.0.0.1:{server.port}/p?q=1")
        assert (response.status_code, response.text, response.headers["x-a"]) == (404, "nope", "1")
        response = await client.post(f"http://127.0.0.1:{server.port}/", json={"a": 1})
    assert server.connections == 1
    assert server.requests[0].startswith(b"GET /p?q=1 HTTP/1.1")


async def test_httpx_read_timeout_applies_to_the_whole_exchange() -> None:
    slow = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n{"
    async with (
        raw_server(always(slow)) as server,
        httpx.AsyncClient(transport=SlotTransport(), timeout=0.2) as client,
    ):
        with pytest.raises(httpx.ReadTimeout, match=r"within 0\.2 s"):
            await client.get(f"http://127.0.0.1:{server.port}/")


SECRET = b"sk-transport-7a1c-secret"


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ((b"authorization", b"Bearer " + SECRET + b"\n"), "authorization"),
        ((b"x-a", SECRET + b"\r\nx-injected: 1"), "x-a"),
        ((b"x-nul", SECRET + b"\x00"), "x-nul"),
        ((b"x-space", SECRET + b" "), "x-space"),
        ((b"bad name", SECRET), "name 'bad'"),
        ((b"x-b:" + SECRET, b"v"), "name 'x-b'"),  # a name is shown only up to the bad byte
    ],
    ids=["lf", "crlf", "nul", "trailing-space", "space-in-name", "colon-in-name"],
)
async def test_unsendable_header_names_the_header_not_its_value(
    header: tuple[bytes, bytes], name: str
) -> None:
    async with raw_server(always(OK)) as server:
        transport = SlotTransport()
        url = f"http://127.0.0.1:{server.port}/"
        with pytest.raises(httpx.LocalProtocolError, match=name) as info:
            await transport.post(url, b"{}", [header])
        assert SECRET.decode() not in str(info.value)
        async with httpx.AsyncClient(transport=transport, timeout=5) as client:
            request = client.build_request("GET", url)
            request.headers = httpx.Headers([*request.headers.raw, header])
            with pytest.raises(httpx.LocalProtocolError, match=name) as info:
                await client.send(request)
            assert SECRET.decode() not in str(info.value)
            assert info.value.request is request
            assert (await client.get(url)).status_code == 200  # the transport goes on
    assert len(server.requests) == 1


async def test_callers_framing_headers_give_way_to_the_real_length() -> None:
    async with raw_server(always(OK)) as server:
        transport = SlotTransport()
        url = f"http://127.0.0.1:{server.port}/"
        framing = [(b"content-length", b"999"), (b"transfer-encoding", b"chunked")]
        reply = await transport.post(url, b'{"a": 1}', framing)
        assert reply.status == 200
        await transport.aclose()
    assert b"content-length: 8" in server.requests[0]
    assert b"999" not in server.requests[0]
    assert b"chunked" not in server.requests[0]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://[::1/v1", "IPv6"),
        ("http://127.0.0.1:70000/", "[Pp]ort"),
        ("http://127.0.0.1:abc/", "[Pp]ort"),
        ("http://127.0.0.1:-1/", "[Pp]ort"),
    ],
    ids=["ipv6", "port-range", "port-name", "port-negative"],
)
async def test_malformed_url_is_an_invalid_url(url: str, problem: str) -> None:
    with pytest.raises(httpx.InvalidURL, match=problem):
        await SlotTransport().post(url, b"{}")


# -- probes: the status, never the whole body ---------------------------------------------


class PeakRss:
    """The highest resident set size seen while inside, sampled every millisecond."""

    def __init__(self) -> None:
        self.start = self.peak = psutil.Process().memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._done.wait(0.001):
            self.peak = max(self.peak, process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start


Answer = Callable[[anyio.abc.SocketStream], Awaitable[None]]


@asynccontextmanager
async def streaming_server(answer: Answer) -> AsyncIterator[str]:
    """A server that reads a request head, then lets ``answer`` write what it likes (and
    reads the next request on the connection if ``answer`` returns)."""

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                while True:
                    buffer = b""
                    while b"\r\n\r\n" not in buffer:
                        buffer += await stream.receive()
                    await answer(stream)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield f"http://127.0.0.1:{port}/health"
        tg.cancel_scope.cancel()


async def endless_body(stream: anyio.abc.SocketStream) -> None:
    await stream.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
    while True:
        await stream.send(chunk)


async def silence(stream: anyio.abc.SocketStream) -> None:
    await anyio.sleep_forever()


async def drip(stream: anyio.abc.SocketStream) -> None:
    """A byte every 20 ms, forever: each read is quick, the answer never ends."""
    for byte in b"HTTP/1.1 200 OK\r\n" + b"x-a: b\r\n" * 100_000:
        await stream.send(bytes([byte]))
        await anyio.sleep(0.02)


@functools.cache
def gzip_of_zeros(megabytes: int) -> bytes:
    """``megabytes`` MB of zeros, gzipped (about 1 KB a MB)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    chunks = [compressor.compress(zeros) for _ in range(megabytes)]
    return b"".join([*chunks, compressor.flush()])


async def gzip_bomb(stream: anyio.abc.SocketStream) -> None:
    """64 MB of zeros as 64 KB of gzip."""
    body = gzip_of_zeros(64)
    head = f"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: {len(body)}\r\n\r\n"
    await stream.send(head.encode() + body)


@asynccontextmanager
async def probe_client(kind: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client over the slot transport (local servers) or httpx's own (proxied)."""
    transport = SlotTransport() if kind == "slot" else None
    async with httpx.AsyncClient(transport=transport, trust_env=False, timeout=30) as client:
        yield client


PROBE_TIMEOUT = 0.5
# What a probe and an excerpt come to, by transport: the slot transport reads a body
# whole (to MAX_BODY, patched to 1 MiB here), httpx's own stops after PROBE_BYTES.
PROBES = [
    ("slot", endless_body, None, httpx.RemoteProtocolError),
    ("httpx", endless_body, 200, 200),
    ("slot", gzip_bomb, 200, 200),
    ("httpx", gzip_bomb, 200, 200),
    ("slot", silence, None, httpx.TimeoutException),
    ("httpx", silence, None, httpx.TimeoutException),
    ("slot", drip, None, httpx.TimeoutException),
    ("httpx", drip, None, httpx.TimeoutException),
]


@pytest.mark.parametrize(
    ("kind", "answer", "status", "outcome"),
    PROBES,
    ids=[f"{kind}-{answer.__name__}" for kind, answer, _, _ in PROBES],
)
async def test_probes_read_little_and_end_in_time(
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    answer: Answer,
    status: int | None,
    outcome: int | type[Exception],
) -> None:
    monkeypatch.setattr(_transport, "MAX_BODY", 1 << 20)
    gzip_of_zeros(64)  # made before the probe's clock starts
    async with streaming_server(answer) as url, probe_client(kind) as client:
        with PeakRss() as rss, anyio.fail_after(PROBE_TIMEOUT + 2):
            assert await probe_status(client, url, PROBE_TIMEOUT) == status
            if isinstance(outcome, int):
                got, body = await fetch_excerpt(client, url, PROBE_TIMEOUT)
                assert (got, len(body) <= PROBE_BYTES) == (outcome, True)
            else:
                with pytest.raises(outcome):
                    await fetch_excerpt(client, url, PROBE_TIMEOUT)
    assert rss.growth < 40 * 2**20, f"grew {rss.growth / 2**20:.0f} MiB"


@pytest.mark.parametrize("kind", ["slot", "httpx"])
async def test_probes_of_what_is_not_there(kind: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/health"  # bound, not listening
        async with probe_client(kind) as client:
            with anyio.fail_after(5):
                assert await probe_status(client, url, PROBE_TIMEOUT) is None
                with pytest.raises(httpx.ConnectError):
                    await fetch_excerpt(client, url, PROBE_TIMEOUT)
                assert await probe_status(client, "http://[::1/health", PROBE_TIMEOUT) is None
                with pytest.raises(httpx.UnsupportedProtocol):
                    await fetch_excerpt(client, "http://[::1/health", PROBE_TIMEOUT)


async def test_endless_chunked_body_ends_at_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_transport, "MAX_BODY", 1 << 20)
    async with streaming_server(endless_body) as url:
        transport = SlotTransport()
        with anyio.fail_after(5), pytest.raises(httpx.RemoteProtocolError, match="over"):
            await transport.post(url, b"{}")
        await transport.aclose()


# -- streamed responses ------------------------------------------------------------------


class Stepper:
    """A server whose answer a test writes piece by piece (``say``), that reports how each
    connection ended (``closed``: the client closed it) and counts connections."""

    def __init__(self) -> None:
        self.send, self.receive = anyio.create_memory_object_stream[bytes | None](100)
        self.connections = 0
        self.closed = anyio.Event()

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        self.connections += 1
        async with stream, anyio.create_task_group() as tg:

            async def watch() -> None:  # EOF from the client: it closed the connection
                try:
                    while await stream.receive():
                        pass
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    self.closed.set()
                    tg.cancel_scope.cancel()

            tg.start_soon(watch)
            async for piece in self.receive:
                if piece is None:
                    break
                await stream.send(piece)
            tg.cancel_scope.cancel()


@asynccontextmanager
async def stepper() -> AsyncIterator[tuple[Stepper, str]]:
    server = Stepper()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with server.send, server.receive, listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, server.handle)
        with anyio.fail_after(10):
            yield server, f"http://127.0.0.1:{port}/v1/chat/completions"
        tg.cancel_scope.cancel()


CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_stream_hands_out_each_piece_as_it_arrives() -> None:
    async with stepper() as (server, url):
        transport = SlotTransport()
        await server.send.send(CHUNKED_HEAD)
        response = await transport.open_stream(url, b"{}")
        assert response.status == 200
        assert response.header(b"content-type") == "text/event-stream"
        for piece in (b"data: 1\n\n", b"data: 2\n\n"):  # the next is sent only once read
            await server.send.send(chunk(piece))
            assert await response.receive() == piece
        await server.send.send(b"0\r\n\r\n")
        assert await response.receive() == b""
        assert response.complete
        assert await response.receive() == b""  # and stays so
        assert transport._idle  # the connection went back for reuse
        await transport.aclose()


async def test_stream_of_a_content_length_body_reuses_the_connection() -> None:
    async with raw_server(always(OK)) as server:
        transport = SlotTransport()
        url = f"http://127.0.0.1:{server.port}/v1/x"
        for _ in range(2):
            response = await transport.open_stream(url, b"{}")
            assert [piece async for piece in response] == [b"{}"]
            assert response.complete
        reply = await transport.post(url, b"{}")
        assert reply.content == b"{}"
        await transport.aclose()
    assert server.connections == 1


async def test_stream_of_a_close_delimited_body() -> None:
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: x\n\n"
    async with raw_server(always(answer, close=True)) as server:
        transport = SlotTransport()
        for _ in range(2):  # the closed connection is not reused
            response = await transport.open_stream(f"http://127.0.0.1:{server.port}/", b"{}")
            assert b"".join([piece async for piece in response]) == b"data: x\n\n"
            assert response.complete
        await transport.aclose()
    assert server.connections == 2


@pytest.mark.parametrize("how", ["aclose", "cancel"])
async def test_stopping_early_closes_the_connection(how: str) -> None:
    async with stepper() as (server, url):
        transport = SlotTransport()
        await server.send.send(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
        response = await transport.open_stream(url, b"{}")
        assert await response.receive() == b"data: 1\n\n"
        if how == "aclose":
            await response.aclose()
        else:
            with anyio.move_on_after(0.05):
                await response.receive()  # nothing more comes: cancelled while reading
        await server.closed.wait()  # the server sees the client go: it can abort
        with pytest.raises(httpx.ReadError):
            await response.receive()
        assert not transport._idle
        await transport.aclose()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (CHUNKED_HEAD + chunk(b"data: 1\n\n"), httpx.RemoteProtocolError),  # cut: no last chunk
        (CHUNKED_HEAD + b"zz\r\n", httpx.RemoteProtocolError),  # broken chunked framing
        (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort", httpx.RemoteProtocolError),
    ],
)
async def test_a_broken_body_is_an_error_and_the_connection_is_dropped(
    answer: bytes, error: type[Exception]
) -> None:
    async with raw_server(always(answer, close=True)) as server:
        transport = SlotTransport()
        response = await transport.open_stream(f"http://127.0.0.1:{server.port}/", b"{}")
        with pytest.raises(error):
            async for _ in response:
                pass
        assert not response.complete and not transport._idle
        await transport.aclose()


async def test_stream_errors_before_the_head_are_httpx_errors() -> None:
    async with raw_server(always(b"", close=True)) as server:
        transport = SlotTransport()
        with pytest.raises(httpx.RemoteProtocolError, match="without answering"):
            await transport.open_stream(f"http://127.0.0.1:{server.port}/", b"{}")
        with pytest.raises(httpx.LocalProtocolError, match="x-key"):
            await transport.open_stream(
                f"http://127.0.0.1:{server.port}/", b"{}", [(b"x-key", b"secret\n")]
            )
        assert not transport._idle
        await transport.aclose()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(httpx.ConnectError):
            await SlotTransport().open_stream(f"http://127.0.0.1:{sock.getsockname()[1]}/", b"")


# -- HTTP/1.1 framing, written by hand and parsed by llhttp -------------------------------

SPLIT = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Long:  a b \t\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
    b'3;name=value;x\r\n{"a\r\n5;ext="q"\r\n": 1}\r\n0;last\r\nx-trailer: t\r\n\r\n'
)


@pytest.mark.parametrize("pieces", [1, len(SPLIT)], ids=["byte-by-byte", "whole"])
async def test_response_split_anywhere_with_chunk_extensions(pieces: int) -> None:
    """A 1xx head, a chunked body with extensions and a trailer, sent byte by byte (or at
    once): the same reply, and the connection reused, whether read whole or streamed."""

    async def answer(stream: anyio.abc.SocketStream) -> None:
        size = -(-len(SPLIT) // pieces)
        for start in range(0, len(SPLIT), size):
            await stream.send(SPLIT[start : start + size])

    async with streaming_server(answer) as url:
        transport = SlotTransport()
        for _ in range(2):
            reply = await transport.post(url, b"{}")
            assert (reply.status, reply.content) == (200, b'{"a": 1}')
            assert reply.header(b"x-long") == "a b"
            assert reply.header(b"content-type") == "application/json"
            assert reply.header(b"x-trailer") is None  # trailers are dropped
            assert [len(idle) for idle in transport._idle.values()] == [1]
        response = await transport.open_stream(url, b"{}")
        assert (response.status, response.header(b"x-long")) == (200, "a b")
        assert b"".join([piece async for piece in response]) == b'{"a": 1}'
        assert response.complete
        assert [len(idle) for idle in transport._idle.values()] == [1]
        await transport.aclose()


class Recorder:
    """A server that records every byte each connection sends, and answers ``OK`` to
    each request head."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        self.received.append(b"")
        number = len(self.received) - 1
        async with stream:
            try:
                while True:
                    data = await stream.receive()
                    self.received[number] += data
                    if data.endswith(b"{}"):
                        await stream.send(OK)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass


@pytest.mark.parametrize(
    "header",
    [(b"x-key", SECRET + b"\r\n"), (b"x key", SECRET), (b"host", b"elsewhere")],
    ids=["crlf", "space-in-name", "second-host"],
)
async def test_bad_header_is_refused_before_anything_is_sent(
    header: tuple[bytes, bytes],
) -> None:
    recorder = Recorder()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    url = f"http://127.0.0.1:{port}/"
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, recorder.handle)
        transport = SlotTransport()
        for open_ in (transport.post, transport.open_stream):
            with pytest.raises(httpx.LocalProtocolError) as info:
                await open_(url, b"{}", [header])
            assert SECRET.decode() not in str(info.value)
        assert recorder.received == []  # not even a connection
        assert (await transport.post(url, b"{}")).status == 200
        await transport.aclose()
        tg.cancel_scope.cancel()
    assert len(recorder.received) == 1
    assert SECRET not in recorder.received[0] and b"elsewhere" not in recorder.received[0]


async def test_unsendable_target_and_method() -> None:
    async with raw_server(always(OK)) as server:
        transport = SlotTransport()
        base = f"http://127.0.0.1:{server.port}"
        with pytest.raises(httpx.LocalProtocolError, match="target") as info:
            await transport.post(f"{base}/a b?key={SECRET.decode()}", b"{}")
        assert SECRET.decode() not in str(info.value)
        async with httpx.AsyncClient(transport=transport, timeout=5) as client:
            with pytest.raises(httpx.LocalProtocolError, match="method"):
                await client.request("GE T", f"{base}/")
            assert (await client.get(f"{base}/")).status_code == 200
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("answer", "reused"),
    [
        (OK, True),
        (OK.replace(b"HTTP/1.1", b"HTTP/1.0"), False),
        (
            OK.replace(b"\r\n\r\n", b"\r\nconnection: keep-alive\r\n\r\n").replace(
                b"/1.1", b"/1.0"
            ),
            False,
        ),
        (OK.replace(b"\r\n\r\n", b"\r\nConnection: Close\r\n\r\n"), False),
        (OK + b"HTTP/1.1 200 OK\r\n", False),  # bytes past the end of the response
        (b"HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n", True),
    ],
    ids=["http11", "http10", "http10-keep-alive", "close", "junk-after", "204"],
)
async def test_reuse_only_after_a_whole_keep_alive_http11_response(
    answer: bytes, reused: bool
) -> None:
    async with raw_server(always(answer)) as server:
        transport = SlotTransport()
        for _ in range(2):
            reply = await transport.post(f"http://127.0.0.1:{server.port}/", b"{}")
            assert reply.status in (200, 204)
            assert reply.content == (b"{}" if reply.status == 200 else b"")
            await anyio.sleep(0.01)
        await transport.aclose()
    assert server.connections == (1 if reused else 2)


async def test_callers_connection_close_is_honoured() -> None:
    async with raw_server(always(OK)) as server:
        transport = SlotTransport()
        for _ in range(2):
            await transport.post(
                f"http://127.0.0.1:{server.port}/", b"{}", [(b"connection", b"close")]
            )
        await transport.aclose()
    assert server.connections == 2


async def test_head_has_no_body_whatever_its_length() -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\n"
    async with (
        raw_server(lambda connection, request: (head if connection == 0 else OK, False)) as server,
        httpx.AsyncClient(transport=SlotTransport(), timeout=5) as client,
    ):
        response = await client.head(f"http://127.0.0.1:{server.port}/")
        assert (response.status_code, response.content, response.headers["x-a"]) == (200, b"", "1")
        response = await client.get(f"http://127.0.0.1:{server.port}/")
        assert (response.status_code, response.content) == (200, b"{}")
    assert server.requests[0].startswith(b"HEAD / HTTP/1.1")
    assert server.connections == 2  # llhttp would read a body: the connection ends


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            b"HTTP/1.1 200 OK\r\nx-a: b\x00c\r\ncontent-length: 0\r\n\r\n",
            "NUL in the value of header 'x-a'",
        ),
        (b"HTTP/1.1 20x OK\r\n\r\n", r"it began b'HTTP/1.1 20x OK'"),  # quoted, for redaction
        (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n", "broken HTTP response"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab", "without a complete"),
        (b"HTTP/1.1 200 OK\r\ncontent-le", "without answering"),
    ],
    ids=["nul", "status", "upgrade", "cut-chunk", "cut-head"],
)
async def test_more_broken_responses(answer: bytes, message: str) -> None:
    async with raw_server(always(answer, close=True)) as server:
        transport = SlotTransport()
        with pytest.raises(httpx.RemoteProtocolError, match=message):
            await transport.post(f"http://127.0.0.1:{server.port}/", b"{}")
        assert not transport._idle
        await transport.aclose()


async def test_bare_line_feeds_are_read_as_h11_read_them() -> None:
    answer = b"HTTP/1.1 200 OK\ncontent-length: 2\n\n{}"
    async with raw_server(always(answer)) as server:
        transport = SlotTransport()
        reply = await transport.post(f"http://127.0.0.1:{server.port}/", b"{}")
        assert (reply.status, reply.content) == (200, b"{}")
        await transport.aclose()
