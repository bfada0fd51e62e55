"""The reaper: a small process between servescope and the server it launches.

Run as a script (``python _reaper.py PARENT_PID GRACE -- ARGV...``), never imported
by the library, so it starts in milliseconds and needs only the standard library and
psutil. Its standard input is a Unix socket to the parent: the control channel.

Why it exists: if the Python process running ``open_server`` is SIGKILLed (OOM
killer, SLURM preemption), nothing in it can clean up, and an inference engine's
worker processes would keep their GPU memory. The reaper outlives its parent just
long enough to kill the server's whole tree:

* it is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so descendants that double-fork
  or move to their own session are re-parented to it and stay findable;
* it starts the server in a new session (its own process group) with
  ``PR_SET_PDEATHSIG = SIGKILL``, so the server dies if the reaper itself is killed;
* it tears the tree down — SIGTERM to the group and every descendant, a grace period,
  then SIGKILL until none is left — when the parent asks (``stop``), when the control
  socket reaches end-of-file (the parent died: the kernel closed its end), when its
  parent process id changes (checked every 0.5 s), or on SIGTERM.

The reaper does *not* set ``PR_SET_PDEATHSIG`` on itself: that signal fires when the
*thread* that forked it exits, and event loops fork from worker threads (trio's idle
worker threads exit after 10 s, which tore every server down 10 s after its start).

Messages from the parent: ``stop`` (tear down with the grace given at start) or
``stop SECONDS`` (a shorter grace: the server already failed).
Messages to the parent, one line each: ``spawned PID``, ``error MESSAGE`` (the server
could not be started), ``exit CODE`` (the server exited; negative: killed by a signal),
``done`` (teardown finished).
"""

from __future__ import annotations

import sys

# Run as a script, this file's folder heads sys.path; nothing should be imported from it.
del sys.path[0]

import ctypes  # noqa: E402
import os  # noqa: E402
import selectors  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import psutil  # noqa: E402

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
ORPHAN_GRACE = 2.0  # the parent is gone: free the GPUs fast
KILL_ROUNDS_SECONDS = 5.0


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(option, value, 0, 0, 0)) == 0


def _server_preexec() -> None:
    # Runs in the forked child before exec; the reaper is single-threaded, so this is safe.
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Reaper:
    """Spawns the server, reports on it, and kills its tree when told to."""

    def __init__(self, control: socket.socket, parent_pid: int, grace: float) -> None:
        self.control = control
        self.parent_pid = parent_pid
        self.grace = grace
        self.server: subprocess.Popen[bytes] | None = None
        self.exit_reported = False
        self.terminate_grace: float | None = None

    def send(self, message: str) -> None:
        try:
            self.control.sendall(message.encode("utf-8", "replace") + b"\n")
        except OSError:
            pass  # the parent is gone; the teardown goes on regardless

    def spawn(self, argv: list[str]) -> bool:
        try:
            self.server = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_server_preexec,
            )
        except (OSError, ValueError) as exc:
            self.send(f"error cannot start {argv[0]!r}: {exc}")
            return False
        self.send(f"spawned {self.server.pid}")
        return True

    def run(self, wakeup_fd: int) -> None:
        """Wait for a reason to tear down; report the server's exit on the way."""
        assert self.server is not None
        selector = selectors.DefaultSelector()
        selector.register(self.control, selectors.EVENT_READ, "control")
        selector.register(wakeup_fd, selectors.EVENT_READ, "signal")
        pidfd = _pidfd_open(self.server.pid)
        if pidfd is not None:
            selector.register(pidfd, selectors.EVENT_READ, "exit")
        while self.terminate_grace is None:
            for key, _ in selector.select(timeout=0.5):
                if key.data == "control":
                    self._read_control()
                elif key.data == "exit":
                    selector.unregister(key.fd)
                else:
                    os.read(key.fd, 512)  # a signal arrived; its handler has run
            self._check_exit()
            if os.getppid() != self.parent_pid:
                self.terminate_grace = min(self.grace, ORPHAN_GRACE)
        self.kill_tree(self.terminate_grace)
        self._check_exit()
        self.send("done")

    def _read_control(self) -> None:
        try:
            data = self.control.recv(4096)
        except OSError:
            data = b""
        if b"stop" in data:  # "stop" or "stop SECONDS" (a shorter grace: it crashed)
            self.terminate_grace = self.grace
            words = data[data.index(b"stop") :].split(b"\n", 1)[0].split()
            if len(words) > 1:
                try:
                    self.terminate_grace = min(self.grace, max(0.0, float(words[1])))
                except ValueError:
                    pass
        elif not data:  # end of file: the parent died without asking
            self.terminate_grace = min(self.grace, ORPHAN_GRACE)

    def _check_exit(self) -> None:
        assert self.server is not None
        _reap_orphans(self.server.pid)
        code = self.server.poll()
        if code is not None and not self.exit_reported:
            self.exit_reported = True
            self.send(f"exit {code}")

    def kill_tree(self, grace: float) -> None:
        """SIGTERM the group and every descendant, wait ``grace``, then SIGKILL the rest."""
        assert self.server is not None
        self._signal_tree(signal.SIGTERM)
        self._signal_tree(signal.SIGCONT)  # a stopped (hung) process acts on it only then
        deadline = time.monotonic() + grace
        while _alive_descendants() and time.monotonic() < deadline:
            self._check_exit()
            time.sleep(0.02)
        deadline = time.monotonic() + KILL_ROUNDS_SECONDS
        while _alive_descendants() and time.monotonic() < deadline:
            self._signal_tree(signal.SIGKILL)
            time.sleep(0.01)
            self._check_exit()

    def _signal_tree(self, sig: int) -> None:
        assert self.server is not None
        if self.server.poll() is None:
            try:
                os.killpg(self.server.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in _alive_descendants():
            try:
                proc.send_signal(sig)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass


def _alive_descendants() -> list[psutil.Process]:
    alive = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def _reap_orphans(server_pid: int) -> None:
    """Collect exited orphans re-parented to us (the server is collected by Popen)."""
    for proc in psutil.Process().children():
        if proc.pid == server_pid:
            continue
        try:
            os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:
            pass


def _pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None  # no pidfd: the 0.5 s select timeout polls instead


def main(argv: list[str]) -> int:
    parent_pid, grace, sep, *command = argv
    if sep != "--" or not command:
        print("usage: _reaper.py PARENT_PID GRACE -- ARGV...", file=sys.stderr)
        return 2
    control = socket.socket(fileno=0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    reaper = Reaper(control, int(parent_pid), float(grace))

    def on_sigterm(signum: int, frame: object) -> None:
        reaper.terminate_grace = min(reaper.grace, ORPHAN_GRACE)

    signal.signal(signal.SIGTERM, on_sigterm)
    wakeup_read, wakeup_write = os.pipe()
    os.set_blocking(wakeup_write, False)
    signal.set_wakeup_fd(wakeup_write)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    if os.getppid() != reaper.parent_pid:
        return 1  # the parent died before we could watch it: start nothing
    if not reaper.spawn(command):
        return 127
    # The server has its own copies of our stdout and stderr; let go of ours so the
    # parent sees end-of-file on them when the server's tree is gone.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    reaper.run(wakeup_read)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
