"""Fake ``python -m sglang.launch_server`` for multi-node tests (real SGLang needs a GPU).

Takes the real flags servescope passes (unknown ones are rejected, as argparse does)::

    --model-path M --port P --host H --nnodes N --node-rank R --dist-init-addr HOST:PORT
    --tp-size/--tensor-parallel-size K --dp-size/--data-parallel-size K
    --pp-size/--pipeline-parallel-size K --context-length L --strict-ports
    --served-model-name NAME --trust-remote-code --mem-fraction-static F --dtype D

Behaviour, as SGLang 0.5.x across nodes (log format from tests/transcripts: stderr lines
``[YYYY-MM-DD HH:MM:SS] message``, scheduler lines ``[... TP<t>] message`` when tp > 1):

* ``--nnodes N > 1``: a real TCP rendezvous on ``--dist-init-addr`` (rank 0 listens and waits
  for ranks 1..N-1 to connect and say their rank; the others connect, retrying while
  refused, as torch's TCPStore clients do), between ``Init torch distributed begin.`` and
  ``Init torch distributed ends. ...``.
* Rank 0 then prints uvicorn's lines, listens at ``Uvicorn running on http://HOST:PORT``
  (``/health`` answering 503 until the warm-up is done, as SGLang's), serves servescope's
  dummy OpenAI API, and prints exactly ``The server is fired up and ready to roll!``.
* Ranks >= 1 serve only SGLang's dummy health server on ``--host:--port`` (``GET /health``
  and ``/health_generate``: 200; SGLang's ``launch_dummy_health_check_server``, which logs
  nothing) and stay up. Nobody notices a peer's death while idle: servescope must. The
  next generation request on rank 0 (``POST /v1/completions``, ``/v1/chat/completions``,
  ``/generate``) does, when a peer's connection is closed (a cut network is not seen):
  it answers 500, then rank 0 prints ``Scheduler hit an exception: ... DistBackendError:
  NCCL error: remote process exited ...`` and the SIGQUIT lines and SIGKILLs itself.

Environment knobs (see ``tests/multinode/fake_vllm.py``): ``FAKE_ENGINE_FATAL_AFTER=S``
prints ``[... TP<t>] Scheduler hit an exception: Traceback ...``, ``Received sigquit from a
child process. ...`` and ``kill_process_tree called: ...``, then SIGKILLs itself (exit -9,
as SGLang); ``FAKE_ENGINE_IGNORE_SIGTERM=1``; ``FAKE_ENGINE_JOIN_TIMEOUT``,
``FAKE_ENGINE_STARTUP``, ``FAKE_ENGINE_LIFETIME``. SIGTERM otherwise kills it at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

_ROOT = Path(__file__).resolve().parents[4]  # the repository (tests/multinode/fake_sglang/...)
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.multinode.fake_vllm import (  # noqa: E402
    EngineKnobs,
    PeerCheckedApp,
    Rendezvous,
    RendezvousError,
    bind_or_none,
    emit,
    exit_now,
    serve_app,
)

from servescope._dummy_app import DummyApp, DummySettings, _lifespan  # noqa: E402

READY_LINE = "The server is fired up and ready to roll!"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch_server.py")
    add = parser.add_argument
    add("--model-path", "--model", required=True)
    add("--port", type=int, default=30000)
    add("--host", default="127.0.0.1")
    add("--nnodes", type=int, default=1)
    add("--node-rank", type=int, default=0)
    add("--dist-init-addr", "--nccl-init-addr", default=None)
    add("--tp-size", "--tensor-parallel-size", dest="tp_size", type=int, default=1)
    add("--dp-size", "--data-parallel-size", dest="dp_size", type=int, default=1)
    add("--pp-size", "--pipeline-parallel-size", dest="pp_size", type=int, default=1)
    add("--context-length", type=int, default=None)
    add("--strict-ports", action="store_true")
    add("--served-model-name", default=None)
    add("--trust-remote-code", action="store_true")
    add("--mem-fraction-static", type=float, default=None)
    add("--dtype", default="auto")
    return parser


def _log(message: str, prefix: str = "") -> None:
    emit(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}{prefix}] {message}", err=True)


def _local_prefixes(args: argparse.Namespace) -> list[str]:
    """The scheduler prefixes (' PP<p> TP<t>', parts only for sizes > 1) of this node's ranks."""
    world = args.tp_size * args.pp_size
    per_node = max(1, world // max(1, args.nnodes))
    prefixes = []
    for rank in range(args.node_rank * per_node, min(world, (args.node_rank + 1) * per_node)):
        pp_rank, tp_rank = divmod(rank, args.tp_size)
        prefix = f" PP{pp_rank}" if args.pp_size > 1 else ""
        prefix += f" TP{tp_rank}" if args.tp_size > 1 else ""
        prefixes.append(prefix)
    return prefixes or [""]


def _bind_or_exit(host: str, port: int, code: int) -> socket.socket:
    """The port bound, or uvicorn's error line and exit ``code`` (as SGLang does)."""
    bound = bind_or_none(host, port)
    if isinstance(bound, OSError):
        _log(
            f"ERROR:    [Errno {bound.errno}] error while attempting to bind on address "
            f"({host!r}, {port}): address already in use"
        )
        exit_now(code)
    return bound


class _HealthApp:
    """SGLang's dummy health server on ranks >= 1: ``/health``, ``/health_generate``."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        ok = scope["method"] == "GET" and scope["path"] in ("/health", "/health_generate")
        body = b"" if ok else b'{"detail":"Not Found"}'
        await send(
            {
                "type": "http.response.start",
                "status": 200 if ok else 404,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _fatal(
    prefix: str, error: str = "RuntimeError: fake engine: FAKE_ENGINE_FATAL_AFTER reached"
) -> None:
    _log("Scheduler hit an exception: Traceback (most recent call last):", prefix)
    for line in (
        '  File "/usr/local/lib/python3.12/dist-packages/sglang/srt/managers/scheduler.py", '
        "line 6362, in run_scheduler_process",
        "    scheduler.event_loop_overlap()",
        error,
        "",
    ):
        emit(line, err=True)
    _log("Received sigquit from a child process. It usually means the child failed.")
    pid = os.getpid()
    _log(f"kill_process_tree called: parent_pid={pid}, include_parent=True, pid={pid}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(pid, signal.SIGKILL)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m sglang.launch_server ...`` (fake)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.nnodes > 1 and not args.dist_init_addr:
        parser.error("--dist-init-addr is required when --nnodes > 1")
    if not 0 <= args.node_rank < max(1, args.nnodes):
        parser.error(f"--node-rank {args.node_rank} must be in [0, {args.nnodes})")
    knobs = EngineKnobs()
    prefixes = _local_prefixes(args)
    knobs.arm(None, lambda: _fatal(prefixes[0]))
    served = args.served_model_name or args.model_path

    _log(
        f"server_args={{'model_path': {args.model_path!r}, 'host': {args.host!r}, "
        f"'port': {args.port}, 'tp_size': {args.tp_size}, 'dp_size': {args.dp_size}, "
        f"'pp_size': {args.pp_size}, 'context_length': {args.context_length}, "
        f"'dist_init_addr': {args.dist_init_addr!r}, 'nnodes': {args.nnodes}, "
        f"'node_rank': {args.node_rank}, 'served_model_name': {served!r}, ...}}"
    )
    http: socket.socket | None = None
    if args.node_rank == 0:
        # Bound now (as the fake holds its port), listening only at 'Uvicorn running on'.
        http = _bind_or_exit(args.host, args.port, 3)
    for prefix in prefixes:
        _log("Init torch distributed begin.", prefix)
    host, _, port = (args.dist_init_addr or "127.0.0.1:0").rpartition(":")
    meeting = Rendezvous(
        host.strip("[]"), int(port), args.nnodes, args.node_rank, knobs.join_timeout
    )
    if args.nnodes > 1:
        try:
            meeting.run()
        except RendezvousError as exc:
            _log(
                f"Scheduler hit an exception: Traceback (most recent call last):\n{exc}\n",
                prefixes[0],
            )
            _log("Received sigquit from a child process. It usually means the child failed.")
            exit_now(1)
    channels = None
    if args.nnodes > 1 and args.node_rank == 0:
        # As SGLang's PortArgs across nodes: its tokenizer's ZMQ socket on the port just
        # above the dist-init one (and more above it), bound on the head.
        channels = _bind_or_exit(host.strip("[]"), int(port) + 1, 1)
        channels.listen()
    for prefix in prefixes:
        _log("Init torch distributed ends. mem usage=0.00 GB", prefix)
        _log("Load weight begin. avail mem=78.53 GB", prefix)
    time.sleep(knobs.startup)
    for prefix in prefixes:
        _log(
            "Load weight end. elapsed=0.41 s, type=Qwen3ForCausalLM, avail mem=77.31 GB, "
            "mem usage=1.22 GB.",
            prefix,
        )
        _log("Memory pool end. avail mem=9.12 GB", prefix)
    context = args.context_length or 40960
    _log(
        "max_total_num_tokens=616384, chunked_prefill_size=8192, max_prefill_tokens=16384, "
        f"max_running_requests=4096, context_len={context}, available_gpu_mem=8.47 GB",
        prefixes[0],
    )
    if http is None:  # a node of rank >= 1
        health = _bind_or_exit(args.host, args.port, 1)
        anyio.run(serve_app, _HealthApp(), health, lambda: None, lambda: None)
        return

    dummy = DummyApp(DummySettings(model=served))
    dummy.healthy = False  # SGLang's /health answers 503 until its warm-up is done

    def on_peer_dead(peer: str) -> None:
        """A request found a rank dead: the collective fails, SGLang kills its tree."""
        error = (
            "torch.distributed.DistBackendError: NCCL error: remote process exited or there "
            f"was a network error (peer {peer})"
        )
        late = threading.Timer(0.3, _fatal, args=(prefixes[0], error))  # the 500 goes out first
        late.daemon = True
        late.start()

    app = PeerCheckedApp(dummy, meeting, on_peer_dead)
    pid = os.getpid()

    def before_listen() -> None:
        _log(f"INFO:     Started server process [{pid}]")
        _log("INFO:     Waiting for application startup.")
        _log("INFO:     Application startup complete.")

    def after_listen() -> None:
        _log(f"INFO:     Uvicorn running on http://{args.host}:{args.port} (Press CTRL+C to quit)")

    def ready() -> None:
        dummy.healthy = True
        _log(READY_LINE)

    anyio.run(serve_app, app, http, before_listen, after_listen, ready)


if __name__ == "__main__":
    main()
