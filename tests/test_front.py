"""The router front (``servescope route``): real clients — the openai SDK and httpx —
against a front over dummy replicas running as processes; replicas killed under load
and mid-stream, a remote replica registering and its lease lapsing, clients going away,
the admin API's guard, admission control, and ``/metrics`` read by Prometheus' parser.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

import servescope
from servescope import Pool, open_pool
from servescope._asgi import listen_socket, serve_asgi
from servescope._dummy_app import DEFAULT_TEXT, DummyApp, DummySettings
from servescope._front import Front, open_front
from servescope._frontconfig import FrontConfig

from .test_pool import CRASH_SCRIPT, dummy, eventually, gone, process, script
from .test_pool_chaos import backends

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "hi"}]
SDK_MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
TOKEN = "admin-token-for-tests"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@asynccontextmanager
async def fronted(
    config: servescope.ServerConfig | None = None,
    replicas: int = 2,
    *,
    routing: str = "round_robin",
    **front: Any,
) -> AsyncIterator[tuple[Pool, Front]]:
    """A front (any free port, the admin token set) over ``replicas`` copies of
    ``config`` (default: dummy processes), all ready."""
    config = config or process("--model", "dummy")
    async with open_pool(
        config, replicas=replicas, routing=routing, open_membership=True, **FAST_POOL
    ) as pool:
        if replicas:
            await pool.wait_ready(replicas)
        settings = FrontConfig(port=0, admin_token=TOKEN, **front)
        async with open_front(pool, settings) as running:
            yield pool, running


FAST_POOL: dict[str, Any] = {"restart_backoff": 0.05, "restart_backoff_max": 0.2}


def sdk(front: Front, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=front.url + "/v1", api_key="unused", **options)


async def test_openai_sdk_whole_answers_round_robin_across_replicas() -> None:
    async with fronted(replicas=3) as (pool, front), sdk(front) as client:
        for _ in range(9):
            chat = await client.chat.completions.create(model="dummy", messages=SDK_MESSAGES)
            assert chat.choices[0].message.content == DEFAULT_TEXT
        text = await client.completions.create(model="dummy", prompt="once", max_tokens=3)
        assert text.choices[0].finish_reason == "length"
        assert [model.id async for model in client.models.list()] == ["dummy"]
        answered = [replica.answered for replica in pool.replicas]
        assert sorted(answered) == [3, 3, 4]  # round robin: 10 requests over 3 replicas
        async with httpx.AsyncClient() as http:  # and as each replica saw it
            urls = [f"{replica.base_url}/dummy/stats" for replica in pool.replicas]
            seen = [(await http.get(url)).json()["completions"] for url in urls]
        assert seen == answered


async def test_request_id_is_passed_to_the_replica_returned_and_assigned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str | None] = []
    bodies: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/v1/models":
            await inner(scope, receive, send)
            return
        seen.append(dict(scope["headers"]).get(b"x-request-id", b"").decode() or None)
        body, more = b"", True
        while more:  # the body, recorded whole, then handed to the dummy in one piece
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        bodies.append(body)

        async def replay() -> Any:
            return {"type": "http.request", "body": body, "more_body": False}

        await inner(scope, replay, send)

    inner = DummyApp(DummySettings())
    async with anyio.create_task_group() as tg:
        sock = listen_socket()
        await tg.start(lambda task_status: serve_asgi(app, sock, task_status=task_status))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with fronted(dummy(), replicas=0) as (pool, front):
            index = pool.add_endpoint(url)
            await eventually(lambda: pool.ready_count() == 1)
            async with httpx.AsyncClient(base_url=front.url) as client:
                body = {"model": "dummy", "messages": MESSAGES}
                mine = await client.post(
                    "/v1/chat/completions", json=body, headers={"x-request-id": "job-7.42"}
                )
                assert mine.status_code == 200, mine.text
                assert mine.headers["x-request-id"] == "job-7.42"
                assigned = await client.post(
                    "/v1/chat/completions", json=body, headers={"x-request-id": "bad id\x7f"}
                )
                new_id = assigned.headers["x-request-id"]
                assert len(new_id) == 32 and new_id != "bad id"
            assert "job-7.42" in seen and new_id in seen
            assert "job-7.42 POST /v1/chat/completions -> 200" in caplog.text
            # bodies pass through as they came: spacing, key order, escapes, unknown keys
            odd = b'{ "messages" : [{"role":"user","content":"h\\u00e9"}], "model":"dummy", "x":1}'
            async with httpx.AsyncClient(base_url=front.url) as client:
                passed = await client.post("/v1/chat/completions", content=odd)
                assert passed.status_code == 200
            assert bodies[-1] == odd
            assert index == 0
        tg.cancel_scope.cancel()


async def test_sigkill_of_a_replica_under_load_loses_no_whole_request() -> None:
    async with fronted(replicas=3, routing="least_loaded") as (pool, front):
        victim = pool.replicas[1].pid
        assert victim is not None
        statuses: list[int] = []
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=front.url, limits=limits, timeout=60) as client:

            async def one(number: int) -> None:
                body = {"model": "dummy", "messages": MESSAGES, "max_tokens": 4}
                reply = await client.post("/v1/chat/completions", json=body)
                statuses.append(reply.status_code)
                if number == 40:
                    os.kill(victim, signal.SIGKILL)

            async with anyio.create_task_group() as tg:
                for number in range(300):
                    tg.start_soon(one, number)
        assert statuses == [200] * 300
        await eventually(lambda: gone(victim))


async def test_wrong_model_bad_json_and_unknown_routes_are_clear_errors() -> None:
    async with (
        fronted(dummy(), replicas=1) as (_, front),
        httpx.AsyncClient(base_url=front.url) as client,
    ):
        other = await client.post(
            "/v1/chat/completions", json={"model": "gpt-9", "messages": MESSAGES}
        )
        assert other.status_code == 404
        assert "gpt-9" in other.json()["error"]["message"]
        broken = await client.post("/v1/completions", content=b"{not json")
        assert broken.status_code == 400 and "not valid JSON" in broken.text
        array = await client.post("/v1/completions", content=b"[1, 2]")
        assert array.status_code == 400 and "JSON object" in array.text
        refused = await client.post("/v1/completions", json={"prompt": 7})
        assert refused.status_code == 400  # the replica's own 400, passed through
        assert (await client.get("/nowhere")).status_code == 404
        assert (await client.get("/v1/chat/completions")).status_code == 405


async def test_admin_api_needs_its_token() -> None:
    async with (
        fronted(dummy(), replicas=1) as (_, front),
        httpx.AsyncClient(base_url=front.url) as client,
    ):
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token-xyz"},
            {"Authorization": TOKEN},
        ):
            for method, path in (
                ("GET", "/workers"),
                ("POST", "/pause"),
                ("DELETE", "/workers/0"),
            ):
                reply = await client.request(method, path, headers=headers)
                assert reply.status_code == 401, (method, path, headers)
                assert TOKEN not in reply.text
        listed = await client.get("/workers", headers=ADMIN)
        assert listed.status_code == 200
        assert [w["state"] for w in listed.json()["workers"]] == ["ready"]


def test_a_non_loopback_front_needs_an_admin_token() -> None:
    with pytest.raises(servescope.ConfigError, match="needs an admin token"):
        FrontConfig(host="0.0.0.0")
    FrontConfig(host="0.0.0.0", admin_token=TOKEN)
    FrontConfig(host="::1")
    with pytest.raises(servescope.ConfigError, match="at least 8"):
        FrontConfig(admin_token="short")


async def test_pause_resume_drain_over_the_admin_api() -> None:
    async with (
        fronted(dummy(), replicas=2) as (pool, front),
        httpx.AsyncClient(base_url=front.url, headers=ADMIN) as client,
    ):
        assert (await client.post("/resume")).status_code == 409  # not paused
        assert (await client.post("/pause")).json() == {"state": "paused"}
        assert pool.state.value == "paused"
        assert (await client.post("/resume")).json() == {"state": "running"}
        body = {"messages": MESSAGES}
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        assert (await client.post("/drain")).json() == {"state": "stopped"}
        closed = await client.post("/v1/chat/completions", json=body)
        assert closed.status_code == 503
        assert (await client.get("/readiness")).status_code == 503


async def test_queue_full_is_429_and_queue_timeout_503_with_retry_after() -> None:
    config = dummy(latency=0.5)
    async with fronted(config, replicas=1, max_concurrency=1, queue_size=1, queue_timeout=0.2) as (
        _,
        front,
    ):
        async with httpx.AsyncClient(base_url=front.url, timeout=10) as client:
            replies: list[httpx.Response] = []

            async def one() -> None:
                replies.append(
                    await client.post("/v1/chat/completions", json={"messages": MESSAGES})
                )

            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(one)
                    await anyio.sleep(0.02)
        statuses = sorted(reply.status_code for reply in replies)
        assert statuses == [200, 429, 503]
        for reply in replies:
            if reply.status_code != 200:
                assert int(reply.headers["retry-after"]) >= 1
                assert reply.json()["error"]["type"] == "overloaded"


async def test_readiness_and_health() -> None:
    async with (
        fronted(
            dummy(),
            replicas=0,
        ) as (_pool, front),
        httpx.AsyncClient(base_url=front.url) as client,
    ):
        assert (await client.get("/health")).status_code == 200
        not_ready = await client.get("/readiness")
        assert not_ready.status_code == 503 and not_ready.json()["ready"] == 0


async def test_metrics_parse_with_prometheus_and_carry_per_replica_series() -> None:
    async with fronted(replicas=2) as (_pool, front), sdk(front) as client:
        for _ in range(4):
            await client.chat.completions.create(model="dummy", messages=SDK_MESSAGES)
        async with httpx.AsyncClient(base_url=front.url) as http:
            text = (await http.get("/metrics")).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    requests = {
        (s.labels["replica"], s.labels["outcome"]): s.value
        for s in families["servescope_replica_requests"].samples
        if s.name.endswith("_total")
    }
    assert requests[("0", "answered")] == 2 and requests[("1", "answered")] == 2
    states = {
        s.labels["replica"]: s.labels["state"]
        for s in families["servescope_replica_state"].samples
        if s.value == 1
    }
    assert states == {"0": "ready", "1": "ready"}
    latency = [
        s
        for s in families["servescope_replica_latency_seconds"].samples
        if s.name.endswith("_count")
    ]
    assert sorted(s.value for s in latency) == [2, 2]
    for name in (
        "servescope_replica_in_flight",
        "servescope_replica_breaker_state",
        "servescope_replica_errors",
        "servescope_replica_retries",
        "servescope_replica_restarts",
        "servescope_replica_time_to_first_token_seconds",
        "servescope_front_requests",
        "servescope_front_rejected",
        "servescope_pool_ready_replicas",
    ):
        assert name in families, name


async def test_register_probe_failure_and_deregister_over_the_admin_api() -> None:
    async with fronted(dummy(), replicas=0) as (_pool, front), anyio.create_task_group() as tg:
        sock = listen_socket()
        app = DummyApp(DummySettings())
        await tg.start(lambda task_status: serve_asgi(app, sock, task_status=task_status))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with httpx.AsyncClient(base_url=front.url, headers=ADMIN) as client:
            added = await client.post("/workers", json={"url": url + "/v1"})
            assert added.status_code == 201, added.text
            index = added.json()["id"]
            again = await client.post("/workers", json={"url": url})
            assert again.status_code == 200 and again.json()["id"] == index
            chat = await client.post("/v1/chat/completions", json={"messages": MESSAGES})
            assert chat.status_code == 200
            dead = listen_socket()  # bound and listening, never accepting: then closed
            dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}"
            dead.close()
            refused = await client.post("/workers", json={"url": dead_url})
            assert refused.status_code == 502 and "check" in refused.text
            bad = await client.post("/workers", json={"url": "ftp://x"})
            assert bad.status_code == 400
            itself = await client.post(
                "/workers", json={"url": front.url.replace("127.0.0.1", "localhost")}
            )
            assert itself.status_code == 400 and "own address" in itself.text
            removed = await client.delete(f"/workers/{index}")
            assert removed.status_code == 200
            listed = (await client.get("/workers")).json()["workers"]
            assert listed == []
            assert (await client.delete(f"/workers/{index}")).status_code == 404
        tg.cancel_scope.cancel()


@asynccontextmanager
async def cli_serving(*args: str) -> AsyncIterator[anyio.abc.Process]:
    """``servescope serve ARGS`` as a process; SIGTERM (then SIGKILL) on the way out."""
    command = [sys.executable, "-m", "servescope.cli", "serve", *args]
    process = await anyio.open_process(command, stdout=-1, stderr=-1)
    try:
        yield process
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGCONT)
                process.terminate()
                with anyio.move_on_after(15):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    await stream.aclose()


async def test_a_remote_replica_registers_its_lease_lapses_when_frozen_and_it_rejoins() -> None:
    async with fronted(dummy(), replicas=0, lease_ttl=1.5) as (pool, front):
        args = ("--register-with", front.url, "--token", TOKEN, "--set", "health_interval=0.2")
        async with (
            cli_serving(*args) as server,
            httpx.AsyncClient(base_url=front.url, headers=ADMIN) as client,
        ):

            async def workers() -> list[dict[str, Any]]:
                return list((await client.get("/workers")).json()["workers"])

            with anyio.fail_after(30):
                while not [w for w in await workers() if w["state"] == "ready"]:  # noqa: ASYNC110 (the front's state, seen over HTTP)
                    await anyio.sleep(0.05)
            (joined,) = await workers()
            assert joined["lease_left"] is not None
            chat = await client.post("/v1/chat/completions", json={"messages": MESSAGES})
            assert chat.status_code == 200
            server.send_signal(signal.SIGSTOP)
            with anyio.fail_after(10):
                while await workers():  # noqa: ASYNC110 (the front's state, seen over HTTP)
                    await anyio.sleep(0.05)
            server.send_signal(signal.SIGCONT)  # it renews, is told it is forgotten: joins again
            with anyio.fail_after(15):
                while not [w for w in await workers() if w["state"] == "ready"]:  # noqa: ASYNC110 (the front's state, seen over HTTP)
                    await anyio.sleep(0.05)
            (rejoined,) = await workers()
            assert rejoined["url"] == joined["url"] and rejoined["id"] != joined["id"]
            server.terminate()  # it deregisters on its way out
            with anyio.fail_after(15):
                await server.wait()
            assert await workers() == []
            assert pool.ready_count() == 0


def test_json_payloads_are_forwarded_as_sent() -> None:
    # the front checks the model and passes the rest through: unknown fields survive
    from servescope._front import _payload

    body = json.dumps({"model": "dummy", "messages": MESSAGES, "vendor_x": [1]}).encode()
    assert _payload(body, "dummy")["vendor_x"] == [1]


# -- streaming ------------------------------------------------------------------------------


# On trio, the openai client's own SSE generators are garbage-collected unfinished even
# after the stream is closed (see test_openai_client.py); that is theirs, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_openai_sdk_streams_through_the_front() -> None:
    async with fronted(replicas=2) as (pool, front), sdk(front) as client:
        stream = await client.chat.completions.create(
            model="dummy",
            messages=SDK_MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        async with stream:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                usage = chunk.usage or usage
        assert "".join(pieces) == DEFAULT_TEXT
        assert usage is not None and usage.completion_tokens == 100
        text = await client.completions.create(model="dummy", prompt="x", stream=True)
        async with text:
            joined = "".join([chunk.choices[0].text async for chunk in text if chunk.choices])
        assert joined == DEFAULT_TEXT
        assert sum(replica.answered for replica in pool.replicas) == 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_replica_dying_mid_stream_is_an_error_event_the_sdk_raises() -> None:
    config = process("--model", "dummy", "--token-latency", "0.1")
    async with fronted(config, replicas=2) as (pool, front), sdk(front, max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="dummy", messages=SDK_MESSAGES, stream=True
        )
        pieces: list[str] = []
        with pytest.raises(openai.APIError) as caught:
            async with stream:
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        pieces.append(chunk.choices[0].delta.content)
                    if len(pieces) == 2:
                        (busy,) = [r for r in pool.replicas if r.in_flight]
                        assert busy.pid is not None
                        os.kill(busy.pid, signal.SIGKILL)
        assert 2 <= len(pieces) < len(DEFAULT_TEXT.split())  # cut short, and said so
        assert "broke off" in str(caught.value) or "interrupted" in str(caught.value).lower()


async def test_a_client_leaving_mid_stream_stops_the_generation_on_the_replica() -> None:
    config = process("--model", "dummy", "--token-latency", "0.2")
    async with fronted(config, replicas=1) as (pool, front):
        (replica,) = pool.replicas
        host, port = front.url.removeprefix("http://").split(":")
        async with await anyio.connect_tcp(host, int(port)) as stream:  # a raw client
            await stream.send(post("/v1/chat/completions", {"messages": MESSAGES, "stream": True}))
            received = b""
            with anyio.fail_after(5):
                while b"data: " not in received:
                    received += await stream.receive()
            assert received.startswith(b"HTTP/1.1 200 ")
            assert b"content-type: text/event-stream" in received
            assert pool.replicas[0].in_flight == 1
        # gone after the first chunk: the front closes its connection to the replica
        async with httpx.AsyncClient() as client:
            stats_url = f"{replica.base_url}/dummy/stats"
            with anyio.fail_after(5):  # in flight there: the stats request itself only
                while (await client.get(stats_url)).json()["in_flight"] > 1:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
        await eventually(lambda: pool.replicas[0].in_flight == 0, within=5)
        assert pool.replicas[0].answered == 0  # an abandoned stream, not an answer


def post(path: str, body: dict[str, Any]) -> bytes:
    """A raw HTTP/1.1 POST of ``body`` as JSON."""
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    return head.encode() + b"content-length: %d\r\n\r\n" % len(data) + data


async def test_a_whole_request_is_cancelled_on_the_replica_when_its_client_leaves() -> None:
    async with fronted(process("--model", "dummy", "--latency", "30"), replicas=1) as (pool, front):
        (replica,) = pool.replicas
        host, port = front.url.removeprefix("http://").split(":")
        async with await anyio.connect_tcp(host, int(port)) as stream:
            await stream.send(post("/v1/chat/completions", {"messages": MESSAGES}))
            await eventually(lambda: pool.replicas[0].in_flight == 1, within=5)
        await eventually(lambda: pool.replicas[0].in_flight == 0, within=5)
        async with httpx.AsyncClient() as client:  # and the replica itself stopped
            stats_url = f"{replica.base_url}/dummy/stats"
            with anyio.fail_after(5):  # in flight there: the stats request itself only
                while (await client.get(stats_url)).json()["in_flight"] > 1:  # noqa: ASYNC110
                    await anyio.sleep(0.02)


async def test_a_request_timing_out_stops_its_attempt_on_the_replica() -> None:
    """The anchor bug: a retry or a timeout left the first attempt decoding."""
    config = process("--model", "dummy", "--latency", "30", request_timeout=0.5, max_retries=0)
    async with open_pool(config, replicas=1) as pool:
        await pool.wait_ready()
        with pytest.raises(servescope.RetriesExhausted):
            await pool.chat(MESSAGES)
        (replica,) = pool.replicas
        async with httpx.AsyncClient() as client:
            stats_url = f"{replica.base_url}/dummy/stats"
            with anyio.fail_after(5):
                while (await client.get(stats_url)).json()["in_flight"] > 1:  # noqa: ASYNC110
                    await anyio.sleep(0.02)


async def test_an_ejected_replica_s_requests_in_flight_are_sent_to_another() -> None:
    """What a lapsed lease does: the frozen replica's requests finish elsewhere."""
    async with (
        backends("frozen", "alive") as (frozen, alive),
        open_pool(dummy(), replicas=0, open_membership=True, routing="round_robin") as pool,
    ):
        first = pool.add_endpoint(f"http://127.0.0.1:{frozen.port}")
        pool.add_endpoint(f"http://127.0.0.1:{alive.port}")
        await pool.wait_ready(2)
        frozen.freeze()
        texts: list[str] = []

        async def one() -> None:
            texts.append((await pool.chat(MESSAGES)).text)

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(one)
            await eventually(lambda: [r.in_flight for r in pool.replicas] == [2, 0])
            await pool.eject(first, "its lease lapsed")
        assert texts == ["alive"] * 4
        assert [info.index for info in pool.replicas] == [1]
        frozen.thaw()


async def test_every_worker_dead_then_back_and_a_worker_down_at_start() -> None:
    """SGLang's router users' bugs: no recovery once every worker died and came back;
    refusing to start while a worker was down."""
    template = dummy(request_timeout=2.0, max_retries=1)
    async with backends("a", "b") as (a, b), fronted(template, replicas=0) as (pool, front):
        b.kill()  # down before the front knows it
        pool.add_endpoint(f"http://127.0.0.1:{a.port}")
        pool.add_endpoint(f"http://127.0.0.1:{b.port}")
        async with httpx.AsyncClient(base_url=front.url, timeout=30) as client:
            body = {"messages": MESSAGES}
            await eventually(lambda: pool.ready_count() == 1)
            assert (await client.post("/v1/chat/completions", json=body)).json()["choices"]
            a.kill()
            failed = await client.post("/v1/chat/completions", json=body)
            assert failed.status_code in (502, 503, 504), failed.text
            assert "error" in failed.json()
            await a.start()
            await b.start()
            await eventually(lambda: pool.ready_count() == 2, within=20)
            texts = set()
            for _ in range(6):
                reply = await client.post("/v1/chat/completions", json=body)
                texts.add(reply.json()["choices"][0]["message"]["content"])
            assert texts == {"a", "b"}


async def test_an_open_pool_whose_replicas_all_fail_for_good_does_not_wait_for_ever(
    tmp_path: Path,
) -> None:
    config = script(tmp_path / "crash.py", CRASH_SCRIPT)
    with anyio.fail_after(30):
        async with open_pool(
            config, replicas=1, open_membership=True, max_restarts=1, **FAST_POOL
        ) as pool:
            with pytest.raises(servescope.PoolFailed, match="exited with code 3"):
                await pool.wait_ready()
            assert pool.replicas[0].given_up
            # the pool itself serves on: a replica may still join
            assert pool.state.value == "running"
