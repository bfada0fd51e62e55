"""Streamed answers end to end: the dummy (in process and as a process), retries before
the first byte, a server dying or stalling mid-stream, a client leaving early, and
hostile servers sending broken event streams."""

from __future__ import annotations

import gc
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from servescope import (
    BadRequest,
    Chunk,
    DummyConfig,
    RequestError,
    RetriesExhausted,
    Server,
    StreamInterrupted,
    open_server,
)
from servescope._client import Outcome, RequestClient, Wire
from servescope._dummy_app import DEFAULT_TEXT
from servescope._redact import MASK, Redactor
from servescope._transport import SlotTransport

from .conftest import dummy_process
from .test_fake_engine import fake_engine, free_port, wait_serving
from .test_requests import KEY, FixedTarget, answer, scripted_pool
from .test_transport import CHUNKED_HEAD, Script, Stepper, always, chunk, stepper

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "hi"}]


async def collect(stream: Any) -> list[Chunk]:
    with anyio.fail_after(10):
        return [piece async for piece in stream]


def sse(*events: Any, done: bool = True) -> bytes:
    """A chunked event-stream answer with these events (dicts as JSON)."""
    body = b"".join(
        chunk(b"data: " + (json.dumps(e).encode() if isinstance(e, dict) else e) + b"\n\n")
        for e in events
    )
    return CHUNKED_HEAD + body + (chunk(b"data: [DONE]\n\n") if done else b"") + b"0\r\n\r\n"


def delta(text: str, finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
    return {"object": "chat.completion.chunk", "choices": [choice]}


# -- against the dummy -------------------------------------------------------------------


async def test_stream_chat_from_the_in_process_dummy() -> None:
    async with open_server(DummyConfig()) as server:
        chunks = await collect(server.stream_chat(MESSAGES))
        assert "".join(c.text for c in chunks) == DEFAULT_TEXT
        assert len(chunks) > 10  # word by word, not one piece
        assert chunks[0].raw["choices"][0]["delta"]["role"] == "assistant"
        assert all(c.raw["object"] == "chat.completion.chunk" for c in chunks)
        assert [c.finish_reason for c in chunks][-2:] == [None, "stop"]
        metrics = server.metrics
        assert (metrics.started, metrics.succeeded, metrics.failed) == (1, 1, 0)
        assert metrics.in_flight == 0


async def test_stream_complete_with_usage_in_the_with_form() -> None:
    async with open_server(DummyConfig(completion_tokens=7)) as server:
        stream = server.stream_complete(
            "abcd", max_tokens=5, stream_options={"include_usage": True}
        )
        async with stream as chunks:
            got = await collect(chunks)
        assert "".join(c.text for c in got) == DEFAULT_TEXT
        assert got[-1].usage is not None and got[-1].usage.completion_tokens == 5
        assert [c.finish_reason for c in got if c.finish_reason] == ["length"]
        assert all(c.raw["object"] == "text_completion" for c in got)
        assert server.metrics.completion_tokens == 5
        assert server.metrics.succeeded == 1


async def test_stream_raw_hands_out_the_event_stream_bytes() -> None:
    payload = {"messages": MESSAGES, "stream": True}
    async with open_server(DummyConfig()) as server, server.stream_raw(payload) as stream:
        assert stream.status == 200
        assert (b"content-type", b"text/event-stream") in stream.headers
        body = b"".join([piece async for piece in stream])
    assert body.startswith(b"data: {") and body.endswith(b"data: [DONE]\n\n")


async def test_a_503_before_the_first_byte_is_retried() -> None:
    headers = {"x-servescope-fault": "status=503|ok", "x-servescope-fault-id": uuid.uuid4().hex}
    payload = {"messages": MESSAGES, "stream": True}
    config = DummyConfig(backoff_base=0.001)
    async with open_server(config) as server:
        async with server.stream_raw(payload, headers=headers) as stream:
            assert stream.status == 200
            assert b"[DONE]" in b"".join([piece async for piece in stream])
        assert server.metrics.retried == 1
        assert server.metrics.succeeded == 1


async def test_seeded_faults_before_the_first_byte_are_retried_for_stream_chat() -> None:
    config = DummyConfig(
        faults=("status=503", "drop"), fault_rate=0.5, fault_seed=3, backoff_base=0.001
    )
    config = config.model_copy(update={"max_retries": 20})
    async with open_server(config) as server:
        for _ in range(10):
            chunks = await collect(server.stream_chat(MESSAGES))
            assert "".join(c.text for c in chunks) == DEFAULT_TEXT
        assert server.metrics.retried > 0
        assert server.metrics.succeeded == 10


async def test_refusals_pass_through_raw_and_raise_parsed() -> None:
    bad = {"messages": MESSAGES, "stream": True, "max_tokens": -1}
    async with open_server(DummyConfig()) as server:
        async with server.stream_raw(bad) as stream:
            assert stream.status == 400
            body = b"".join([piece async for piece in stream])
        assert json.loads(body)["error"]["message"] == "'max_tokens' must be a positive integer"
        with pytest.raises(BadRequest, match="max_tokens") as info:
            await collect(server.stream_chat(MESSAGES, max_tokens=-1))
        assert info.value.status_code == 400
        metrics = server.metrics
        assert (metrics.started, metrics.succeeded, metrics.failed) == (2, 0, 2)


async def test_request_raw() -> None:
    headers = {"x-servescope-fault": "status=503|ok", "x-servescope-fault-id": uuid.uuid4().hex}
    config = DummyConfig(backoff_base=0.001, max_retries=1)
    async with open_server(config) as server:
        reply = await server.request_raw({"messages": MESSAGES}, headers=headers)
        assert reply.status == 200
        assert json.loads(reply.content)["choices"][0]["message"]["content"] == DEFAULT_TEXT
        refused = await server.request_raw({"messages": []})
        assert refused.status == 400 and b"non-empty" in refused.content
        with pytest.raises(RetriesExhausted):
            await server.request_raw(
                {"messages": MESSAGES}, headers={"x-servescope-fault": "status=503"}
            )
        metrics = server.metrics
        assert (metrics.succeeded, metrics.failed, metrics.completion_tokens) == (1, 2, 100)


async def dummy_stats(server: Server) -> dict[str, int]:
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.get(server.base_url + "/dummy/stats")
    return dict(response.json())


async def wait_idle(server: Server) -> None:
    """Until the dummy has no request in flight but the stats request itself (bounded)."""
    with anyio.fail_after(5):
        while (await dummy_stats(server))["in_flight"] > 1:  # noqa: ASYNC110 (another process)
            await anyio.sleep(0.02)


@pytest.mark.parametrize("where", ["in-process", "subprocess"])
async def test_leaving_early_closes_the_connection_and_the_engine_stops(where: str) -> None:
    if where == "in-process":
        config: Any = DummyConfig(token_latency=0.05)
    else:
        config = dummy_process("--token-latency", "0.05")
    async with open_server(config) as server:
        await server.wait_ready()
        started = time.monotonic()
        async with server.stream_chat(MESSAGES) as chunks:
            async for _ in chunks:
                assert (await dummy_stats(server))["in_flight"] == 2  # this, and the stats
                break
        await wait_idle(server)
        assert time.monotonic() - started < 1.5  # not after the whole answer (~1 s)
        assert server.metrics.in_flight == 0
        # The slot is back: another stream goes through whole.
        chunks_after = await collect(server.stream_complete("x"))
        assert "".join(c.text for c in chunks_after) == DEFAULT_TEXT


async def test_one_task_may_hold_several_streams_open() -> None:
    async with open_server(DummyConfig(max_concurrency=2)) as server:
        async with server.stream_chat(MESSAGES) as first, server.stream_complete("x") as second:
            texts = ["".join(c.text for c in await collect(s)) for s in (first, second)]
        assert texts == [DEFAULT_TEXT, DEFAULT_TEXT]
        assert server.metrics.succeeded == 2


# Left without ``async with``, the socket is closed when collected, with a ResourceWarning.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_bare_async_for_left_early_gives_its_slot_back() -> None:
    async with open_server(DummyConfig(max_concurrency=1, token_latency=0.05)) as server:
        async for _ in server.stream_chat(MESSAGES):
            break
        gc.collect()
        assert server.metrics.in_flight == 0
        chunks = await collect(server.stream_chat(MESSAGES))  # the one slot is free
        assert "".join(c.text for c in chunks) == DEFAULT_TEXT


async def test_stream_from_a_subprocess_dummy() -> None:
    async with open_server(dummy_process("--token-latency", "0.001")) as server:
        chunks = await collect(server.stream_chat(MESSAGES))
        assert "".join(c.text for c in chunks) == DEFAULT_TEXT
        await wait_idle(server)


async def test_engine_killed_mid_stream_is_stream_interrupted() -> None:
    port = free_port()
    with fake_engine(port, "--token-latency", "0.05") as proc:
        wait_serving(proc, port, within=20)
        transport = SlotTransport()
        target = FixedTarget(f"http://127.0.0.1:{port}", Wire.build(transport.post, {}))
        client = RequestClient(DummyConfig(request_timeout=30), dispatch=target)
        try:
            with anyio.fail_after(5), pytest.raises(StreamInterrupted, match="broke off"):
                async for number, _ in aenumerate(client.stream_chat(MESSAGES)):
                    if number == 2:
                        proc.kill()
            assert target.released == [Outcome.FAILED]
            assert client.metrics.failed == 1
        finally:
            await transport.aclose()


async def aenumerate(stream: Any) -> AsyncIterator[tuple[int, Any]]:
    number = 0
    async for item in stream:
        yield number, item
        number += 1


# -- against scripted servers ------------------------------------------------------------


@asynccontextmanager
async def streaming_pool(
    script: Script, **config: Any
) -> AsyncIterator[tuple[RequestClient, FixedTarget]]:
    async with scripted_pool(script, redact=Redactor([KEY]), **config) as (pool, _server):
        target = pool._dispatch
        assert isinstance(target, FixedTarget)
        yield pool, target


async def test_retry_only_before_the_first_byte() -> None:
    def script(connection: int, request: int) -> tuple[bytes, bool]:
        if connection == 0:
            return answer(503, b"busy", "retry-after: 0"), True
        return sse(delta("a"), delta("b", "stop")), False

    async with streaming_pool(script) as (pool, target):
        chunks = await collect(pool.stream_chat(MESSAGES))
        assert [c.text for c in chunks] == ["a", "b"]
        assert target.released == [Outcome.FAILED, Outcome.ANSWERED]
        assert len(target.first_bytes) == 1 and target.first_bytes[0] >= 0
        assert pool.metrics.retried == 1


HOSTILE = [
    (sse(b"not json"), RequestError, "not valid JSON"),
    (sse(b"[1, 2]"), RequestError, "not a JSON object"),
    (sse({"choices": [{"delta": {"content": 5}}]}), RequestError, "not a string"),
    (sse({"choices": "x"}), RequestError, "not a list"),
    (sse(delta("a"), done=False), StreamInterrupted, "without \\[DONE\\]"),
    (CHUNKED_HEAD + chunk(b"data: " + b"x" * (5 << 20)), RequestError, "over 4194304 bytes"),
    (
        sse(delta("a"), {"error": {"message": f"engine died; key {KEY}", "code": 500}}),
        StreamInterrupted,
        "reported an error mid-stream: engine died",
    ),
    (sse({"error": "plain"}), StreamInterrupted, "mid-stream: plain"),
    (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: {}\n\n",
        StreamInterrupted,
        "without \\[DONE\\]",
    ),
]


@pytest.mark.parametrize(("response", "error", "match"), HOSTILE)
async def test_hostile_event_streams(response: bytes, error: type[Exception], match: str) -> None:
    async with streaming_pool(always(response, close=True)) as (pool, target):
        with pytest.raises(error, match=match) as info:
            await collect(pool.stream_chat(MESSAGES))
        assert KEY not in str(info.value) and (MASK in str(info.value) or KEY not in match)
        assert target.released == [Outcome.FAILED]  # never retried: bytes were handed out
        assert (pool.metrics.failed, pool.metrics.in_flight) == (1, 0)


async def test_hostile_streams_fail_the_with_form_too() -> None:
    async with streaming_pool(always(sse(delta("a"), done=False), close=True)) as (pool, _):
        with pytest.raises(StreamInterrupted):
            async with pool.stream_chat(MESSAGES) as chunks:
                async for _ in chunks:
                    pass


@asynccontextmanager
async def stepped(
    **config: Any,
) -> AsyncIterator[tuple[Stepper, FixedTarget, RequestClient]]:
    """A client of one target: a server this test feeds step by step (``stepper``);
    the client's connections closed on every way out."""
    async with stepper() as (server, url):
        transport = SlotTransport()
        target = FixedTarget(url.rsplit("/v1/", 1)[0], Wire.build(transport.post, {}))
        try:
            yield server, target, RequestClient(DummyConfig(**config), dispatch=target)
        finally:
            await transport.aclose()


async def test_a_gap_longer_than_the_request_timeout_is_stream_interrupted() -> None:
    async with stepped(request_timeout=0.3) as (server, target, client):
        await server.send.send(
            CHUNKED_HEAD + chunk(b"data: " + json.dumps(delta("a")).encode() + b"\n\n")
        )
        started = time.monotonic()
        with pytest.raises(StreamInterrupted, match=r"no more of the answer for 0\.3 s"):
            async for _ in client.stream_chat(MESSAGES):
                pass
        assert time.monotonic() - started < 2
        await server.closed.wait()  # the connection was closed: the engine can abort
        assert target.released == [Outcome.FAILED]


async def test_the_target_failing_mid_stream_is_stream_interrupted() -> None:
    async with stepped(request_timeout=30) as (server, target, client):
        await server.send.send(
            CHUNKED_HEAD + chunk(b"data: " + json.dumps(delta("a")).encode() + b"\n\n")
        )
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                with pytest.raises(StreamInterrupted, match="server failed"):
                    async with client.stream_chat(MESSAGES) as chunks:
                        async for _ in chunks:  # the next read is waiting when it fails
                            tg.start_soon(fail_soon, target)
        await server.closed.wait()
        assert target.released == [Outcome.LOST]


async def test_a_read_after_the_target_failed_is_stream_interrupted_at_once() -> None:
    async with stepped(request_timeout=30) as (server, target, client):
        await server.send.send(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
        with anyio.fail_after(5), pytest.raises(StreamInterrupted, match="server failed"):
            async with client.stream_raw({"messages": MESSAGES}) as stream:
                async for _ in stream:
                    target.lost = True  # between reads: no attempt scope to cancel
        await server.closed.wait()
        assert target.released == [Outcome.LOST]


async def fail_soon(target: FixedTarget) -> None:
    """As a pool does when a replica fails: mark it lost, cancel the attempts on it."""
    await anyio.sleep(0.05)
    target.lost = True
    for scope in list(target.attempts):
        scope.cancel()


@pytest.mark.parametrize("form", ["raw", "chunks"])
async def test_the_callers_cancellation_is_not_swallowed(form: str) -> None:
    async with stepped(request_timeout=30) as (server, target, client):
        await server.send.send(
            CHUNKED_HEAD + chunk(b"data: " + json.dumps(delta("a")).encode() + b"\n\n")
        )
        pieces: list[object] = []
        with anyio.move_on_after(0.2) as scope:
            if form == "raw":
                async with client.stream_raw({"messages": MESSAGES}) as stream:
                    async for piece in stream:
                        pieces.append(piece)
            else:
                async with client.stream_chat(MESSAGES) as chunks:
                    async for parsed in chunks:
                        pieces.append(parsed)
        assert scope.cancelled_caught and len(pieces) == 1
        await server.closed.wait()
        assert target.released == [Outcome.ABANDONED]
        assert client.metrics.in_flight == 0


async def test_leaving_the_raw_stream_early_closes_the_connection() -> None:
    async with stepped() as (server, target, client):
        await server.send.send(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
        async with client.stream_raw({"messages": MESSAGES}) as stream:
            assert await stream.receive() == b"data: 1\n\n"
        await server.closed.wait()
        assert target.released == [Outcome.ABANDONED]
        assert (client.metrics.started, client.metrics.in_flight) == (1, 0)


async def test_an_answer_that_stops_before_its_first_byte_is_retried() -> None:
    def script(connection: int, request: int) -> tuple[bytes, bool]:
        if connection == 0:
            return CHUNKED_HEAD, True  # the head, then the connection is cut
        return sse(delta("a", "stop")), False

    async with streaming_pool(script) as (pool, target):
        chunks = await collect(pool.stream_chat(MESSAGES))
        assert [c.text for c in chunks] == ["a"]
        assert target.released == [Outcome.FAILED, Outcome.ANSWERED]


async def test_a_stream_over_a_wire_that_cannot_stream_comes_whole() -> None:
    async with streaming_pool(always(sse(delta("a"), delta("b", "stop")))) as (pool, target):
        wire = target.wire
        target.wire = Wire(wire.post, wire.headers)  # no open_stream: posts and reads whole
        chunks = await collect(pool.stream_chat(MESSAGES))
        assert [c.text for c in chunks] == ["a", "b"]
