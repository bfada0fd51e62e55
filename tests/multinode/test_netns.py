"""The namespace nodes themselves: connected, fenced off from the root namespace, cuttable,
and gone without a trace at the end."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from . import netns
from .netns import HEAD_IP, WORKER_IP, NetNodes, NetnsUnavailable, Node, net_nodes

PORT = 5000
_LISTENER = (
    "import socket, sys\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)\n"
    "print('listening', flush=True)\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(b'hello from ' + sys.argv[1].encode()); c.close()\n"
)
_CLIENT = (
    "import socket, sys\n"
    "try:\n"
    "    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0)\n"
    "    print(c.recv(100).decode())\n"
    "except OSError as exc:\n"
    "    print('failed', exc.errno); sys.exit(1)\n"
)


def _listen(node: Node, tmp_path: Path) -> None:
    log = tmp_path / f"listener-{node.name}.log"
    proc = node.spawn([sys.executable, "-c", _LISTENER, node.ip, str(PORT)], log=log)
    netns.wait_for_line(log, "^listening$", timeout=10, proc=proc)


def _hello(node: Node, ip: str) -> str:
    return node.run([sys.executable, "-c", _CLIENT, ip, str(PORT)], timeout=10).stdout.strip()


def _other_route_holders(ours: str) -> bool:
    try:
        state = json.loads(netns._ROUTE_STATE.read_text())
    except (OSError, ValueError):
        return False
    return any(not h.endswith(":" + ours) for h in state.get("holders", []))


def test_nodes_reach_each_other_over_tcp(netnodes: NetNodes, tmp_path: Path) -> None:
    for node in netnodes.nodes:
        _listen(node, tmp_path)
    assert _hello(netnodes.worker, HEAD_IP) == f"hello from {HEAD_IP}"
    assert _hello(netnodes.head, WORKER_IP) == f"hello from {WORKER_IP}"
    assert [n.rank for n in netnodes.nodes] == [0, 1]
    ifaces = netnodes.head.run(["ip", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert f"{HEAD_IP}/24" in ifaces


def test_root_namespace_cannot_reach_the_nodes(netnodes: NetNodes, tmp_path: Path) -> None:
    _listen(netnodes.head, tmp_path)
    assert netns.route_present()
    # The unreachable route answers at once: no packet leaves the machine.
    assert netns.connect_errno(HEAD_IP, PORT, timeout=2.0) == errno.EHOSTUNREACH


def test_cut_and_restore(netnodes: NetNodes, tmp_path: Path) -> None:
    for node in netnodes.nodes:
        _listen(node, tmp_path)
    netnodes.worker.cut()
    assert _hello(netnodes.head, WORKER_IP).startswith("failed")
    assert _hello(netnodes.worker, HEAD_IP).startswith("failed")
    netnodes.worker.restore()
    deadline = time.monotonic() + 5.0
    while (answer := _hello(netnodes.worker, HEAD_IP)).startswith("failed"):
        assert time.monotonic() < deadline, answer
        time.sleep(0.1)
    assert answer == f"hello from {HEAD_IP}"


def test_teardown_leaves_no_namespace_route_or_process(tmp_path: Path) -> None:
    try:
        with net_nodes() as nodes:
            procs = [
                node.spawn(
                    [
                        sys.executable,
                        "-c",
                        "import signal, time\n"
                        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)",
                    ],
                    log=tmp_path / f"{node.name}.log",
                )
                for node in nodes.nodes
            ]
            names = [node.name for node in nodes.nodes]
            deadline = time.monotonic() + 5.0
            while not all(node.pids() for node in nodes.nodes):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            base = names[0][:-1]
    except NetnsUnavailable as exc:
        netns.skip_unavailable(exc)
    assert all(proc.returncode == -signal.SIGKILL for proc in procs)
    assert not set(names) & netns._namespaces()
    if not _other_route_holders(base):
        assert not netns.route_present()


def test_setup_failing_half_way_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    real_ip = netns._ip
    made: list[str] = []

    def failing_ip(*args: str, check: bool = True) -> object:
        if args[:2] == ("netns", "add"):
            made.append(args[2])
        if "veth" in args:
            raise RuntimeError("veth refused (injected)")
        return real_ip(*args, check=check)

    monkeypatch.setattr(netns, "_ip", failing_ip)
    try:
        with pytest.raises(RuntimeError, match="injected"), net_nodes():
            pass
    except NetnsUnavailable as exc:
        netns.skip_unavailable(exc)
    monkeypatch.undo()
    assert len(made) == 2
    assert not set(made) & netns._namespaces()
    if not _other_route_holders(made[0][:-1]):
        assert not netns.route_present()


def test_wait_for_line_fails_with_the_tail(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("one\ntwo\n")
    assert netns.wait_for_line(log, "^two$", timeout=1) < 1
    with pytest.raises(AssertionError, match=r"(?s)0\.2 s passed.*two"):
        netns.wait_for_line(log, "three", timeout=0.2)
    assert os.environ.get("SERVESCOPE_TEST_RUN")
