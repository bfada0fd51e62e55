"""``python -m servescope.dummy``: the dummy server as a process, scriptable as a fake engine.

Without options it serves the dummy OpenAI API on ``--port`` and prints uvicorn's
``Application startup complete.`` when it accepts connections. Options script the
behaviours a supervisor must survive, each timed in seconds from start::

    --ready-after 2            bind at once, accept connections only after 2 s
    --never-ready              bind, never accept (a server that hangs while loading)
    --print '1.5:stderr:text'  print a line ('\\xff' escapes give bytes; {time} the time)
    --flood '0:stdout:10000000'  print that many bytes without a newline, then one
    --exit-after 3 --exit-code 1
    --ignore-sigterm           SIGTERM does nothing (only SIGKILL stops it)
    --child ignore-sigterm     spawn a child: plain | ignore-sigterm | new-group | orphan
    --pid-file F               write {"server": pid, "children": [pids]} as JSON
    --lifetime 600             exit by itself after this long, whatever happens
    --fault 'status=503' --fault-rate 0.2 --fault-seed 1   seeded random faults
    --replay FILE              play a transcript of a real engine's output (below)
    --api-key-env VLLM_API_KEY   /v1/ routes require the key that variable holds
    --token-latency 0.05       seconds between the chunks of a streamed answer

A transcript (``tests/transcripts/*.log``) is printed line by line; ``{port}`` is
replaced by the port; lines starting with ``#`` are comments and lines starting with
``@`` are directives: ``@stdout`` / ``@stderr`` (where the next lines go), ``@sleep S``,
``@serve`` (start answering HTTP), ``@unhealthy`` / ``@healthy`` (``/health`` answers
503 / 200), ``@exit N``, ``@kill9`` (SIGKILL itself, as SGLang does), ``@hang``.

Nothing here is imported by the library; tests and benchmarks run it as a process.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import BinaryIO

import anyio

from servescope._asgi import bound_socket, listen_socket, serve_asgi
from servescope._dummy_app import DEFAULT_TEXT, DummyApp, DummySettings
from servescope._faults import FaultSchedule

__all__ = ["main"]

READY_LINE = "INFO:     Application startup complete."
_SLEEPER = (
    "import signal, sys, time\n"
    "if sys.argv[1] == 'ignore': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "time.sleep(float(sys.argv[2]))\n"
)
_ORPHANER = (
    "import subprocess, sys\n"
    "p = subprocess.Popen([sys.executable, '-c', sys.argv[1], 'ignore', sys.argv[2]],"
    " start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "print(p.pid, flush=True)\n"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m servescope.dummy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--port", type=int, required=True)
    add("--host", default="127.0.0.1")
    add("--model", default="dummy")
    add("--text", default=DEFAULT_TEXT)
    add("--completion-tokens", type=int, default=100)
    add("--latency", type=float, default=0.0)
    add("--token-latency", type=float, default=0.0, metavar="SECONDS")
    add("--ready-after", type=float, default=0.0)
    add("--never-ready", action="store_true")
    add("--ready-line", default=READY_LINE)
    add("--print", dest="prints", action="append", default=[], metavar="T:STREAM:TEXT")
    add("--flood", action="append", default=[], metavar="T:STREAM:NBYTES")
    add("--exit-after", type=float)
    add("--exit-code", type=int, default=1)
    add("--ignore-sigterm", action="store_true")
    add(
        "--child",
        action="append",
        default=[],
        choices=["plain", "ignore-sigterm", "new-group", "orphan"],
    )
    add("--pid-file", type=Path)
    add("--lifetime", type=float, default=600.0)
    add("--fault", dest="faults", action="append", default=[], metavar="DIRECTIVE")
    add("--fault-rate", type=float, default=0.0)
    add("--fault-seed", type=int, default=0)
    add("--replay", type=Path, metavar="FILE")
    add("--api-key-env", metavar="NAME", help="require the key in this variable on /v1/ routes")
    return parser


def _stream(name: str) -> BinaryIO:
    if name not in ("stdout", "stderr"):
        raise SystemExit(f"stream must be stdout or stderr, not {name!r}")
    return sys.stdout.buffer if name == "stdout" else sys.stderr.buffer


def _write(stream: BinaryIO, data: bytes) -> None:
    stream.write(data)
    stream.flush()


async def _at(when: float, start: float) -> None:
    await anyio.sleep(max(0.0, start + when - time.monotonic()))


async def _print_later(spec: str, start: float) -> None:
    when, name, text = spec.split(":", 2)
    await _at(float(when), start)
    text = text.replace("{time}", f"{time.time():.6f}")
    _write(_stream(name), codecs.escape_decode(text.encode("utf-8"))[0] + b"\n")


async def _flood_later(spec: str, start: float) -> None:
    when, name, size = spec.split(":", 2)
    await _at(float(when), start)
    stream, left = _stream(name), int(size)
    while left > 0:
        chunk = min(left, 1 << 20)
        stream.write(b"x" * chunk)
        left -= chunk
    _write(stream, b"\n")


async def _exit_later(when: float, code: int, start: float) -> None:
    await _at(when, start)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _spawn_children(kinds: Sequence[str], lifetime: float) -> list[int]:
    pids = []
    for kind in kinds:
        mode = "ignore" if kind == "ignore-sigterm" else "plain"
        if kind == "orphan":
            middle = subprocess.run(
                [sys.executable, "-c", _ORPHANER, _SLEEPER, str(lifetime)],
                capture_output=True,
                check=True,
                text=True,
            )
            pids.append(int(middle.stdout.strip()))
            continue
        child = subprocess.Popen(
            [sys.executable, "-c", _SLEEPER, mode, str(lifetime)],
            start_new_session=(kind == "new-group"),
        )
        pids.append(child.pid)
    return pids


def _write_pid_file(path: Path, children: list[int]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"server": os.getpid(), "children": children}))
    tmp.replace(path)


def _settings(args: argparse.Namespace) -> DummySettings:
    """What the app answers, from the options (the API key from ``--api-key-env``)."""
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    return DummySettings(
        args.model,
        args.text,
        args.completion_tokens,
        args.latency,
        key,
        token_latency=args.token_latency,
    )


def _bind(host: str, port: int) -> socket.socket:
    """The socket ``_serve`` listens on once ready: bound now, so the port is held."""
    try:
        return bound_socket(host, port)
    except OSError as exc:
        print("Traceback (most recent call last):", file=sys.stderr)
        print(f"OSError: [Errno {exc.errno}] {exc.strerror}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


async def _serve(args: argparse.Namespace, start: float) -> None:
    served = _bind(args.host, args.port)  # refusing connections until it listens
    if args.never_ready:
        await anyio.sleep_forever()
    await _at(args.ready_after, start)
    served.listen(4096)
    settings = _settings(args)
    schedule = FaultSchedule(tuple(args.faults), args.fault_rate, args.fault_seed)
    first_ok = False

    def on_request(method: str, path: str, status: int) -> None:
        nonlocal first_ok
        if path == "/v1/models" and status == 200 and not first_ok:
            first_ok = True
            _write(
                sys.stdout.buffer, f"servescope-dummy: first 200 at {time.time():.6f}\n".encode()
            )

    async with anyio.create_task_group() as tg:
        _write(sys.stdout.buffer, f"servescope-dummy: serving at {time.time():.6f}\n".encode())
        await tg.start(
            lambda task_status: serve_asgi(
                DummyApp(settings, on_request, schedule),
                served,
                backlog=4096,
                task_status=task_status,
            )
        )
        if args.ready_line:
            _write(sys.stderr.buffer, args.ready_line.encode() + b"\n")


async def _replay(args: argparse.Namespace, lines: list[str]) -> None:
    """Play a transcript: print its lines, obey its directives (see the module docstring)."""
    app = DummyApp(_settings(args))
    stream = sys.stdout.buffer
    async with anyio.create_task_group() as tg:
        for number, line in enumerate(lines, 1):
            if line.startswith("#"):
                continue
            if not line.startswith("@"):
                _write(stream, line.replace("{port}", str(args.port)).encode() + b"\n")
                continue
            directive, _, value = line[1:].partition(" ")
            if directive in ("stdout", "stderr"):
                stream = _stream(directive)
            elif directive == "sleep":
                await anyio.sleep(float(value))
            elif directive == "serve":
                sock = listen_socket(args.host, args.port, backlog=4096)
                await tg.start(partial(serve_asgi, app, sock))
            elif directive in ("healthy", "unhealthy"):
                app.healthy = directive == "healthy"
            elif directive == "exit":
                await _exit_later(0, int(value), time.monotonic())
            elif directive == "kill9":
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            elif directive == "hang":
                await anyio.sleep_forever()
            else:
                raise SystemExit(f"transcript line {number}: unknown directive {line!r}")


async def _main(args: argparse.Namespace) -> None:
    start = time.monotonic()
    async with anyio.create_task_group() as tg:
        for spec in args.prints:
            tg.start_soon(_print_later, spec, start)
        for spec in args.flood:
            tg.start_soon(_flood_later, spec, start)
        if args.exit_after is not None:
            tg.start_soon(_exit_later, args.exit_after, args.exit_code, start)
        tg.start_soon(_exit_later, args.lifetime, 0, start)
        if args.replay is not None:
            await _replay(args, args.replay.read_text().splitlines())
        else:
            await _serve(args, start)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the dummy server process."""
    args = _parser().parse_args(argv)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    children = _spawn_children(args.child, args.lifetime)
    if args.pid_file is not None:
        _write_pid_file(args.pid_file, children)
    anyio.run(_main, args)


if __name__ == "__main__":
    main()
