"""``servescope generate`` end to end: peak memory against the input's size, and resuming.

Runs the console script in subprocesses (the dummy is served inside it, with no
latency, so the numbers cover the job, the pool and the server together), each measured
on its own (``wait4``: its peak resident memory). For each size N:

- ``fresh``: a new job of N prompts, start to end (prompts per second, peak memory);
  only up to ``--fresh-max`` prompts, as the dummy answers ~2,000 a second here;
- ``tail``: the same job found done but for its last 1,000 prompts: every id is
  remembered (as in a fresh job's plan) and the server starts and serves those 1,000:
  the job's peak memory at N prompts, without N requests;
- ``resume``: the job rerun once finished: nothing left, no server started; its wall
  time (start-up included) gives the rate at which a rerun gets through done lines (the
  output read, the input planned), in lines per second: at 1 million lines, the figure
  the README quotes (target: 300,000 lines/s or more);
- ``resume zst``: the same with the input and the output as ``.jsonl.zst`` (up to
  ``--fresh-max`` x 10 prompts).

The input and output files are made on the fly in a temporary directory (10 million
lines: ~2 GB). ``--src DIR`` runs servescope from another source tree (an older
revision's ``src``) for a before/after comparison.

Usage: python benchmarks/bench_generate.py [--full] [--sizes 10000,100000,1000000]
    [--fresh-max 100000] [--src DIR] [--out bench-results/generate.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zstandard
from benchlib import leftover_children, revision

SIZES = [10_000, 100_000, 1_000_000]
FULL_SIZES = [*SIZES, 10_000_000]
TAIL = 1_000
MAIN = "from servescope.cli import main; main()"


def write_prompts(path: Path, count: int) -> None:
    with path.open("w") as file:
        for start in range(0, count, 10_000):
            chunk = []
            for i in range(start, min(start + 10_000, count)):
                if i % 2:
                    content = f"Question {i}?"
                    chunk.append(
                        f'{{"id": {i}, "messages": [{{"role": "user", "content": "{content}"}}]}}\n'
                    )
                else:
                    chunk.append(
                        f'{{"id": {i}, "prompt": "Once upon a time, {i}", "max_tokens": 16}}\n'
                    )
            file.write("".join(chunk))


def write_results(path: Path, count: int) -> None:
    """Result lines as the job writes them, for the first ``count`` prompts."""
    usage = '"usage": {"prompt_tokens": 6, "completion_tokens": 16}'
    with path.open("w") as file:
        for start in range(0, count, 10_000):
            file.write(
                "".join(
                    f'{{"id": {i}, "text": "Once upon a time there was a model", '
                    f'"finish_reason": "length", {usage}}}\n'
                    for i in range(start, min(start + 10_000, count))
                )
            )


def generate(prompts: Path, output: Path, src: Path | None) -> dict[str, Any]:
    """One ``servescope generate`` run: its wall time, peak memory and output."""
    command = [sys.executable, "-c", MAIN, "generate", str(prompts), "-o", str(output)]
    command += ["--concurrency", "64", "--progress", "none"]
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    started = time.perf_counter()
    job = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True
    )
    assert job.stderr is not None
    stderr = job.stderr.read()
    _, status, usage = os.wait4(job.pid, 0)
    wall = time.perf_counter() - started
    job.returncode = os.waitstatus_to_exitcode(status)
    if job.returncode != 0:
        raise SystemExit(f"generate failed ({job.returncode}):\n{stderr[-3000:]}")
    planned = re.search(r"planned in ([0-9.]+) s", stderr)
    return {
        "wall_s": round(wall, 3),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "no_server": "no server started" in stderr,
        "planned_s": float(planned[1]) if planned else None,
    }


def count_lines(path: Path) -> int:
    with path.open("rb") as file:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))


def measure(size: int, fresh: bool, src: Path | None, tmp: Path, max_fresh: int) -> dict[str, Any]:
    prompts, output = tmp / "prompts.jsonl", tmp / "results.jsonl"
    write_prompts(prompts, size)
    result: dict[str, Any] = {"prompts": size}
    if fresh:
        output.unlink(missing_ok=True)
        run = generate(prompts, output, src)
        run["prompts_per_s"] = round(size / run["wall_s"])
        result["fresh"] = run
    else:
        write_results(output, size - min(TAIL, size))
        run = generate(prompts, output, src)
        run["sent"] = min(TAIL, size)
        result["tail"] = run
    written = count_lines(output)
    assert written == size, f"{written} lines written for {size} prompts"
    run = generate(prompts, output, src)
    run["lines_per_s"] = round(size / run["wall_s"])
    result["resume"] = run
    if size <= 10 * max_fresh:
        packed = [path.with_name(path.name + ".zst") for path in (prompts, output)]
        for path, zst in zip((prompts, output), packed, strict=True):
            with path.open("rb") as plain, zst.open("wb") as out:
                zstandard.ZstdCompressor(level=3).copy_stream(plain, out)
        run = generate(packed[0], packed[1], src)
        run["lines_per_s"] = round(size / run["wall_s"])
        result["resume zst"] = run
        for path in packed:
            path.unlink()
    for path in (prompts, output):
        path.unlink()
    return result


def table(results: list[dict[str, Any]]) -> str:
    rows = [("prompts", "run", "wall s", "peak MiB", "rate", "server")]
    for result in results:
        for name in ("fresh", "tail", "resume", "resume zst"):
            if name in result:
                run = result[name]
                rate = (
                    f"{run['prompts_per_s']:,} prompts/s"
                    if "prompts_per_s" in run
                    else f"{run['lines_per_s']:,} lines/s"
                    if "lines_per_s" in run
                    else f"{run['sent']:,} sent"
                )
                server = "none" if run["no_server"] else "started"
                rows.append(
                    (
                        f"{result['prompts']:,}",
                        name,
                        f"{run['wall_s']:.1f}",
                        f"{run['peak_rss_mib']:.0f}",
                        rate,
                        server,
                    )
                )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="up to 10 million prompts")
    parser.add_argument("--sizes", help="comma-separated prompt counts (overrides --full)")
    parser.add_argument("--fresh-max", type=int, default=100_000)
    parser.add_argument("--src", type=Path, help="servescope's source tree to run")
    parser.add_argument("--out", type=Path, default=Path("bench-results/generate.json"))
    options = parser.parse_args()
    sizes = FULL_SIZES if options.full else SIZES
    if options.sizes:
        sizes = [int(size) for size in options.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            fresh = size <= options.fresh_max
            results.append(measure(size, fresh, options.src, Path(tmp), options.fresh_max))
            print(f"{size:,} prompts measured", file=sys.stderr, flush=True)
    print(table(results))
    for result in results:
        for name in ("resume", "resume zst"):
            run = result.get(name)
            if run is None or run["planned_s"] is None:
                continue
            own = round(result["prompts"] / max(run["planned_s"], 0.05))
            print(
                f"{name} at {result['prompts']:,} done lines: {run['lines_per_s']:,} lines/s "
                f"start to end, {own:,} lines/s in the plan itself (target >= 300,000)"
            )
    report = {
        "revision": "src: " + str(options.src) if options.src else revision(),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "results": results,
        "leftover_processes": leftover_children(),
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
