"""Replicas: how ``open_pool`` scales, fails over, and what it costs — side by side.

Everything is measured in one run, interleaved, so that a noisy machine moves both
sides of a ratio alike: read the ratios, not the absolute numbers.

* scaling: pools of 1, 2 and 4 replicas of a dummy whose capacity is bounded (each
  answer takes ``--latency`` s, and a replica takes at most ``--slots`` requests at
  once: its config's ``max_concurrency``), each loaded with twice its slots in flight.
  The target: N replicas serve at least 0.9·N times what one serves. First with
  in-process dummies (served in this event loop: no process scheduling between the
  pool and its replicas), with two control rows: ``servers xN``, N ``open_server``
  scopes with the load split evenly among them by hand, no pool — what this event loop
  allows at all; and ``jittered xN``, the pool again with each answer's latency drawn
  uniformly within ±``--jitter``/2 of the same mean (the dummy's ``delay`` fault header).
  A fixed latency on one event loop forms convoys: an answer whose timer fires while
  the loop serves another is pushed behind it, and from then on the two run in step,
  so the waves grow until every answer of a wave queues behind the CPU of the others;
  the jitter breaks them up. Then the pools with the dummy as subprocesses. The scopes
  are all open at once and each round visits every case (in a rotated order); a
  ratio is taken against one replica of its kind *in the same round*. Workers start
  spread over one latency, as requests that arrive over time would ("of ideal", the
  share of ``slots / latency`` per replica served, pays that ramp and the last wave).
* failover: 4 subprocess replicas, 256 requests in flight, one replica SIGKILLed at a
  time (``--kills`` of them, each a different replica, each once the previous one
  answers again). Each request carries its own id as its ``model``, which the dummy
  echoes: an id with an error or no answer is lost, one answered twice is a duplicate,
  an answer carrying another id is crossed. Latency (p50/p99/max) of the requests
  that ended in the second before each kill vs the failover window (in flight at the
  kill, or started before the replica was ready again) and those in flight at the kill
  (a quarter of them on the killed replica); and, per kill, kill → the
  pool saw the replica fail (its state left ``ready``) → it is ``ready`` again → it
  has a request on it again → it answered one. Default restart settings (first
  backoff 1 s) and retry settings.
* overhead: a pool of 1 vs ``open_server`` on the same dummy, 64 requests in flight,
  both scopes open at once, alternating rounds (the order swapped every round): req/s
  and client CPU seconds per 1,000 requests (``time.process_time``). The target: the
  pool at most 5 % slower. With the dummy as a subprocess (this process's CPU is the
  client's alone), then in-process.

Usage: python benchmarks/bench_replicas.py [--quick] [--backend asyncio,trio]
       [--only scaling,failover,overhead] [--latency 0.05] [--slots 8]
       [--out bench-results/replicas.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
from benchlib import leftover_children, revision

import servescope
import servescope.dummy

DUMMY = Path(servescope.dummy.__file__)
PAYLOAD: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
LEVELS = (1, 2, 4)
SCALING_TARGET = 0.9  # N replicas serve >= this * N * one replica
OVERHEAD_TARGET = 0.95  # a pool of 1 serves >= this * open_server
FAILOVER_REPLICAS = 4
FAILOVER_IN_FLIGHT = 256
OVERHEAD_IN_FLIGHT = 64
SECTIONS = ("scaling", "failover", "overhead")

Send = Callable[[], Awaitable[object]]
Row = dict[str, float]


@dataclass(frozen=True)
class Plan:
    """How long and how often each measurement runs (``--quick``: a shorter run)."""

    latency: float = 0.05
    jitter: float = 0.02
    slots: int = 8
    rounds: int = 3
    seconds: float = 1.5
    kills: int = 3
    failover_latency: float = 0.2
    overhead_rounds: int = 6
    overhead_requests: int = 4000

    def quick(self) -> Plan:
        """Fewer rounds and kills, shorter measurements."""
        return replace(self, rounds=2, seconds=1.0, kills=1, overhead_rounds=4)


# -- load ---------------------------------------------------------------------------------


async def drive(sends: Sequence[Send], total: int, workers: int, spread: float = 0.0) -> Row:
    """``total`` requests through ``workers`` workers (worker ``i`` sends with
    ``sends[i % len(sends)]`` and starts ``spread * i / workers`` s late): req/s, client
    CPU seconds per 1,000 requests, errors."""
    left, errors = total, 0

    async def worker(index: int) -> None:
        nonlocal left, errors
        send = sends[index % len(sends)]
        if spread:
            await anyio.sleep(spread * index / workers)
        while left > 0:
            left -= 1
            try:
                await send()
            except servescope.ServeError:
                errors += 1

    wall, cpu = time.perf_counter(), time.process_time()
    async with anyio.create_task_group() as tg:
        for index in range(workers):
            tg.start_soon(worker, index)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"rps": total / wall, "cpu_s_per_1000": cpu / total * 1000, "errors": errors}


def sender(target: servescope.Server | servescope.Pool) -> Send:
    """One request to ``target``."""

    async def send() -> None:
        await target.request(PAYLOAD)

    return send


def jittered_sender(pool: servescope.Pool, jitter: float, seed: int) -> Send:
    """One request to ``pool`` that the dummy delays by up to ``jitter`` s more."""
    rng = random.Random(seed)

    async def send() -> None:
        headers = {"x-servescope-fault": f"delay={rng.uniform(0, jitter):.4f}"}
        await pool.request(PAYLOAD, headers=headers)

    return send


def summary(values: Sequence[float]) -> Row:
    """Median and spread of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# -- scaling ------------------------------------------------------------------------------


def bounded_config(latency: float, slots: int, process: bool) -> servescope.ServerConfig:
    """A replica whose capacity is bounded: ``slots`` at once, ``latency`` s each."""
    if process:
        args = ("--latency", str(latency), "--completion-tokens", "1")
        return servescope.CustomConfig(
            script=DUMMY, extra_args=args, max_concurrency=slots, shutdown_grace=2.0
        )
    return servescope.DummyConfig(latency=latency, completion_tokens=1, max_concurrency=slots)


async def scaling(plan: Plan, *, process: bool) -> dict[str, Any]:
    """Pools of 1, 2, 4 (in-process: and the control rows) loaded in rotated rounds."""
    config = bounded_config(plan.latency, plan.slots, process)
    capacity = plan.slots / plan.latency  # one replica's requests per second, at best
    rounds: list[dict[str, Row]] = []
    async with AsyncExitStack() as stack:
        cases: dict[str, list[Send]] = {}
        for n in LEVELS:
            pool = await stack.enter_async_context(servescope.open_pool(config, replicas=n))
            await pool.wait_ready(min_ready=n)
            cases[f"pool x{n}"] = [sender(pool)]
        if not process:
            await add_controls(stack, cases, plan)
        for sends in cases.values():  # warm: connections, code paths
            await drive(sends, 4 * plan.slots * len(sends), 2 * plan.slots * len(sends))
        for number in range(plan.rounds):
            names = list(cases)
            shift = number % len(names)
            row: dict[str, Row] = {}
            for name in names[shift:] + names[:shift]:
                n = int(name.rsplit("x", 1)[1])
                total = round(n * capacity * plan.seconds)
                workers = 2 * n * plan.slots
                row[name] = await drive(cases[name], total, workers, spread=plan.latency)
            rounds.append(row)
    return {"rounds": rounds, **scaling_ratios(rounds, capacity)}


async def add_controls(stack: AsyncExitStack, cases: dict[str, list[Send]], plan: Plan) -> None:
    """The in-process control rows: N plain servers, and pools with jittered latency."""
    config = bounded_config(plan.latency, plan.slots, process=False)
    servers = []
    for _ in range(max(LEVELS)):
        server = await stack.enter_async_context(servescope.open_server(config))
        await server.wait_ready()
        servers.append(sender(server))
    for n in LEVELS:
        cases[f"servers x{n}"] = servers[:n]
    jittered = bounded_config(plan.latency - plan.jitter / 2, plan.slots, process=False)
    for n in LEVELS:
        pool = await stack.enter_async_context(servescope.open_pool(jittered, replicas=n))
        await pool.wait_ready(min_ready=n)
        cases[f"jittered x{n}"] = [jittered_sender(pool, plan.jitter, seed=n)]


def scaling_ratios(rounds: list[dict[str, Row]], capacity: float) -> dict[str, Any]:
    """Each case's req/s, and against one replica of its kind in the same round."""
    cases: dict[str, Any] = {}
    for name in rounds[0]:
        kind, n = name.rsplit(" x", 1)
        base = f"{kind} x1"
        ratios = [row[name]["rps"] / row[base]["rps"] for row in rounds]
        per_n = statistics.median(ratios) / int(n)
        cases[name] = {
            "rps": summary([row[name]["rps"] for row in rounds]),
            "of_ideal": statistics.median(row[name]["rps"] for row in rounds) / (int(n) * capacity),
            "x_one": summary(ratios),
            "x_one_per_replica": per_n,
            "cpu_s_per_1000": statistics.median(row[name]["cpu_s_per_1000"] for row in rounds),
            "errors": sum(row[name]["errors"] for row in rounds),
            "met": per_n >= SCALING_TARGET if kind == "pool" else None,
        }
    return {"cases": cases}


# -- failover -----------------------------------------------------------------------------


@dataclass
class Call:
    """One request of the failover run: its id, when it ran, what came back."""

    id: int
    started: float
    ended: float = math.nan
    echoed: str | None = None
    error: str | None = None


@dataclass
class Kill:
    """One SIGKILL: when, which replica, and when the pool saw it and got it back."""

    replica: int
    pid: int
    at: float
    noticed: float = math.nan
    ready: float = math.nan
    taking: float = math.nan
    answering: float = math.nan
    states: list[str] = field(default_factory=list)


def failover_config(plan: Plan) -> servescope.CustomConfig:
    """A subprocess dummy (so it can be SIGKILLed), answering after ``failover_latency``."""
    args = ("--latency", str(plan.failover_latency), "--completion-tokens", "1")
    return servescope.CustomConfig(script=DUMMY, extra_args=args, shutdown_grace=2.0)


async def failover(plan: Plan) -> dict[str, Any]:
    """256 in flight on 4 replicas; ``plan.kills`` replicas SIGKILLed one after another."""
    calls: list[Call] = []
    kills: list[Kill] = []
    stop = anyio.Event()

    async def worker(pool: servescope.Pool) -> None:
        while not stop.is_set():
            call = Call(len(calls), time.perf_counter())
            calls.append(call)
            try:
                reply = await pool.request({**PAYLOAD, "model": f"r{call.id}"})
                call.echoed = str(reply.get("model"))
            except servescope.ServeError as exc:
                call.error = f"{type(exc).__name__}: {exc}"
            call.ended = time.perf_counter()

    async with servescope.open_pool(failover_config(plan), replicas=FAILOVER_REPLICAS) as pool:
        await pool.wait_ready(min_ready=FAILOVER_REPLICAS)
        async with anyio.create_task_group() as tg:
            for _ in range(FAILOVER_IN_FLIGHT):
                tg.start_soon(worker, pool)
            for number in range(plan.kills):
                await anyio.sleep(2.0)  # steady state: the "before" window is its last second
                kills.append(await kill_one(pool, number % FAILOVER_REPLICAS))
            await anyio.sleep(1.0)
            stop.set()
        replicas = [asdict(info) for info in pool.replicas]
    for info in replicas:
        info.pop("log_tail")
    return {**failover_figures(calls, kills), "replicas": replicas}


async def kill_one(pool: servescope.Pool, index: int, limit: float = 60.0) -> Kill:
    """SIGKILL replica ``index``; watch it leave ``ready``, come back, take and answer
    requests again (polled every 5 ms)."""
    info = pool.replicas[index]
    if info.state != "ready" or info.pid is None:
        raise RuntimeError(f"replica {index} is {info.state}, not ready to be killed")
    kill = Kill(index, info.pid, time.perf_counter())
    os.kill(info.pid, signal.SIGKILL)
    answered = -1
    with anyio.move_on_after(limit):
        while math.isnan(kill.answering):
            info, now = pool.replicas[index], time.perf_counter()
            if not kill.states or kill.states[-1] != info.state:
                kill.states.append(info.state)
            if math.isnan(kill.noticed) and info.state != "ready":
                kill.noticed = now
            elif not math.isnan(kill.noticed) and math.isnan(kill.ready) and info.state == "ready":
                kill.ready, answered = now, info.answered
            elif answered >= 0:
                if math.isnan(kill.taking) and (info.in_flight or info.answered > answered):
                    kill.taking = now
                if info.answered > answered:
                    kill.answering = now
            await anyio.sleep(0.005)
    return kill


def percentiles(latencies: Sequence[float]) -> Row:
    """p50, p99 and max of ``latencies`` (seconds), in milliseconds."""
    if not latencies:
        return {"n": 0, "p50_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return {
        "n": len(ordered),
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": p99 * 1000,
        "max_ms": ordered[-1] * 1000,
    }


def failover_figures(calls: list[Call], kills: list[Kill]) -> dict[str, Any]:
    """Lost, duplicate and crossed answers by request id; latency windows; recovery."""
    delivered = Counter(call.echoed for call in calls if call.echoed is not None)
    before: list[float] = []
    during: list[float] = []
    at_kill: list[float] = []
    for kill in kills:
        back = kill.ready if not math.isnan(kill.ready) else math.inf
        for call in calls:
            if call.error is not None or math.isnan(call.ended):
                continue
            latency = call.ended - call.started
            if kill.at - 1.0 <= call.ended < kill.at:
                before.append(latency)
            elif call.ended >= kill.at and call.started < back:
                during.append(latency)
                if call.started < kill.at:
                    at_kill.append(latency)
    errors = Counter(call.error.split(":")[0] for call in calls if call.error is not None)
    return {
        "requests": len(calls),
        "answered": sum(call.echoed is not None for call in calls),
        "lost": sum(call.echoed is None for call in calls),
        "errors": dict(errors),
        "duplicates": sum(count - 1 for count in delivered.values()),
        "crossed": sum(call.echoed not in (None, f"r{call.id}") for call in calls),
        "latency_before": percentiles(before),
        "latency_failover": percentiles(during),
        "latency_in_flight_at_kill": percentiles(at_kill),
        "kills": [
            {
                "replica": kill.replica,
                "noticed_ms": (kill.noticed - kill.at) * 1000,
                "ready_again_ms": (kill.ready - kill.at) * 1000,
                "taking_again_ms": (kill.taking - kill.at) * 1000,
                "answering_again_ms": (kill.answering - kill.at) * 1000,
                "states": kill.states,
            }
            for kill in kills
        ],
    }


# -- overhead -----------------------------------------------------------------------------


def plain_config(process: bool) -> servescope.ServerConfig:
    """A dummy that answers at once."""
    if process:
        args = ("--completion-tokens", "1")
        return servescope.CustomConfig(script=DUMMY, extra_args=args, shutdown_grace=2.0)
    return servescope.DummyConfig(completion_tokens=1)


async def overhead(plan: Plan, *, process: bool) -> dict[str, Any]:
    """``open_server`` and a pool of 1, both open, loaded in alternating rounds."""
    config = plain_config(process)
    rounds: list[dict[str, Row]] = []
    async with (
        servescope.open_server(config) as server,
        servescope.open_pool(config, replicas=1) as pool,
    ):
        await server.wait_ready()
        await pool.wait_ready()
        cases = {"open_server": sender(server), "pool of 1": sender(pool)}
        for send in cases.values():
            await drive([send], plan.overhead_requests // 4, OVERHEAD_IN_FLIGHT)
        for number in range(plan.overhead_rounds):
            names = list(cases) if number % 2 == 0 else list(cases)[::-1]
            row = {}
            for name in names:
                row[name] = await drive([cases[name]], plan.overhead_requests, OVERHEAD_IN_FLIGHT)
            rounds.append(row)
    speed = [row["pool of 1"]["rps"] / row["open_server"]["rps"] for row in rounds]
    cpu = [
        row["pool of 1"]["cpu_s_per_1000"] / row["open_server"]["cpu_s_per_1000"] for row in rounds
    ]
    cases_out = {
        name: {
            "rps": summary([row[name]["rps"] for row in rounds]),
            "cpu_s_per_1000": summary([row[name]["cpu_s_per_1000"] for row in rounds]),
            "errors": sum(row[name]["errors"] for row in rounds),
        }
        for name in cases
    }
    return {
        "rounds": rounds,
        "cases": cases_out,
        "pool_rps_ratio": summary(speed),
        "pool_cpu_ratio": summary(cpu),
        "met": statistics.median(speed) >= OVERHEAD_TARGET,
    }


# -- the run ------------------------------------------------------------------------------


async def run(plan: Plan, sections: Sequence[str]) -> dict[str, Any]:
    """Every section asked for, on the current event loop."""
    results: dict[str, Any] = {}
    if "scaling" in sections:
        results["scaling in-process"] = await scaling(plan, process=False)
        results["scaling process"] = await scaling(plan, process=True)
    if "failover" in sections:
        results["failover"] = await failover(plan)
    if "overhead" in sections:
        results["overhead process"] = await overhead(plan, process=True)
        results["overhead in-process"] = await overhead(plan, process=False)
    return results


def print_scaling(backend: str, name: str, result: dict[str, Any], plan: Plan) -> None:
    print(
        f"\n{backend} | {name}: latency {plan.latency * 1000:g} ms (jittered: "
        f"±{plan.jitter * 500:g} ms), {plan.slots} slots per replica, "
        f"{len(result['rounds'])} rounds (target: pool x one >= {SCALING_TARGET}*N)"
    )
    print(
        f"{'case':<14} {'req/s':>8} {'of ideal':>9} {'x one':>7} {'min-max':>11} "
        f"{'per N':>6} {'CPU s/1000':>11} {'errors':>7} {'met':>5}"
    )
    for case, row in result["cases"].items():
        ratio = row["x_one"]
        met = "-" if row["met"] is None else ("yes" if row["met"] else "NO")
        print(
            f"{case:<14} {row['rps']['median']:>8.0f} {row['of_ideal']:>9.2f} "
            f"{ratio['median']:>7.2f} {ratio['min']:>5.2f}-{ratio['max']:<5.2f} "
            f"{row['x_one_per_replica']:>6.2f} {row['cpu_s_per_1000']:>11.3f} "
            f"{row['errors']:>7.0f} {met:>5}"
        )


def print_failover(backend: str, result: dict[str, Any], plan: Plan) -> None:
    print(
        f"\n{backend} | failover: {FAILOVER_REPLICAS} subprocess replicas, "
        f"{FAILOVER_IN_FLIGHT} in flight, latency {plan.failover_latency * 1000:g} ms, "
        f"{len(result['kills'])} SIGKILLs"
    )
    print(
        f"requests {result['requests']}, answered {result['answered']}, "
        f"lost {result['lost']} (target 0) {dict(result['errors']) or ''}, "
        f"duplicates {result['duplicates']} (target 0), crossed {result['crossed']}"
    )
    print(f"{'latency window':<18} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for window in ("before", "failover", "in_flight_at_kill"):
        row = result[f"latency_{window}"]
        print(
            f"{window.replace('_', ' '):<18} {row['n']:>5.0f} {row['p50_ms']:>8.0f} "
            f"{row['p99_ms']:>8.0f} {row['max_ms']:>8.0f}"
        )
    print(
        f"{'kill':<6} {'noticed ms':>11} {'ready again ms':>15} {'taking ms':>10} "
        f"{'answered ms':>12}  states"
    )
    for kill in result["kills"]:
        print(
            f"r{kill['replica']:<5} {kill['noticed_ms']:>11.0f} {kill['ready_again_ms']:>15.0f} "
            f"{kill['taking_again_ms']:>10.0f} {kill['answering_again_ms']:>12.0f}  "
            f"{' > '.join(kill['states'])}"
        )
    outcomes = [
        f"r{info['index']}: answered {info['answered']}, failed {info['failed']}, "
        f"lost {info['lost']}, restarts {info['restarts']}, breaker {info['breaker']}"
        for info in result["replicas"]
    ]
    print("attempts per replica: " + "; ".join(outcomes))


def print_overhead(backend: str, name: str, result: dict[str, Any]) -> None:
    speed, cpu = result["pool_rps_ratio"], result["pool_cpu_ratio"]
    print(
        f"\n{backend} | {name}: {OVERHEAD_IN_FLIGHT} in flight, {len(result['rounds'])} "
        f"alternating rounds (target: pool >= {OVERHEAD_TARGET} x open_server)"
    )
    print(f"{'case':<12} {'req/s':>8} {'min-max':>11} {'CPU s/1000':>11} {'errors':>7}")
    for case, row in result["cases"].items():
        rps = row["rps"]
        print(
            f"{case:<12} {rps['median']:>8.0f} {rps['min']:>5.0f}-{rps['max']:<5.0f} "
            f"{row['cpu_s_per_1000']['median']:>11.3f} {row['errors']:>7.0f}"
        )
    print(
        f"pool / open_server: req/s {speed['median']:.3f} ({speed['min']:.3f}-{speed['max']:.3f})"
        f", CPU per request {cpu['median']:.3f} ({cpu['min']:.3f}-{cpu['max']:.3f}); "
        f"met: {'yes' if result['met'] else 'NO'}"
    )


def print_results(backend: str, results: dict[str, Any], plan: Plan) -> None:
    for name, result in results.items():
        if name.startswith("scaling"):
            print_scaling(backend, name, result, plan)
        elif name == "failover":
            print_failover(backend, result, plan)
        else:
            print_overhead(backend, name, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter")
    parser.add_argument("--backend", default="asyncio,trio")
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections to run")
    parser.add_argument("--latency", type=float, default=Plan.latency, help="scaling: s")
    parser.add_argument("--slots", type=int, default=Plan.slots, help="scaling: per replica")
    parser.add_argument("--out", type=Path, default=Path("bench-results/replicas.json"))
    options = parser.parse_args()
    plan = replace(Plan(), latency=options.latency, slots=options.slots)
    plan = plan.quick() if options.quick else plan
    sections = options.only.split(",")
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    payload: dict[str, Any] = {
        "plan": asdict(plan),
        "revision": revision(),
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
    }
    started = time.perf_counter()
    try:
        for backend in options.backend.split(","):
            results = anyio.run(run, plan, sections, backend=backend)
            print_results(backend, results, plan)
            payload[backend] = results
    finally:
        left = leftover_children()
    payload["loadavg_after"] = os.getloadavg()
    payload["seconds"] = time.perf_counter() - started
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(payload, indent=2))
    print(f"\n{payload['seconds']:.0f} s; load average {payload['loadavg_before']} -> ", end="")
    print(f"{payload['loadavg_after']}; written to {options.out}")
    if left:
        sys.exit(f"processes left running (killed now): {left}")


if __name__ == "__main__":
    main()
