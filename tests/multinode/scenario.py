"""Running one multi-node server across the ``netnodes``: each node's scope is
``python -m servescope serve --config ...`` in its own process inside its namespace, as
``srun`` would start it on every node; the test watches, kills, cuts and times them.

``FIGURES`` collects the measured times; the run prints them at its end (conftest)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from .netns import NetNodes, Node, wait_for_line

#: Measured figures, printed at the end of the run: name → seconds, per run.
FIGURES: dict[str, list[float]] = {}
#: The peak resident memory of both nodes (GiB) per kind of start (``two_nodes``' name).
PEAK_RSS: dict[str, float] = {}
TOKEN = "multinode-test-token"
HEAD_READY = r"^http://\S+/v1 model="
WORKER_READY = r"worker node 1 of 2: the head serves at http://"


def figure(name: str, seconds: float) -> None:
    FIGURES.setdefault(name, []).append(seconds)


@dataclass
class NodeRun:
    """One node's ``servescope serve`` process, and where its output goes."""

    node: Node
    proc: subprocess.Popen[bytes]
    out: Path

    def wait_line(self, pattern: str, timeout: float) -> float:
        return wait_for_line(self.out, pattern, timeout=timeout, proc=self.proc)

    def wait_exit(self, timeout: float) -> tuple[int, float]:
        """The exit code and the seconds it took (``AssertionError`` past ``timeout``)."""
        start = time.monotonic()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"node {self.node.rank} still running after {timeout} s:\n{self.tail()}"
            ) from None
        return code, time.monotonic() - start

    def text(self) -> str:
        """Everything the node's process printed so far."""
        return self.out.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.out.read_text(errors="replace").splitlines()[-lines:])


def wait_empty(node: Node, timeout: float) -> float:
    """Seconds until no process is left in ``node`` (``AssertionError`` past ``timeout``)."""
    start = time.monotonic()
    while node.pids():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"processes left on node {node.rank}: {describe(node.pids())}")
        time.sleep(0.05)
    return time.monotonic() - start


def describe(pids: list[int]) -> list[str]:
    found = []
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        found.append(f"{pid}: {command[:120].decode(errors='replace')}")
    return found


def kill_node(node: Node) -> None:
    """SIGKILL every process on ``node``: the machine died."""
    for pid in node.pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_node(
    node: Node,
    config: dict[str, Any],
    workdir: Path,
    *,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
    command: tuple[str, ...] = ("serve",),
) -> NodeRun:
    """``servescope serve`` (or ``command``) for ``node`` with ``config`` (its
    ``nodes.node_rank`` set)."""
    config = {**config, "nodes": {**config.get("nodes", {}), "node_rank": node.rank}}
    path = workdir / f"node{node.rank}.json"
    path.write_text(json.dumps(config))
    out = workdir / f"node{node.rank}.out"
    argv = [python, "-m", "servescope", *command, "--config", str(path), "--log-level", "INFO"]
    proc = node.spawn(argv, env={"SERVESCOPE_NODE_TOKEN": TOKEN, **(env or {})}, log=out)
    return NodeRun(node, proc, out)


@contextmanager
def two_nodes(
    netnodes: NetNodes,
    config: dict[str, Any],
    workdir: Path,
    *,
    ready_within: float,
    python: str = sys.executable,
    node_env: dict[int, dict[str, str]] | None = None,
    name: str = "ready (both nodes)",
) -> Iterator[tuple[NodeRun, NodeRun]]:
    """Both nodes started (worker first, as a scheduler may), both ready; ``node_env``:
    more environment per node rank; ``name``: the start-up time's figure."""
    envs = node_env or {}
    worker = start_node(netnodes.worker, config, workdir, python=python, env=envs.get(1))
    head = start_node(netnodes.head, config, workdir, python=python, env=envs.get(0))
    memory = _MemorySampler(netnodes)
    memory.start()
    try:
        started = time.monotonic()
        head.wait_line(HEAD_READY, ready_within)
        worker.wait_line(WORKER_READY, 30)
        figure(name, time.monotonic() - started)
        yield head, worker
    finally:
        memory.stop()
        PEAK_RSS[name] = max(PEAK_RSS.get(name, 0.0), memory.peak / 2**30)
        for run in (head, worker):
            if run.proc.poll() is None:
                run.proc.send_signal(signal.SIGTERM)
        for run in (head, worker):
            try:
                run.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                run.proc.kill()
                run.proc.wait(timeout=10)


class _MemorySampler(threading.Thread):
    """The largest sum of the resident memory of every process on both nodes, sampled
    every 0.25 s (shared pages counted once per process: an upper bound)."""

    def __init__(self, netnodes: NetNodes) -> None:
        super().__init__(daemon=True)
        self.nodes = netnodes.nodes
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.25):
            total = 0
            for node in self.nodes:
                for pid in node.pids():
                    try:
                        total += psutil.Process(pid).memory_info().rss
                    except psutil.Error:
                        continue
            self.peak = max(self.peak, total)

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)


def post(
    node: Node, url: str, path: str, body: dict[str, Any], timeout: float = 60
) -> dict[str, Any]:
    """POST ``body`` to ``url + path`` from inside ``node`` (the only place it is reachable)."""
    code = (
        "import json, sys, urllib.request\n"
        "req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), "
        "headers={'content-type': 'application/json'})\n"
        "print(urllib.request.urlopen(req, timeout=float(sys.argv[3])).read().decode())\n"
    )
    done = node.run(
        [sys.executable, "-c", code, url + path, json.dumps(body), str(timeout)],
        timeout=timeout + 10,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def head_url(head: NodeRun) -> str:
    for line in head.out.read_text(errors="replace").splitlines():
        if line.startswith("http://") and "/v1 model=" in line:
            return line.split("/v1 model=")[0]
    raise AssertionError(f"no URL line in the head's output:\n{head.tail()}")
