"""Process supervision: start a server behind the reaper, watch it, tear its tree down.

The server is never our direct child. We start ``_reaper.py`` in a new session with a
Unix socket as its standard input, and the reaper starts the server. The socket
carries the reaper's reports (``spawned``, ``exit``, ``done``) to us and our ``stop``
to it; if we die, the kernel closes our end and the reaper kills the server's tree
by itself. See ``_reaper.py`` for the other half.

If the reaper itself dies (the OOM killer, a stray ``kill -9``), the server dies with
it (``PR_SET_PDEATHSIG``) but its descendants are re-parented to init. So every process
of a tree carries a token of its own in its environment (``SERVESCOPE_TREE``), and when
the reaper did not finish a teardown, this side finds them by it and kills them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import anyio.to_thread
import psutil
from anyio.abc import ByteReceiveStream, Process, UNIXSocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from ._errors import ServerStartError

__all__ = ["TREE_VARIABLE", "ServerProcess", "kill_tree", "spawn_server"]

logger = logging.getLogger("servescope")

REAPER = Path(__file__).with_name("_reaper.py")
#: The environment variable that marks every process of one server's tree.
TREE_VARIABLE = "SERVESCOPE_TREE"
#: The reaper's SIGKILL rounds after the grace period, plus start-up slack.
KILL_MARGIN = 8.0
#: How long the reaper may take to start the server and say so.
SPAWN_TIMEOUT = 30.0


class ServerProcess:
    """A server process running under the reaper.

    ``stdout`` and ``stderr`` are the server's own streams. ``wait_exit`` returns its
    exit status as soon as it exits; ``terminate`` kills its whole tree.
    """

    def __init__(self, reaper: Process, control: socket.socket, token: str, grace: float):
        self.pid = -1
        self.grace = grace
        self.token = token
        self.reaper_died = False
        self._reaper = reaper
        self._socket = control
        self._control: UNIXSocketStream | None = None
        self._reports: BufferedByteReceiveStream | None = None
        self.exit_code: int | None = None

    async def _connect(self) -> None:
        self._control = await UNIXSocketStream.from_socket(self._socket)
        self._reports = BufferedByteReceiveStream(self._control)

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

    @property
    def reaper_pid(self) -> int:
        """The reaper's process id."""
        return self._reaper.pid

    async def wait_exit(self) -> int:
        """Wait until the server exits; its status (negative: killed by that signal).

        If the reaper itself dies first, ``reaper_died`` is set and this is its status.
        """
        assert self._reports is not None
        while self.exit_code is None:
            report = await _read_report(self._reports)
            if report is None:  # the reaper itself died (SIGKILL): so did the server
                self.reaper_died = True
                self.exit_code = await self._reaper.wait() or -signal.SIGKILL
            elif report.startswith("exit "):
                self.exit_code = int(report.split()[1])
        return self.exit_code

    async def terminate(self, grace: float | None = None) -> None:
        """Kill the server's tree: SIGTERM, ``grace`` seconds (default: the one given at
        start; never longer), SIGKILL; wait until reaped.

        Shielded and bounded: if the reaper does not finish its teardown in time, or
        died before it could (killed), every process of the tree is SIGKILLed from here,
        found by its token — re-parented orphans included.
        """
        grace = self.grace if grace is None else min(grace, self.grace)
        with anyio.CancelScope(shield=True):
            try:
                if self._control is None:
                    self._socket.close()  # never connected: end-of-file tells it to stop
                else:
                    await self._control.send(f"stop {grace:g}\n".encode())
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # the reaper is already gone or going
            with anyio.move_on_after(grace + KILL_MARGIN):
                await self._reaper.wait()
            if self._reaper.returncode is None:
                logger.warning("reaper %d did not finish; killing its tree", self._reaper.pid)
                self._reaper.kill()
                await self._reaper.wait()
            if self._reaper.returncode != 0:  # no clean teardown: ours to finish
                killed = await anyio.to_thread.run_sync(kill_tree, self.token)
                if killed:
                    logger.warning("killed %d left-over processes of pid %d", killed, self.pid)
            if self._control is not None:
                await self._control.aclose()
            self._socket.close()
            await self._reaper.aclose()


async def spawn_server(
    argv: Sequence[str], *, env: Mapping[str, str], grace: float
) -> ServerProcess:
    """Start ``argv`` under the reaper; return once the server process exists.

    Raises ``ServerStartError`` if it cannot be started (no such executable, no file
    descriptors left, ...). Cancelled or failing at any point after the reaper exists,
    it tears the tree down before it returns: nothing outlives the call.
    """
    token = uuid.uuid4().hex
    command = [sys.executable, str(REAPER), str(os.getpid()), str(grace), "--", *argv]
    try:
        ours, theirs = socket.socketpair()
    except OSError as exc:
        raise ServerStartError(f"cannot start the reaper process: {exc}") from exc
    try:
        # Shielded: a start cancelled half way leaves asyncio killing a reaper it no
        # longer waits for (alive a moment after we return); the spawn takes milliseconds,
        # and a cancellation is acted on right after it (the tree torn down).
        with anyio.CancelScope(shield=True):
            reaper = await anyio.open_process(
                command,
                stdin=theirs.fileno(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**os.environ, **env, TREE_VARIABLE: token},
                start_new_session=True,
            )
    except BaseException as exc:
        ours.close()
        if isinstance(exc, OSError):
            raise ServerStartError(f"cannot start the reaper process: {exc}") from exc
        raise
    finally:
        theirs.close()
    process = ServerProcess(reaper, ours, token, grace)
    try:
        first = await _first_report(process)
    except BaseException:
        await process.terminate()
        raise
    if first is not None and first.startswith("spawned "):
        process.pid = int(first.split()[1])
        return process
    await process.terminate()
    if first is None:
        raise ServerStartError(f"could not start {argv[0]!r}: the reaper did not report")
    raise ServerStartError(first.removeprefix("error ").strip())


async def _first_report(process: ServerProcess) -> str | None:
    """The reaper's first report (``spawned PID`` or ``error ...``); None if none in time."""
    with anyio.move_on_after(SPAWN_TIMEOUT):
        await process._connect()
        assert process._reports is not None
        return await _read_report(process._reports)
    return None


async def _read_report(reports: BufferedByteReceiveStream) -> str | None:
    try:
        line = await reports.receive_until(b"\n", 4096)
    except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
        return None
    return line.decode("utf-8", "replace")


def kill_tree(token: str) -> int:
    """SIGKILL every process marked with this tree's ``token`` (last resort; no grace);
    how many there were. Processes of other users, whose environment cannot be read,
    cannot be of the tree."""
    marked = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(TREE_VARIABLE) == token:
                marked.append(proc)
        except (psutil.Error, OSError):
            continue
    for proc in marked:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(marked, timeout=5)
    return len(marked)
