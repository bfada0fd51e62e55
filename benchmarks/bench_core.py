"""Core supervision latencies, measured against a real server process.

* readiness: the server's first 200 on the probe → ``wait_ready()`` returns (the
  target: < 50 ms); and the dummy opens its socket → ``wait_ready()`` returns, with
  uvicorn's ready line (the probe fires at once; this includes hypercorn's own start
  inside the dummy) and without one (only the backoff poll can find it).
* fatal line: the server prints ``CUDA out of memory`` and hangs → the
  ``ServerStartError`` reaches the caller (server torn down).
* teardown: the body exits → ``open_server`` returns, with a server and a child that
  both ignore SIGTERM (so the whole ``shutdown_grace`` is spent, then SIGKILL).
* death after ready: a ready custom server prints a ``CUDA out of memory`` traceback →
  the ``ServerCrashed`` reaches the caller (the 0.25 s settle is in it).
* hung after ready: a ready server is frozen (SIGSTOP) → the ``ServerCrashed`` ("not
  answering") reaches the caller, with ``unhealthy_after`` = 2 s: the target is 2 s plus
  little.

Timestamps cross the process boundary as wall-clock times printed by
``servescope.dummy``. Each case runs ``--repeat`` times on asyncio and on trio;
the table gives the median and the spread (min-max).

Usage: python benchmarks/bench_core.py [--repeat N] [--out bench-results/core.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

import servescope
import servescope.dummy

DUMMY = Path(servescope.dummy.__file__)
GRACE = 1.0
UNHEALTHY_AFTER = 2.0


def config(*args: str, **kwargs: float) -> servescope.CustomConfig:
    return servescope.CustomConfig(script=DUMMY, extra_args=args, **kwargs)


def stamp(server: servescope.Server, marker: str) -> float:
    for line in server.log_tail():
        if line.startswith(f"servescope-dummy: {marker} at "):
            return float(line.rsplit(" ", 1)[1])
    raise RuntimeError(f"the dummy did not print {marker!r}")


async def readiness(ready_line: bool) -> dict[str, float]:
    args = ["--ready-after", "0.5"] + ([] if ready_line else ["--ready-line", ""])
    async with servescope.open_server(config(*args)) as server:
        await server.wait_ready()
        ready_at = time.time()
        while not any("first 200" in line for line in server.log_tail()):  # noqa: ASYNC110
            await anyio.sleep(0.01)  # the dummy prints it right after answering
        return {
            "serving_to_ready": ready_at - stamp(server, "serving"),
            "first_200_to_ready": ready_at - stamp(server, "first 200"),
        }


async def fatal_line() -> dict[str, float]:
    line = "0.3:stderr:{time} torch.OutOfMemoryError: CUDA out of memory."
    try:
        async with servescope.open_server(config("--never-ready", "--print", line)) as server:
            await server.wait_ready()
    except servescope.ServerStartError as exc:
        printed_at = float((exc.matched_line or "nan").split()[0])
        return {"fatal_line_to_error": time.time() - printed_at}
    raise RuntimeError("no ServerStartError")


async def teardown() -> dict[str, float]:
    args = ("--ignore-sigterm", "--child", "ignore-sigterm")
    async with servescope.open_server(config(*args, shutdown_grace=GRACE)) as server:
        await server.wait_ready()
        left_body = time.perf_counter()
    return {"teardown_sigterm_ignored": time.perf_counter() - left_body}


async def death_after_ready() -> dict[str, float]:
    lines = ["Traceback (most recent call last):", '  File "server.py", line 1, in run']
    lines.append("torch.OutOfMemoryError: CUDA out of memory at {time}")
    prints = [
        arg for n, text in enumerate(lines) for arg in ("--print", f"{1 + n / 50}:stderr:{text}")
    ]
    try:
        async with servescope.open_server(config(*prints)) as server:
            await server.wait_ready()
            await anyio.sleep(30)
    except servescope.ServerCrashed as exc:
        printed_at = float((exc.matched_line or "nan").split()[-1])
        return {"death_line_to_error": time.time() - printed_at}
    raise RuntimeError("no ServerCrashed")


async def hung_after_ready() -> dict[str, float]:
    settings = {"health_interval": 0.5, "health_timeout": 1.0, "unhealthy_after": UNHEALTHY_AFTER}
    try:
        async with servescope.open_server(config(**settings)) as server:
            await server.wait_ready()
            assert server.pid is not None
            os.kill(server.pid, signal.SIGSTOP)
            frozen_at = time.perf_counter()
            await anyio.sleep(30)
    except servescope.ServerCrashed:
        return {"frozen_to_error": time.perf_counter() - frozen_at}
    raise RuntimeError("no ServerCrashed")


CASES: dict[str, Callable[[], Awaitable[dict[str, float]]]] = {
    "with ready line": lambda: readiness(ready_line=True),
    "without ready line": lambda: readiness(ready_line=False),
    "fatal line": fatal_line,
    "teardown": teardown,
    "death after ready": death_after_ready,
    "hung after ready": hung_after_ready,
}


def summarize(samples: list[float]) -> dict[str, float]:
    return {
        "median_ms": statistics.median(samples) * 1000,
        "min_ms": min(samples) * 1000,
        "max_ms": max(samples) * 1000,
        "n": len(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("bench-results/core.json"))
    options = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    for backend in ("asyncio", "trio"):
        for case, run in CASES.items():
            samples: dict[str, list[float]] = {}
            for _ in range(options.repeat):
                for metric, value in anyio.run(run, backend=backend).items():
                    samples.setdefault(metric, []).append(value)
            for metric, values in samples.items():
                results[f"{backend} | {case} | {metric}"] = summarize(values)
    print(f"{'loop | case | metric':<70} {'median ms':>10} {'min-max ms':>18}")
    for name, stats in results.items():
        spread = f"{stats['min_ms']:.1f}-{stats['max_ms']:.1f}"
        print(f"{name:<70} {stats['median_ms']:>10.1f} {spread:>18}")
    payload = {
        "grace_s": GRACE,
        "unhealthy_after_s": UNHEALTHY_AFTER,
        "repeat": options.repeat,
        "results": results,
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
