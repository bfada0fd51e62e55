"""The drop-in across two nodes on loopback, as datatrove's executors run it: the same
runner on each node, ``DATATROVE_NODE_RANK`` / ``DATATROVE_NODE_IPS`` saying which node
it is. The engine is the fake ``vllm`` CLI of tests/multinode (a real rendezvous); each
node a process of its own, as on a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("servescope.integrations.datatrove", exc_type=ImportError)

from ..test_multinode import FAKE_VLLM, free_ports

#: One node's datatrove task: ``NODE_SCRIPT WORK MASTER_PORT LIVENESS_PORT``.
NODE_SCRIPT = """
import asyncio, json, os, sys, time
from pathlib import Path
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
import servescope
from servescope.integrations.datatrove import InferenceConfig, InferenceRunner

work, master, liveness = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

async def rollout(document, generate):
    result = await generate({"messages": [{"role": "user", "content": document.text}]})
    await asyncio.sleep(float(os.environ.get("ROLLOUT_SLEEP", "0")))  # a slow rollout
    return result.text

config = InferenceConfig(
    server_type="vllm", model_name_or_path="fake-model", tp=2, master_port=master,
    model_kwargs={"enforce-eager": True}, server_log_folder=str(work / "server-logs"),
    max_concurrent_generations=2,
)
settings = {
    "executable": (sys.executable, sys.argv[4]),
    "shutdown_grace": 2,
    "nodes": {"node_ip": "127.0.0.1", "liveness_port": liveness, "heartbeat_interval": 0.1,
              "node_timeout": 1.0},
}
runner = InferenceRunner(rollout, config, JsonlWriter(str(work / "output"), compression=None),
                         servescope_settings=settings)
reader = JsonlReader(str(work / "input"))
outcome = {"error": None}
try:
    runner.run(reader.run(None, 0, 1), rank=0)
except servescope.ServeError as exc:
    outcome["error"] = f"{type(exc).__name__}: {exc.reason if hasattr(exc, 'reason') else exc}"
outcome["at"] = time.time()
print(json.dumps(outcome), flush=True)
"""


def start_node(
    work: Path, rank: int, master: int, liveness: int, **env_vars: str
) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        **env_vars,
        "DATATROVE_NODE_RANK": str(rank),
        "DATATROVE_NODE_IPS": "127.0.0.1,127.0.0.1",
        "SERVESCOPE_NODE_TOKEN": "test-token",
        "FAKE_ENGINE_LIFETIME": "60",
    }
    command = [sys.executable, "-c", NODE_SCRIPT, str(work), str(master), str(liveness)]
    return subprocess.Popen([*command, str(FAKE_VLLM)], env=env, stdout=subprocess.PIPE, text=True)


def outcome(node: subprocess.Popen[str]) -> dict[str, object]:
    out, _ = node.communicate(timeout=60)
    assert node.returncode == 0, out
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def run_nodes(
    tmp_path: Path, docs: int, **head_env: str
) -> tuple[list[Path], dict[str, object], dict[str, object]]:
    """The head and a worker node, each a datatrove task on ``docs`` documents: their
    folders and what each runner did."""
    master, liveness = free_ports(2)
    works = [tmp_path / "head", tmp_path / "worker"]
    for work in works:
        (work / "input").mkdir(parents=True)
        with (work / "input" / "docs.jsonl").open("w") as file:
            for i in range(docs):
                file.write(json.dumps({"id": f"doc-{i}", "text": f"text {i}"}) + "\n")
    worker = start_node(works[1], 1, master, liveness)
    head = start_node(works[0], 0, master, liveness, **head_env)
    try:
        return works, outcome(head), outcome(worker)
    finally:
        for node in (head, worker):
            node.kill()
            node.wait()


def test_the_head_serves_the_documents_and_the_worker_ends_with_it(tmp_path: Path) -> None:
    works, head_done, worker_done = run_nodes(tmp_path, 30)
    assert head_done["error"] is None and worker_done["error"] is None
    written = (works[0] / "output" / "00000.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in written) == sorted(
        f"doc-{i}" for i in range(30)
    )
    assert not (works[1] / "output").exists()  # a worker node sends no requests
    assert isinstance(worker_done["at"], float) and isinstance(head_done["at"], float)
    assert worker_done["at"] - head_done["at"] < 5.0
    logs = sorted(path.name for path in (works[0] / "server-logs").iterdir())
    assert logs == ["server_rank_00000_node_0.log"]


def test_a_dead_head_engine_fails_both_nodes(tmp_path: Path) -> None:
    """The head's engine dies mid-run: the head's task fails with ServerCrashed naming the
    engine's fatal line, and the worker node's with the head's reason, in seconds."""
    _, head_done, worker_done = run_nodes(
        tmp_path, 200, FAKE_ENGINE_FATAL_AFTER="2.5", ROLLOUT_SLEEP="0.1"
    )
    assert isinstance(head_done["error"], str) and isinstance(worker_done["error"], str)
    assert head_done["error"].startswith("ServerCrashed")
    assert "EngineCore encountered a fatal error" in head_done["error"]
    assert worker_done["error"].startswith("ServerCrashed")
    assert "the head failed" in worker_done["error"]
    assert isinstance(worker_done["at"], float) and isinstance(head_done["at"], float)
    assert abs(worker_done["at"] - head_done["at"]) < 3.0
