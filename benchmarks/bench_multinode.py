"""Multi-node failure times: a worker node's death (SIGKILL, link cut) → the head's
exception, and the head's end (SIGTERM, its driver SIGKILLed) → the last process gone on
the worker node, across two network-namespace nodes, each node's scope a ``servescope
serve`` process, the engine the fake multi-node vLLM (tests/multinode/fake_vllm.py: a real
TCP rendezvous, blind to an idle peer's death, as the real one). Each case runs
``--runs`` times; the table sets the figures against what datatrove 0.10.1 and the
engines do alone (measured on this kind of machine, ``shared/MULTINODE.md``). The same
cases with the real vLLM and Ray run in ``nox -s vllm`` (tests/vllm/test_multinode_*).

Needs root (``ip netns``); without it the benchmark says so and exits 0.

    python benchmarks/bench_multinode.py [--runs 5] [--out bench-results/multinode.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import leftover_children, revision
from tests.multinode.netns import FAKE_VLLM, HEAD_IP, NetNodes, NetnsUnavailable, net_nodes
from tests.multinode.scenario import kill_node, two_nodes, wait_empty

CONFIG = {
    "backend": "vllm",
    "model": "fake-model",
    "executable": [sys.executable, str(FAKE_VLLM)],
    "tp": 2,
    "host": "0.0.0.0",
    "nodes": {"nnodes": 2, "master_addr": HEAD_IP, "master_port": 29640},
    "env": {"FAKE_ENGINE_LIFETIME": "120"},
    "startup_timeout": 60,
    "shutdown_grace": 5,
}

#: What happens without servescope (shared/MULTINODE.md, same kind of machine).
ALONE = {
    "worker node SIGKILLed → head's exception": "never (idle vLLM); 15-65 s (datatrove's Ray)",
    "link cut → head's exception": "65 s (Ray's GCS health check default)",
    "head's SIGTERM → worker node empty": "never (headless vLLM); 40-70 s (datatrove)",
    "head's driver SIGKILLed → worker node empty": "never (headless vLLM); 40-70 s (datatrove)",
}


def worker_killed(nodes: NetNodes, work: Path) -> float:
    with two_nodes(nodes, CONFIG, work, ready_within=60) as (head, _):
        kill_node(nodes.worker)
        return head.wait_exit(30)[1]


def link_cut(nodes: NetNodes, work: Path) -> float:
    with two_nodes(nodes, CONFIG, work, ready_within=60) as (head, _):
        nodes.worker.cut()
        return head.wait_exit(30)[1]


def head_ended(nodes: NetNodes, work: Path) -> float:
    with two_nodes(nodes, CONFIG, work, ready_within=60) as (head, _):
        started = time.monotonic()
        head.proc.send_signal(signal.SIGTERM)
        wait_empty(nodes.worker, 30)
        return time.monotonic() - started


def head_driver_killed(nodes: NetNodes, work: Path) -> float:
    with two_nodes(nodes, CONFIG, work, ready_within=60) as (head, _):
        started = time.monotonic()
        os.kill(head.proc.pid, signal.SIGKILL)
        wait_empty(nodes.worker, 30)
        return time.monotonic() - started


CASES: dict[str, Callable[[NetNodes, Path], float]] = {
    "worker node SIGKILLed → head's exception": worker_killed,
    "link cut → head's exception": link_cut,
    "head's SIGTERM → worker node empty": head_ended,
    "head's driver SIGKILLed → worker node empty": head_driver_killed,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-results/multinode.json"))
    options = parser.parse_args()
    results: dict[str, list[float]] = {name: [] for name in CASES}
    try:
        for _ in range(options.runs):  # interleaved: each run does every case once
            for name, case in CASES.items():
                with net_nodes() as nodes, tempfile.TemporaryDirectory() as work:
                    results[name].append(case(nodes, Path(work)))
    except NetnsUnavailable as exc:
        print(f"bench_multinode: skipped: network namespaces unavailable ({exc})")
        return
    left = leftover_children()
    print(f"\nmulti-node failure times, {options.runs} runs (revision {revision()})")
    print(f"{'case':46} {'median':>8} {'max':>8}   without servescope")
    for name, values in results.items():
        median, worst = statistics.median(values), max(values)
        print(f"{name:46} {median:7.2f}s {worst:7.2f}s   {ALONE[name]}")
    if left:
        print(f"LEFT RUNNING (killed now): {left}")
    options.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"revision": revision(), "runs": options.runs, "seconds": results, "alone": ALONE}
    options.out.write_text(json.dumps(payload, indent=2))
    if left:
        sys.exit(1)


if __name__ == "__main__":
    main()
