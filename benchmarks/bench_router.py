"""Routers side by side: servescope's HTTP front (``servescope route``) and SGLang's router.

Two dummy replicas run as processes (``python -m servescope.dummy``). Three arms reach
the same two:

* ``direct``: straight to the first replica, no router (the baseline);
* ``sglang``: SGLang's Rust router (``python -m sglang_router.launch_router``, pip package
  ``sglang-router``), ``--policy round_robin``;
* ``servescope``: ``servescope route --worker-url ... --routing round_robin``.

One client for every arm, as cheap as it gets so that it does not take the CPU the
routers need: servescope's own h11 transport (``SlotTransport.post``) with a fixed number
of requests in flight (``--concurrency``: 1, 64, 256), ``--requests`` chat completions per
cell (a small prompt, the dummy's default answer). At each concurrency the arms run one
after the other (the order rotated every round), ``--rounds`` times, each cell after a
short untimed warm-up; the table shows medians over the rounds: requests/s, p50/p99
latency, p50 added over ``direct`` in the same round, CPU per request of the router's
process tree (user + sys, psutil), of the two replicas and of the client, the requests
the replicas took per request sent (``/dummy/stats``: 1.000 is no retry, no duplicate),
and servescope / sglang requests/s taken round by round. Any answer other than 200 (or no
answer) is an error: counted, shown with a sample, and the run exits 1.

Targets: servescope's front serves >= 0.8 x sglang-router's requests/s at 64 and 256 in
flight, and adds <= 1 ms to the p50 at 1 in flight.

Client, routers and replicas share this machine's cores (and with whatever else runs on
it): read the ratios of one run, not the absolute numbers.

``--profile``: afterwards a servescope front runs under cProfile for one 64-in-flight
cell: ``servescope route`` in this file's process (``--profiled-front FILE route ...``,
the console script's ``main``), its profiler on from SIGUSR1 (sent after the warm-up) to
SIGUSR2 (after the timed cell: it writes FILE, kept next to the JSON), so that start-up
imports and the warm-up stay out of it; then it is stopped with SIGINT. Its top 25
functions by cumulative and by own time are printed. (cProfile counts every resumption
of a coroutine as a call: an ``async def``'s ncalls is its awaits that suspended, + 1.)

An arm that cannot run (``sglang_router`` not installed or not starting; no ``servescope
route`` command) is skipped with the reason, printed and in the JSON; the others still run.

Usage: python benchmarks/bench_router.py [--quick] [--requests N] [--rounds R]
       [--concurrency 1,64,256] [--profile] [--out bench-results/bench_router.json]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import pstats
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
from benchlib import leftover_children, revision

from servescope._transport import SlotTransport

HOST = "127.0.0.1"
BODY = json.dumps({"model": "dummy", "messages": [{"role": "user", "content": "hi"}]}).encode()
CHAT = "/v1/chat/completions"
ARMS = ("direct", "sglang", "servescope")
THROUGHPUT_TARGET = 0.8  # servescope >= this x sglang's req/s ...
THROUGHPUT_LEVELS = (64, 256)  # ... at these numbers in flight
LATENCY_TARGET_MS = 1.0  # servescope adds <= this to the p50 ...
LATENCY_LEVEL = 1  # ... at this number in flight
PROFILE_LEVEL = 64
PROFILE_TOP = 25
READY_LIMIT = 60.0  # s for a replica or a router to be ready
STOP_GRACE = 10.0  # s from SIGTERM (SIGINT) to SIGKILL
PROFILE_STOP_GRACE = 60.0  # s for a profiled front to write its stats
PROFILED_FRONT = "--profiled-front"  # hidden: this file as the profiled front's process

Row = dict[str, Any]


@dataclass(frozen=True)
class Plan:
    """How much each cell sends and how often (``--quick``: a shorter run)."""

    levels: tuple[int, ...] = (1, 64, 256)
    requests: int = 5000
    rounds: int = 3
    warmup: int = 300  # untimed requests before each cell (at least 2 per worker)
    cell_limit: float = 120.0  # s: a cell still running by then counts what is left as errors

    def quick(self) -> Plan:
        """One round fewer, under a third of the requests."""
        return replace(self, requests=1500, rounds=2, warmup=150)


class Unavailable(Exception):
    """An arm that cannot run here (not installed, does not start): skipped, with the reason."""


# -- processes ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Started:
    """A process this benchmark started, and where its output goes."""

    name: str
    command: list[str]
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 15) -> str:
        """The last lines of its output."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def tree(self) -> list[psutil.Process]:
        """The process and its descendants (those alive now)."""
        try:
            root = psutil.Process(self.popen.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


class Processes:
    """Every process the run starts, stopped on every way out (``stop_all``)."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.started: list[Started] = []

    def start(self, name: str, command: list[str]) -> Started:
        log = self.logdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        started = Started(name, command, popen, log)
        self.started.append(started)
        return started

    def stop(self, proc: Started, sig: int = signal.SIGTERM, grace: float = STOP_GRACE) -> int:
        """``sig``, then SIGKILL after ``grace`` s (descendants left behind too): its exit code."""
        tree = proc.tree()
        if proc.popen.poll() is None:
            proc.popen.send_signal(sig)
            try:
                proc.popen.wait(grace)
            except subprocess.TimeoutExpired:
                print(f"{proc.name}: still running {grace:g} s after {sig!r}: SIGKILL")
                proc.popen.kill()
                proc.popen.wait(grace)
        for child in tree[1:]:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        if proc in self.started:
            self.started.remove(proc)
        return proc.popen.returncode

    def stop_all(self) -> None:
        for proc in reversed(list(self.started)):
            self.stop(proc)


def get_ok(url: str, want: Callable[[httpx.Response], bool] | None = None) -> bool:
    """Whether GET ``url`` answers 200 (and ``want`` of the response holds)."""
    try:
        response = httpx.get(url, timeout=2.0, trust_env=False)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and (want is None or want(response))


def wait_ready(proc: Started, check: Callable[[], bool], limit: float = READY_LIMIT) -> float:
    """Poll ``check`` (every 50 ms, up to ``limit`` s) until it holds: seconds it took.
    Raises ``Unavailable`` if the process exits or the time runs out."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if proc.popen.poll() is not None:
            raise Unavailable(
                f"{proc.name} exited with {proc.popen.returncode} before it was ready:\n"
                f"{proc.tail()}"
            )
        if check():
            return time.monotonic() - started
        time.sleep(0.05)
    raise Unavailable(f"{proc.name} not ready after {limit:g} s:\n{proc.tail()}")


def start_replicas(procs: Processes, count: int = 2) -> list[tuple[Started, str]]:
    """``count`` dummies (each exits by itself after an hour, whatever happens here)."""
    replicas = []
    for index in range(count):
        port = free_port()
        command = [sys.executable, "-m", "servescope.dummy", "--host", HOST, "--port", str(port)]
        proc = procs.start(f"replica{index}", [*command, "--lifetime", "3600"])
        replicas.append((proc, f"http://{HOST}:{port}"))
    for proc, url in replicas:
        try:
            wait_ready(proc, partial(get_ok, url + "/health"))
        except Unavailable as exc:
            raise SystemExit(f"the dummy replicas do not start: {exc}") from None
    return replicas


def sglang_command(workers: Sequence[str], port: int, extra: Sequence[str]) -> list[str]:
    """SGLang's router in front of ``workers``, its metrics on another port of 127.0.0.1."""
    return [
        *(sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *workers),
        *("--host", HOST, "--port", str(port), "--policy", "round_robin"),
        *("--prometheus-host", HOST, "--prometheus-port", str(free_port()), *extra),
    ]


def start_sglang(procs: Processes, workers: Sequence[str], extra: Sequence[str]) -> Started:
    """SGLang's router, ready: ``GET /readiness`` 200 and every worker healthy in
    ``GET /workers`` (its readiness needs only one)."""
    if importlib.util.find_spec("sglang_router") is None:
        raise Unavailable("sglang_router is not installed (pip install sglang-router)")
    port = free_port()
    proc = procs.start("sglang", sglang_command(workers, port, extra))
    base = f"http://{HOST}:{port}"

    def all_healthy(response: httpx.Response) -> bool:
        listed = response.json().get("workers", [])
        healthy = {w.get("url") for w in listed if w.get("is_healthy")}
        return healthy >= set(workers)

    try:
        wait_ready(
            proc,
            lambda: get_ok(base + "/readiness") and get_ok(base + "/workers", all_healthy),
        )
    except Unavailable:
        procs.stop(proc)
        raise
    return proc


def route_args(workers: Sequence[str], port: int, extra: Sequence[str]) -> list[str]:
    """``servescope``'s arguments for a front in front of ``workers``."""
    urls = [arg for url in workers for arg in ("--worker-url", url)]
    return [
        *("route", *urls, "--model", "dummy", "--routing", "round_robin"),
        *("--host", HOST, "--port", str(port), *extra),
    ]


def check_servescope_route() -> None:
    """Raises ``Unavailable`` unless ``servescope route --help`` works."""
    command = [sys.executable, "-m", "servescope.cli", "route", "--help"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise Unavailable("`servescope route --help` did not answer within 60 s") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise Unavailable(
            f"no `servescope route` here (`route --help` exits {done.returncode}):\n{tail}"
        )


def start_servescope(
    procs: Processes,
    workers: Sequence[str],
    extra: Sequence[str],
    *,
    profile: Path | None = None,
) -> Started:
    """``servescope route``, ready (``GET /readiness`` 200); under cProfile if ``profile``."""
    port = free_port()
    command = [sys.executable, "-m", "servescope.cli", *route_args(workers, port, extra)]
    if profile is not None:
        command[1:3] = [str(Path(__file__).resolve()), PROFILED_FRONT, str(profile)]
    proc = procs.start("servescope-profiled" if profile else "servescope", command)
    try:
        wait_ready(proc, lambda: get_ok(f"http://{HOST}:{port}/readiness"))
    except Unavailable:
        procs.stop(proc)
        raise
    return proc


def router_url(proc: Started) -> str:
    """The chat completions URL of a router started with ``--port P`` (from its command)."""
    port = proc.command[proc.command.index("--port") + 1]
    return f"http://{HOST}:{port}{CHAT}"


# -- load ---------------------------------------------------------------------------------


def cpu_seconds(processes: Sequence[psutil.Process]) -> float:
    """User + system CPU seconds of ``processes`` so far (those gone count 0)."""
    total = 0.0
    for proc in processes:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


@dataclass
class Cell:
    """One arm at one concurrency in one round."""

    rps: float = 0.0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    router_cpu_ms: float = math.nan  # per request
    replicas_cpu_ms: float = math.nan
    client_cpu_ms: float = math.nan
    upstream_per_request: float = math.nan  # requests the replicas took per request sent
    upstream_split: list[int] = field(default_factory=list)  # requests each replica took
    errors: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    sample: str = ""  # the first error's body or exception


async def load(
    transport: SlotTransport, url: str, total: int, level: int, limit: float
) -> tuple[list[float], Counter[str], str, float]:
    """``total`` POSTs to ``url``, ``level`` at a time: latencies of the 200s (s), failures
    by kind, the first failure's text, and the wall time."""
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    sample = ""
    left = total
    clock = time.perf_counter

    async def worker() -> None:
        nonlocal left, sample
        while left > 0:
            left -= 1
            start = clock()
            try:
                reply = await transport.post(url, BODY)
            except Exception as exc:
                failures[type(exc).__name__] += 1
                sample = sample or f"{type(exc).__name__}: {exc}"
                continue
            if reply.status == 200:
                latencies.append(clock() - start)
            else:
                failures[f"HTTP {reply.status}"] += 1
                sample = sample or f"HTTP {reply.status}: {reply.content[:300]!r}"

    wall = clock()
    with anyio.move_on_after(limit) as scope:
        async with anyio.create_task_group() as tg:
            for _ in range(min(level, total)):
                tg.start_soon(worker)
    wall = clock() - wall
    if scope.cancelled_caught:
        unfinished = total - len(latencies) - sum(failures.values())
        failures[f"unfinished after {limit:g} s"] += unfinished
        sample = sample or f"{unfinished} requests unfinished after {limit:g} s"
    return latencies, failures, sample, wall


def quantile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile of sorted ``ordered`` (nearest rank), NaN if empty."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def served(probe: httpx.AsyncClient, workers: Sequence[str]) -> list[int]:
    """How many requests each replica has taken so far (the dummy's ``/dummy/stats``)."""
    counts = []
    for url in workers:
        response = await probe.get(url + "/dummy/stats")
        counts.append(int(response.json()["requests"]) - 1)  # not counting this probe
    return counts


async def measure(
    transport: SlotTransport,
    url: str,
    level: int,
    plan: Plan,
    router: Sequence[psutil.Process],
    replicas: Replicas,
    *,
    around: Callable[[bool], Awaitable[None]] | None = None,
) -> Cell:
    """An untimed warm-up, then one timed cell, with the CPU each side spent on it and
    the requests each replica took; ``around(True)`` is awaited just before the timed
    cell, ``around(False)`` just after."""
    warmup = max(plan.warmup, 2 * level)
    _, failures, sample, _ = await load(transport, url, warmup, level, plan.cell_limit)
    async with httpx.AsyncClient(timeout=10, trust_env=False) as probe:
        if around is not None:
            await around(True)
        served_before = await served(probe, replicas.urls)
        cpu_before = cpu_seconds(router), cpu_seconds(replicas.tree), time.process_time()
        latencies, more, more_sample, wall = await load(
            transport, url, plan.requests, level, plan.cell_limit
        )
        cpu_after = cpu_seconds(router), cpu_seconds(replicas.tree), time.process_time()
        served_after = await served(probe, replicas.urls)
        if around is not None:
            await around(False)
    failures.update(more)
    spent = zip(cpu_before, cpu_after, strict=True)
    per_request = [(after - before) / plan.requests * 1000 for before, after in spent]
    upstream = [after - before for before, after in zip(served_before, served_after, strict=True)]
    latencies.sort()
    return Cell(
        rps=plan.requests / wall,
        p50_ms=quantile(latencies, 0.5) * 1000,
        p99_ms=quantile(latencies, 0.99) * 1000,
        router_cpu_ms=per_request[0] if router else math.nan,
        replicas_cpu_ms=per_request[1],
        client_cpu_ms=per_request[2],
        upstream_per_request=sum(upstream) / plan.requests,
        upstream_split=upstream,
        errors=sum(failures.values()),
        failures=dict(failures),
        sample=sample or more_sample,
    )


@dataclass
class Replicas:
    """The replicas' base URLs and processes."""

    urls: list[str]
    tree: list[psutil.Process]


@dataclass
class Target:
    """Where an arm's requests go and which processes serve them."""

    name: str
    url: str
    router: list[psutil.Process]
    proc: Started | None = None  # the router; None: direct


async def run_levels(
    targets: Sequence[Target], replicas: Replicas, plan: Plan
) -> dict[int, list[dict[str, Cell]]]:
    """Every concurrency: ``plan.rounds`` rounds, each arm once per round (rotated order)."""
    results: dict[int, list[dict[str, Cell]]] = {}
    transport = SlotTransport(connect_timeout=10.0)
    try:
        for level in plan.levels:
            rounds = results[level] = []
            for number in range(plan.rounds):
                shift = number % len(targets)
                row: dict[str, Cell] = {}
                for target in [*targets[shift:], *targets[:shift]]:
                    cell = await measure(
                        transport, target.url, level, plan, target.router, replicas
                    )
                    row[target.name] = cell
                    print(
                        f"  {level:>4} in flight, round {number + 1}, {target.name:<10} "
                        f"{cell.rps:>7.0f} req/s, p50 {cell.p50_ms:6.2f} ms, "
                        f"errors {cell.errors}",
                        flush=True,
                    )
                rounds.append({name: row[name] for name in ARMS if name in row})
    finally:
        await transport.aclose()
    return results


async def run_profiled(front: Started, replicas: Replicas, plan: Plan, path: Path) -> Cell:
    """One 64-in-flight cell against the profiled front, its profiler on for the timed
    part only (SIGUSR1 ... SIGUSR2: ``profiled_front``)."""

    async def around(starting: bool) -> None:
        front.popen.send_signal(signal.SIGUSR1 if starting else signal.SIGUSR2)
        if starting:
            await anyio.sleep(0.2)  # handled at once: the signal wakes its event loop
            return
        for _ in range(int(PROFILE_STOP_GRACE / 0.05)):  # until it has written the file
            if await anyio.Path(path).exists():
                break
            await anyio.sleep(0.05)

    transport = SlotTransport(connect_timeout=10.0)
    try:
        return await measure(
            transport, router_url(front), PROFILE_LEVEL, plan, front.tree(), replicas, around=around
        )
    finally:
        await transport.aclose()


def profiled_front(path: Path, argv: list[str]) -> None:
    """``servescope ARGV`` in this process, profiled from SIGUSR1 to SIGUSR2 (written to
    ``path`` then, or on the way out): the hidden ``--profiled-front PATH ARGV...``."""
    import cProfile

    from servescope.cli import main as servescope_main

    profiler = cProfile.Profile()
    written = False

    def start(signum: int, frame: object) -> None:
        profiler.enable()

    def stop(signum: int, frame: object) -> None:
        nonlocal written
        profiler.disable()
        profiler.dump_stats(path)
        written = True

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    try:
        servescope_main(argv)
    finally:
        if not written:
            stop(0, None)


# -- figures ------------------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and spread of ``values`` (NaN ones left out)."""
    kept = [value for value in values if not math.isnan(value)]
    if not kept:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {"median": statistics.median(kept), "min": min(kept), "max": max(kept)}


def figures(level: int, rounds: list[dict[str, Cell]]) -> Row:
    """Each arm's medians over rounds, p50 added over direct and servescope / sglang, per
    round; whether the targets that apply at ``level`` were met."""
    arms: Row = {}
    for name in rounds[0]:
        cells = [row[name] for row in rounds]
        added = [row[name].p50_ms - row["direct"].p50_ms for row in rounds if "direct" in row]
        failures: Counter[str] = Counter()
        for cell in cells:
            failures.update(cell.failures)
        arms[name] = {
            "rps": summary([cell.rps for cell in cells]),
            "p50_ms": summary([cell.p50_ms for cell in cells])["median"],
            "p99_ms": summary([cell.p99_ms for cell in cells])["median"],
            "added_p50_ms": summary(added)["median"] if name != "direct" else 0.0,
            "router_cpu_ms_per_request": summary([c.router_cpu_ms for c in cells])["median"],
            "replicas_cpu_ms_per_request": summary([c.replicas_cpu_ms for c in cells])["median"],
            "client_cpu_ms_per_request": summary([c.client_cpu_ms for c in cells])["median"],
            "upstream_per_request": summary([c.upstream_per_request for c in cells])["max"],
            "errors": sum(cell.errors for cell in cells),
            "failures": dict(failures),
            "sample": next((cell.sample for cell in cells if cell.sample), ""),
        }
    out: Row = {"arms": arms, "rounds": [{k: asdict(v) for k, v in row.items()} for row in rounds]}
    if "servescope" in arms and "sglang" in arms:
        ratios = [row["servescope"].rps / row["sglang"].rps for row in rounds]
        out["servescope_over_sglang_rps"] = summary(ratios)
        if level in THROUGHPUT_LEVELS:
            out["throughput_met"] = statistics.median(ratios) >= THROUGHPUT_TARGET
    if "servescope" in arms and "direct" in arms and level == LATENCY_LEVEL:
        out["latency_met"] = arms["servescope"]["added_p50_ms"] <= LATENCY_TARGET_MS
    return out


def yes(met: bool) -> str:
    return "yes" if met else "NO"


def print_level(level: int, result: Row, plan: Plan) -> None:
    print(
        f"\n{level} in flight: {len(result['rounds'])} rounds of {plan.requests} requests "
        f"per arm (medians; CPU in ms per request; upstream: requests the replicas took "
        f"per request sent, the most of any round)"
    )
    print(
        f"{'arm':<11} {'req/s':>7} {'min-max':>11} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'+p50 ms':>8} {'router CPU':>11} {'replicas CPU':>13} {'client CPU':>11} "
        f"{'upstream':>9} {'errors':>7}"
    )
    for name, arm in result["arms"].items():
        rps = arm["rps"]
        print(
            f"{name:<11} {rps['median']:>7.0f} {rps['min']:>5.0f}-{rps['max']:<5.0f} "
            f"{arm['p50_ms']:>7.2f} {arm['p99_ms']:>7.2f} {arm['added_p50_ms']:>8.2f} "
            f"{arm['router_cpu_ms_per_request']:>11.3f} "
            f"{arm['replicas_cpu_ms_per_request']:>13.3f} "
            f"{arm['client_cpu_ms_per_request']:>11.3f} {arm['upstream_per_request']:>9.3f} "
            f"{arm['errors']:>7.0f}"
        )
    if (ratio := result.get("servescope_over_sglang_rps")) is not None:
        line = (
            f"servescope / sglang req/s: {ratio['median']:.2f} "
            f"({ratio['min']:.2f}-{ratio['max']:.2f})"
        )
        if "throughput_met" in result:
            line += f"; target >= {THROUGHPUT_TARGET}: {yes(result['throughput_met'])}"
        print(line)
    if "latency_met" in result:
        added = result["arms"]["servescope"]["added_p50_ms"]
        print(
            f"servescope adds {added:.2f} ms to the p50; target <= {LATENCY_TARGET_MS:g} ms: "
            f"{yes(result['latency_met'])}"
        )


def profile_tables(path: Path) -> Row:
    """The top functions of a cProfile file, by cumulative and by own time, as text."""
    tables = {}
    for key in ("cumulative", "tottime"):
        buffer = io.StringIO()
        stats = pstats.Stats(str(path), stream=buffer)
        stats.strip_dirs().sort_stats(key).print_stats(PROFILE_TOP)
        text = buffer.getvalue()
        # From the column header on: the preamble names the file and the totals.
        start = text.find("   ncalls")
        tables[key] = text[start:].rstrip() if start >= 0 else text.rstrip()
        tables["totals"] = next(
            (line.strip() for line in text.splitlines() if "function calls" in line), ""
        )
    return tables


# -- the run ------------------------------------------------------------------------------


def version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@contextmanager
def processes() -> Iterator[Processes]:
    """A ``Processes`` whose logs live in a temporary folder, all stopped on the way out."""
    with tempfile.TemporaryDirectory(prefix="bench_router-") as logdir:
        procs = Processes(Path(logdir))
        try:
            yield procs
        finally:
            procs.stop_all()


def bench(options: argparse.Namespace, plan: Plan, payload: Row) -> bool:
    """Start everything, measure, stop everything: whether every request succeeded."""
    sglang_extra = shlex.split(options.sglang_args)
    servescope_extra = shlex.split(options.servescope_args)
    skipped: dict[str, str] = payload["skipped"]
    with processes() as procs:
        replicas = start_replicas(procs)
        workers = [url for _, url in replicas]
        replica_set = Replicas(workers, [p for proc, _ in replicas for p in proc.tree()])
        targets = [Target("direct", workers[0] + CHAT, [])]
        commands: Row = payload["commands"]
        commands["replica"] = shlex.join(replicas[0][0].command)
        try:
            sglang = start_sglang(procs, workers, sglang_extra)
            targets.append(Target("sglang", router_url(sglang), sglang.tree(), sglang))
            commands["sglang"] = shlex.join(sglang.command)
        except Unavailable as exc:
            skipped["sglang"] = str(exc)
        try:
            check_servescope_route()
            front = start_servescope(procs, workers, servescope_extra)
            targets.append(Target("servescope", router_url(front), front.tree(), front))
            commands["servescope"] = shlex.join(front.command)
        except Unavailable as exc:
            skipped["servescope"] = str(exc)
        for name, reason in skipped.items():
            print(f"\n*** {name} arm SKIPPED: {reason}\n", flush=True)
        print(f"arms: {', '.join(target.name for target in targets)}; running:", flush=True)
        results = anyio.run(run_levels, targets, replica_set, plan)
        for level, rounds in results.items():
            payload["levels"][str(level)] = figures(level, rounds)
        if options.profile and "servescope" not in skipped:
            for target in targets:  # the routers measured are idle now: free their memory
                if target.proc is not None:
                    procs.stop(target.proc)
            payload["profile"] = profile(procs, replica_set, servescope_extra, plan, options.out)
        elif options.profile:
            payload["profile"] = {"skipped": skipped["servescope"]}
    errors = sum(
        arm["errors"] for level in payload["levels"].values() for arm in level["arms"].values()
    )
    return errors == 0 and not payload.get("profile", {}).get("cell", {}).get("errors")


def profile(
    procs: Processes, replicas: Replicas, extra: Sequence[str], plan: Plan, out: Path
) -> Row:
    """One 64-in-flight cell on a servescope front under cProfile; stopped with SIGINT."""
    path = out.with_suffix(".prof")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    front = start_servescope(procs, replicas.urls, extra, profile=path)
    print(f"\nprofile: {PROFILE_LEVEL} in flight on `{shlex.join(front.command)}`", flush=True)
    cell = anyio.run(run_profiled, front, replicas, plan, path)
    code = procs.stop(front, signal.SIGINT, PROFILE_STOP_GRACE)
    result: Row = {"command": shlex.join(front.command), "cell": asdict(cell), "exit": code}
    if not path.exists():
        result["error"] = f"no profile written (exit {code}):\n{front.tail()}"
        return result
    result["file"] = str(path)
    result.update(profile_tables(path))
    return result


def print_profile(result: Row) -> None:
    if "skipped" in result:
        print(f"\n*** profile SKIPPED: {result['skipped']}")
        return
    cell = result["cell"]
    print(
        f"\nprofile (servescope front under cProfile, {PROFILE_LEVEL} in flight, the timed "
        f"cell only): {cell['rps']:.0f} req/s, p50 {cell['p50_ms']:.2f} ms, front CPU "
        f"{cell['router_cpu_ms']:.3f} ms per request, errors {cell['errors']}, "
        f"front exit {result['exit']}"
    )
    if "error" in result:
        print(f"*** {result['error']}")
        return
    print(f"{result['totals']}; file {result['file']}")
    for key, title in (("cumulative", "cumulative time"), ("tottime", "own (total) time")):
        print(f"\ntop {PROFILE_TOP} by {title}:\n{result[key]}")


def print_errors(payload: Row) -> None:
    """Every arm that had an error, loudly."""
    for level, result in payload["levels"].items():
        for name, arm in result["arms"].items():
            if arm["errors"]:
                print(
                    f"*** ERRORS: {name} at {level} in flight: {arm['errors']} "
                    f"{arm['failures']}; first: {arm['sample']}"
                )
    cell = payload.get("profile", {}).get("cell")
    if cell and cell["errors"]:
        print(f"*** ERRORS in the profiled cell: {cell['failures']}; first: {cell['sample']}")


def main() -> None:
    if sys.argv[1:2] == [PROFILED_FRONT]:
        profiled_front(Path(sys.argv[2]), sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests")
    parser.add_argument("--requests", type=int, help=f"per cell (default {Plan.requests})")
    parser.add_argument("--rounds", type=int, help=f"default {Plan.rounds}")
    parser.add_argument("--concurrency", default=",".join(map(str, Plan.levels)))
    parser.add_argument("--profile", action="store_true", help="cProfile the servescope front")
    parser.add_argument(
        "--sglang-args",
        default="--log-level warn",
        help="more arguments for sglang's router (default: no log line per request, as ours)",
    )
    parser.add_argument("--servescope-args", default="", help="more for `servescope route`")
    parser.add_argument("--out", type=Path, default=Path("bench-results/bench_router.json"))
    options = parser.parse_args()
    plan = Plan(levels=tuple(int(level) for level in options.concurrency.split(",")))
    plan = plan.quick() if options.quick else plan
    if options.requests:
        plan = replace(plan, requests=options.requests)
    if options.rounds:
        plan = replace(plan, rounds=options.rounds)
    payload: Row = {
        "plan": asdict(plan),
        "revision": revision(),
        "sglang_router": version("sglang-router"),
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "targets": {
            f"servescope / sglang req/s at {THROUGHPUT_LEVELS} in flight": THROUGHPUT_TARGET,
            f"servescope added p50 ms at {LATENCY_LEVEL} in flight": LATENCY_TARGET_MS,
        },
        "commands": {},
        "skipped": {},
        "levels": {},
    }
    print(
        f"sglang-router {payload['sglang_router'] or 'not installed'}; {os.cpu_count()} CPUs, "
        f"load average {payload['loadavg_before']}"
    )
    started = time.perf_counter()
    try:
        clean = bench(options, plan, payload)
    finally:
        left = leftover_children()
    payload["loadavg_after"] = os.getloadavg()
    payload["seconds"] = time.perf_counter() - started
    for level, result in payload["levels"].items():
        print_level(int(level), result, plan)
    if "profile" in payload:
        print_profile(payload["profile"])
    for name, reason in payload["skipped"].items():
        lines = reason.splitlines()
        print(
            f"\n*** {name} arm SKIPPED: {lines[0]}"
            + (f" ... {lines[-1]}" if len(lines) > 1 else "")
        )
    print_errors(payload)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(payload, indent=2))
    print(f"\n{payload['seconds']:.0f} s; load average {payload['loadavg_before']} -> ", end="")
    print(f"{payload['loadavg_after']}; written to {options.out}")
    if left:
        sys.exit(f"processes left running (killed now): {left}")
    if not clean:
        sys.exit("*** some requests failed: see ERRORS above")


if __name__ == "__main__":
    main()
