"""The request pool: classification, retries, Retry-After, slots, metrics.

The property test drives the in-process dummy with random per-request fault
sequences and checks each request's outcome against a model of the rules.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any

import anyio
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import servescope
from servescope import BadRequest, DummyConfig, RequestError, RetriesExhausted, open_server
from servescope._client import Outcome, RequestClient, Target, Wire
from servescope._redact import MASK, Redactor
from servescope._responses import classify_status, parse_completion, parse_json
from servescope._retry import backoff_delay, parse_retry_after, retry_delay
from servescope._transport import SlotTransport

from .test_transport import RawServer, Script, always, raw_server

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)
KEY = "sk-test-0d4c2b-pool-secret"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("3", 3.0),
        (" 0.5 ", 0.5),
        ("-1", None),
        ("soon", None),
        ("Mon, 23 Nov 2026 12:00:30 GMT", 30.0),
        ("Mon, 23 Nov 2026 11:00:00 GMT", 0.0),
        ("Mon, 99 Foo 2026 12:00:30 GMT", None),
        # Digits str.isdigit or float() accept but HTTP does not: unreadable, never an error.
        ("\u00b2", None),
        ("\u0663", None),
        ("\uff11", None),
        ("1\u00b2", None),
        ("1_000", None),
        ("+5", None),
        ("1e3", None),
        ("-0", None),
        # Numbers that are not a finite wait.
        ("9" * 400, None),
        ("1e309", None),
        ("inf", None),
        ("Infinity", None),
        ("nan", None),
        ("\t 7 \t", 7.0),
        ("", None),
        ("\xe9\xff 3", None),  # a header's bytes, decoded as latin-1
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


@given(st.text() | st.binary().map(lambda data: data.decode("latin-1")))
def test_parse_retry_after_never_raises(value: str) -> None:
    seconds = parse_retry_after(value, now=NOW)
    assert seconds is None or (math.isfinite(seconds) and seconds >= 0)


@given(st.integers(0, 200), st.floats(0, 10), st.floats(0, 100), st.integers())
def test_backoff_is_full_jitter_and_capped(retry: int, base: float, cap: float, seed: int) -> None:
    delay = backoff_delay(retry, base=base, cap=cap, rng=random.Random(seed))
    assert 0 <= delay <= min(cap, base * 2.0 ** min(retry, 62))


@given(st.floats(0, 1e6), st.integers(0, 10))
def test_retry_after_is_a_capped_floor(retry_after: float, retry: int) -> None:
    rng = random.Random(0)
    delay = retry_delay(retry, retry_after, base=0.1, cap=1.0, retry_after_cap=60.0, rng=rng)
    assert min(retry_after, 60.0) <= delay <= max(1.0, min(retry_after, 60.0))


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, None),
        (400, BadRequest),
        (401, BadRequest),
        (403, BadRequest),
        (404, BadRequest),
        (413, BadRequest),
        (422, BadRequest),
        (408, None),
        (429, None),
        (500, None),
        (502, None),
        (503, None),
        (504, None),
        (418, RequestError),
        (501, RequestError),
    ],
)
def test_classify_status(status: int, kind: type[Exception] | None) -> None:
    error = classify_status(status, b'{"error": "x"}')
    assert (type(error) if error else None) is kind


@pytest.mark.parametrize(
    ("response", "message"),
    [
        ({}, "no choices"),
        ({"choices": []}, "no choices"),
        ({"choices": ["text"]}, "no choices"),
        ({"choices": [{"message": {"content": 5}}]}, "not a string"),
        ({"choices": [{"text": ["a"]}]}, "not a string"),
    ],
)
def test_malformed_completion(response: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError, match=message):
        parse_completion(response)


def nested(depth: int) -> list[Any]:
    """A list nested ``depth`` deep, built without recursion."""
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a": ' * 100_000, "nested too deeply"),
        (b"1" * 5000, "not valid JSON"),  # past int's digit limit: ValueError, not JSONDecodeError
        (b"\xff{}", "not valid JSON"),
        (b"[1]", "not a JSON object"),
    ],
    ids=["arrays", "objects", "huge-int", "bad-utf8", "array"],
)
def test_malformed_json_body(body: bytes, message: str) -> None:
    with pytest.raises(RequestError, match=message) as info:
        parse_json(body)
    assert type(info.value) is RequestError


@pytest.mark.parametrize(
    "response",
    [
        {"choices": nested(100_000)},
        {"choices": [{"message": {"content": nested(100_000)}}]},
        {"choices": [{"text": {1, 2}}]},  # not JSON at all: the excerpt must not fail on it
    ],
    ids=["choices", "content", "unencodable"],
)
def test_malformed_completion_too_deep_to_quote(response: dict[str, Any]) -> None:
    with pytest.raises(RequestError, match=r"no choices|not a string"):
        parse_completion(response)


def test_completion_fields() -> None:
    message = {"content": "hi", "reasoning_content": "because"}
    response = {
        "choices": [{"message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": True, "total_tokens": "x"},
    }
    completion = parse_completion(response)
    assert (completion.text, completion.reasoning, completion.finish_reason) == (
        "hi",
        "because",
        "stop",
    )
    assert completion.usage == servescope.Usage(prompt_tokens=3)
    legacy = parse_completion({"choices": [{"message": {"content": None, "reasoning": "r"}}]})
    assert (legacy.text, legacy.reasoning) == ("", "r")


# -- against the dummy -------------------------------------------------------------------

MAX_RETRIES = 3
TERMINAL = {
    "ok": None,
    "delay=0.01": None,
    "status=400": BadRequest,
    "status=404": BadRequest,
    "status=422": BadRequest,
    "status=418": RequestError,
    "malformed": RequestError,
    "no-choices": RequestError,
    "truncated": RequestError,
}
RETRYABLE = ["status=503", "status=429,retry-after=0", "status=500", "status=502", "drop"]


def open_connections(port: int) -> list[object]:
    """This process's TCP sockets to or from ``port``."""
    return [
        conn
        for conn in psutil.Process().net_connections(kind="tcp")
        if port in (conn.laddr[1] if conn.laddr else None, conn.raddr[1] if conn.raddr else None)
    ]


def expected_outcome(steps: list[str]) -> tuple[type[Exception] | None, int]:
    """The error class (None: a Completion) and the number of attempts, by the rules."""
    for attempt in range(MAX_RETRIES + 1):
        step = steps[min(attempt, len(steps) - 1)]
        if step in TERMINAL:
            return TERMINAL[step], attempt + 1
    return RetriesExhausted, MAX_RETRIES + 1


fault_sequences = st.lists(st.sampled_from([*TERMINAL, *RETRYABLE]), min_size=1, max_size=5)


@pytest.mark.anyio
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fault_sequences, min_size=1, max_size=24), st.integers(1, 8))
async def test_every_request_ends_once_with_the_right_outcome(
    sequences: list[list[str]], concurrency: int
) -> None:
    config = DummyConfig(
        max_concurrency=concurrency, max_retries=MAX_RETRIES, backoff_base=0.001, backoff_max=0.01
    )
    outcomes: dict[int, list[object]] = {i: [] for i in range(len(sequences))}

    async def one(i: int, server: servescope.Server) -> None:
        headers = {"x-servescope-fault": "|".join(sequences[i]), "x-servescope-fault-id": str(i)}
        headers["x-servescope-fault-id"] += uuid.uuid4().hex
        try:
            response = await server.request(
                {"messages": [{"role": "user", "content": "hi"}]}, headers=headers
            )
            outcomes[i].append(parse_completion(response))
        except RequestError as exc:
            outcomes[i].append(exc)

    tasks_before = {task.id for task in anyio.get_running_tasks()}
    with anyio.fail_after(30):
        async with open_server(config) as server, anyio.create_task_group() as tg:
            for i in range(len(sequences)):
                tg.start_soon(one, i, server)
        metrics = server.metrics
        assert server._dummy_app is not None
        stats = server._dummy_app.stats()
    # Leaving the scope leaves no task and no open connection behind.
    assert {task.id for task in anyio.get_running_tasks()} <= tasks_before
    port = int(server.base_url.rsplit(":", 1)[1])
    assert open_connections(port) == []
    total_attempts = 0
    for i, steps in enumerate(sequences):
        (outcome,) = outcomes[i]  # exactly once
        kind, attempts = expected_outcome(steps)
        total_attempts += attempts
        if kind is None:
            assert isinstance(outcome, servescope.Completion), (steps, outcome)
        else:
            assert type(outcome) is kind, (steps, outcome)
        if isinstance(outcome, RetriesExhausted):
            assert isinstance(outcome.__cause__, RequestError)
    assert metrics.started == len(sequences)
    assert metrics.succeeded + metrics.failed == len(sequences)
    assert metrics.retried == total_attempts - len(sequences)
    assert stats["max_in_flight"] <= concurrency + 1  # + the readiness probe
    assert stats["in_flight"] == 0


@pytest.mark.anyio
async def test_retry_after_is_honoured_and_slot_released() -> None:
    config = DummyConfig(max_concurrency=1, backoff_base=0.001, backoff_max=0.001)
    async with open_server(config) as server:
        await server.wait_ready()
        finished: dict[str, float] = {}
        start = anyio.current_time()

        async def slow_to_retry() -> None:
            headers = {
                "x-servescope-fault": "status=503,retry-after=0.5|ok",
                "x-servescope-fault-id": uuid.uuid4().hex,
            }
            await server.request({"messages": [{"role": "user", "content": "a"}]}, headers=headers)
            finished["retried"] = anyio.current_time() - start

        async def plain() -> None:
            await anyio.sleep(0.1)  # let the first one get its 503 and start sleeping
            await server.chat([{"role": "user", "content": "b"}])
            finished["plain"] = anyio.current_time() - start

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow_to_retry)
            tg.start_soon(plain)
    assert finished["retried"] >= 0.5
    assert finished["plain"] < 0.4  # it did not wait for the sleeping request's slot
    assert server.metrics.retried == 1


@pytest.mark.anyio
async def test_requests_fail_fast_after_the_server_failed() -> None:
    from .conftest import dummy_process

    config = dummy_process("--exit-after", "1.0")
    with anyio.fail_after(20), pytest.raises(servescope.ServerCrashed) as info:
        async with open_server(config) as server:
            await server.wait_ready()
            await anyio.sleep(10)
    with pytest.raises(servescope.ServerCrashed) as again:
        await server.chat([{"role": "user", "content": "hi"}])
    # The scope's own error (a copy each time: one object would collect every traceback).
    assert (str(again.value), again.value.exit_code) == (str(info.value), info.value.exit_code)


@pytest.mark.anyio
async def test_seeded_fault_schedule() -> None:
    config = DummyConfig(
        faults=("status=503",), fault_rate=0.5, fault_seed=7, backoff_base=0.001, max_retries=20
    )
    async with open_server(config) as server:
        for _ in range(20):
            await server.chat([{"role": "user", "content": "x"}])
        assert 0 < server.metrics.retried < 60
        assert server.metrics.succeeded == 20
        assert server.metrics.latency_p50 is not None
        assert server.metrics.completion_tokens == 2000


@pytest.mark.anyio
async def test_request_timeout_is_retried_then_exhausted() -> None:
    config = DummyConfig(request_timeout=0.2, max_retries=1, backoff_base=0.001)
    headers = {"x-servescope-fault": "slow-body=2"}
    async with open_server(config) as server:
        with anyio.fail_after(5), pytest.raises(RetriesExhausted) as info:
            await server.request({"messages": [{"role": "user", "content": "x"}]}, headers=headers)
        assert isinstance(info.value.__cause__, servescope.RequestTimeout)
        assert server.metrics.retried == 1
        assert server.metrics.failed == 1


# -- against scripted servers ------------------------------------------------------------


class FixedTarget:
    """A dispatcher whose every attempt goes to one URL (a raw scripted server)."""

    def __init__(self, url: str, wire: Wire) -> None:
        self.base_url = url
        self.wire = wire
        self.lost = False
        self.attempts: set[anyio.CancelScope] = set()
        self.released: list[Outcome] = []
        self.first_bytes: list[float] = []

    def route(self, payload: Mapping[str, Any], routing_key: str | None) -> None:
        return None

    async def acquire(self, tried: Sequence[Target], route: object) -> Target:
        return self

    def release(
        self, target: Target, outcome: Outcome, retry_after: float | None, elapsed: float
    ) -> None:
        self.released.append(outcome)

    def check_open(self) -> None:
        pass

    async def backoff(self, seconds: float, tried: Sequence[Target]) -> None:
        await anyio.sleep(seconds)

    def waiting(self) -> int:
        return 0

    def first_byte(self, target: Target, seconds: float) -> None:
        self.first_bytes.append(seconds)


@asynccontextmanager
async def scripted_pool(
    script: Script,
    *,
    redact: Callable[[str], str] | None = None,
    headers: dict[str, str] | None = None,
    **config: Any,
) -> AsyncIterator[tuple[RequestClient, RawServer]]:
    """A request pool over a ``SlotTransport`` to a raw server that answers ``script``."""
    config = {"max_retries": 2, "backoff_base": 0.001, "backoff_max": 0.001, **config}
    async with raw_server(script) as server:
        transport = SlotTransport()
        extra: dict[str, Any] = {} if redact is None else {"redact": redact}
        wire = Wire.build(
            transport.post, {"authorization": f"Bearer {KEY}"} if headers is None else headers
        )
        pool = RequestClient(
            DummyConfig(**config),
            dispatch=FixedTarget(f"http://127.0.0.1:{server.port}", wire),
            **extra,
        )
        try:
            with anyio.fail_after(10):
                yield pool, server
        finally:
            await transport.aclose()


def answer(status: int, body: bytes, *headers: str) -> bytes:
    head = "".join(f"{header}\r\n" for header in headers)
    return f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n{head}\r\n".encode() + body


@pytest.mark.anyio
async def test_deeply_nested_response_is_a_request_error_not_retried() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    async with scripted_pool(always(answer(200, body))) as (pool, server):
        with pytest.raises(RequestError, match="nested too deeply") as info:
            await pool.chat([{"role": "user", "content": "hi"}])
    assert type(info.value) is RequestError
    assert len(server.requests) == 1


def circular() -> dict[str, Any]:
    value: dict[str, Any] = {}
    value["self"] = value
    return value


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"stop": {"a", "b"}}, "set is not JSON serializable"),
        ({"x": object()}, "object is not JSON serializable"),
        ({("a", "b"): 1}, "keys must be"),
        ({"temperature": float("nan")}, "not JSON compliant"),
        ({"temperature": float("inf")}, "not JSON compliant"),
        ({"messages": nested(100_000)}, "nested too deeply"),
        (circular(), "Circular reference"),
        (["not", "a", "mapping"], "not a mapping"),
    ],
    ids=["set", "object", "tuple-key", "nan", "inf", "deep", "circular", "list"],
)
async def test_unencodable_payload_is_a_bad_request_never_sent(payload: Any, problem: str) -> None:
    async with scripted_pool(always(answer(200, b"{}"))) as (pool, server):
        with pytest.raises(BadRequest, match=problem) as info:
            await pool.request(payload)
    assert info.value.status_code is None
    assert "payload" in str(info.value)
    assert server.requests == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({"x-a": f"{KEY}\r\nx-injected: 1"}, "header 'x-a'"),
        ({"x-a": f"{KEY}\x00"}, "header 'x-a'"),
        ({"x a": KEY}, "header name 'x'"),
        ({"x-a": 5}, "header 'x-a'.*int"),
        ({5: KEY}, "header name.*int"),
        ({"x-a": f"{KEY}\ud800"}, "header 'x-a'"),
        ({"x-\u00e9": KEY}, "header name 'x-"),
        ({"host": "elsewhere"}, "multiple Host"),
        ([("x-a", "b")], "headers must be a mapping"),
    ],
    ids=[
        "crlf",
        "nul",
        "space-in-name",
        "int-value",
        "int-name",
        "surrogate",
        "non-ascii",
        "host",
        "list",
    ],
)
async def test_unsendable_header_is_a_bad_request_never_sent(headers: Any, problem: str) -> None:
    async with scripted_pool(always(answer(200, b"{}"))) as (pool, server):
        with pytest.raises(BadRequest, match=problem) as info:
            await pool.request({"prompt": "hi"}, headers=headers)
        assert (await pool.request({"prompt": "hi"})) == {}  # the pool goes on
    assert info.value.status_code is None
    assert KEY not in str(info.value)
    assert len(server.requests) == 1  # only the good one


@pytest.mark.anyio
async def test_api_key_with_a_line_break_is_a_bad_request() -> None:
    headers = {"authorization": f"Bearer {KEY}\n"}
    async with scripted_pool(always(answer(200, b"{}")), headers=headers) as (pool, server):
        with pytest.raises(BadRequest, match="header 'authorization'") as info:
            await pool.chat([{"role": "user", "content": "hi"}])
    assert info.value.status_code is None
    assert KEY not in str(info.value)
    assert server.requests == []
    assert pool.metrics.retried == 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    "base_url", ["http://[::1", "http://127.0.0.1:70000", "ftp://127.0.0.1"], ids=str
)
async def test_unusable_url_is_a_request_error_not_retried(base_url: str) -> None:
    async with scripted_pool(always(answer(200, b"{}"))) as (pool, _):
        pool._dispatch = FixedTarget(base_url, pool._dispatch.wire)  # type: ignore[attr-defined]
        with pytest.raises(RequestError) as info:
            await pool.request({"prompt": "hi"})
    assert type(info.value) is RequestError
    assert pool.metrics.retried == 0


class EchoAuth:
    """A script that answers ``status`` with a body quoting the request's Authorization."""

    def __init__(self, status: int, template: bytes = b'{"error": "invalid key: %s"}') -> None:
        self.status, self.template = status, template
        self.server: RawServer | None = None

    def __call__(self, connection: int, request: int) -> tuple[bytes, bool]:
        assert self.server is not None
        head = self.server.requests[-1]
        (auth,) = [
            line for line in head.split(b"\r\n") if line.lower().startswith(b"authorization")
        ]
        body = self.template.replace(b"%s", auth.partition(b":")[2].strip())
        if self.status == 0:  # not HTTP at all
            return body + b"\r\n\r\n", True
        return answer(self.status, body), False


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "template", "kind"),
    [
        (401, b'{"error": "invalid key: %s"}', BadRequest),
        (401, b'{"error": "' + b"x" * 275 + b' %s"}', BadRequest),  # cut at the excerpt's end
        (418, b"no tea for %s", RequestError),
        (200, b"<html>%s</html>", RequestError),
        (200, b'{"echo": "%s"}', RequestError),  # no choices: parse_completion's excerpt
        (0, b"HTTP/1.1 %s", RetriesExhausted),  # a broken status line, quoted by h11
    ],
    ids=["401", "401-cut", "418", "not-json", "no-choices", "broken-http"],
)
async def test_secrets_echoed_by_the_server_are_redacted(
    status: int, template: bytes, kind: type[RequestError]
) -> None:
    script = EchoAuth(status, template)
    async with scripted_pool(script, redact=Redactor([KEY])) as (pool, server):
        script.server = server
        with pytest.raises(kind) as info:
            await pool.chat([{"role": "user", "content": "hi"}])
    error: BaseException | None = info.value
    while error is not None:
        assert KEY[:6] not in str(error)
        assert KEY[:6] not in getattr(error, "body", "")
        error = error.__cause__
    assert MASK[:4] in str(info.value)
    assert KEY.encode() in server.requests[0]  # it was sent, as it should be


def test_parse_completion_with_the_pools_redaction() -> None:
    pool = RequestClient(
        DummyConfig(),
        dispatch=FixedTarget("http://127.0.0.1:9", Wire.build(SlotTransport().post, {})),
        redact=Redactor([KEY]),
    )
    with pytest.raises(RequestError, match="no choices") as info:
        pool.parse_completion({"error": f"bad key {KEY}"})
    assert KEY not in str(info.value)
    assert pool.parse_completion({"choices": [{"text": "ok"}]}).text == "ok"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "problem"), [(5, "path must be a str"), ("/v1/x y", "cannot carry")], ids=str
)
async def test_unusable_path_is_a_bad_request_never_sent(path: Any, problem: str) -> None:
    async with scripted_pool(always(answer(200, b"{}"))) as (pool, server):
        with pytest.raises(BadRequest, match=problem) as info:
            await pool.request({"prompt": "hi"}, path=path)
    assert info.value.status_code is None
    assert server.requests == []


@pytest.mark.anyio
async def test_request_in_backoff_outside_the_scope_ends_with_it() -> None:
    """A request from a task outside the scope, sleeping out a 30 s Retry-After when the
    scope ends, gets ServerClosed at once instead of sleeping on."""
    outcome: list[BaseException] = []

    async def outside(server: servescope.Server) -> None:
        fault = {"x-servescope-fault": "status=503,retry-after=30"}
        try:
            await server.request({"prompt": "hi"}, headers=fault)
        except servescope.ServeError as exc:
            outcome.append(exc)

    config = DummyConfig(retry_after_max=60, backoff_max=60)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as callers:
            async with open_server(config) as server:
                await server.wait_ready()
                callers.start_soon(outside, server)
                await anyio.sleep(0.5)  # it is sleeping out its Retry-After now
            ended = anyio.current_time()
        assert anyio.current_time() - ended < 2
    assert [type(exc) for exc in outcome] == [servescope.ServerClosed]
