"""Ray across two network-namespace nodes under servescope: ``ray start --head --block``
and ``ray start --address ... --block`` as supervised processes of each node's scope
(never ``ray stop``), the engine on the head a fake vLLM (``--distributed-executor-backend
ray``: it needs ``RAY_ADDRESS`` to answer). Ray alone notices a lost node after 65 s and
its workers linger 40 to 70 s after the head (``shared/MULTINODE.md``); here each failure
ends both nodes within seconds, and no Ray process is left on either."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from ..multinode.conftest import netnodes as netnodes  # the fixture
from ..multinode.netns import FAKE_VLLM, HEAD_IP, NetNodes, Node
from ..multinode.scenario import figure, head_url, post, two_nodes, wait_empty

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None and not os.environ.get("SERVESCOPE_REQUIRE_VLLM"),
    reason="Ray is not installed (nox -s vllm installs it)",
)


def config() -> dict[str, Any]:
    return {
        "backend": "vllm",
        "model": "fake-model",
        "executable": [sys.executable, str(FAKE_VLLM)],
        "tp": 2,
        "host": "0.0.0.0",
        "nodes": {
            "nnodes": 2,
            "master_addr": HEAD_IP,
            "master_port": 29620,
            "executor": "ray",
            "ray_port": 6390,
            "ray_args": {"num-cpus": 1, "num-gpus": 1},
        },
        "env": {"FAKE_ENGINE_LIFETIME": "120"},
        "startup_timeout": 120,
        "shutdown_grace": 5,
    }


def raylet(node: Node) -> int:
    for pid in node.pids():
        try:
            if psutil.Process(pid).name() == "raylet":
                return pid
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no raylet on node {node.rank}")


def test_ray_nodes_serve_and_a_killed_worker_raylet_fails_the_head(
    netnodes: NetNodes, tmp_path: Path
) -> None:
    with two_nodes(netnodes, config(), tmp_path, ready_within=120, name="Ray: ready") as (
        head,
        worker,
    ):
        answer = post(netnodes.head, head_url(head), "/v1/completions", {"prompt": "hi"})
        assert answer["choices"][0]["text"]
        os.kill(raylet(netnodes.worker), signal.SIGKILL)
        code, took = head.wait_exit(60)
        assert code != 0 and "node 1" in head.text()
        figure("Ray: worker raylet SIGKILLed → head's exception", took)
        assert worker.wait_exit(30)[0] != 0
        figure("Ray: → no Ray process left on the worker", took + wait_empty(netnodes.worker, 30))
        figure("Ray: → no Ray process left on the head", took + wait_empty(netnodes.head, 30))


def test_a_cut_link_fails_the_ray_head_within_seconds(netnodes: NetNodes, tmp_path: Path) -> None:
    with two_nodes(netnodes, config(), tmp_path, ready_within=120, name="Ray: ready") as (
        head,
        worker,
    ):
        netnodes.worker.cut()
        code, took = head.wait_exit(60)
        assert code != 0 and "nothing heard for 3 s" in head.text()
        figure("Ray: link cut → head's exception", took)
        code, took_worker = worker.wait_exit(30)
        assert code != 0
        figure(
            "Ray: link cut → worker node empty",
            took + took_worker + wait_empty(netnodes.worker, 30),
        )
        wait_empty(netnodes.head, 30)


def test_the_heads_end_ends_the_ray_worker_within_seconds(
    netnodes: NetNodes, tmp_path: Path
) -> None:
    with two_nodes(netnodes, config(), tmp_path, ready_within=120, name="Ray: ready") as (
        head,
        worker,
    ):
        head.proc.send_signal(signal.SIGTERM)
        code, took_head = head.wait_exit(60)
        assert code == 0, head.tail()
        code, took = worker.wait_exit(30)
        assert code == 0, worker.tail()
        figure("Ray: head's SIGTERM → head's Ray gone", took_head + wait_empty(netnodes.head, 30))
        figure(
            "Ray: head's SIGTERM → worker node empty",
            took_head + took + wait_empty(netnodes.worker, 30),
        )
