"""The router front under arbitrary input: its HTTP server fed any bytes a client may
send, and its request checks fed any body. Neither may hang, crash or answer with
anything but an HTTP answer (or a closed connection)."""

from __future__ import annotations

import json

import anyio
from hypothesis import given
from hypothesis import strategies as st

from servescope._asgi import listen_socket
from servescope._front import _Answer, _payload
from servescope._httpserver import Request, Responder, serve_http

REQUEST_LINES = st.sampled_from(
    [b"GET / HTTP/1.1\r\n", b"POST /v1/completions HTTP/1.1\r\n", b"GET /x HTTP/1.0\r\n", b""]
)
HEADERS = st.lists(
    st.sampled_from(
        [
            b"host: x\r\n",
            b"content-length: 3\r\n",
            b"content-length: -1\r\n",
            b"transfer-encoding: chunked\r\n",
            b"expect: 100-continue\r\n",
            b"connection: close\r\n",
            b"x: \x00\r\n",
            b"bad header\r\n",
        ]
    ),
    max_size=4,
)


async def _echo(request: Request, responder: Responder) -> None:
    await responder.respond(200, request.body[:100], [(b"content-type", b"text/plain")])


async def _exchange(data: bytes) -> bytes:
    sock = listen_socket()
    port = sock.getsockname()[1]
    received = b""
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: serve_http(_echo, sock, task_status=task_status))
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(data)
            # An incomplete request waits for the rest (a 408 after 30 s): read what
            # comes within a moment, then hang up.
            with anyio.move_on_after(0.05):
                while True:
                    try:
                        received += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
        tg.cancel_scope.cancel()
    return received


@given(REQUEST_LINES, HEADERS, st.binary(max_size=200))
def test_the_front_server_answers_any_bytes_with_http_or_closes(
    line: bytes, headers: list[bytes], tail: bytes
) -> None:
    answer = anyio.run(_exchange, line + b"".join(headers) + b"\r\n" + tail)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:80]
    assert b" 500 " not in answer.split(b"\r\n", 1)[0]  # never an internal error


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(st.one_of(st.binary(max_size=300), JSON.map(lambda v: json.dumps(v).encode())))
def test_front_request_bodies_are_accepted_or_refused_with_400_or_404(body: bytes) -> None:
    try:
        payload = _payload(body, "m")
    except _Answer as answer:
        status = answer.status
    else:
        status = 200
        assert isinstance(payload, dict)
        assert payload.get("model") in (None, "m")
    assert status in (200, 400, 404)
