"""``open_pool``: routing, readiness, replica state, GPU slices, config files, control
signals, the routing log, and how a pool fails — on both loops.

Replicas here are mostly the in-process dummy (fast, no process); processes where what
is tested is a process (its environment, its exit, its teardown). The chaos suite
(kills, hangs, 5xx, 429, restarts) is ``test_pool_chaos``.
"""

from __future__ import annotations

import collections
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

import servescope
from servescope import (
    ControlError,
    CustomConfig,
    DummyConfig,
    EndpointConfig,
    Pool,
    PoolFailed,
    ServerClosed,
    ServerStartError,
    load_pool_config,
    open_pool,
    open_server,
)
from servescope._asgi import bound_socket
from servescope._dummy_app import DummyApp
from servescope._faults import Fault, FaultSchedule, parse_fault

from .conftest import dummy_process

MESSAGES = [{"role": "user", "content": "hi"}]
#: A quick health watch and quick retries: every test ends in seconds.
FAST: dict[str, Any] = {
    "health_interval": 0.1,
    "request_timeout": 20.0,
    "backoff_base": 0.01,
    "backoff_max": 0.05,
}
#: Quick restarts and demotion.
QUICK: dict[str, Any] = {"restart_backoff": 0.05, "restart_backoff_max": 0.2, "demote_after": 0.5}
#: A script that fails at once, each time it is started.
CRASH_SCRIPT = (
    "import sys\n"
    "print('loading weights for the crash loop', flush=True)\n"
    "print('RuntimeError: bad checkpoint', file=sys.stderr, flush=True)\n"
    "sys.exit(3)\n"
)
#: A server script that prints the GPUs it was given, then serves as the dummy does.
GPU_SCRIPT = (
    "import os, sys\n"
    "print('visible=' + os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>'), flush=True)\n"
    "from servescope.dummy import main\n"
    "main(sys.argv[1:])\n"
)


def dummy(**values: Any) -> DummyConfig:
    """An in-process dummy replica with a quick health watch."""
    return DummyConfig(**{**FAST, **values})


def process(*dummy_args: str, **values: Any) -> CustomConfig:
    """The dummy as a process replica (``python -m servescope.dummy``)."""
    return dummy_process(*dummy_args, **{"model": "dummy", **FAST, **values})


def script(path: Path, text: str, **values: Any) -> CustomConfig:
    """A replica running ``text`` as its server script."""
    path.write_text(text)
    return CustomConfig(script=path, **{"model": "dummy", **FAST, **values})


def served(pool: Pool) -> list[int]:
    """How many requests each replica answered."""
    return [replica.answered for replica in pool.replicas]


def app(pool: Pool, index: int) -> DummyApp:
    """Replica ``index``'s in-process dummy app (its current incarnation's)."""
    server = pool._replicas[index].server
    assert server is not None and server.dummy_app is not None
    return server.dummy_app


class Script(FaultSchedule):
    """The faults of a replica's next requests, in order; then none."""

    def __init__(self, *directives: str) -> None:
        super().__init__()
        self.queue = collections.deque(parse_fault(directive) for directive in directives)

    def next(self) -> Fault:
        return self.queue.popleft() if self.queue else Fault()


def inject(pool: Pool, index: int, *directives: str) -> None:
    """Replica ``index`` (in-process) answers its next requests with these faults."""
    app(pool, index).faults = Script(*directives)


def settled(pool: Pool) -> None:
    """Every load counter back at zero, nobody waiting."""
    assert [replica.in_flight for replica in pool.replicas] == [0] * len(pool.replicas)
    assert pool._dispatch.busy == 0
    assert pool._dispatch.waiting() == 0
    assert pool.metrics.in_flight == 0


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (or is a zombie no one waits for)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def eventually(check: Callable[[], bool], within: float = 10.0) -> None:
    """Wait until ``check()`` holds (polled every 10 ms); fail after ``within`` s."""
    with anyio.fail_after(within):
        while not check():  # noqa: ASYNC110 (no event tells a test when a state is reached)
            await anyio.sleep(0.01)


async def chat(pool: Pool, **params: Any) -> str:
    """One chat completion's text."""
    out = await pool.chat(MESSAGES, max_tokens=4, **params)
    return out.text


async def faulty(pool: Pool, fault: str, **params: Any) -> dict[str, Any]:
    """One request carrying a fault directive for the replica that gets it."""
    payload = {"messages": MESSAGES, "max_tokens": 4}
    return await pool.request(payload, headers={"x-servescope-fault": fault}, **params)


@asynccontextmanager
async def collecting() -> AsyncIterator[tuple[anyio.abc.TaskGroup, list[Any]]]:
    """A task group and a list that ``spawn`` appends each task's outcome to."""
    results: list[Any] = []
    async with anyio.create_task_group() as tg:
        yield tg, results


def spawn(tg: anyio.abc.TaskGroup, results: list[Any], make: Callable[[], Awaitable[Any]]) -> None:
    """Run ``make()`` in ``tg``; its result, or the ``ServeError`` it raised, goes to
    ``results`` (exactly one entry per call)."""

    async def run() -> None:
        try:
            results.append(await make())
        except servescope.ServeError as exc:
            results.append(exc)

    tg.start_soon(run)


# -- routing ----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("routing", "expected"),
    [("round_robin", [3, 3, 3]), ("least_loaded", [3, 3, 3])],
)
async def test_requests_one_at_a_time_take_turns(routing: str, expected: list[int]) -> None:
    with anyio.fail_after(10):
        async with open_pool(dummy(), replicas=3, routing=routing) as pool:
            await pool.wait_ready(3)
            for _ in range(9):
                await chat(pool)
            assert served(pool) == expected
            settled(pool)


@pytest.mark.anyio
async def test_least_loaded_spreads_concurrent_requests() -> None:
    """Six at once over three replicas: two each, never three on one."""
    with anyio.fail_after(10):
        async with open_pool(dummy(latency=0.2, health_interval=None), replicas=3) as pool:
            await pool.wait_ready(3)
            async with collecting() as (tg, results):
                for _ in range(6):
                    spawn(tg, results, lambda: chat(pool))
            assert served(pool) == [2, 2, 2]
            assert [app(pool, i).max_in_flight for i in range(3)] == [2, 2, 2]
            settled(pool)


@pytest.mark.anyio
async def test_power_of_two_reaches_every_replica() -> None:
    with anyio.fail_after(10):
        async with open_pool(dummy(), replicas=4, routing="power_of_two", seed=3) as pool:
            await pool.wait_ready(4)
            for _ in range(40):
                await chat(pool)
            assert sum(served(pool)) == 40 and min(served(pool)) > 0


@pytest.mark.anyio
async def test_prefix_keeps_a_prompt_on_one_replica_and_spreads_prompts() -> None:
    with anyio.fail_after(10):
        async with open_pool(dummy(), replicas=3, routing="prefix") as pool:
            await pool.wait_ready(3)
            for _ in range(6):
                await pool.complete("the same long system prompt, then a question", max_tokens=2)
            assert sorted(served(pool)) == [0, 0, 6]
            before = served(pool)
            for number in range(30):
                await pool.complete(f"prompt number {number}", max_tokens=2)
            spread = [now - then for now, then in zip(served(pool), before, strict=True)]
            assert min(spread) > 0, spread


@pytest.mark.anyio
async def test_sticky_sends_one_key_to_one_replica() -> None:
    with anyio.fail_after(10):
        async with open_pool(dummy(), replicas=3, routing="sticky") as pool:
            await pool.wait_ready(3)
            for _ in range(6):
                await chat(pool, routing_key="user-42")
            assert sorted(served(pool)) == [0, 0, 6]
            for number in range(30):
                await chat(pool, routing_key=f"user-{number}")
            assert min(served(pool)) > 0


# -- readiness and state ----------------------------------------------------------------


@pytest.mark.anyio
async def test_wait_ready_min_ready() -> None:
    """Two in-process replicas are ready at once; the process replica only after 1 s."""
    configs = [dummy(), dummy(), process("--ready-after", "1.0")]
    with anyio.fail_after(20):
        async with open_pool(configs) as pool:
            with pytest.raises(servescope.ConfigError, match="min_ready must be 1 to 3"):
                await pool.wait_ready(4)
            with pytest.raises(servescope.ConfigError, match="min_ready must be 1 to 3"):
                await pool.wait_ready(0)
            await pool.wait_ready(2)
            states = [replica.state for replica in pool.replicas]
            assert states == ["ready", "ready", "starting"]
            await pool.wait_ready()  # the config's min_ready: 1
            await pool.wait_ready(3)
            assert [replica.state for replica in pool.replicas] == ["ready"] * 3


@pytest.mark.anyio
async def test_requests_wait_for_a_replica_by_themselves() -> None:
    with anyio.fail_after(20):
        async with open_pool(process("--ready-after", "0.5"), replicas=1) as pool:
            assert pool.replicas[0].state == "starting"
            assert await chat(pool)
            assert pool.replicas[0].state == "ready"


@pytest.mark.anyio
async def test_replicas_info() -> None:
    configs = [dummy(latency=0.3), process()]
    with anyio.fail_after(20):
        async with open_pool(configs, routing="round_robin") as pool:
            await pool.wait_ready(2)
            first, second = pool.replicas
            assert first.index == 0 and second.index == 1
            assert first.pid is None and isinstance(second.pid, int)
            for info in pool.replicas:
                assert info.state == "ready" and info.breaker == "closed"
                assert info.base_url is not None
                assert info.base_url.startswith("http://127.0.0.1:")
                assert (info.restarts, info.given_up, info.last_error) == (0, False, None)
                assert any("ready at" in line for line in info.log_tail)
            assert pool.replicas[0].base_url != pool.replicas[1].base_url
            async with anyio.create_task_group() as tg:
                tg.start_soon(chat, pool)  # round robin: replica 0, which takes 0.3 s
                await eventually(lambda: pool.replicas[0].in_flight == 1)
                assert pool.metrics.in_flight == 1
            assert [r.answered for r in pool.replicas] == [1, 0]
            await chat(pool)
            inject(pool, 0, "status=503")
            await chat(pool)  # replica 0 fails it, replica 1 answers
            now = pool.replicas
            assert [(r.answered, r.failed, r.in_flight) for r in now] == [(1, 1, 0), (2, 0, 0)]
            assert pool.metrics.succeeded == 3 and pool.metrics.retried == 1
            assert repr(pool) == "<Pool 2 replicas: 2 ready; running>"


@pytest.mark.anyio
async def test_gpu_slices_are_seen_by_each_replica(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Four visible devices, two per replica: each replica's process sees its own two,
    in order."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1,0,2")
    config = script(tmp_path / "gpu_server.py", GPU_SCRIPT)
    with anyio.fail_after(20):
        async with open_pool(config, replicas=2, gpus_per_replica=2) as pool:
            await pool.wait_ready(2)
            tails = [replica.log_tail for replica in pool.replicas]
    assert "visible=3,1" in "\n".join(tails[0])
    assert "visible=0,2" in "\n".join(tails[1])


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("visible", "problem"),
    [("0,1,2", "need 4, 3 are visible"), ("", "need 4, 0 are visible")],
)
async def test_gpu_slices_that_do_not_fit_are_config_errors(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, visible: str, problem: str
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    config = script(tmp_path / "gpu_server.py", GPU_SCRIPT)
    with anyio.fail_after(10), pytest.raises(servescope.ConfigError, match=problem):
        async with open_pool(config, replicas=2, gpus_per_replica=2):
            pytest.fail("the pool started")  # pragma: no cover


@pytest.mark.anyio
async def test_load_pool_config_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "pool.toml"
    path.write_text(
        'backend = "dummy"\n'
        'text = "from the file"\n'
        "health_interval = 0.1\n"
        "replicas = 3\n"
        'routing = "round_robin"\n'
        "max_restarts = 2\n"
        "restart_backoff = 0.05\n"
        "demote_after = 1.5\n"
    )
    config, settings = load_pool_config(path)
    assert isinstance(config, DummyConfig) and config.text == "from the file"
    assert (settings.replicas, settings.routing, settings.max_restarts) == (3, "round_robin", 2)
    assert (settings.restart_backoff, settings.demote_after) == (0.05, 1.5)
    with anyio.fail_after(10):
        async with open_pool(config, **settings.model_dump()) as pool:
            await pool.wait_ready(3)
            assert pool.settings == settings
            texts = {await chat(pool) for _ in range(6)}
            assert texts == {"from the file"}
            assert served(pool) == [2, 2, 2]


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"replicas": 2, "min_ready": 3}, "min_ready=3 is more than replicas=2"),
        ({"restart_backoff": 10, "restart_backoff_max": 1}, "restart_backoff is more"),
        ({"replicas": -1}, "replicas"),
        ({"routing": "fastest"}, "routing"),
        ({"demote_after": float("inf")}, "demote_after"),
    ],
)
def test_pool_settings_that_cannot_work_are_config_errors(
    values: dict[str, object], problem: str
) -> None:
    with pytest.raises(servescope.ConfigError, match=re.escape(problem)):
        servescope.PoolConfig(**values)


def test_load_pool_config_refuses_a_typo(tmp_path: Path) -> None:
    path = tmp_path / "pool.toml"
    path.write_text('backend = "dummy"\nreplicas = 2\nrouting = "fastest"\n')
    with pytest.raises(servescope.ConfigError, match="routing"):
        load_pool_config(path)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("configs", "values", "problem"),
    [
        ([], {}, "non-empty list"),
        ([DummyConfig(), DummyConfig()], {"replicas": 3}, "replicas=3 but 2 configs"),
        ([DummyConfig(), DummyConfig(model="other")], {}, "one model"),
        ([DummyConfig()], {"routing": "random"}, "routing"),
    ],
)
async def test_open_pool_refuses_bad_settings(
    configs: list[DummyConfig], values: dict[str, Any], problem: str
) -> None:
    with anyio.fail_after(5), pytest.raises(servescope.ConfigError, match=problem):
        async with open_pool(configs, **values):
            pytest.fail("the pool started")  # pragma: no cover


# -- control ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_megatron_invalid_control_signals_raise() -> None:
    """Megatron logs an invalid signal and ignores it; here each raises ``ControlError``
    and changes nothing."""
    with anyio.fail_after(10):
        async with open_pool(dummy(), replicas=2) as pool:
            await pool.wait_ready(2)
            with pytest.raises(ControlError, match=r"STOP.*RUNNING.*pause or drain first"):
                await pool.stop()
            with pytest.raises(ControlError, match=r"RESUME.*RUNNING.*not paused"):
                await pool.resume()
            assert await chat(pool)
            await pool.pause()
            with pytest.raises(ControlError, match=r"PAUSE.*PAUSED"):
                await pool.pause()
            await pool.resume()
            assert await chat(pool)


@pytest.mark.anyio
async def test_signals_once_stopped_are_control_errors() -> None:
    """``ControlError`` for anything once stopped (not ``ServerClosed``, which is for
    requests), naming what the state allows."""
    with anyio.fail_after(10):
        async with open_pool(dummy(), replicas=2) as pool:
            await pool.wait_ready(2)
            await pool.drain(timeout=1)
            for signal_ in (pool.pause, pool.resume, pool.stop):
                with pytest.raises(ControlError, match=r"STOPPED.*nothing, the pool has stopped"):
                    await signal_()
            with pytest.raises(ControlError, match="STOPPED"):
                await pool.drain(timeout=1)
            with pytest.raises(ServerClosed):
                await chat(pool)


@pytest.mark.anyio
async def test_stop_cuts_a_drain_short() -> None:
    """DRAINING → STOPPED is allowed: a drain waiting for a long request can be cut
    short by ``stop``, which cancels it (its caller gets ``ServerClosed``)."""
    with anyio.fail_after(10):
        async with open_pool(dummy(), replicas=2) as pool, collecting() as (tg, results):
            await pool.wait_ready(2)
            spawn(tg, results, lambda: faulty(pool, "delay=30"))
            await eventually(lambda: pool.metrics.in_flight == 1)
            drained = anyio.Event()

            async def drain() -> None:
                await pool.drain(timeout=30)
                drained.set()

            tg.start_soon(drain)
            await eventually(lambda: pool.state.value == "draining")
            started = time.monotonic()
            await pool.stop()
            await drained.wait()
            assert time.monotonic() - started < 3
        assert len(results) == 1 and isinstance(results[0], ServerClosed)
        assert [replica.state for replica in pool.replicas] == ["stopped", "stopped"]


@pytest.mark.anyio
async def test_pause_waits_for_in_flight_then_callers_wait_until_resume() -> None:
    with anyio.fail_after(15):
        config = dummy(latency=0.3, health_interval=None)  # every request the app sees is ours
        async with open_pool(config, replicas=2) as pool:
            await pool.wait_ready(2)
            async with collecting() as (tg, results):
                for _ in range(4):
                    spawn(tg, results, lambda: chat(pool))
                await eventually(lambda: pool.metrics.in_flight == 4)
                await pool.pause()
                assert len(results) == 4  # pause returned once those in flight finished
                assert pool.state.value == "paused"
                handled = app(pool, 0).requests + app(pool, 1).requests
                for _ in range(4):
                    spawn(tg, results, lambda: chat(pool))
                await eventually(lambda: pool.metrics.waiting == 4)
                await anyio.sleep(0.3)
                assert len(results) == 4 and pool.metrics.in_flight == 0
                assert app(pool, 0).requests + app(pool, 1).requests == handled
                await pool.resume()
            assert len(results) == 8 and all(isinstance(text, str) for text in results)
            settled(pool)


@pytest.mark.anyio
async def test_pause_with_nothing_in_flight_returns_at_once_and_stop_after_it() -> None:
    with anyio.fail_after(20):
        async with open_pool(process(), replicas=2) as pool:
            await pool.wait_ready(2)
            pids = [replica.pid for replica in pool.replicas]
            with anyio.fail_after(1):
                await pool.pause()
            async with collecting() as (tg, results):
                spawn(tg, results, lambda: chat(pool))  # waits while paused
                await eventually(lambda: pool.metrics.waiting == 1)
                await pool.stop()
            assert len(results) == 1 and isinstance(results[0], ServerClosed)
            assert [replica.state for replica in pool.replicas] == ["stopped", "stopped"]
            assert all(pid is not None and gone(pid) for pid in pids)
            with pytest.raises(ServerClosed):
                await chat(pool)


@pytest.mark.anyio
async def test_drain_under_load_finishes_in_flight_then_stops_every_process() -> None:
    with anyio.fail_after(20):
        async with open_pool(process(), replicas=2) as pool:
            await pool.wait_ready(2)
            pids = [replica.pid for replica in pool.replicas]
            async with collecting() as (tg, results):
                for _ in range(4):
                    spawn(tg, results, lambda: faulty(pool, "delay=0.5"))
                await eventually(lambda: pool.metrics.in_flight == 4)
                tg.start_soon(pool.drain, 10)
                await eventually(lambda: pool.state.value == "draining")
                for _ in range(3):  # sent after the drain began
                    spawn(tg, results, lambda: chat(pool))
            answers = [result for result in results if isinstance(result, dict)]
            refused = [result for result in results if isinstance(result, ServerClosed)]
            assert (len(answers), len(refused), len(results)) == (4, 3, 7)
            assert pool.state.value == "stopped"
            assert [replica.state for replica in pool.replicas] == ["stopped", "stopped"]
            assert all(pid is not None and gone(pid) for pid in pids)
            settled(pool)


@pytest.mark.anyio
async def test_drain_timeout_cancels_what_is_left() -> None:
    with anyio.fail_after(10):
        async with open_pool(dummy(), replicas=2) as pool, collecting() as (tg, results):
            await pool.wait_ready(2)
            spawn(tg, results, lambda: faulty(pool, "delay=0.1"))
            spawn(tg, results, lambda: faulty(pool, "delay=60"))
            await eventually(lambda: pool.metrics.in_flight == 2)
            started = time.monotonic()
            await pool.drain(timeout=0.5)
            assert 0.4 < time.monotonic() - started < 3
        assert sorted(type(result).__name__ for result in results) == ["ServerClosed", "dict"]


# -- the routing log and deterministic mode ---------------------------------------------


def decisions(path: Path) -> list[tuple[int, int, list[list[int]], int]]:
    """Each routing decision in a routing log, without its time."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [(d["request"], d["attempt"], d["candidates"], d["chosen"]) for d in lines]


async def route_requests(log: Path, seed: int) -> None:
    with anyio.fail_after(10):
        settings: dict[str, Any] = {"routing": "power_of_two", "seed": seed, "routing_log": log}
        async with open_pool(dummy(), replicas=3, **settings) as pool:
            await pool.wait_ready(3)
            for _ in range(20):
                await chat(pool)


@pytest.mark.anyio
async def test_deterministic_mode_same_seed_same_decisions(tmp_path: Path) -> None:
    await route_requests(tmp_path / "a.jsonl", seed=11)
    await route_requests(tmp_path / "b.jsonl", seed=11)
    await route_requests(tmp_path / "c.jsonl", seed=12)
    first, again = decisions(tmp_path / "a.jsonl"), decisions(tmp_path / "b.jsonl")
    assert len(first) == 20 and first == again
    assert decisions(tmp_path / "c.jsonl") != first
    assert len({chosen for *_, chosen in first}) == 3


@pytest.mark.anyio
async def test_routing_log_lines(tmp_path: Path) -> None:
    """One JSON line per attempt: its request, attempt number, the candidates with their
    load, and the choice; a retry avoids the replica that failed it."""
    log = tmp_path / "logs" / "routing.jsonl"
    with anyio.fail_after(10):
        async with open_pool(dummy(), replicas=2, routing_log=log) as pool:
            await pool.wait_ready(2)
            await chat(pool)
            inject(pool, served(pool).index(0), "status=503")  # where the next one goes
            await chat(pool)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 3
    assert set(lines[0]) == {"time", "request", "attempt", "policy", "candidates", "chosen"}
    assert all(line["policy"] == "least_loaded" for line in lines)
    assert abs(lines[0]["time"] - time.time()) < 60
    assert [(line["request"], line["attempt"]) for line in lines] == [(1, 1), (2, 1), (2, 2)]
    assert lines[0]["candidates"] == [[0, 0], [1, 0]]
    assert lines[1]["chosen"] != lines[0]["chosen"]  # a tie goes round, not to the first
    assert lines[2]["candidates"] == [[lines[0]["chosen"], 0]]  # the failed one is avoided
    assert lines[2]["chosen"] != lines[1]["chosen"]


def test_routing_log_that_cannot_be_written_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")

    async def main() -> None:
        async with open_pool(dummy(), routing_log=blocker / "routing.jsonl"):
            pytest.fail("the pool started")  # pragma: no cover

    with pytest.raises(servescope.ConfigError, match="routing_log"):
        anyio.run(main)


# -- failing for good -------------------------------------------------------------------


@pytest.mark.anyio
async def test_pool_failed_names_each_replica_when_all_spend_their_budget(
    tmp_path: Path,
) -> None:
    config = script(tmp_path / "crash.py", CRASH_SCRIPT)
    started = time.monotonic()
    with anyio.fail_after(20), pytest.raises(PoolFailed) as caught:
        async with open_pool(config, replicas=2, max_restarts=1, **QUICK) as pool:
            await pool.wait_ready()
            pytest.fail("a replica became ready")  # pragma: no cover
    assert time.monotonic() - started < 10
    failure = caught.value
    assert "every replica failed for good" in failure.reason
    for index in (0, 1):
        assert f"replica {index} (1 restarts): server exited with code 3" in failure.reason
    assert len(failure.replica_errors) == 2
    for error in failure.replica_errors:
        assert isinstance(error, ServerStartError) and error.exit_code == 3
        assert any("loading weights" in line for line in error.log_tail)
    assert [(r.state, r.given_up, r.restarts) for r in pool.replicas] == [("failed", True, 1)] * 2
    with pytest.raises(PoolFailed):
        await chat(pool)


@pytest.mark.anyio
async def test_requests_waiting_when_the_pool_fails_get_pool_failed(tmp_path: Path) -> None:
    config = script(tmp_path / "crash.py", CRASH_SCRIPT)
    with anyio.fail_after(20), pytest.raises(PoolFailed):
        async with (
            open_pool(config, replicas=1, max_restarts=1, **QUICK) as pool,
            collecting() as (tg, results),
        ):
            spawn(tg, results, lambda: chat(pool))
    assert len(results) <= 1
    assert all(isinstance(result, PoolFailed) for result in results)


# -- a heterogeneous pool ---------------------------------------------------------------


@pytest.mark.anyio
async def test_heterogeneous_pool_of_endpoints_and_an_in_process_dummy() -> None:
    """Two servers someone else runs (endpoints) and one of the pool's own, each with its
    own text: round robin reaches each in turn."""
    with anyio.fail_after(15):
        async with (
            open_server(DummyConfig(text="alpha")) as alpha,
            open_server(DummyConfig(text="beta")) as beta,
        ):
            await alpha.wait_ready()
            await beta.wait_ready()
            configs: Sequence[servescope.ServerConfig] = [
                EndpointConfig(url=f"{alpha.base_url}/v1", model="dummy", **FAST),
                EndpointConfig(url=beta.base_url, model="dummy", **FAST),
                dummy(text="gamma"),
            ]
            async with open_pool(configs, routing="round_robin") as pool:
                await pool.wait_ready(3)
                texts = [await chat(pool) for _ in range(6)]
            assert sorted(texts) == ["alpha"] * 2 + ["beta"] * 2 + ["gamma"] * 2
            assert [replica.pid for replica in pool.replicas] == [None] * 3


# -- waiting for a replica --------------------------------------------------------------


@pytest.mark.anyio
async def test_waiters_sleep_while_a_half_open_breaker_cannot_take_them() -> None:
    """A breaker past its cool-down (half-open) is no deadline to wake up for: requests
    waiting on a paused pool sleep until resumed, they do not spin the event loop."""
    breaker: dict[str, Any] = {"breaker_failures": 1, "breaker_cooldown": 0.05}
    with anyio.fail_after(10):
        async with open_pool(dummy(), replicas=2, **breaker) as pool:
            await pool.wait_ready(2)
            inject(pool, 0, "status=503")
            await chat(pool)  # replica 0's breaker opens; replica 1 answers the retry
            assert [r.breaker for r in pool.replicas] == ["open", "closed"]
            await anyio.sleep(0.1)
            assert [r.breaker for r in pool.replicas] == ["half-open", "closed"]
            looks = 0
            reopening = pool._reopening

            def counted() -> list[float]:
                nonlocal looks
                looks += 1
                return reopening()

            pool._reopening = counted  # type: ignore[method-assign]
            await pool.pause()
            async with collecting() as (tg, results):
                spawn(tg, results, lambda: chat(pool))
                await anyio.sleep(0.5)
                assert results == [] and looks < 10, looks
                await pool.resume()
            assert len(results) == 1 and isinstance(results[0], str)


@asynccontextmanager
async def one_slot_and_a_dead_endpoint() -> AsyncIterator[Pool]:
    """A pool whose replica 0 takes one request at a time (0.3 s each) and whose replica 1,
    an endpoint nobody listens on, waits 30 s before each re-check: no replica changes
    while a test runs, only slots are freed."""
    dead = bound_socket()  # bound, not listening: connections are refused
    try:
        url = f"http://127.0.0.1:{dead.getsockname()[1]}/v1"
        configs = [
            dummy(latency=0.3, max_concurrency=1),
            EndpointConfig(url=url, model="dummy", **FAST),
        ]
        async with open_pool(configs, restart_backoff=30) as pool:
            await pool.wait_ready(1)
            await eventually(lambda: pool.replicas[1].state == "restarting")
            yield pool
    finally:
        dead.close()


@pytest.mark.anyio
@pytest.mark.parametrize("waiter", ["waiting", "cancelled"])
async def test_wait_ready_never_takes_a_freed_slot_from_a_request(waiter: str) -> None:
    """``wait_ready`` waits for replicas to change, not for slots: a slot freed while it
    waits (or after it was cancelled) goes to the request waiting for one."""
    with anyio.fail_after(10):
        async with one_slot_and_a_dead_endpoint() as pool, collecting() as (tg, results):
            if waiter == "waiting":
                tg.start_soon(pool.wait_ready, 2)
            else:
                with anyio.move_on_after(0.05):
                    await pool.wait_ready(2)
            await anyio.sleep(0.05)
            assert pool.metrics.waiting == 0  # requests waiting: wait_ready is none
            started = time.monotonic()
            spawn(tg, results, lambda: chat(pool))
            await eventually(lambda: pool.metrics.in_flight == 1)
            spawn(tg, results, lambda: chat(pool))  # waits for the one slot
            await eventually(lambda: len(results) == 2, within=5)
            assert time.monotonic() - started < 2
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_waiter_cancelled_as_it_is_woken_passes_the_slot_on() -> None:
    """A caller giving up at the moment a slot is handed to it: the next waiter gets it."""
    with anyio.fail_after(10):
        async with one_slot_and_a_dead_endpoint() as pool, collecting() as (tg, results):
            gives_up = anyio.CancelScope()

            async def first_then_give_up() -> None:
                results.append(await chat(pool))
                gives_up.cancel()  # before the waiter it woke has run

            async def impatient() -> None:
                with gives_up:
                    await chat(pool)
                results.append("gave up")

            tg.start_soon(first_then_give_up)
            await eventually(lambda: pool.metrics.in_flight == 1)
            tg.start_soon(impatient)
            await eventually(lambda: pool.metrics.waiting == 1)
            spawn(tg, results, lambda: chat(pool))
            await eventually(lambda: pool.metrics.waiting == 2)
            started = time.monotonic()
            await eventually(lambda: len(results) == 3, within=5)
            assert time.monotonic() - started < 2
            assert sorted(map(str, results)).count("gave up") == 1
            settled(pool)


# -- leaving the scope ------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_error_in_the_body_comes_out_as_it_is_and_every_process_is_gone() -> None:
    with anyio.fail_after(20), pytest.raises(KeyError, match="from the body"):
        async with open_pool(process(), replicas=2) as pool:
            await pool.wait_ready(2)
            pids = [replica.pid for replica in pool.replicas]
            raise KeyError("from the body")
    assert all(pid is not None and gone(pid) for pid in pids)
    assert [replica.state for replica in pool.replicas] == ["stopped", "stopped"]


@pytest.mark.anyio
async def test_requests_waiting_outside_the_scope_get_server_closed_when_it_ends() -> None:
    with anyio.fail_after(10):
        async with collecting() as (tg, results), open_pool(dummy(), replicas=2) as pool:
            await pool.wait_ready(2)
            await pool.pause()
            for _ in range(3):
                spawn(tg, results, lambda: chat(pool))  # tasks of the outer group
            await eventually(lambda: pool.metrics.waiting == 3)
        assert len(results) == 3 and all(isinstance(r, ServerClosed) for r in results)
        with pytest.raises(ServerClosed):
            await chat(pool)
