"""Request throughput: ``server.request`` against two baselines, side by side.

The dummy runs as a separate process (``python -m servescope.dummy``) so client and
server do not share an event loop. At each concurrency, the same number of chat
requests goes through:

* ``servescope``: ``server.request`` (request pool + its slot transport);
* ``httpx default``: a default ``httpx.AsyncClient`` (connection limit = concurrency);
* ``conn per request``: a raw HTTP/1.1 POST on a new TCP connection per request
  (datatrove's ``_raw_post`` pattern).

Reports requests/s, client CPU seconds per 1,000 requests and errors. Then memory:
``--held`` requests (10,000) are sent to a dummy that answers each only after
``--hold`` seconds; once the dummy reports them all in flight, the growth of the
client's resident memory divided by their number is the memory per in-flight request
(task, connection, buffers, the pool's bookkeeping). The same with a bare anyio
connection per request gives the floor any HTTP/1.1 client on anyio pays.

Usage: python benchmarks/bench_pool.py [--requests N] [--concurrency 1,64,512] [--held N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import httpx
import psutil

import servescope
import servescope.dummy

DUMMY = Path(servescope.dummy.__file__)
BODY = json.dumps({"model": "dummy", "messages": [{"role": "user", "content": "hi"}]}).encode()

Send = Callable[[], Awaitable[None]]


async def drive(send: Send, total: int, concurrency: int) -> dict[str, float]:
    errors = 0
    left = total

    async def worker() -> None:
        nonlocal left, errors
        while left > 0:
            left -= 1
            try:
                await send()
            except Exception:
                errors += 1

    wall, cpu = time.perf_counter(), time.process_time()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"rps": total / wall, "cpu_s_per_1000": cpu / total * 1000, "errors": errors}


async def raw_post(host: str, port: int) -> None:
    async with await anyio.connect_tcp(host, port) as stream:
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n"
            "Connection: close\r\n\r\n"
        )
        await stream.send(head.encode() + BODY)
        data = b""
        try:
            while True:
                data += await stream.receive()
        except anyio.EndOfStream:
            pass
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(data[:100])


async def run(total: int, levels: list[int]) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    config = servescope.CustomConfig(
        script=DUMMY, extra_args=("--completion-tokens", "1"), max_concurrency=max(levels)
    )
    async with servescope.open_server(config) as server:
        await server.wait_ready()
        url = server.base_url + "/v1/chat/completions"
        port = int(server.base_url.rsplit(":", 1)[1])
        payload = {"messages": [{"role": "user", "content": "hi"}]}
        for level in levels:

            async def ours() -> None:
                await server.request(payload)

            results[f"servescope @ {level}"] = await drive(ours, total, level)
            limits = httpx.Limits(max_connections=level, max_keepalive_connections=level)
            async with httpx.AsyncClient(limits=limits, trust_env=False, timeout=60) as client:

                async def default() -> None:
                    response = await client.post(
                        url, content=BODY, headers={"content-type": "application/json"}
                    )
                    response.raise_for_status()

                results[f"httpx default @ {level}"] = await drive(default, total, level)

            async def per_request() -> None:
                await raw_post("127.0.0.1", port)

            results[f"conn per request @ {level}"] = await drive(per_request, total, level)
    return results


async def held_memory(held: int, hold: float, raw: bool) -> dict[str, float]:
    """Client memory per in-flight request with ``held`` requests parked on a slow server.

    ``raw``: the floor, a bare anyio connection per request that sends the request and
    waits for the answer (no HTTP parsing, pool or retries).
    """
    config = servescope.CustomConfig(
        script=DUMMY,
        extra_args=("--completion-tokens", "1", "--latency", str(hold)),
        max_concurrency=held,
        request_timeout=hold + 120,
        connect_timeout=60,
    )
    me = psutil.Process()
    payload = {"messages": [{"role": "user", "content": "hi"}]}
    errors = 0

    async def one() -> None:
        nonlocal errors
        try:
            if raw:
                await raw_post("127.0.0.1", port)
            else:
                await server.request(payload)
        except (servescope.RequestError, RuntimeError, OSError):
            errors += 1

    async with servescope.open_server(config) as server:
        await server.wait_ready()
        port = int(server.base_url.rsplit(":", 1)[1])
        await server.request(payload)  # warm: imports, first connection
        stats_url = server.base_url + "/dummy/stats"
        async with httpx.AsyncClient(trust_env=False, timeout=30) as probe:
            before = me.memory_info().rss
            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(held):
                    tg.start_soon(one)
                in_flight = 0
                while in_flight < held and time.perf_counter() - started < hold:
                    await anyio.sleep(0.25)
                    stats = (await probe.get(stats_url)).json()
                    in_flight = stats["in_flight"] - 1  # not counting this probe
                during = me.memory_info().rss
                all_in = time.perf_counter() - started
            finished = time.perf_counter() - started
    return {
        "held": held,
        "in_flight_at_server": in_flight,
        "seconds_to_all_in_flight": all_in,
        "seconds_to_all_done": finished,
        "kib_per_request": (during - before) / 1024 / held,
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", default="1,64,512")
    parser.add_argument("--backend", default="asyncio")
    parser.add_argument("--held", type=int, default=10_000)
    parser.add_argument("--hold", type=float, default=30.0)
    parser.add_argument("--held-only", choices=["servescope", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("bench-results/pool.json"))
    options = parser.parse_args()
    if options.held_only:  # one memory measurement, in a fresh process (see below)
        raw = options.held_only == "raw"
        row = anyio.run(held_memory, options.held, options.hold, raw, backend=options.backend)
        print(json.dumps(row))
        return
    levels = [int(level) for level in options.concurrency.split(",")]
    results = anyio.run(run, options.requests, levels, backend=options.backend)
    print(f"{'client @ in flight':<28} {'req/s':>9} {'CPU s/1000':>11} {'errors':>7}")
    for name, row in results.items():
        print(f"{name:<28} {row['rps']:>9.0f} {row['cpu_s_per_1000']:>11.3f} {row['errors']:>7.0f}")
    memory = {}
    for name, mode in [("servescope", "servescope"), ("bare connection (floor)", "raw")]:
        # Each in its own process: memory freed by one run stays in this process's heap
        # and would make the next one look free.
        command = [sys.executable, __file__, "--held-only", mode, "--held", str(options.held)]
        command += ["--hold", str(options.hold), "--backend", options.backend]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        memory[name] = row
        print(
            f"memory, {name}: {row['kib_per_request']:.1f} KiB per in-flight request "
            f"({row['in_flight_at_server']:.0f}/{row['held']:.0f} held at the server after "
            f"{row['seconds_to_all_in_flight']:.1f} s, errors {row['errors']:.0f})"
        )
    options.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "requests": options.requests,
        "backend": options.backend,
        "results": results,
        "memory": memory,
    }
    options.out.write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
