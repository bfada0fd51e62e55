"""Two network-namespace "nodes" on one machine, for multi-node tests (root only).

``net_nodes()`` builds a head (10.250.0.1/24) and a worker (10.250.0.2/24) namespace, joined
by a veth pair whose end is named ``eth0`` inside both (so one ``GLOO_SOCKET_IFNAME=eth0``
fits every node), with ``lo`` up in each, and ``unreachable 10.250.0.0/24`` in the root
namespace so that no test traffic leaves the machine. On every way out (setup failing half
way included) it SIGKILLs every process still in either namespace, deletes both namespaces
(and with them the veth pair) and, once no other live holder needs it, the route.

Namespaces share the filesystem and the PID space: a process spawned "on" a node is a
normal child of the test, and its log file is a normal file.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest
from filelock import FileLock

__all__ = [
    "FAKE_SGLANG_DIR",
    "FAKE_VLLM",
    "HEAD_IP",
    "SUBNET",
    "WORKER_IP",
    "NetNodes",
    "NetnsUnavailable",
    "Node",
    "can_connect",
    "fake_sglang_env",
    "net_nodes",
    "route_present",
    "skip_unavailable",
    "wait_for_line",
]

HEAD_IP = "10.250.0.1"
WORKER_IP = "10.250.0.2"
PREFIX_LEN = 24
SUBNET = f"10.250.0.0/{PREFIX_LEN}"
IFNAME = "eth0"

#: ``PYTHONPATH`` entry that makes ``python -m sglang.launch_server`` the fake SGLang.
FAKE_SGLANG_DIR = Path(__file__).resolve().parent / "fake_sglang"
#: ``python FAKE_VLLM serve MODEL ...``: the fake ``vllm`` CLI.
FAKE_VLLM = Path(__file__).resolve().parent / "fake_vllm.py"

#: The root namespace's route is shared by concurrent test processes: a holder list guards it.
_ROUTE_LOCK = Path(tempfile.gettempdir()) / "servescope-netns-route.lock"
_ROUTE_STATE = Path(tempfile.gettempdir()) / "servescope-netns-route.json"
_IP_TIMEOUT = 10.0
_KILL_DEADLINE = 5.0
_serial = itertools.count()


class NetnsUnavailable(Exception):
    """``ip netns add`` was refused (not root, no CAP_SYS_ADMIN, no ``ip``)."""


#: Why each multi-node test skipped so far was skipped (the conftest's summary prints them).
SKIPPED: list[str] = []


def skip_unavailable(exc: NetnsUnavailable) -> NoReturn:
    """Skip the running test for want of namespaces, and count the skip."""
    SKIPPED.append(str(exc))
    pytest.skip(f"multinode: no network namespaces here: {exc}")


def fake_sglang_env() -> dict[str, str]:
    """The environment additions that make ``python -m sglang.launch_server`` the fake."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(FAKE_SGLANG_DIR) + (os.pathsep + path if path else "")}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` (bounded), raising with its stderr when ``check`` and it fails."""
    done = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _netns_pids(name: str) -> list[int]:
    done = _ip("netns", "pids", name, check=False)
    if done.returncode != 0:
        return []
    return [int(word) for word in done.stdout.split() if word.isdigit()]


def _namespaces() -> set[str]:
    done = _ip("netns", "list", check=False)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


@dataclass
class Node:
    """One namespace "node": ``name`` (the namespace), ``ip`` on its ``eth0``, ``rank``."""

    name: str
    ip: str
    rank: int
    _spawned: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    def _exec(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *(os.fspath(arg) for arg in argv)]

    def spawn(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        log: Path,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside this node, in a new session, stdout and stderr to ``log``.

        Its environment is this process's plus ``env``. ``ip netns exec`` execs the
        command, so the returned process *is* the command (its pid, its process group).
        The node's teardown kills it if the test did not.
        """
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                self._exec(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self._spawned.append(proc)
        return proc

    def run(
        self, argv: Sequence[str | os.PathLike[str]], timeout: float = 10.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a quick command inside this node and wait for it (output captured as text).

        Raises ``subprocess.TimeoutExpired`` (the command killed) past ``timeout``.
        """
        return subprocess.run(
            self._exec(argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    def cut(self) -> None:
        """Take this node's ``eth0`` down: the network between the nodes is cut."""
        _ip("-n", self.name, "link", "set", IFNAME, "down")

    def restore(self) -> None:
        """Bring this node's ``eth0`` back up (its address and subnet route come back)."""
        _ip("-n", self.name, "link", "set", IFNAME, "up")

    def pids(self) -> list[int]:
        """The pids of the processes living in this node's namespace."""
        return _netns_pids(self.name)

    def _kill_all(self) -> None:
        """SIGKILL every process in the namespace until none is left (bounded), and reap
        the ones this node spawned."""
        deadline = time.monotonic() + _KILL_DEADLINE
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        for proc in self._spawned:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=_KILL_DEADLINE)
        if pids := self.pids():
            raise RuntimeError(f"namespace {self.name}: processes {pids} survived SIGKILL")


@dataclass
class NetNodes:
    """The two nodes of a test: ``head`` (rank 0) and ``worker`` (rank 1)."""

    head: Node
    worker: Node

    @property
    def nodes(self) -> list[Node]:
        """Every node, by rank."""
        return [self.head, self.worker]


def route_present() -> bool:
    """Whether the root namespace has the ``unreachable 10.250.0.0/24`` route."""
    done = _ip("route", "show", "type", "unreachable", SUBNET, check=False)
    return bool(done.stdout.strip())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _route_update(holder: str, *, hold: bool) -> None:
    """Add ``holder`` to (or remove it from) the route's live holders; the route exists
    while any holds it. A route found with no recorded holder is someone else's: kept."""
    with FileLock(str(_ROUTE_LOCK), timeout=_IP_TIMEOUT):
        try:
            state = json.loads(_ROUTE_STATE.read_text())
        except (OSError, ValueError):
            state = {}
        holders = [h for h in state.get("holders", []) if _pid_alive(int(h.split(":")[0]))]
        ours = bool(state.get("ours", False))
        if hold:
            if not route_present():
                _ip("route", "add", "unreachable", SUBNET)
                ours = True
            holders.append(holder)
        else:
            holders = [h for h in holders if h != holder]
            if not holders and ours:
                _ip("route", "del", "unreachable", SUBNET, check=False)
                ours = False
        _ROUTE_STATE.write_text(json.dumps({"holders": holders, "ours": ours}))


def _delete_namespace(name: str) -> None:
    Node(name, "", -1)._kill_all()
    if name in _namespaces():
        _ip("netns", "delete", name)


def _add_namespace(name: str) -> None:
    try:
        done = _ip("netns", "add", name, check=False)
    except FileNotFoundError as exc:
        raise NetnsUnavailable(f"no `ip` command ({exc})") from None
    if done.returncode == 0:
        return
    if "File exists" in done.stderr:  # a crashed run with this pid left it: ours to clear
        _delete_namespace(name)
        done = _ip("netns", "add", name, check=False)
        if done.returncode == 0:
            return
    raise NetnsUnavailable(
        f"`ip netns add` refused (euid {os.geteuid()}; needs root / CAP_SYS_ADMIN): "
        f"{done.stderr.strip()}"
    )


@contextlib.contextmanager
def net_nodes() -> Iterator[NetNodes]:
    """Two connected namespace nodes, torn down (processes, namespaces, route) on exit.

    Raises ``NetnsUnavailable`` when namespaces cannot be made here (nothing is left then).
    """
    base = f"ss{os.getpid()}{next(_serial) % 1000}"
    nodes = NetNodes(Node(base + "h", HEAD_IP, 0), Node(base + "w", WORKER_IP, 1))
    holder = f"{os.getpid()}:{base}"
    made: list[Node] = []
    held = False
    try:
        for node in nodes.nodes:
            _add_namespace(node.name)
            made.append(node)
        _route_update(holder, hold=True)
        held = True
        head, worker = nodes.head.name, nodes.worker.name
        _ip(
            "-n",
            head,
            "link",
            "add",
            IFNAME,
            "type",
            "veth",
            "peer",
            "name",
            IFNAME,
            "netns",
            worker,
        )
        for node in nodes.nodes:
            _ip("-n", node.name, "addr", "add", f"{node.ip}/{PREFIX_LEN}", "dev", IFNAME)
            _ip("-n", node.name, "link", "set", IFNAME, "up")
            _ip("-n", node.name, "link", "set", "lo", "up")
        yield nodes
    finally:
        errors: list[BaseException] = []
        for node in reversed(made):
            try:
                node._kill_all()
                _ip("netns", "delete", node.name)
            except Exception as exc:
                errors.append(exc)
        if held:
            try:
                _route_update(holder, hold=False)
            except Exception as exc:
                errors.append(exc)
        if errors and sys.exc_info()[0] is None:
            raise errors[0]


def can_connect(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens from *this* namespace."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_line(
    log: Path,
    pattern: str,
    *,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    interval: float = 0.05,
) -> float:
    """Wait until a line of ``log`` matches the regex ``pattern``; return the seconds taken.

    Fails (``AssertionError`` with the log's tail) past ``timeout``, or as soon as ``proc``
    (the process writing the log) has exited without printing it.
    """
    regex = re.compile(pattern, re.MULTILINE)
    start = time.monotonic()
    deadline = start + timeout
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        if regex.search(text):
            return time.monotonic() - start
        exited = proc is not None and proc.poll() is not None
        if exited or time.monotonic() >= deadline:
            why = f"exited with {proc.returncode}" if exited and proc else f"{timeout:.1f} s passed"
            tail = "\n".join(text.splitlines()[-30:])
            raise AssertionError(f"{pattern!r} not in {log} ({why}); its tail:\n{tail}")
        time.sleep(interval)


def connect_errno(host: str, port: int, timeout: float = 1.0) -> int | None:
    """The errno of a failed TCP connect to ``host:port`` from here (None: it connected;
    ``errno.ETIMEDOUT``: no answer within ``timeout``)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except TimeoutError:
        return errno.ETIMEDOUT
    except OSError as exc:
        return exc.errno
