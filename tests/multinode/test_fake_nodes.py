"""One model across two network-namespace nodes, each node's scope a ``servescope serve``
process in its namespace, the engine a fake that takes the real flags, makes a real TCP
rendezvous and prints the real lines (``fake_vllm.py`` for vLLM's own multi-node mode,
``fake_sglang`` for SGLang ``--nnodes``) — and, like the real engines, never notices an
idle peer's death. Each failure is timed (``FIGURES``, printed at the end of the run)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from .netns import FAKE_VLLM, HEAD_IP, NetNodes, fake_sglang_env
from .scenario import figure, head_url, kill_node, post, start_node, two_nodes, wait_empty

#: servescope's default heartbeat (0.5 s) and node timeout (3 s): the figures are the
#: defaults' figures.
NODES = {"nnodes": 2, "master_addr": HEAD_IP, "master_port": 29600}


def config(backend: str) -> dict[str, Any]:
    common = {
        "model": "fake-model",
        "tp": 2,
        "host": "0.0.0.0",
        "nodes": NODES,
        "startup_timeout": 60,
        "shutdown_grace": 5,
        "env": {"FAKE_ENGINE_LIFETIME": "120"},
    }
    if backend == "vllm":
        return {"backend": "vllm", "executable": [sys.executable, str(FAKE_VLLM)], **common}
    env = {**common["env"], **fake_sglang_env()}  # type: ignore[dict-item]
    return {"backend": "sglang", "strict_ports": False, **common, "env": env}


BACKENDS = ["vllm", "sglang"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_serves_through_the_head_and_the_heads_end_ends_the_worker(
    netnodes: NetNodes, tmp_path: Path, backend: str
) -> None:
    with two_nodes(netnodes, config(backend), tmp_path, ready_within=60) as (head, worker):
        url = head_url(head)
        answer = post(
            netnodes.head, url, "/v1/completions", {"model": "fake-model", "prompt": "hi"}
        )
        assert answer["choices"][0]["text"]
        head.proc.send_signal(signal.SIGTERM)
        code, took_head = head.wait_exit(30)
        assert code == 0
        code, took = worker.wait_exit(15)
        assert code == 0, worker.tail()
        assert "the head ended; done" in worker.text()
        emptied = took_head + took + wait_empty(netnodes.worker, 10)
        figure(f"{backend}: head's SIGTERM → last process gone on the worker", emptied)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dead_worker_node_fails_the_head_with_no_request(
    netnodes: NetNodes, tmp_path: Path, backend: str
) -> None:
    with two_nodes(netnodes, config(backend), tmp_path, ready_within=60) as (head, _):
        kill_node(netnodes.worker)  # every process of the node, servescope's included
        code, took = head.wait_exit(20)
        assert code != 0
        assert (
            "node 1 (10.250.0.2:" in head.text() and "ServerCrashed" in head.text()
        ) or "node 1" in head.text()
        figure(f"{backend}: worker node SIGKILLed → head's exception", took)
        wait_empty(netnodes.head, 15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_heads_driver_killed_ends_the_worker_node(
    netnodes: NetNodes, tmp_path: Path, backend: str
) -> None:
    with two_nodes(netnodes, config(backend), tmp_path, ready_within=60) as (head, worker):
        os.kill(head.proc.pid, signal.SIGKILL)  # servescope on the head, nothing else
        code, took = worker.wait_exit(20)
        assert code != 0
        assert "the head is lost" in worker.text()
        figure(f"{backend}: head's driver SIGKILLed → worker's exception", took)
        figure(
            f"{backend}: head's driver SIGKILLed → worker node empty",
            took + wait_empty(netnodes.worker, 10),
        )
        wait_empty(netnodes.head, 15)  # the reaper took the head's engine down


def test_a_cut_link_fails_both_sides_within_the_node_timeout(
    netnodes: NetNodes, tmp_path: Path
) -> None:
    with two_nodes(netnodes, config("vllm"), tmp_path, ready_within=60) as (head, worker):
        netnodes.worker.cut()
        code, took = head.wait_exit(20)
        assert code != 0 and "nothing heard for 3 s" in head.text()
        figure("link cut → head's exception", took)
        code, took_worker = worker.wait_exit(20)
        assert code != 0 and "the head is lost" in worker.text()
        figure("link cut → worker node empty", took + took_worker + wait_empty(netnodes.worker, 10))


def test_generate_on_every_node_the_head_writes_the_output(
    netnodes: NetNodes, tmp_path: Path
) -> None:
    """The same ``servescope generate`` on both nodes (as srun runs it): the head sends
    the prompts and writes the output; the worker lends its engine and exits 0 with the
    head, touching neither file."""
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(f'{{"id": {i}, "prompt": "p{i}"}}\n' for i in range(40)))
    output = tmp_path / "out.jsonl"
    command = ("generate", str(prompts), "-o", str(output), "--progress", "none")
    worker = start_node(netnodes.worker, config("vllm"), tmp_path, command=command)
    head = start_node(netnodes.head, config("vllm"), tmp_path, command=command)
    try:
        code, _ = head.wait_exit(60)
        assert code == 0, head.tail()
        code, took = worker.wait_exit(15)
        assert code == 0, worker.tail()
        assert "worker node 1 of 2: the head serves at http://10.250.0.1:" in worker.text()
        figure("generate: head done → worker node's exit", took)
    finally:
        for run in (head, worker):
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait(10)
    lines = output.read_text().splitlines()
    assert len(lines) == 40 and len({json.loads(line)["id"] for line in lines}) == 40
    wait_empty(netnodes.worker, 10)
