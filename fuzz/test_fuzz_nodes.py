"""The multi-node parts under arbitrary input: the liveness channel's head fed any bytes
a stranger on the network may send (it must refuse and go on, never fail the scope or
hang), frames parsed from any bytes, and node roles from any environment."""

from __future__ import annotations

import socket

import anyio
from hypothesis import given
from hypothesis import strategies as st

from servescope import ConfigError, NodesConfig
from servescope._liveness import Frame, HeadLink, LinkSettings, join_mac, parse_frame
from servescope._nodes import first_slurm_host, resolve_role

SETTINGS = LinkSettings("token", 2, heartbeat_interval=0.05, node_timeout=0.2)
FRAMES = st.sampled_from(
    [b"JOIN 1 2 ", b"JOIN 0 2 ", b"JOIN 1 3 ", b"UP\n", b"BEAT\n", b"END ok\n", b"END failed x\n"]
)


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _knock(data: bytes, honest_nonce: bool) -> tuple[list[str], int]:
    lost: list[str] = []
    link = HeadLink(SETTINGS, on_lost=lost.append, note=lambda _: None, outcome=lambda: None)
    port = _port()
    received = 0
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(link.run, "127.0.0.1", port)
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                hello = await stream.receive()
                if honest_nonce:  # a stranger that knows the protocol, not the token
                    nonce = hello.decode().split()[1]
                    data = data.replace(b"MAC", join_mac("guess", nonce, 1, 2).encode())
                await stream.send(data)
                with anyio.move_on_after(0.5):
                    while True:
                        try:
                            received += len(await stream.receive())
                        except (anyio.EndOfStream, anyio.BrokenResourceError):
                            break
            tg.cancel_scope.cancel()
    return lost, len(link.joined)


@given(
    st.lists(FRAMES | st.just(b"MAC\n") | st.binary(max_size=80), max_size=6).map(b"".join),
    st.booleans(),
)
def test_strangers_never_join_nor_fail_the_head(data: bytes, honest_nonce: bool) -> None:
    lost, joined = anyio.run(_knock, data, honest_nonce)
    assert joined == 0 and lost == []


@given(st.binary(max_size=700))
def test_frames(data: bytes) -> None:
    frame = parse_frame(data)
    assert frame is None or (isinstance(frame, Frame) and frame.kind.isupper())


NAMES = st.sampled_from(
    [
        "NNODES",
        "NODE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_NNODES",
        "SLURM_NODEID",
        "SLURM_JOB_NODELIST",
        "SLURM_NODELIST",
        "DATATROVE_NODE_RANK",
        "DATATROVE_NODE_IPS",
    ]
)


@given(st.dictionaries(NAMES, st.text(max_size=40) | st.integers(-5, 9).map(str)))
def test_roles_from_any_environment(env: dict[str, str]) -> None:
    try:
        role = resolve_role(NodesConfig(), env, first_slurm_host)
    except ConfigError as exc:
        message = str(exc)
    else:
        assert 0 <= role.rank < role.nnodes and role.master_addr
        return
    assert message and "Traceback" not in message
