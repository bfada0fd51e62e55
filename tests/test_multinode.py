"""A multi-node server on loopback: two node scopes of ``open_server`` in one test, the
engine a fake ``vllm`` CLI (tests/multinode/fake_vllm.py: a real TCP rendezvous, the real
log lines, and, like the real one, blind to a peer's death). Checks what the liveness
channel adds: the head's failure or end reaches the worker, the worker's death reaches
the head, with no request needed. The real-network versions (network namespaces, real
vLLM, Ray) are in tests/multinode."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

import servescope
from servescope import NodesConfig, NotHeadNode, ServerCrashed, ServerStartError, VLLMConfig

pytestmark = pytest.mark.anyio
FAKE_VLLM = Path(__file__).parent / "multinode" / "fake_vllm.py"
FAKE_SGLANG = Path(__file__).parent / "multinode" / "fake_sglang"


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def rendezvous_ports() -> tuple[int, int]:
    """A master port and a liveness port clear of the ports an engine takes above the
    master port (SGLang: the next few; ephemeral ports often come in a row)."""
    for _ in range(100):
        master, liveness = free_ports(2)
        if not 0 <= liveness - master <= 16:
            return master, liveness
    raise AssertionError("no two free ports apart")


def node_configs(
    backend: str = "vllm", head_env: dict[str, str] | None = None, **nodes: Any
) -> tuple[servescope.ServerConfig, servescope.ServerConfig]:
    master, liveness = rendezvous_ports()
    configs: list[servescope.ServerConfig] = []
    for rank in (0, 1):
        settings = NodesConfig(
            nnodes=2,
            node_rank=rank,
            master_addr="127.0.0.1",
            master_port=master,
            liveness_port=liveness,
            node_ip="127.0.0.1",
            token="test-token",
            heartbeat_interval=0.1,
            node_timeout=1.0,
            **nodes,
        )
        env = {"FAKE_ENGINE_LIFETIME": "60", **(head_env or {} if rank == 0 else {})}
        common: dict[str, Any] = {
            "model": "fake-model",
            "nodes": settings,
            "env": env,
            "startup_timeout": 30,
            "shutdown_grace": 2,
            "tp": 2,
        }
        if backend == "vllm":
            configs.append(VLLMConfig(executable=(sys.executable, str(FAKE_VLLM)), **common))
        else:
            env["PYTHONPATH"] = os.pathsep.join([str(FAKE_SGLANG), *sys.path])
            configs.append(servescope.SGLangConfig(strict_ports=False, **common))
    return configs[0], configs[1]


@asynccontextmanager
async def worker_node(config: servescope.ServerConfig) -> AsyncIterator[dict[str, Any]]:
    """The worker node's scope in a task of its own; what became of it in the dict."""
    seen: dict[str, Any] = {"error": None, "ended": anyio.Event(), "pids": []}

    async def run() -> None:
        try:
            async with servescope.open_server(config) as node:
                assert isinstance(node, servescope.WorkerNode)
                seen["node"] = node
                await node.wait_ready()
                seen["pids"].append(node.pid)
                seen["head_url"] = node.head_url
                with pytest.raises(NotHeadNode, match="worker node 1 of 2"):
                    await node.chat([{"role": "user", "content": "hi"}])
                await node.wait_head_exit()
                seen["returned"] = True
        except servescope.ServeError as exc:
            seen["error"] = exc
        finally:
            seen["at"] = anyio.current_time()
            seen["ended"].set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        yield seen
        with anyio.fail_after(20):
            await seen["ended"].wait()


async def until(check: Callable[[], object], limit: float = 30.0) -> None:
    """Poll ``check`` until it is true (bounded: ``AssertionError`` past ``limit`` s)."""
    for _ in range(int(limit / 0.02)):
        if check():
            return
        await anyio.sleep(0.02)
    raise AssertionError(f"not true within {limit} s")


def gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
async def test_the_head_serves_and_its_end_ends_the_worker(
    anyio_backend: str, backend: str
) -> None:
    head_config, worker_config = node_configs(backend)
    with anyio.fail_after(60):
        async with worker_node(worker_config) as worker:
            async with servescope.open_server(head_config) as head:
                await head.wait_ready()
                assert head.node_role is not None and head.node_role.is_head
                out = await head.chat([{"role": "user", "content": "hi"}], max_tokens=4)
                assert out.text
                await until(lambda: "head_url" in worker)
                assert worker["head_url"] == head.base_url
            head_ended = anyio.current_time()
            await worker["ended"].wait()
    assert worker["error"] is None and worker.get("returned")
    assert worker["at"] - head_ended < 3
    assert gone(worker["pids"])


async def test_a_dead_worker_fails_the_head_with_no_request(anyio_backend: str) -> None:
    head_config, worker_config = node_configs()
    with anyio.fail_after(60):
        async with worker_node(worker_config) as worker:
            with pytest.raises(ServerCrashed) as caught:
                async with servescope.open_server(head_config) as head:
                    await head.wait_ready()
                    await until(lambda: worker["pids"])
                    os.kill(worker["pids"][0], signal.SIGKILL)  # the engine's part dies
                    killed = anyio.current_time()
                    await anyio.sleep(30)
            noticed = anyio.current_time() - killed
    assert "node 1" in str(caught.value.reason)
    assert noticed < 5
    assert isinstance(worker["error"], ServerCrashed)


async def test_a_failed_head_fails_the_worker_with_its_reason(anyio_backend: str) -> None:
    head_config, worker_config = node_configs(head_env={"FAKE_ENGINE_FATAL_AFTER": "1.5"})
    with anyio.fail_after(60):
        async with worker_node(worker_config) as worker:
            with pytest.raises(ServerCrashed, match="EngineCore encountered a fatal error"):
                async with servescope.open_server(head_config) as head:
                    await head.wait_ready()
                    await anyio.sleep(30)
    error = worker["error"]
    assert isinstance(error, ServerCrashed)
    assert "the head failed" in error.reason and "fatal line" in error.reason
    assert gone(worker["pids"])


@pytest.mark.parametrize(
    ("rank", "expected"),
    [
        (1, "the head 127.0.0.1 never said it was ready"),
        (0, "node(s) 1 never joined the liveness channel"),
    ],
)
async def test_a_node_whose_peer_never_comes_fails_at_startup_timeout_saying_so(
    anyio_backend: str, rank: int, expected: str
) -> None:
    config = node_configs()[rank].model_copy(update={"startup_timeout": 2.0})
    with anyio.fail_after(30), pytest.raises(ServerStartError) as caught:
        async with servescope.open_server(config) as server:
            await server.wait_ready()
    assert expected in caught.value.reason


async def test_a_token_is_required(anyio_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERVESCOPE_NODE_TOKEN", raising=False)
    config = VLLMConfig(
        model="m", nodes=NodesConfig(nnodes=2, node_rank=0, master_addr="127.0.0.1")
    )
    with pytest.raises(servescope.ConfigError, match="needs a token shared by its nodes"):
        async with servescope.open_server(config):
            pass


async def test_a_pool_of_two_node_replicas_loses_one_and_keeps_serving(anyio_backend: str) -> None:
    """A replica is a group of nodes: its worker node's death fails that replica (the
    pool's business: its requests go to the other), not the pool."""
    groups = [node_configs(), node_configs()]
    heads = [head for head, _ in groups]
    with anyio.fail_after(90):
        async with (
            worker_node(groups[0][1]) as lost,
            worker_node(groups[1][1]),
            servescope.open_pool(heads, max_restarts=0) as pool,
        ):
            await pool.wait_ready()
            await until(lambda: all(r.state == "ready" for r in pool.replicas))
            await until(lambda: lost["pids"])
            os.kill(lost["pids"][0], signal.SIGKILL)
            answers = [await pool.complete("x", max_tokens=2) for _ in range(5)]
            await until(lambda: pool.replicas[0].state == "failed")
            answers += [await pool.complete("x", max_tokens=2) for _ in range(5)]
            assert all(answer.text for answer in answers)
            assert "node 1" in str(pool.replicas[0].last_error)
            assert pool.replicas[1].state == "ready"


async def test_a_pool_refuses_a_worker_rank_and_shared_ports() -> None:
    head, worker = node_configs()
    with pytest.raises(servescope.ConfigError, match="not node 1"):
        async with servescope.open_pool([worker]):
            pass
    with pytest.raises(servescope.ConfigError, match="need one config each"):
        async with servescope.open_pool(head, replicas=2):
            pass


async def test_a_pool_replica_whose_roles_make_it_a_worker_fails_saying_so(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Roles from the environment (not the config) that make a pool's replica a worker
    node: the replica fails with the reason, and the pool with it."""
    monkeypatch.setenv("SERVESCOPE_NODE_TOKEN", "t")
    for name, value in {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    config = VLLMConfig(model="m", executable=(sys.executable, str(FAKE_VLLM)), nodes=NodesConfig())
    with anyio.fail_after(30), pytest.raises(servescope.PoolFailed) as caught:
        async with servescope.open_pool([config], max_restarts=0) as pool:
            await pool.wait_ready()
    assert "a pool runs the head (node 0) of a multi-node replica" in str(caught.value)
    assert "node 1 of 2" in str(caught.value)
