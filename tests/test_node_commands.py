"""What each node of a multi-node server runs: the engines' multi-node flags, the
headless worker, Ray's nodes — command lines and environments, built purely."""

from __future__ import annotations

import sys
from typing import Literal

import pytest

from servescope import ConfigError, NodesConfig, SGLangConfig, VLLMConfig
from servescope._multinode import NodePlan
from servescope._nodes import NodeRole
from servescope.backends.ray import RAY_GRACE, RayNodeConfig


def plan(rank: int, executor: Literal["mp", "ray"] = "mp") -> NodePlan:
    settings = NodesConfig(executor=executor)
    role = NodeRole(2, rank, "10.0.0.1", 29500, "config")
    return NodePlan(role, settings, f"10.0.0.{rank + 1}", "eth0", "t", 29501)


CLI = ("/opt/vllm/bin/vllm",)


def test_vllm_own_multinode_mode() -> None:
    config = VLLMConfig(model="m", tp=16, executable=CLI)
    head = config.node_process_spec(8000, plan(0))
    tail = ["--distributed-executor-backend", "mp", "--nnodes", "2", "--node-rank", "0"]
    tail += ["--master-addr", "10.0.0.1", "--master-port", "29500"]
    assert head.argv[:4] == ["/opt/vllm/bin/vllm", "serve", "m", "--port"]
    assert head.argv[-len(tail) :] == tail
    assert "--tensor-parallel-size" in head.argv and head.health_path == "/health"
    worker = config.node_process_spec(8000, plan(1))
    assert worker.argv[-1] == "--headless" and "1" in worker.argv
    assert worker.health_path is None and worker.compile_key is None


def test_vllm_over_ray_runs_on_the_head_only() -> None:
    head = VLLMConfig(model="m", executable=CLI).node_process_spec(8000, plan(0, "ray"))
    assert head.argv[-2:] == ["--distributed-executor-backend", "ray"]
    assert "--nnodes" not in head.argv


def test_explicit_args_win_and_a_worker_needs_the_cli() -> None:
    config = VLLMConfig(model="m", executable=CLI, args={"master-port": 1234, "headless": True})
    worker = config.node_process_spec(8000, plan(1))
    assert "--master-port=1234" in worker.argv and worker.argv.count("--headless") == 1
    assert "29500" not in worker.argv
    module = VLLMConfig(model="m", python=sys.executable)  # no `vllm` script beside it here
    if module.launcher()[-1] != "serve":
        with pytest.raises(ConfigError, match="only the vllm CLI has"):
            module.node_process_spec(8000, plan(1))
        assert module.node_process_spec(8000, plan(0)).argv[-1] == "29500"  # the head can


def test_sglang_on_every_node() -> None:
    config = SGLangConfig(model="m", tp=16, strict_ports=False)
    head = config.node_process_spec(30000, plan(0))
    tail = ["--nnodes", "2", "--node-rank", "0", "--dist-init-addr", "10.0.0.1:29500"]
    assert head.argv[-len(tail) :] == tail and head.ready_line_required
    worker = config.node_process_spec(30000, plan(1))
    assert "--node-rank" in worker.argv and worker.argv[worker.argv.index("--node-rank") + 1] == "1"
    assert worker.health_path is None
    with pytest.raises(ConfigError, match="SGLang runs across nodes by itself"):
        SGLangConfig(model="m", nodes=NodesConfig(executor="ray"))


def test_ray_nodes() -> None:
    head = RayNodeConfig(role="head", port=6390, node_ip="10.0.0.1", args={"num-gpus": 8})
    spec = head.process_spec(0)
    assert spec.argv[-8:] == [
        "start",
        "--block",
        "--head",
        "--port=6390",
        "--include-dashboard=false",
        "--node-ip-address=10.0.0.1",
        "--disable-usage-stats",
        "--num-gpus=8",
    ]
    assert spec.env["RAY_health_check_period_ms"] == "1000"
    assert spec.health_path is None and spec.ready_line_required and spec.max_grace == RAY_GRACE
    worker = RayNodeConfig(role="worker", address="10.0.0.1:6390", node_ip="10.0.0.2")
    spec = worker.process_spec(0)
    assert "--address=10.0.0.1:6390" in spec.argv and "--head" not in spec.argv
    assert spec.env["RAY_gcs_rpc_server_reconnect_timeout_s"] == "5"
    assert spec.patterns.classify("... SUCC scripts.py:1251 -- Ray runtime started.") is not None


def test_plan_environment_for_the_engines() -> None:
    env = plan(1).network_env()
    assert env == {
        "VLLM_HOST_IP": "10.0.0.2",
        "GLOO_SOCKET_IFNAME": "eth0",
        "NCCL_SOCKET_IFNAME": "eth0",
    }
    assert plan(0, "ray").ray_address() == "10.0.0.1:6379"
