"""``servescope generate`` end to end: 20,000 prompts through the dummy backend.

Runs the installed console script in a subprocess (the dummy is served inside it, so the
numbers cover the job, the pool and the server together) and reports prompts per second
and the job's peak resident memory.

Usage: python benchmarks/bench_generate.py [--prompts 20000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(sys.executable).with_name("servescope")


def write_prompts(path: Path, count: int) -> None:
    with path.open("w") as file:
        for i in range(count):
            if i % 2:
                record = {"id": i, "messages": [{"role": "user", "content": f"Question {i}?"}]}
            else:
                record = {"id": i, "prompt": f"Once upon a time, {i}", "max_tokens": 16}
            file.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench-results/generate.json"))
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prompts, output = Path(tmp) / "prompts.jsonl", Path(tmp) / "results.jsonl"
        write_prompts(prompts, options.prompts)
        command = [str(SCRIPT), "generate", str(prompts), "-o", str(output)]
        command += ["--concurrency", str(options.concurrency), "--progress", "none"]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        wall = time.perf_counter() - started
        written = sum(1 for _ in output.open())
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {
        "prompts": options.prompts,
        "written": written,
        "concurrency": options.concurrency,
        "wall_s": wall,
        "prompts_per_s": options.prompts / wall,
        "peak_rss_mib": peak_mib,
    }
    print(
        f"generate: {options.prompts} prompts in {wall:.1f} s = {result['prompts_per_s']:.0f}/s "
        f"at {options.concurrency} in flight, peak memory {peak_mib:.0f} MiB, {written} written"
    )
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
