"""The pool under chaos: replicas killed mid-request, frozen, answering 5xx bursts and
429s, restarted on the same port, all dead then back, crash-looping — and random
schedules of all of it (hypothesis) with the invariants that matter: every request
ends exactly once, no counter drifts, nothing is left behind.

Replicas are fault-injecting dummies: in process (their faults scripted per replica),
as processes (SIGKILL, SIGSTOP), and servers this test runs itself and the pool sees as
endpoints (``Backend``: killed and started again on the same port). Regression tests
are named after the bugs users of the systems in ``shared/POOL.md`` met.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import servescope
from servescope import (
    BadRequest,
    EndpointConfig,
    Pool,
    PoolFailed,
    open_pool,
)
from servescope._asgi import listen_socket, serve_asgi
from servescope._dummy_app import DummyApp, DummySettings

from .test_pool import (
    CRASH_SCRIPT,
    FAST,
    QUICK,
    app,
    chat,
    collecting,
    dummy,
    eventually,
    faulty,
    gone,
    inject,
    process,
    script,
    served,
    settled,
    spawn,
)


class Backend:
    """An OpenAI-shaped server this test runs itself, which a pool sees as an endpoint:
    it can be killed, and started again on the same port (a fresh app each time), and
    frozen (it accepts connections and answers nothing, health probes included: a hung
    engine) and thawed."""

    def __init__(self, tg: anyio.abc.TaskGroup, text: str = "backend") -> None:
        self.tg = tg
        self.text = text
        self.port = 0
        self.app = DummyApp(DummySettings(text=text))
        self.lives = 0
        self._scope: anyio.CancelScope | None = None
        self._thawed = anyio.Event()
        self._thawed.set()

    async def _frozen_or_app(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await self._thawed.wait()
        await self.app(scope, receive, send)

    def freeze(self) -> None:
        """Answer nothing from now on (requests already inside the app go on)."""
        if self._thawed.is_set():
            self._thawed = anyio.Event()

    def thaw(self) -> None:
        """Answer again, the requests held meanwhile included."""
        self._thawed.set()

    async def start(self) -> None:
        """Serve (again) on its port."""
        sock = listen_socket(port=self.port)
        self.port = sock.getsockname()[1]
        self.app = DummyApp(DummySettings(text=self.text))
        self.lives += 1
        await self.tg.start(self._serve, sock)

    async def _serve(self, sock: Any, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        with anyio.CancelScope() as self._scope:
            await serve_asgi(self._frozen_or_app, sock, shutdown_grace=0, task_status=task_status)

    def kill(self) -> None:
        """Stop serving at once: connections are cut, new ones refused."""
        assert self._scope is not None
        self._scope.cancel()

    def config(self, **values: Any) -> EndpointConfig:
        """The endpoint replica for it, with a quick health watch."""
        url = f"http://127.0.0.1:{self.port}/v1"
        return EndpointConfig(url=url, model="dummy", **{**FAST, "unhealthy_after": 0.5, **values})


@asynccontextmanager
async def backends(*texts: str) -> AsyncIterator[list[Backend]]:
    """Started ``Backend``s, one per text; all stopped on the way out."""
    async with anyio.create_task_group() as tg:
        started = [Backend(tg, text) for text in texts]
        for backend in started:
            await backend.start()
        yield started
        tg.cancel_scope.cancel()


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block (a hung engine); SIGCONT on every way out."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def ends(connection: Any) -> set[int]:
    """The local and remote ports of one of ``psutil``'s connections."""
    return {address.port for address in (connection.laddr, connection.raddr) if address}


# -- a replica dies mid-request -----------------------------------------------------------


@pytest.mark.anyio
async def test_megatron_request_on_dead_rank_is_failed_and_rerouted() -> None:
    """Megatron never fails the requests of a dead rank (their futures hang for ever)
    and never restarts it. Here: SIGKILL a replica with three requests on it; they are
    re-sent at once and answered by the other, each caller gets exactly one answer, and
    the killed replica restarts and serves again. (A backoff of up to 5 s: a retry to
    a replica the request has not tried must not wait it.)"""
    config = process(backoff_base=5.0, backoff_max=5.0)
    with anyio.fail_after(30):
        async with open_pool(config, replicas=2, routing="round_robin", **QUICK) as pool:
            await pool.wait_ready(2)
            killed = pool.replicas[0].pid
            assert killed is not None
            async with collecting() as (tg, results):
                for _ in range(6):
                    spawn(tg, results, lambda: faulty(pool, "delay=1"))
                await eventually(lambda: [r.in_flight for r in pool.replicas] == [3, 3])
                os.kill(killed, signal.SIGKILL)
                started = time.monotonic()
            assert time.monotonic() - started < 1 + 0.5  # 1 s on the other replica
            assert len(results) == 6 and all(isinstance(r, dict) for r in results), results
            first = pool.replicas[0]
            assert first.lost + first.failed == 3 and first.answered == 0
            await pool.wait_ready(2)
            assert pool.replicas[0].restarts == 1 and pool.replicas[0].pid != killed
            assert gone(killed)
            for _ in range(4):
                await chat(pool)
            assert served(pool)[0] == 2  # it rejoined: round robin reaches it again
            settled(pool)


@pytest.mark.anyio
async def test_ray_request_on_dead_replica_is_retried() -> None:
    """Ray Serve gives a request on a replica that died ``ActorDiedError``, not retried.
    Here an endpoint dies under a request: the request is answered by another replica."""
    with anyio.fail_after(15):
        async with backends("dies", "lives") as (dies, lives):
            configs = [dies.config(), lives.config()]
            async with open_pool(configs, routing="round_robin") as pool:
                await pool.wait_ready(2)
                async with collecting() as (tg, results):
                    spawn(tg, results, lambda: faulty(pool, "delay=0.5"))
                    await eventually(lambda: dies.app.in_flight == 1)
                    dies.kill()
                (answer,) = results
                assert isinstance(answer, dict), answer
                assert answer["choices"][0]["message"]["content"].startswith("lives")
                settled(pool)


@pytest.mark.anyio
async def test_vllm_one_dead_rank_does_not_take_the_pool_down() -> None:
    """vLLM: one dead DP rank shuts the whole server down. Here the others serve every
    request while the dead one restarts."""
    configs = [process(), dummy(), dummy()]
    with anyio.fail_after(30):
        async with open_pool(configs, **QUICK) as pool:
            await pool.wait_ready(3)
            pid = pool.replicas[0].pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await eventually(lambda: pool.replicas[0].state != "ready")
            texts = [await chat(pool) for _ in range(20)]
            assert len(texts) == 20
            await pool.wait_ready(3)
            assert pool.replicas[0].restarts == 1
            assert pool.replicas[0].last_error is not None
            assert "SIGKILL" in pool.replicas[0].last_error


# -- a replica hangs ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_sigstopped_replica_is_demoted_its_requests_resent_then_promoted() -> None:
    """A frozen replica (SIGSTOP) is out of rotation within ``demote_after``; the requests
    on it are sent elsewhere then, not at their timeout; SIGCONT brings it back."""
    config = process(unhealthy_after=30)  # hung, not dead: it must not be restarted
    with anyio.fail_after(30):
        async with open_pool(config, replicas=2, routing="round_robin", **QUICK) as pool:
            await pool.wait_ready(2)
            pid = pool.replicas[0].pid
            assert pid is not None
            async with collecting() as (tg, results):
                for _ in range(4):
                    spawn(tg, results, lambda: faulty(pool, "delay=0.3"))
                await eventually(lambda: [r.in_flight for r in pool.replicas] == [2, 2])
                with frozen(pid):
                    started = time.monotonic()
                    await eventually(lambda: len(results) == 4)
                    assert time.monotonic() - started < 0.5 + 2  # demote_after, then 0.3 s
                    assert pool.replicas[0].state == "unhealthy"
                    assert pool.replicas[0].lost == 2
                    before = served(pool)
                    for _ in range(4):
                        await chat(pool)
                    assert served(pool)[0] == before[0]  # it gets nothing while frozen
                await eventually(lambda: pool.replicas[0].state == "ready", within=5)
            assert all(isinstance(r, dict) for r in results)
            assert pool.replicas[0].restarts == 0 and pool.replicas[0].pid == pid
            before = served(pool)
            for _ in range(4):
                await chat(pool)
            assert served(pool)[0] == before[0] + 2
            settled(pool)


@pytest.mark.anyio
async def test_replica_hung_past_unhealthy_after_is_restarted() -> None:
    config = process(unhealthy_after=1.0)
    with anyio.fail_after(30):
        async with open_pool(config, replicas=2, **QUICK) as pool:
            await pool.wait_ready(2)
            pid = pool.replicas[0].pid
            assert pid is not None
            with frozen(pid):
                await eventually(lambda: pool.replicas[0].restarts == 1, within=10)
            await pool.wait_ready(2)
            assert gone(pid) and pool.replicas[0].pid != pid
            assert pool.replicas[0].last_error is not None
            assert "hangs" in pool.replicas[0].last_error


@pytest.mark.anyio
async def test_scope_exits_in_bound_with_a_frozen_replica() -> None:
    """Leaving the pool while a replica is SIGSTOPped: it is woken to take its SIGTERM
    (or killed after its grace), and the scope ends in bound, nothing left running."""
    config = process(unhealthy_after=30, shutdown_grace=5.0)
    with anyio.fail_after(20):
        async with open_pool(config, replicas=2, **QUICK) as pool:
            await pool.wait_ready(2)
            pid = pool.replicas[0].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            await eventually(lambda: pool.replicas[0].state == "unhealthy")
            leaving = time.monotonic()
        assert time.monotonic() - leaving < 3
        assert gone(pid)


# -- 5xx bursts and 429s ------------------------------------------------------------------

BREAKER: dict[str, Any] = {
    "breaker_failures": 3,
    "breaker_window": 10.0,
    "breaker_cooldown": 0.3,
    "breaker_successes": 2,
}


@pytest.mark.anyio
async def test_5xx_burst_opens_the_breaker_traffic_moves_then_it_closes() -> None:
    with anyio.fail_after(15):
        async with open_pool(dummy(), replicas=2, routing="round_robin", **BREAKER) as pool:
            await pool.wait_ready(2)
            inject(pool, 0, *["status=503"] * 3)
            for _ in range(3):  # each fails on replica 0 and is answered by replica 1
                await chat(pool)
            assert pool.replicas[0].breaker == "open" and pool.replicas[0].failed == 3
            for _ in range(6):
                await chat(pool)
            assert served(pool) == [0, 9]  # while open, replica 0 gets nothing
            await anyio.sleep(0.35)
            assert pool.replicas[0].breaker == "half-open"
            for _ in range(4):
                await chat(pool)
            assert pool.replicas[0].breaker == "closed"
            assert served(pool) == [2, 11] and pool.metrics.failed == 0
            settled(pool)


@pytest.mark.anyio
async def test_process_replica_answering_only_503_is_kept_out_by_its_breaker() -> None:
    configs = [process("--fault", "status=503", "--fault-rate", "1"), dummy()]
    with anyio.fail_after(20):
        async with open_pool(configs, routing="round_robin", **QUICK, **BREAKER) as pool:
            await pool.wait_ready(2)
            for _ in range(12):
                await chat(pool)
            assert pool.metrics.succeeded == 12 and pool.metrics.failed == 0
            assert pool.replicas[0].breaker in ("open", "half-open")
            assert pool.replicas[0].answered == 0 and pool.replicas[0].failed >= 3
            assert pool.replicas[0].state == "ready"  # failing requests is no crash


@pytest.mark.anyio
async def test_litellm_dead_host_connection_errors_open_the_breaker() -> None:
    """LiteLLM never cooled a deployment on connection errors, so a dead host kept its
    share of traffic. Cut connections count as failures here."""
    with anyio.fail_after(15):
        async with open_pool(dummy(), replicas=2, routing="round_robin", **BREAKER) as pool:
            await pool.wait_ready(2)
            inject(pool, 0, *["drop"] * 3)
            for _ in range(8):
                await chat(pool)
            assert pool.replicas[0].breaker == "open" and pool.replicas[0].failed == 3
            assert served(pool) == [0, 8]


@pytest.mark.anyio
async def test_429_retry_after_cools_the_replica_at_once_for_that_long() -> None:
    """A 429 with ``Retry-After: 1`` takes the replica out for 1 s — not for the
    breaker's cool-down (30 s here), not after several failures."""
    breaker = {**BREAKER, "breaker_cooldown": 30.0}
    with anyio.fail_after(15):
        async with open_pool(dummy(), replicas=2, routing="round_robin", **breaker) as pool:
            await pool.wait_ready(2)
            inject(pool, 0, "status=429,retry-after=1")
            async with collecting() as (tg, results):
                spawn(tg, results, lambda: chat(pool))
                await eventually(lambda: pool.replicas[0].throttled == 1)
                cooled = time.monotonic()
                assert pool.replicas[0].breaker == "open"
                # The request itself goes to replica 1 at once: the replica cools, not it.
                await eventually(lambda: len(results) == 1, within=0.5)
                for _ in range(6):
                    await chat(pool)
                assert served(pool)[0] == 0
                await eventually(lambda: pool.replicas[0].breaker == "half-open", within=3)
                assert 0.8 < time.monotonic() - cooled < 1.5
            assert results and isinstance(results[0], str)  # answered by replica 1
            for _ in range(4):
                await chat(pool)
            assert served(pool)[0] == 2


@pytest.mark.anyio
async def test_litellm_second_cooldown_keeps_the_later_deadline() -> None:
    """LiteLLM: a second cooldown replaced the first with its earlier deadline, so a
    deployment that asked for a long pause was hit again at once. Two 429s on one
    replica: ``Retry-After: 1.5`` first, then one of 0.2 (an older request answered
    later) — it stays out for the 1.5 s."""
    with anyio.fail_after(15):
        async with open_pool(dummy(), replicas=2, routing="round_robin") as pool:
            await pool.wait_ready(2)
            inject(pool, 0, "delay=0.3,status=429,retry-after=0.2", "status=429,retry-after=1.5")
            async with collecting() as (tg, results):
                spawn(tg, results, lambda: chat(pool))  # replica 0: the short one, late
                await eventually(lambda: pool.replicas[0].in_flight == 1)
                spawn(tg, results, lambda: chat(pool))  # replica 1
                await eventually(lambda: pool.replicas[1].answered == 1)
                spawn(tg, results, lambda: chat(pool))  # replica 0: the long one, at once
                await eventually(lambda: pool.replicas[0].throttled == 1)
                cooled = time.monotonic()
                await eventually(lambda: pool.replicas[0].throttled == 2)
                await anyio.sleep(0.5)  # well past the 0.2 s of the second
                assert pool.replicas[0].breaker == "open"
                await eventually(lambda: pool.replicas[0].breaker == "half-open", within=3)
                assert 1.3 < time.monotonic() - cooled < 2.0
            assert len(results) == 3 and all(isinstance(r, str) for r in results)


@pytest.mark.anyio
async def test_litellm_all_cooling_waits_instead_of_failing() -> None:
    """LiteLLM fails a request when every deployment cools. Here it waits for the first
    replica to come back, within its own deadline, and is answered."""
    with anyio.fail_after(15):
        async with open_pool(dummy(), replicas=2, routing="round_robin") as pool:
            await pool.wait_ready(2)
            inject(pool, 0, "status=429,retry-after=0.6")
            inject(pool, 1, "status=429,retry-after=0.6")
            async with collecting() as (tg, results):
                spawn(tg, results, lambda: chat(pool))
                spawn(tg, results, lambda: chat(pool))
                await eventually(lambda: [r.breaker for r in pool.replicas] == ["open"] * 2)
                started = time.monotonic()
                assert await chat(pool)
                assert 0.4 < time.monotonic() - started < 2
            assert len(results) == 2 and all(isinstance(r, str) for r in results)
            settled(pool)


# -- load counters ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_litellm_least_busy_counters_never_drift_negative(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """LiteLLM's least-busy counters drifted below zero on some ways out, and one backend
    took 94 % of the traffic. Every way out here — answers, 5xx and 429 retries, cut
    connections, refusals, callers giving up mid-request — gives each slot back once:
    the counters end at zero and least-loaded routing is even again."""
    faults = [
        "ok",
        "status=503|ok",
        "status=429,retry-after=0.01|ok",
        "drop|ok",
        "status=400",
        "malformed",
        "delay=0.05",
        "delay=5",  # its caller gives up first
    ]
    config = dummy(max_retries=8)
    with anyio.fail_after(20):
        # No breaker: it would take replicas out, and routing is not what is tested here.
        async with open_pool(config, replicas=3, breaker_cooldown=0) as pool:
            await pool.wait_ready(3)
            async with collecting() as (tg, results):
                for number in range(48):
                    fault = faults[number % len(faults)]
                    headers = {"x-servescope-fault": fault, "x-servescope-fault-id": str(number)}

                    async def one(headers: dict[str, str] = headers) -> Any:
                        with anyio.move_on_after(0.5):
                            payload = {"messages": [{"role": "user", "content": "x"}]}
                            return await pool.request(payload, headers=headers)
                        return "gave up"

                    spawn(tg, results, one)
            assert len(results) == 48
            kinds = {type(r).__name__ for r in results}
            assert kinds == {"dict", "BadRequest", "RequestError", "str"}, kinds
            settled(pool)
            before = served(pool)
            for _ in range(30):
                await chat(pool)
            assert [now - then for now, then in zip(served(pool), before, strict=True)] == [10] * 3
    assert "below zero" not in caplog.text


@pytest.mark.anyio
async def test_litellm_ties_not_always_first() -> None:
    """LiteLLM's least-busy sent every tie to the first deployment (Megatron: to the
    lowest rank). Idle replicas take turns."""
    with anyio.fail_after(10):
        async with open_pool(dummy(), replicas=4) as pool:
            await pool.wait_ready(4)
            for _ in range(8):
                await chat(pool)
            assert served(pool) == [2, 2, 2, 2]


@pytest.mark.anyio
async def test_sglang_router_load_tracked_not_all_to_worker_zero() -> None:
    """SGLang's router, load not tracked, sent everything to worker 0. A slow replica
    fills up with requests; the others take the rest."""
    configs = [dummy(latency=1.0), dummy(), dummy()]
    with anyio.fail_after(10):
        async with open_pool(configs) as pool, collecting() as (tg, results):
            await pool.wait_ready(3)
            for _ in range(30):
                spawn(tg, results, lambda: chat(pool))
                await anyio.sleep(0.01)
        assert served(pool)[0] <= 2 and sum(served(pool)) == 30


@pytest.mark.anyio
async def test_sglang_router_client_timeout_leaves_no_attempt_running() -> None:
    """SGLang's router retried after a client's timeout while the first attempt went on
    (two workers decoding one request). A caller giving up here cancels its attempt;
    nothing is sent again."""
    with anyio.fail_after(10):
        async with open_pool(dummy(health_interval=None), replicas=2) as pool:
            await pool.wait_ready(2)
            with anyio.move_on_after(0.2):
                await faulty(pool, "delay=2")
            await anyio.sleep(0.3)
            apps = [app(pool, i) for i in range(2)]
            assert sum(app.requests for app in apps) == 2 + 1  # readiness probes, the request
            assert pool.metrics.retried == 0
            settled(pool)


@pytest.mark.anyio
async def test_datatrove_retry_goes_to_another_server() -> None:
    """datatrove's client retried 6 times on the same server. A retry here goes to
    another replica first."""
    with anyio.fail_after(10):
        async with open_pool(dummy(), replicas=3, routing="round_robin") as pool:
            await pool.wait_ready(3)
            inject(pool, 0, "status=503")
            inject(pool, 1, "status=503")
            await chat(pool)
            failed = [r.failed for r in pool.replicas]
            assert failed == [1, 1, 0] and served(pool) == [0, 0, 1]


# -- replicas that come back ----------------------------------------------------------------

REJOIN: dict[str, Any] = {**QUICK, "restart_backoff_max": 0.1}


@pytest.mark.anyio
async def test_sglang_router_failed_worker_rejoins_after_restart() -> None:
    """SGLang's router marked a worker Failed and never probed it again: restarted on the
    same address, it never rejoined. An endpoint that dies and comes back on its port
    serves again here."""
    with anyio.fail_after(20):
        async with (
            backends("a", "b") as (a, b),
            open_pool([a.config(), b.config()], **REJOIN) as pool,
        ):
            await pool.wait_ready(2)
            a.kill()
            await eventually(lambda: pool.replicas[0].state in ("failed", "restarting"))
            texts = {await chat(pool) for _ in range(4)}
            assert all(text.startswith("b") for text in texts)
            await anyio.sleep(0.5)  # re-checked, again and again, while it is down
            assert pool.replicas[0].restarts >= 2
            await a.start()  # the same port
            await eventually(lambda: pool.replicas[0].state == "ready", within=5)
            texts = {await chat(pool) for _ in range(4)}
            assert any(text.startswith("a") for text in texts)
            assert a.lives == 2 and a.app.requests > 0


@pytest.mark.anyio
async def test_endpoint_recheck_backoff_starts_over_once_it_served_again() -> None:
    """An endpoint is re-checked for ever, with a doubling wait; once it has served
    longer than ``restart_window``, its next outage starts from the first short wait
    again — not from the cap its first outage reached (nor do its re-checks pile up)."""
    backoff: dict[str, Any] = {
        "restart_backoff": 0.01,
        "restart_backoff_max": 1.0,
        "restart_window": 0.5,
    }
    with anyio.fail_after(20):
        async with (
            backends("a", "b") as (a, b),
            open_pool([a.config(), b.config()], **backoff) as pool,
        ):
            await pool.wait_ready(2)
            a.kill()
            await anyio.sleep(1.5)  # re-checked after 0.01, 0.02, 0.04 ... 0.64 s
            assert pool.replicas[0].restarts >= 6
            await a.start()
            await eventually(lambda: pool.replicas[0].state == "ready", within=3)
            await anyio.sleep(0.7)  # serving, longer than restart_window
            a.kill()
            await eventually(lambda: pool.replicas[0].state in ("failed", "restarting"))
            await anyio.sleep(0.05)
            await a.start()
            back = time.monotonic()
            await eventually(lambda: pool.replicas[0].state == "ready", within=3)
            assert time.monotonic() - back < 0.5  # not the 1 s the first outage reached
            assert len(pool._replicas[0].restart_times) <= 5


@pytest.mark.anyio
async def test_sglang_router_starts_with_some_workers_unhealthy() -> None:
    """SGLang's router refused to start unless every worker was healthy. A pool starts
    with one of two up, serves with it, and takes the other once it comes up."""
    with anyio.fail_after(20):
        async with backends("up", "late") as (up, late):
            late.kill()  # its port is known, nobody listens there yet
            await anyio.sleep(0.05)
            async with open_pool([up.config(), late.config()], **REJOIN) as pool:
                await pool.wait_ready(1)
                assert pool.replicas[1].state != "ready"
                texts = {await chat(pool) for _ in range(3)}
                assert all(text.startswith("up") for text in texts)
                await late.start()
                await pool.wait_ready(2)
                texts = {await chat(pool) for _ in range(4)}
                assert {text[:2] for text in texts} == {"up", "la"}


@pytest.mark.anyio
async def test_sglang_router_every_worker_dead_then_back() -> None:
    """SGLang's router panicked in a loop when every worker died, and did not recover when
    they came back. Requests sent while none is up wait; once one is back, they are
    answered."""
    with anyio.fail_after(20):
        async with (
            backends("a", "b") as (a, b),
            open_pool([a.config(), b.config()], **REJOIN) as pool,
        ):
            await pool.wait_ready(2)
            a.kill()
            b.kill()
            await eventually(lambda: "ready" not in [r.state for r in pool.replicas])
            async with collecting() as (tg, results):
                for _ in range(5):
                    spawn(tg, results, lambda: chat(pool))
                await anyio.sleep(0.5)
                assert results == [] and pool.metrics.waiting == 5
                await a.start()
                await b.start()
            assert len(results) == 5 and all(isinstance(r, str) for r in results)
            await pool.wait_ready(2)
            settled(pool)


@pytest.mark.anyio
async def test_every_process_replica_killed_then_back() -> None:
    """Every replica SIGKILLed: the requests in flight and those sent meanwhile wait for
    the restarts, then are answered."""
    with anyio.fail_after(30):
        async with open_pool(process(), replicas=2, **QUICK) as pool:
            await pool.wait_ready(2)
            pids = [replica.pid for replica in pool.replicas]
            async with collecting() as (tg, results):
                for _ in range(4):
                    spawn(tg, results, lambda: faulty(pool, "delay=0.5"))
                await eventually(lambda: pool.metrics.in_flight == 4)
                for pid in pids:
                    assert pid is not None
                    os.kill(pid, signal.SIGKILL)
                for _ in range(4):
                    spawn(tg, results, lambda: chat(pool))
            assert len(results) == 8 and all(not isinstance(r, Exception) for r in results)
            assert [replica.restarts for replica in pool.replicas] == [1, 1]
            assert all(pid is not None and gone(pid) for pid in pids)
            settled(pool)


# -- a crash loop -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_crash_loop_spends_its_budget_and_stays_failed_while_others_serve(
    tmp_path: Path,
) -> None:
    configs = [script(tmp_path / "crash.py", CRASH_SCRIPT), dummy(), process()]
    with anyio.fail_after(20):
        async with open_pool(configs, max_restarts=2, **QUICK) as pool:
            await pool.wait_ready(2)
            await eventually(lambda: pool.replicas[0].given_up)
            crashed = pool.replicas[0]
            assert (crashed.state, crashed.restarts) == ("failed", 2)
            assert crashed.last_error is not None
            assert "exited with code 3 before it was ready" in crashed.last_error
            assert any("loading weights" in line for line in crashed.log_tail)
            assert any("bad checkpoint" in line for line in crashed.log_tail)
            with pytest.raises(PoolFailed, match="only 2 replicas can still serve, 3 wanted"):
                await pool.wait_ready(3)
            for _ in range(6):
                await chat(pool)
            assert served(pool) == [0, 3, 3]
            await anyio.sleep(0.3)
            assert pool.replicas[0].state == "failed"  # not restarted again
            assert pool.replicas[0].restarts == 2
            await pool.pause()
            await pool.stop()
            assert [r.state for r in pool.replicas] == ["failed", "stopped", "stopped"]


# -- control under chaos ------------------------------------------------------------------


@pytest.mark.anyio
async def test_drain_while_a_replica_dies() -> None:
    """A replica killed during a drain: the drain still returns, the request that was on
    it gets ``ServerClosed`` (the pool takes no new attempt), the other is answered, the
    dead replica is not restarted, and the scope ends cleanly."""
    with anyio.fail_after(20):
        async with open_pool(process(), replicas=2, routing="round_robin", **QUICK) as pool:
            await pool.wait_ready(2)
            pids = [replica.pid for replica in pool.replicas]
            async with collecting() as (tg, results):
                spawn(tg, results, lambda: faulty(pool, "delay=1"))
                spawn(tg, results, lambda: faulty(pool, "delay=1"))
                await eventually(lambda: [r.in_flight for r in pool.replicas] == [1, 1])
                tg.start_soon(pool.drain, 10)
                await eventually(lambda: [r.state for r in pool.replicas] == ["draining"] * 2)
                assert pids[0] is not None
                os.kill(pids[0], signal.SIGKILL)
            assert sorted(type(r).__name__ for r in results) == ["ServerClosed", "dict"]
            assert [r.state for r in pool.replicas] == ["stopped", "stopped"]
            assert [r.restarts for r in pool.replicas] == [0, 0]
            assert all(pid is not None and gone(pid) for pid in pids)
            settled(pool)


@pytest.mark.anyio
async def test_pause_and_resume_while_replicas_are_killed() -> None:
    """Paused while a replica dies and restarts: nothing is dispatched until resumed, then
    everything is answered."""
    with anyio.fail_after(30):
        async with open_pool(process(), replicas=2, **QUICK) as pool:
            await pool.wait_ready(2)
            async with collecting() as (tg, results):
                for _ in range(4):
                    spawn(tg, results, lambda: faulty(pool, "delay=0.3"))
                await eventually(lambda: pool.metrics.in_flight == 4)
                pid = pool.replicas[0].pid
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                await pool.pause()  # those re-sent wait: paused
                for _ in range(4):
                    spawn(tg, results, lambda: chat(pool))
                await pool.wait_ready(2)
                await anyio.sleep(0.2)
                assert pool.metrics.in_flight == 0
                assert len(results) == 2 and pool.metrics.waiting == 6
                await pool.resume()
            assert len(results) == 8 and all(not isinstance(r, Exception) for r in results)
            settled(pool)


# -- random schedules of all of it --------------------------------------------------------

#: A fault: (seconds from the start, what, how long or how many, which endpoint).
ChaosEvent = tuple[float, str, float, int]
KINDS = ["kill", "freeze", "burst", "throttle", "drop", "pause"]
#: Per-request directives: most are answered, some are refused (400) by every replica.
REQUESTS = ["ok", "ok", "delay=0.05", "delay=0.2", "status=400"]


class Chaos:
    """Plays a schedule of faults on a pool: two endpoints (``Backend``: killed and
    restarted on their port, frozen and thawed) and an in-process dummy (5xx bursts,
    429s, cut connections); and pauses the pool. One fault at a time per target."""

    def __init__(self, pool: Pool, endpoints: list[Backend]) -> None:
        self.pool = pool
        self.endpoints = endpoints
        self.locks = {name: anyio.Lock() for name in ("0", "1", "dummy", "pool")}

    async def play(self, at: float, kind: str, size: float, endpoint: int) -> None:
        """At ``at`` s, one fault: ``size`` s of it (``kill``, ``freeze``, ``pause``), or
        about ``10 * size`` faulty answers (``burst``, ``drop``), or a ``Retry-After`` of
        ``size / 2`` s (``throttle``)."""
        await anyio.sleep(at)
        if kind in ("kill", "freeze"):
            async with self.locks[str(endpoint)]:
                await self._endpoint(self.endpoints[endpoint], kind, size)
        elif kind == "pause":
            async with self.locks["pool"]:
                await self.pool.pause()
                await anyio.sleep(size / 2)
                await self.pool.resume()
        else:
            async with self.locks["dummy"]:
                await self._dummy(kind, size)

    async def _endpoint(self, backend: Backend, kind: str, size: float) -> None:
        if kind == "kill":
            backend.kill()
            await anyio.sleep(size)
            await backend.start()
        else:
            backend.freeze()
            await anyio.sleep(size)
            backend.thaw()

    async def _dummy(self, kind: str, size: float) -> None:
        count = 1 + int(size * 10)
        if kind == "burst":
            inject(self.pool, 2, *["status=503", "status=500", "status=502"] * count)
        elif kind == "throttle":
            inject(self.pool, 2, f"status=429,retry-after={size / 2:.2f}")
        else:
            inject(self.pool, 2, *["drop"] * count)


chaos_events = st.lists(
    st.tuples(
        st.floats(0, 0.8),
        st.sampled_from(KINDS),
        st.sampled_from([0.1, 0.25, 0.4, 0.6, 0.8]),
        st.integers(0, 1),
    ),
    max_size=6,
)
chaos_requests = st.lists(st.tuples(st.floats(0, 1.0), st.sampled_from(REQUESTS)), max_size=30)


@pytest.mark.anyio
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chaos_events, chaos_requests)
async def test_random_chaos_every_request_ends_exactly_once(
    events: list[ChaosEvent], requests: list[tuple[float, str]]
) -> None:
    """Invariants under any schedule of kills, hangs, bursts, 429s, cut connections and
    pauses: every request ends exactly once — answered, or refused (400) with
    ``BadRequest`` — and never twice (the replicas' answers are the answers); every load
    counter is back at zero; the scope exits within its bound, leaving no task and no
    connection behind (and no process: the leak check)."""
    outcomes: list[list[object]] = [[] for _ in requests]
    quick = {
        **QUICK,
        "demote_after": 0.3,
        "restart_backoff_max": 0.1,
        "breaker_failures": 3,
        "breaker_cooldown": 0.2,
    }
    tasks_before = {task.id for task in anyio.get_running_tasks()}
    with anyio.fail_after(30):
        async with backends("a", "b") as endpoints:
            configs = [endpoints[0].config(), endpoints[1].config(), dummy(max_retries=10)]
            async with open_pool(configs, **quick) as pool:
                await pool.wait_ready(3)
                chaos = Chaos(pool, endpoints)

                async def send(number: int, at: float, fault: str) -> None:
                    await anyio.sleep(at)
                    headers = {"x-servescope-fault": fault}
                    payload = {"messages": [{"role": "user", "content": f"#{number}"}]}
                    try:
                        outcomes[number].append(await pool.request(payload, headers=headers))
                    except servescope.ServeError as exc:
                        outcomes[number].append(exc)

                async with anyio.create_task_group() as tg:
                    for number, (at, fault) in enumerate(requests):
                        tg.start_soon(send, number, at, fault)
                    for event in events:
                        tg.start_soon(chaos.play, *event)
                settled(pool)
                answered = sum(replica.answered for replica in pool.replicas)
                ports = {int(str(r.base_url).rsplit(":", 1)[1]) for r in pool.replicas}
                leaving = time.monotonic()
            assert time.monotonic() - leaving < 3
    assert {task.id for task in anyio.get_running_tasks()} <= tasks_before
    assert [c for c in psutil.Process().net_connections("tcp") if ports & ends(c)] == []
    for (_, fault), outcome in zip(requests, outcomes, strict=True):
        assert len(outcome) == 1, outcome  # exactly once
        (result,) = outcome
        if fault == "status=400":
            assert isinstance(result, BadRequest) and result.status_code == 400, result
        else:
            assert isinstance(result, dict) and result["choices"], result
    assert answered == len(requests)  # one answer per request, none twice
    ids = [r["id"] for (r,) in outcomes if isinstance(r, dict)]
    assert len(ids) == len(set(ids))
