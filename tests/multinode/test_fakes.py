"""The fake multi-node engines: a real rendezvous across two namespace nodes, the real
engines' lines, and (like the real ones) no notice of a peer's death while idle."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import netns
from .netns import FAKE_VLLM, HEAD_IP, NetNodes, Node

SGLANG_READY = r"^\[[\d\- :]+\] The server is fired up and ready to roll!$"
VLLM_READY = r"^INFO:     Application startup complete\.$"
HTTP_PORT = 30000
DIST_PORT = 5000
_GET = (
    "import sys, urllib.request\n"
    "with urllib.request.urlopen(sys.argv[1], timeout=5) as r:\n"
    "    print(r.status, r.read().decode())\n"
)


def _get(node: Node, url: str) -> str:
    done = node.run([sys.executable, "-c", _GET, url], timeout=15)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _sglang(rank: int, host: str = HEAD_IP) -> list[str]:
    return [
        sys.executable, "-m", "sglang.launch_server", "--model-path", "fake/model",
        "--port", str(HTTP_PORT), "--host", host, "--nnodes", "2", "--node-rank", str(rank),
        "--dist-init-addr", f"{HEAD_IP}:{DIST_PORT}", "--tp-size", "2",
        "--context-length", "512",
    ]  # fmt: skip


def _vllm(rank: int, host: str = HEAD_IP) -> list[str]:
    argv = [
        sys.executable, str(FAKE_VLLM), "serve", "fake/model", "--port", str(HTTP_PORT),
        "--host", host, "--nnodes", "2", "--node-rank", str(rank), "--master-addr", HEAD_IP,
        "--master-port", str(DIST_PORT), "--distributed-executor-backend", "mp",
        "--tensor-parallel-size", "2", "--max-model-len", "512",
        "--disable-uvicorn-access-log", "--dtype", "bfloat16", "--enforce-eager",
    ]  # fmt: skip
    return [*argv, "--headless"] if rank else argv


def _stop(proc: subprocess.Popen[bytes], within: float = 5.0) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=within)


_POST = (
    "import sys, urllib.error, urllib.request\n"
    'body = b\'{"model": "fake/model", "prompt": "hi", "max_tokens": 4}\'\n'
    "req = urllib.request.Request(sys.argv[1], body, {'Content-Type': 'application/json'})\n"
    "try:\n"
    "    with urllib.request.urlopen(req, timeout=5) as r: print(r.status)\n"
    "except urllib.error.HTTPError as exc: print(exc.code)\n"
)


def _complete(node: Node) -> str:
    url = f"http://{HEAD_IP}:{HTTP_PORT}/v1/completions"
    done = node.run([sys.executable, "-c", _POST, url], timeout=15)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _two_nodes(
    netnodes: NetNodes, tmp_path: Path, engine: str, ready: str
) -> tuple[list[subprocess.Popen[bytes]], list[Path]]:
    """Rank 0, checked not ready while alone; then rank 1; then rank 0 ready."""
    argv = _sglang if engine == "sglang" else _vllm
    env = netns.fake_sglang_env() if engine == "sglang" else {}
    logs = [tmp_path / f"{engine}-{node.rank}.log" for node in netnodes.nodes]
    head = netnodes.head.spawn(argv(0), env={**env, "VLLM_HOST_IP": HEAD_IP}, log=logs[0])
    netns.wait_for_line(logs[0], r"Init torch distributed begin|distributed_init_method=tcp://",
                        timeout=15, proc=head)  # fmt: skip
    time.sleep(0.5)  # alone, rank 0 must keep waiting
    assert head.poll() is None
    assert "ready to roll" not in logs[0].read_text()
    assert "Application startup complete" not in logs[0].read_text()
    worker_ip = netnodes.worker.ip
    worker = netnodes.worker.spawn(
        argv(1, worker_ip), env={**env, "VLLM_HOST_IP": worker_ip}, log=logs[1]
    )
    netns.wait_for_line(logs[0], ready, timeout=20, proc=head)
    return [head, worker], logs


def _check_idle_death_unnoticed(
    procs: list[subprocess.Popen[bytes]], logs: list[Path], netnodes: NetNodes
) -> None:
    head, worker = procs
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=5)
    before = logs[0].read_text()
    time.sleep(3.0)
    assert head.poll() is None, "the head noticed its idle peer's death (real engines do not)"
    assert logs[0].read_text() == before
    assert _get(netnodes.head, f"http://{HEAD_IP}:{HTTP_PORT}/v1/models").startswith("200 ")
    # As the real engines, the next generation request finds the peer gone: 500, then death.
    assert _complete(netnodes.head) == "500"


def test_fake_sglang_two_nodes(netnodes: NetNodes, tmp_path: Path) -> None:
    procs, logs = _two_nodes(netnodes, tmp_path, "sglang", SGLANG_READY)
    head_log = logs[0].read_text()
    assert head_log.index("Uvicorn running on http://10.250.0.1:30000") < head_log.index(
        "The server is fired up and ready to roll!"
    )
    assert "[" in head_log and " TP0] Init torch distributed ends." in head_log
    netns.wait_for_line(logs[1], r" TP1\] Init torch distributed ends\.", timeout=5)
    models = _get(netnodes.head, f"http://{HEAD_IP}:{HTTP_PORT}/v1/models")
    assert models.startswith("200 ") and '"fake/model"' in models
    # Rank 1 serves SGLang's dummy health server only.
    worker_url = f"http://{netnodes.worker.ip}:{HTTP_PORT}"
    assert _get(netnodes.worker, worker_url + "/health").startswith("200")
    assert _complete(netnodes.head) == "200"
    _check_idle_death_unnoticed(procs, logs, netnodes)
    assert procs[0].wait(timeout=5) == -signal.SIGKILL
    text = logs[0].read_text()
    assert " TP0] Scheduler hit an exception: Traceback" in text
    assert "NCCL error: remote process exited" in text
    assert "] Received sigquit from a child process. It usually means the child failed." in text


def test_fake_vllm_mp_two_nodes(netnodes: NetNodes, tmp_path: Path) -> None:
    procs, logs = _two_nodes(netnodes, tmp_path, "vllm", VLLM_READY)
    head_log = logs[0].read_text()
    assert head_log.index(f"(APIServer pid={procs[0].pid}) INFO ") < head_log.index(
        "Starting vLLM server on http://10.250.0.1:30000"
    )
    assert head_log.index("Starting vLLM server on") < head_log.index(
        "Application startup complete."
    )
    netns.wait_for_line(logs[1], r"rank 1 in world size 2", timeout=5)
    assert "Application startup complete" not in logs[1].read_text()  # headless
    models = _get(netnodes.head, f"http://{HEAD_IP}:{HTTP_PORT}/v1/models")
    assert models.startswith("200 ") and '"fake/model"' in models
    assert _complete(netnodes.head) == "200"
    _check_idle_death_unnoticed(procs, logs, netnodes)
    assert procs[0].wait(timeout=5) == 0  # vLLM exits 0 after its engine's death
    text = logs[0].read_text()
    assert f"Connection closed by peer [{netnodes.worker.ip}]:" in text
    assert "This is typically caused by a remote worker crashing." in text
    assert "EngineCore encountered a fatal error." in text
    assert "vllm.v1.engine.exceptions.EngineDeadError" in text
    assert "INFO:     Finished server process" in text


# ------------------------------------------------- one node, root namespace (no netns needed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(argv: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **netns.fake_sglang_env(), **env},
        )  # fmt: skip


def _single_sglang(port: int) -> list[str]:
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", "m", "--port", str(port)]


def _single_vllm(port: int, *more: str) -> list[str]:
    return [sys.executable, str(FAKE_VLLM), "serve", "m", "--port", str(port), *more]


def test_fatal_after_prints_the_real_fatal_lines(tmp_path: Path) -> None:
    sglang_log, vllm_log = tmp_path / "sglang.log", tmp_path / "vllm.log"
    sglang = _start(_single_sglang(_free_port()), sglang_log, FAKE_ENGINE_FATAL_AFTER="1.5")
    vllm = _start(
        _single_vllm(_free_port(), "--host", "127.0.0.1"), vllm_log, FAKE_ENGINE_FATAL_AFTER="1.5"
    )
    try:
        assert sglang.wait(timeout=15) == -signal.SIGKILL  # SGLang kills its own tree
        assert vllm.wait(timeout=15) == 0  # vLLM exits 0 after an engine death
    finally:
        for proc in (sglang, vllm):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = sglang_log.read_text()
    assert "] Scheduler hit an exception: Traceback (most recent call last):" in text
    assert "] Received sigquit from a child process. It usually means the child failed." in text
    text = vllm_log.read_text()
    assert "EngineCore encountered a fatal error." in text
    assert "vllm.v1.engine.exceptions.EngineDeadError" in text


def test_ignore_sigterm_and_prompt_sigterm(tmp_path: Path) -> None:
    stubborn_log, plain_log = tmp_path / "stubborn.log", tmp_path / "plain.log"
    stubborn = _start(_single_sglang(_free_port()), stubborn_log, FAKE_ENGINE_IGNORE_SIGTERM="1")
    plain = _start(_single_vllm(_free_port(), "--host", "127.0.0.1"), plain_log)
    sglang_log = tmp_path / "sglang.log"
    sglang = _start(_single_sglang(_free_port()), sglang_log)
    try:
        netns.wait_for_line(stubborn_log, SGLANG_READY, timeout=15, proc=stubborn)
        netns.wait_for_line(plain_log, VLLM_READY, timeout=15, proc=plain)
        netns.wait_for_line(sglang_log, SGLANG_READY, timeout=15, proc=sglang)
        stubborn.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            stubborn.wait(timeout=0.5)
        assert _stop(plain, within=2.0) == 0
        assert _stop(sglang, within=2.0) == -signal.SIGTERM
    finally:
        for proc in (stubborn, plain, sglang):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_flags_rejected_and_ray_needs_its_address(tmp_path: Path) -> None:
    bad = subprocess.run(
        [*_single_sglang(_free_port()), "--no-such-flag"],
        capture_output=True, text=True, timeout=30, env={**os.environ, **netns.fake_sglang_env()},
    )  # fmt: skip
    assert bad.returncode == 2 and "unrecognized arguments: --no-such-flag" in bad.stderr
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ray = [*_single_vllm(_free_port()), "--distributed-executor-backend", "ray"]
    done = subprocess.run(ray, capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 1 and "Could not find any running Ray instance" in done.stderr
    with socket.socket() as gcs:
        gcs.bind(("127.0.0.1", 0))
        gcs.listen(4)
        address = f"127.0.0.1:{gcs.getsockname()[1]}"
        log = tmp_path / "ray.log"
        proc = _start([*ray, "--host", "127.0.0.1"], log, RAY_ADDRESS=address)
        try:
            netns.wait_for_line(log, VLLM_READY, timeout=15, proc=proc)
        finally:
            proc.kill()
            proc.wait()
    done = subprocess.run(
        ray, capture_output=True, text=True, timeout=30, env={**env, "RAY_ADDRESS": address}
    )
    assert done.returncode == 1 and "Failed to connect to GCS" in done.stderr
