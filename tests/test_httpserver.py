"""The front's HTTP/1.1 server against real clients and raw, hostile sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest

from servescope import _httpserver
from servescope._asgi import listen_socket
from servescope._httpserver import Request, Responder, serve_http

pytestmark = pytest.mark.anyio


class App:
    """A handler with a few routes, recording what happened."""

    def __init__(self) -> None:
        self.cancelled = 0
        self.started = anyio.Event()

    async def __call__(self, request: Request, responder: Responder) -> None:
        if request.path == "/echo":
            body = b"%s %s ?%s %s" % (
                request.method.encode(),
                request.path.encode(),
                request.query.encode(),
                request.body,
            )
            await responder.respond(200, body, [(b"content-type", b"text/plain")])
        elif request.path == "/stream":
            await responder.start(200, [(b"content-type", b"text/event-stream")])
            for number in range(3):
                await responder.send(b"data: %d\n\n" % number)
        elif request.path == "/hang":
            self.started.set()
            try:
                await anyio.sleep_forever()
            finally:
                self.cancelled += 1
        elif request.path == "/bug":
            raise RuntimeError("a bug in the handler")
        elif request.path == "/silent":
            return
        elif request.path == "/inject":  # a handler bug: a header value with CR LF
            await responder.respond(200, b"", [(b"x-a", b"1\r\nx-injected: yes")])
        else:
            await responder.respond(404, b"no", [])


@asynccontextmanager
async def serving(app: App, **options: int) -> AsyncIterator[str]:
    sock = listen_socket()
    port = sock.getsockname()[1]
    async with anyio.create_task_group() as tg:
        await tg.start(
            lambda task_status: serve_http(app, sock, task_status=task_status, **options)
        )
        yield f"http://127.0.0.1:{port}"
        tg.cancel_scope.cancel()


async def raw(url: str, data: bytes, *, read_until_close: bool = True) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    async with await anyio.connect_tcp(host, int(port)) as stream:
        await stream.send(data)
        received = b""
        with anyio.fail_after(5):
            while True:
                try:
                    received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return received
                if not read_until_close and b"\r\n\r\n" in received:
                    return received


async def test_keep_alive_requests_and_query_and_body() -> None:
    async with serving(App()) as url, httpx.AsyncClient(base_url=url) as client:
        for number in range(3):
            reply = await client.post(f"/echo?n={number}", content=b"body")
            assert reply.status_code == 200
            assert reply.text == f"POST /echo ?n={number} body"
            assert reply.headers["server"] == "servescope"


async def test_streamed_answer_is_chunked_and_whole() -> None:
    async with serving(App()) as url, httpx.AsyncClient(base_url=url) as client:
        async with client.stream("GET", "/stream") as reply:
            assert reply.headers["transfer-encoding"] == "chunked"
            body = b"".join([chunk async for chunk in reply.aiter_bytes()])
        assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_pipelined_requests_are_answered_in_order() -> None:
    request = b"GET /echo?%d HTTP/1.1\r\nhost: x\r\n\r\n"
    data = (
        request % 1 + request % 2 + b"GET /echo?3 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    async with serving(App()) as url:
        answer = await raw(url, data)
    assert answer.count(b"HTTP/1.1 200") == 3
    assert answer.index(b"?1") < answer.index(b"?2") < answer.index(b"?3")


async def test_a_client_that_goes_away_cancels_its_handler() -> None:
    app = App()
    async with serving(app) as url:
        host, port = url.removeprefix("http://").split(":")
        stream = await anyio.connect_tcp(host, int(port))
        await stream.send(b"GET /hang HTTP/1.1\r\nhost: x\r\n\r\n")
        with anyio.fail_after(5):
            await app.started.wait()
        await stream.aclose()
        with anyio.fail_after(5):
            while not app.cancelled:  # noqa: ASYNC110 (a counter, no event)
                await anyio.sleep(0.01)
        # and the server goes on serving
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/echo")).status_code == 200


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nbad header line\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 999999999\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n", 400),
    ],
)
async def test_hostile_requests_get_an_error_and_a_closed_connection(
    data: bytes, status: int
) -> None:
    async with serving(App()) as url:
        answer = await raw(url, data)
        assert answer.startswith(b"HTTP/1.1 %d " % status)
        assert b"connection: close" in answer and b'"error"' in answer
        async with httpx.AsyncClient(base_url=url) as client:  # still serving
            assert (await client.get("/echo")).status_code == 200


async def test_a_chunked_body_over_the_cap_is_413() -> None:
    data = b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
    data += b"400\r\n" + b"x" * 1024 + b"\r\n" + b"400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n"
    async with serving(App(), max_body=1500) as url:
        answer = await raw(url, data)
    assert answer.startswith(b"HTTP/1.1 413 ")


async def test_a_slow_client_gets_408(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_httpserver, "REQUEST_TIMEOUT", 0.2)
    async with serving(App()) as url:
        answer = await raw(url, b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nab")
    assert answer.startswith(b"HTTP/1.1 408 ")


async def test_an_idle_connection_is_closed_after_the_keepalive_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_httpserver, "KEEPALIVE_TIMEOUT", 0.2)
    async with serving(App()) as url:
        assert await raw(url, b"") == b""  # closed by the server, nothing sent


async def test_a_handler_bug_is_a_500_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving(App()) as url, httpx.AsyncClient(base_url=url) as client:
        for path in ("/bug", "/silent"):
            reply = await client.get(path)
            assert reply.status_code == 500
            assert "internal error" in reply.json()["error"]["message"]
        assert (await client.get("/echo")).status_code == 200
    assert "a bug in the handler" in caplog.text


async def test_expect_100_continue_is_honoured() -> None:
    data = b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n"
    async with serving(App()) as url:
        host, port = url.removeprefix("http://").split(":")
        async with await anyio.connect_tcp(host, int(port)) as stream:
            await stream.send(data)
            with anyio.fail_after(5):
                assert (await stream.receive()).startswith(b"HTTP/1.1 100 ")
            await stream.send(b"ok")
            with anyio.fail_after(5):
                assert b"POST /echo ? ok" in await stream.receive()


async def test_an_http10_client_gets_a_close_delimited_stream() -> None:
    async with serving(App()) as url:
        answer = await raw(url, b"GET /stream HTTP/1.0\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_an_http10_client_with_keep_alive_keeps_its_connection() -> None:
    request = b"GET /echo?%d HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"
    async with serving(App()) as url:
        answer = await raw(url, request % 1 + b"GET /echo?2 HTTP/1.0\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200") == 2
    assert b"connection: keep-alive" in answer and answer.endswith(b"?2 ")


async def test_a_header_with_cr_lf_from_the_handler_is_a_500_not_a_split_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving(App()) as url:
        answer = await raw(url, b"GET /inject HTTP/1.1\r\nhost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 500 ") and b"x-injected" not in answer
    assert "CR, LF or NUL" in caplog.text


async def test_pipelined_requests_across_reads_and_split_byte_by_byte() -> None:
    data = b"POST /echo?1 HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc"
    data += b"POST /echo?2 HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
    data += b"2\r\nde\r\n1\r\nf\r\n0\r\n\r\n"
    data += b"GET /echo?3 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    async with serving(App()) as url:
        host, port = url.removeprefix("http://").split(":")
        async with await anyio.connect_tcp(host, int(port)) as stream:
            for index in range(len(data)):
                await stream.send(data[index : index + 1])
                if index % 3 == 0:
                    await anyio.sleep(0.001)  # separate reads (most of the time)
            answer = b""
            with anyio.fail_after(5):
                while True:
                    try:
                        answer += await stream.receive()
                    except anyio.EndOfStream:
                        break
    assert answer.count(b"HTTP/1.1 200") == 3
    assert answer.index(b"POST /echo ?1 abc") < answer.index(b"POST /echo ?2 def")
    assert answer.index(b"?2 def") < answer.index(b"GET /echo ?3 ")


async def test_a_head_request_gets_the_length_and_no_body() -> None:
    async with serving(App()) as url:
        answer = await raw(url, b"HEAD /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n")
    assert b"content-length: 13\r\n" in answer  # "HEAD /echo ? "
