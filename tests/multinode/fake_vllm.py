"""A fake ``vllm`` CLI for multi-node tests, and the parts both fake engines share.

Run as ``python tests/multinode/fake_vllm.py serve MODEL --port P ...`` with the flags of
``vllm serve`` that servescope passes (unknown flags are rejected, as argparse does)::

    serve MODEL [--model M] --port P --host H --nnodes N --node-rank R
      --master-addr A --master-port P2 --headless
      --distributed-executor-backend mp|ray|uni|external_launcher
      --tensor-parallel-size K (-tp) --pipeline-parallel-size K (-pp)
      --data-parallel-size K (-dp) --max-model-len L --disable-uvicorn-access-log
      --dtype D --enforce-eager --served-model-name NAME --gpu-memory-utilization F
      --trust-remote-code --seed S

Behaviour, as real vLLM across nodes (tests/transcripts, /work/shared/MULTINODE.md):

* ``mp`` with ``--nnodes N > 1``: a real TCP rendezvous on ``master-addr:master-port``
  (rank 0 listens and waits for ranks 1..N-1 to connect and say their rank; the others
  connect, retrying while refused, as torch's TCPStore clients do). Without
  ``VLLM_HOST_IP`` in the environment both sides then hang silently after ``Loading
  weights took ...`` (as real vLLM does in a namespace with no default route).
* Rank 0 binds ``--port`` at once (connections refused), serves servescope's dummy
  OpenAI API once every rank joined, and prints (stdout, vLLM's format
  ``(APIServer pid=N) INFO MM-DD HH:MM:SS [file.py:N] message``)
  ``Starting vLLM server on http://HOST:PORT``, then (stderr, uvicorn's raw lines)
  ``INFO:     Application startup complete.``, listening from that line on.
* A ``--headless`` rank serves no HTTP and stays up; nobody notices a peer's death while
  idle (the sockets of the rendezvous are held, never read): servescope must.
* The next generation request on rank 0 (``POST /v1/completions``,
  ``/v1/chat/completions``) notices a dead peer (its connection closed; a cut network is not
  seen), as vLLM's next collective does: it answers 500, ``/health`` answers 503, and it
  prints ``EngineCore encountered a fatal error.``, ``... Connection closed by peer [IP]:PORT.
  This is typically caused by a remote worker crashing.``, ``AsyncLLM output_handler
  failed.``, ``...EngineDeadError: ...``, then after 1 s uvicorn's shutdown lines, exit 0.
* ``ray``: needs ``RAY_ADDRESS`` (``HOST:PORT``) and a TCP connection to it, else a
  Ray-like ``ConnectionError`` and exit 1; then serves as rank 0 with no rendezvous.

Environment knobs (tests only; shared with the fake SGLang):

* ``FAKE_ENGINE_FATAL_AFTER=S``: S seconds after start, print the engine's real fatal
  lines (here ``EngineCore encountered a fatal error.`` ... ``EngineDeadError``) and exit 0,
  as vLLM does after an engine death.
* ``FAKE_ENGINE_IGNORE_SIGTERM=1``: SIGTERM does nothing (only SIGKILL stops it).
  Otherwise SIGTERM ends it at once (vLLM: uvicorn's shutdown lines, exit 0).
* ``FAKE_ENGINE_JOIN_TIMEOUT=S``: how long the rendezvous waits (default 300, as torch).
* ``FAKE_ENGINE_STARTUP=S``: pretend model loading between rendezvous and serving (0).
* ``FAKE_ENGINE_LIFETIME=S``: exit by itself after S seconds, whatever happens (3600).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import anyio

from servescope._asgi import bound_socket, serve_asgi
from servescope._dummy_app import DummyApp, DummySettings

__all__ = ["EngineKnobs", "Rendezvous", "main", "serve_app"]

VLLM_VERSION = "0.33.0"
_START = time.monotonic()


# --------------------------------------------------------------------------- shared parts


class EngineKnobs:
    """The ``FAKE_ENGINE_*`` environment knobs, read once."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        fatal = env.get("FAKE_ENGINE_FATAL_AFTER")
        self.fatal_after = float(fatal) if fatal else None
        self.ignore_sigterm = env.get("FAKE_ENGINE_IGNORE_SIGTERM", "") not in ("", "0")
        self.join_timeout = float(env.get("FAKE_ENGINE_JOIN_TIMEOUT") or 300.0)
        self.startup = float(env.get("FAKE_ENGINE_STARTUP") or 0.0)
        self.lifetime = float(env.get("FAKE_ENGINE_LIFETIME") or 3600.0)

    def arm(self, on_sigterm: Callable[[], None] | None, on_fatal: Callable[[], None]) -> None:
        """Install the SIGTERM behaviour (``None``: the default, death by the signal), the
        fatal timer and the lifetime timer."""
        if self.ignore_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        elif on_sigterm is None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        else:
            signal.signal(signal.SIGTERM, lambda _sig, _frame: on_sigterm())
        if self.fatal_after is not None:
            _timer(self.fatal_after, on_fatal)
        _timer(self.lifetime, lambda: os._exit(0))


def _timer(after: float, action: Callable[[], None]) -> None:
    timer = threading.Timer(max(0.0, _START + after - time.monotonic()), action)
    timer.daemon = True
    timer.start()


def emit(line: str, *, err: bool = False) -> None:
    """Print one line and flush (the log must show it at once)."""
    stream = sys.stderr if err else sys.stdout
    stream.write(line + "\n")
    stream.flush()


def exit_now(code: int) -> NoReturn:
    """Flush and leave at once (from any thread, with no cleanup left to hang)."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


class RendezvousError(Exception):
    """The rendezvous failed; the message is torch's wording."""


class Rendezvous:
    """A real TCP rendezvous of ``nnodes`` ranks on ``host:port`` (rank 0 listens).

    The sockets stay open and unread afterwards, like a process group's connections:
    a peer dying while idle goes unnoticed.
    """

    def __init__(self, host: str, port: int, nnodes: int, rank: int, timeout: float) -> None:
        self.host, self.port, self.nnodes, self.rank = host, port, nnodes, rank
        self.timeout = timeout
        self.sockets: list[socket.socket] = []  # the store's (rank 0) and the peers'
        self.peers: list[socket.socket] = []  # the connections to the other ranks

    def run(self) -> None:
        """Block until every rank joined (bounded by ``timeout``), or raise."""
        if self.nnodes <= 1:
            return
        deadline = time.monotonic() + self.timeout
        if self.rank == 0:
            self._serve(deadline)
        else:
            self._join(deadline)

    def _serve(self, deadline: float) -> None:
        store = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        store.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            store.bind(("", self.port))
        except OSError as exc:
            store.close()
            raise RendezvousError(
                "torch.distributed.DistNetworkError: The server socket has failed to listen on "
                f"any local network address. port: {self.port}, useIpv6: false, code: "
                f"-{exc.errno}, name: {exc.strerror}, message: address already in use"
            ) from None
        store.listen(64)
        self.sockets.append(store)
        joined: dict[int, socket.socket] = {}
        while len(joined) < self.nnodes - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RendezvousError(
                    f"torch.distributed.DistStoreError: Timed out after {self.timeout:.0f} "
                    f"seconds waiting for clients. {len(joined) + 1}/{self.nnodes} clients joined."
                )
            store.settimeout(left)
            try:
                conn, _addr = store.accept()
            except TimeoutError:
                continue
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                rank = int(_read_line(conn))
            except (OSError, ValueError):
                conn.close()
                continue
            if not 0 < rank < self.nnodes or rank in joined:
                conn.close()
                continue
            joined[rank] = conn
        for conn in joined.values():
            conn.sendall(b"go\n")
            self.sockets.append(conn)
            conn.setblocking(False)  # dead_peer() peeks without waiting
            self.peers.append(conn)

    def _join(self, deadline: float) -> None:
        delay = 0.05
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RendezvousError(
                    "torch.distributed.DistNetworkError: The client socket has timed out after "
                    f"{self.timeout * 1000:.0f}ms while trying to connect to "
                    f"({self.host}, {self.port})."
                )
            try:
                conn = socket.create_connection((self.host, self.port), timeout=min(left, 5.0))
            except OSError:
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 1.0)
                continue
            break
        try:
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            conn.sendall(f"{self.rank}\n".encode())
            answer = _read_line(conn)
        except OSError as exc:
            conn.close()
            raise RendezvousError(
                f"torch.distributed.DistNetworkError: failed to recv, got 0 bytes ({exc})"
            ) from None
        if answer != "go":
            conn.close()
            raise RendezvousError(
                "torch.distributed.DistNetworkError: Connection reset by peer "
                f"({self.host}, {self.port})"
            )
        self.sockets.append(conn)
        conn.setblocking(False)  # dead_peer() peeks without waiting
        self.peers.append(conn)

    def dead_peer(self) -> str | None:
        """The address of a peer whose connection is closed (it died), if any; without
        blocking. A cut network is not seen: only a closed or reset connection is."""
        for conn in self.peers:
            try:
                data = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                try:
                    return "[{}]:{}".format(*conn.getpeername()[:2])
                except OSError:
                    return "[unknown]"
        return None


def _read_line(conn: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(64)
        if not chunk:
            break
        data += chunk
        if len(data) > 64:
            break
    return data.decode(errors="replace").strip()


def bind_or_none(host: str, port: int) -> socket.socket | OSError:
    """The HTTP socket, bound (not listening), or why it could not be."""
    try:
        return bound_socket(host, port)
    except OSError as exc:
        return exc


async def serve_app(
    app: Any,
    sock: socket.socket,
    before_listen: Callable[[], None],
    after_listen: Callable[[], None],
    ready: Callable[[], None] | None = None,
) -> None:
    """Serve ``app`` on the bound ``sock`` for ever: print ``before_listen``'s lines, listen,
    start serving, print ``after_listen``'s, then (after a short warm-up) ``ready``'s."""
    before_listen()
    sock.listen(4096)
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: serve_asgi(app, sock, task_status=task_status))
        after_listen()
        if ready is not None:
            await anyio.sleep(0.1)
            ready()
        await anyio.sleep_forever()


GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions", "/generate")


class PeerCheckedApp:
    """The dummy app, but a generation request first "uses" the other ranks: when one of
    them has died, it answers 500 and calls ``on_dead(peer)`` (the engine's death), as a
    real engine notices a dead node only at its next collective operation."""

    def __init__(self, app: Any, meeting: Rendezvous, on_dead: Callable[[str], None]) -> None:
        self.app, self.meeting, self.on_dead = app, meeting, on_dead
        self.dead = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] in GENERATE_PATHS
        ):
            peer = self.meeting.dead_peer()
            if self.dead or peer is not None:
                body = (
                    b'{"object":"error","message":"EngineCore encountered an issue.",'
                    b'"type":"InternalServerError","code":500}'
                )
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ]
                await send({"type": "http.response.start", "status": 500, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                if not self.dead:
                    self.dead = True
                    self.on_dead(peer or "[unknown]")
                return
        await self.app(scope, receive, send)


def idle_forever() -> NoReturn:
    """Stay up doing nothing (signals and timers still act)."""
    while True:
        signal.pause()


# --------------------------------------------------------------------------- fake vLLM


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm", description="fake vLLM CLI (tests only)")
    subs = parser.add_subparsers(dest="subparser", required=True)
    serve = subs.add_parser("serve", help="Start the vLLM OpenAI Compatible API server.")
    add = serve.add_argument
    add("model_tag", nargs="?", default=None)
    add("--model", default=None)
    add("--port", type=int, default=8000)
    add("--host", default=None)
    add("--nnodes", type=int, default=1)
    add("--node-rank", type=int, default=0)
    add("--master-addr", default="127.0.0.1")
    add("--master-port", type=int, default=29501)
    add("--headless", action="store_true")
    add(
        "--distributed-executor-backend",
        choices=["ray", "mp", "uni", "external_launcher"],
        default=None,
    )
    add("--tensor-parallel-size", "-tp", type=int, default=1)
    add("--pipeline-parallel-size", "-pp", type=int, default=1)
    add("--data-parallel-size", "-dp", type=int, default=1)
    add("--max-model-len", type=int, default=None)
    add("--disable-uvicorn-access-log", action="store_true")
    add("--dtype", default="auto")
    add("--enforce-eager", action="store_true")
    add("--served-model-name", nargs="+", default=None)
    add("--gpu-memory-utilization", type=float, default=0.9)
    add("--trust-remote-code", action="store_true")
    add("--seed", type=int, default=0)
    return parser


class _VLLMLog:
    """vLLM's log lines: ``(NAME pid=N) LEVEL MM-DD HH:MM:SS [file.py:N] message``."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    def line(self, who: str | None, level: str, where: str, message: str) -> None:
        prefix = f"({who} pid={self.pid}) " if who else ""
        emit(f"{prefix}{level} {time.strftime('%m-%d %H:%M:%S')} [{where}] {message}")


def _vllm_main(args: argparse.Namespace) -> None:
    knobs = EngineKnobs()
    log = _VLLMLog()
    model = args.model_tag or args.model or "Qwen/Qwen3-0.6B"
    served = (args.served_model_name or [model])[0]
    backend = args.distributed_executor_backend or "mp"
    world = args.tensor_parallel_size * args.pipeline_parallel_size
    headless = args.headless
    api = "APIServer"

    def on_sigterm() -> None:
        if not headless:
            for text in (
                "Shutting down",
                "Waiting for application shutdown.",
                "Application shutdown complete.",
                f"Finished server process [{log.pid}]",
            ):
                emit(f"INFO:     {text}", err=True)
        exit_now(0)

    def on_fatal() -> None:
        who = "EngineCore" if not headless else f"Worker_TP{args.node_rank}"
        core = "core.py:1586"
        log.line(who, "ERROR", core, "EngineCore encountered a fatal error.")
        log.line(who, "ERROR", core, "Traceback (most recent call last):")
        log.line(
            who,
            "ERROR",
            core,
            '  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/'
            'engine/core.py", line 1779, in _handle_client_request',
        )
        log.line(who, "ERROR", core, '    raise RuntimeError("Executor failed.")')
        log.line(who, "ERROR", core, "RuntimeError: Executor failed.")
        if not headless:
            log.line(api, "ERROR", "async_llm.py:943", "AsyncLLM output_handler failed.")
            log.line(
                api,
                "ERROR",
                "async_llm.py:943",
                "vllm.v1.engine.exceptions.EngineDeadError: "
                "EngineCore encountered an issue. See stack trace (above) for the root cause.",
            )
        exit_now(0)

    knobs.arm(on_sigterm, on_fatal)

    if args.nnodes > 1 and backend != "mp":
        emit(
            f"ValueError: --nnodes > 1 needs --distributed-executor-backend mp, not {backend}",
            err=True,
        )
        exit_now(1)
    if not 0 <= args.node_rank < max(1, args.nnodes):
        emit(f"ValueError: node_rank {args.node_rank} must be in [0, {args.nnodes})", err=True)
        exit_now(1)

    sock: socket.socket | None = None
    if not headless:
        for text in (
            "",
            "       █     █     █▄   ▄█",
            f" ▄▄ ▄█ █     █     █ ▀▄▀ █  version {VLLM_VERSION}",
            f"  █▄█▀ █     █     █     █  model   {model}",
            "   ▀▀  ▀▀▀▀▀ ▀▀▀▀▀ ▀     ▀",
            "",
        ):
            log.line(api, "INFO", "startup.py:38", text)
        log.line(api, "INFO", "startup.py:96", f"non-default args: {_non_default(args)}")
        bound = bind_or_none(args.host or "0.0.0.0", args.port)
        if isinstance(bound, OSError):
            emit("Traceback (most recent call last):", err=True)
            emit(f"OSError: [Errno {bound.errno}] {bound.strerror}", err=True)
            exit_now(1)
        sock = bound
        log.line(api, "INFO", "model.py:744", "Resolved architecture: Qwen3ForCausalLM")
        log.line(api, "INFO", "model.py:2170", f"Using max model len {args.max_model_len or 40960}")
    else:
        log.line(
            None,
            "INFO",
            "serve.py:262",
            f"Launching vLLM (v{VLLM_VERSION}) headless multiproc executor, with head node "
            f"address {args.master_addr}:{args.master_port} for torch.distributed process "
            "group.",
        )

    if backend == "ray":
        _check_ray()
    engine = "EngineCore" if not headless else f"Worker_TP{args.node_rank}"
    if not headless:
        log.line(
            engine,
            "INFO",
            "core.py:139",
            f"Initializing a V1 LLM engine (v{VLLM_VERSION}) with config: model='{model}', "
            f"tensor_parallel_size={args.tensor_parallel_size}, "
            f"pipeline_parallel_size={args.pipeline_parallel_size}, "
            f"dtype={args.dtype}, enforce_eager={args.enforce_eager}, ...",
        )
    meeting = Rendezvous(
        args.master_addr, args.master_port, args.nnodes, args.node_rank, knobs.join_timeout
    )
    if backend == "mp" and args.nnodes > 1:
        method = f"tcp://{args.master_addr}:{args.master_port}"
        log.line(
            engine,
            "INFO",
            "parallel_state.py:1929",
            f"world_size={world} rank={args.node_rank} local_rank=0 "
            f"distributed_init_method={method} backend=gloo",
        )
        try:
            meeting.run()
        except RendezvousError as exc:
            log.line(engine, "ERROR", "core.py:1072", "EngineCore failed to start.")
            emit(str(exc), err=True)
            exit_now(1)
        log.line(
            engine,
            "INFO",
            "parallel_state.py:2385",
            f"rank {args.node_rank} in world size {world} is assigned as DP rank 0, PP rank "
            f"0, PCP rank 0, TP rank {args.node_rank}, EP rank {args.node_rank}",
        )
    log.line(engine, "INFO", "cpu_model_runner.py:112", f"Starting to load model {model}...")
    time.sleep(knobs.startup)
    log.line(engine, "INFO", "default_loader.py:506", "Loading weights took 0.41 seconds")
    if args.nnodes > 1 and not os.environ.get("VLLM_HOST_IP"):
        idle_forever()  # real vLLM: its IP detection failed; both sides hang silently
    if headless:
        idle_forever()
    log.line(
        engine,
        "INFO",
        "core.py:405",
        "init engine (profile, create kv cache, warmup model) took 1.02 s",
    )
    assert sock is not None
    host = args.host or "0.0.0.0"
    dummy = DummyApp(DummySettings(model=served))

    def on_peer_dead(peer: str) -> None:
        """A request found a rank dead: vLLM's engine death (exit 0 after its watchdog)."""
        dummy.healthy = False  # /health answers 503 at once
        where = "core.py:1586"
        log.line("EngineCore", "ERROR", where, "EngineCore encountered a fatal error.")
        log.line("EngineCore", "ERROR", where, "Traceback (most recent call last):")
        log.line(
            "EngineCore",
            "ERROR",
            where,
            "RuntimeError: [/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] "
            f"Connection closed by peer {peer}. This is typically caused by a remote worker "
            "crashing.",
        )
        log.line(api, "ERROR", "async_llm.py:943", "AsyncLLM output_handler failed.")
        log.line(
            api,
            "ERROR",
            "async_llm.py:943",
            "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. "
            "See stack trace (above) for the root cause.",
        )
        _timer(time.monotonic() - _START + 1.0, on_sigterm)

    app = PeerCheckedApp(dummy, meeting, on_peer_dead)

    def before_listen() -> None:
        log.line(api, "INFO", "entry.py:135", "Supported tasks: ['generate']")
        log.line(api, "INFO", "entry.py:139", f"Starting vLLM server on http://{host}:{args.port}")
        log.line(api, "INFO", "launcher.py:188", "Available routes are:")
        for route, methods in (
            ("/health", "GET"),
            ("/v1/models", "GET"),
            ("/v1/chat/completions", "POST"),
            ("/v1/completions", "POST"),
        ):
            log.line(api, "INFO", "launcher.py:197", f"Route: {route}, Methods: {methods}")
        emit(f"INFO:     Started server process [{log.pid}]", err=True)
        emit("INFO:     Waiting for application startup.", err=True)

    def after_listen() -> None:
        emit("INFO:     Application startup complete.", err=True)

    anyio.run(serve_app, app, sock, before_listen, after_listen)


def _non_default(args: argparse.Namespace) -> dict[str, Any]:
    defaults = vars(_parser().parse_args(["serve"]))
    return {k: v for k, v in vars(args).items() if v != defaults.get(k) and k != "subparser"}


def _check_ray() -> None:
    """vLLM over Ray joins the Ray cluster at ``RAY_ADDRESS``: it must answer."""
    address = os.environ.get("RAY_ADDRESS", "")
    host, _, port = address.rpartition(":")
    if not address or not port.isdigit():
        emit(
            "ConnectionError: Could not find any running Ray instance. Please specify the one "
            "to connect to by setting `--address` flag or `RAY_ADDRESS` environment variable.",
            err=True,
        )
        exit_now(1)
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5.0):
            pass
    except OSError as exc:
        emit(
            f"ConnectionError: Failed to connect to GCS at address {address} ({exc}). "
            "Could not find any running Ray instance.",
            err=True,
        )
        exit_now(1)


def main(argv: Sequence[str] | None = None) -> None:
    """``vllm serve ...`` (fake)."""
    args = _parser().parse_args(argv)
    _vllm_main(args)


if __name__ == "__main__":
    main()
