"""Process supervision: start a server behind the reaper, watch it, tear its tree down.

The server is never our direct child. We start ``_reaper.py`` in a new session with a
Unix socket as its standard input, and the reaper starts the server. The socket
carries the reaper's reports (``spawned``, ``exit``, ``done``) to us and our ``stop``
to it; if we die, the kernel closes our end and the reaper kills the server's tree
by itself. See ``_reaper.py`` for the other half.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import anyio.to_thread
import psutil
from anyio.abc import ByteReceiveStream, Process, UNIXSocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from ._errors import ServerStartError

__all__ = ["ServerProcess", "spawn_server"]

logger = logging.getLogger("servescope")

REAPER = Path(__file__).with_name("_reaper.py")
#: The reaper's SIGKILL rounds after the grace period, plus start-up slack.
KILL_MARGIN = 8.0
#: How long the reaper may take to start the server and say so.
SPAWN_TIMEOUT = 30.0


class ServerProcess:
    """A server process running under the reaper.

    ``stdout`` and ``stderr`` are the server's own streams. ``wait_exit`` returns its
    exit status as soon as it exits; ``terminate`` kills its whole tree.
    """

    def __init__(self, reaper: Process, control: UNIXSocketStream, pid: int, grace: float):
        self.pid = pid
        self.grace = grace
        self._reaper = reaper
        self._control = control
        self._reports = BufferedByteReceiveStream(control)
        self.exit_code: int | None = None

    @property
    def stdout(self) -> ByteReceiveStream:
        """The server's standard output."""
        assert self._reaper.stdout is not None
        return self._reaper.stdout

    @property
    def stderr(self) -> ByteReceiveStream:
        """The server's standard error."""
        assert self._reaper.stderr is not None
        return self._reaper.stderr

    async def wait_exit(self) -> int:
        """Wait until the server exits; its status (negative: killed by that signal)."""
        while self.exit_code is None:
            report = await _read_report(self._reports)
            if report is None:  # the reaper itself died (SIGKILL): so did the server
                self.exit_code = await self._reaper.wait() or -signal.SIGKILL
            elif report.startswith("exit "):
                self.exit_code = int(report.split()[1])
        return self.exit_code

    async def terminate(self, grace: float | None = None) -> None:
        """Kill the server's tree: SIGTERM, ``grace`` seconds (default: the one given at
        start; never longer), SIGKILL; wait until reaped.

        Shielded and bounded: if the reaper does not finish in time, every process
        under it is SIGKILLed from here.
        """
        grace = self.grace if grace is None else min(grace, self.grace)
        with anyio.CancelScope(shield=True):
            try:
                await self._control.send(f"stop {grace:g}\n".encode())
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # the reaper is already gone or going
            with anyio.move_on_after(grace + KILL_MARGIN):
                await self._reaper.wait()
            if self._reaper.returncode is None:
                logger.warning("reaper %d did not finish; killing its tree", self._reaper.pid)
                await anyio.to_thread.run_sync(_kill_tree_now, self._reaper.pid)
                await self._reaper.wait()
            await self._control.aclose()
            await self._reaper.aclose()


async def spawn_server(
    argv: Sequence[str], *, env: Mapping[str, str], grace: float
) -> ServerProcess:
    """Start ``argv`` under the reaper; return once the server process exists.

    Raises ``ServerStartError`` if it cannot be started (no such executable, ...).
    """
    ours, theirs = socket.socketpair()
    command = [sys.executable, str(REAPER), str(os.getpid()), str(grace), "--", *argv]
    try:
        reaper = await anyio.open_process(
            command,
            stdin=theirs.fileno(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **env},
            start_new_session=True,
        )
    except OSError as exc:
        ours.close()
        raise ServerStartError(f"cannot start the reaper process: {exc}") from exc
    finally:
        theirs.close()
    control = await UNIXSocketStream.from_socket(ours)
    process = ServerProcess(reaper, control, pid=-1, grace=grace)
    first = None
    with anyio.move_on_after(SPAWN_TIMEOUT):
        first = await _read_report(process._reports)
        if first is not None and first.startswith("spawned "):
            process.pid = int(first.split()[1])
            return process
    await process.terminate()
    if first is None:
        raise ServerStartError(f"could not start {argv[0]!r}: the reaper did not report")
    raise ServerStartError(first.removeprefix("error ").strip())


async def _read_report(reports: BufferedByteReceiveStream) -> str | None:
    try:
        line = await reports.receive_until(b"\n", 4096)
    except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
        return None
    return line.decode("utf-8", "replace")


def _kill_tree_now(root_pid: int) -> None:
    """SIGKILL ``root_pid`` and every descendant (last resort; no grace)."""
    try:
        root = psutil.Process(root_pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)
