"""``python -m servescope.dummy`` as a process: how it holds and reuses its port.

Plain (synchronous) tests: the engine is a separate process running its own event
loop, so the test's loop would change nothing. Linux only, like the supervisor (the
socket checks read ``/proc``).
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

from .conftest import DUMMY_SCRIPT


@contextmanager
def fake_engine(port: int, *args: str) -> Iterator[subprocess.Popen[str]]:
    """The dummy script on ``port``, SIGKILLed (and reaped) on exit."""
    command = [sys.executable, str(DUMMY_SCRIPT), "--port", str(port), "--lifetime", "60", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def stderr_of(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    return proc.stderr.read()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except ConnectionRefusedError:
        return False


def wait_serving(proc: subprocess.Popen[str], port: int, within: float) -> float:
    """Seconds until ``port`` accepts a connection; fails if the engine exits first."""
    started = time.monotonic()
    while not accepts(port):
        if proc.poll() is not None:
            raise AssertionError(f"the engine exited with {proc.returncode}: {stderr_of(proc)}")
        assert time.monotonic() - started < within, f"not serving after {within} s"
        time.sleep(0.02)
    return time.monotonic() - started


def socket_inodes(pid: int) -> set[str]:
    """The ``socket:[inode]`` names of the sockets ``pid`` holds open."""
    fd_dir = f"/proc/{pid}/fd"
    names = set()
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:"):
            names.add(target)
    return names


def listening_inode(pid: int, port: int) -> str:
    [conn] = [
        conn
        for conn in psutil.Process(pid).net_connections("tcp")
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port
    ]
    return os.readlink(f"/proc/{pid}/fd/{conn.fd}")


def port_taken_meanwhile(port: int, within: float) -> bool:
    """Hammer plain binds of ``port`` until it accepts connections: whether one bind won."""
    deadline = time.monotonic() + within
    with socket.socket() as probe:
        while not accepts(port):
            assert time.monotonic() < deadline, f"not listening after {within} s"
            for _ in range(2000):
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
                else:
                    return True
    return False


def test_port_is_held_from_bind_until_listening() -> None:
    """Bound at once, refusing connections until ``--ready-after``, then listening on that
    same socket: at no moment can another process take the port."""
    port = free_port()
    # A print is only scheduled once the engine has bound: the line means "bound".
    with fake_engine(port, "--ready-after", "2.0", "--print", "0:stdout:bound") as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "bound\n", stderr_of(proc)
        assert not accepts(port)
        bound = socket_inodes(proc.pid)
        assert not port_taken_meanwhile(port, within=10.0), "the port was free for a moment"
        assert listening_inode(proc.pid, port) in bound, "it listens on a socket bound later"


def http_get_closing(port: int) -> bytes:
    """A request with ``Connection: close``: the server closes first, so the TIME_WAIT
    that follows is on the server's side, on ``port``."""
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def time_waits_on(port: int) -> int:
    waiting = [c.laddr for c in psutil.net_connections("tcp") if c.status == psutil.CONN_TIME_WAIT]
    return len([laddr for laddr in waiting if laddr and laddr.port == port])


def test_restarts_at_once_on_a_port_in_time_wait() -> None:
    """A port whose old connections sit in TIME_WAIT (for ~60 s) binds again at once."""
    port = free_port()
    with fake_engine(port) as first:
        wait_serving(first, port, within=30.0)
        for _ in range(3):
            assert http_get_closing(port).startswith(b"HTTP/1.1 200")
    assert time_waits_on(port) >= 3
    with fake_engine(port) as second:
        took = wait_serving(second, port, within=10.0)
        assert http_get_closing(port).startswith(b"HTTP/1.1 200")
    assert took < 5.0, f"serving {took:.1f} s after start"
