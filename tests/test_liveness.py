"""The liveness channel between node scopes (``_liveness``): frames, authentication,
and what each end sees when the other ends, fails, dies, falls silent or lies — over
real TCP on 127.0.0.1, on asyncio and trio."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from servescope._liveness import (
    MAX_FRAME,
    Frame,
    HeadLink,
    HeadRefused,
    LinkSettings,
    WorkerLink,
    encode,
    join_mac,
    parse_frame,
    welcome_mac,
)

pytestmark = pytest.mark.anyio
SETTINGS = LinkSettings("job-token", 2, heartbeat_interval=0.05, node_timeout=0.5)


@pytest.mark.parametrize(
    ("line", "frame"),
    [
        (b"HELLO abc", Frame("HELLO", ("abc",))),
        (b"JOIN 1 2 ff00", Frame("JOIN", ("1", "2", "ff00"))),
        (b"BEAT", Frame("BEAT")),
        (b"UP\r", Frame("UP")),
        (b"END ok", Frame("END", ("ok",))),
        (b"END failed engine died: oom", Frame("END", ("failed engine died: oom",))),
        (b"READY http://10.0.0.1:8000", Frame("READY", ("http://10.0.0.1:8000",))),
        (b"REFUSED wrong token", Frame("REFUSED", ("wrong token",))),
        (b"BEAT extra", None),
        (b"JOIN 1 2", None),
        (b"JOIN x 2 ff", None),
        (b"JOIN 9999999 2 ff", None),
        (b"HELLO", None),
        (b"HELLO a b", None),
        (b"END", None),
        (b"NOPE", None),
        (b"", None),
        ("BEAT\u00e9".encode(), None),
        (b"BEAT\x00", None),
        (b"END " + b"x" * MAX_FRAME, None),
    ],
)
def test_frames(line: bytes, frame: Frame | None) -> None:
    assert parse_frame(line) == frame


@given(st.text(max_size=800))
def test_an_end_reason_always_encodes_to_one_parseable_frame(reason: str) -> None:
    line = encode("END", "failed", reason)
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and len(line) <= MAX_FRAME
    frame = parse_frame(line[:-1])
    assert frame is not None and frame.kind == "END"


def test_macs_bind_token_nonce_and_rank() -> None:
    mac = join_mac("t", "n", 1, 2)
    assert mac == join_mac("t", "n", 1, 2)
    assert (
        len({mac, join_mac("u", "n", 1, 2), join_mac("t", "m", 1, 2), join_mac("t", "n", 2, 2)})
        == 4
    )
    assert welcome_mac("t", "n", 1) != welcome_mac("t", "n", 2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Seen:
    def __init__(self) -> None:
        self.lost: list[str] = []
        self.notes: list[str] = []
        self.ready: list[str] = []
        self.head_end: list[str | None] = []
        self.lost_event = anyio.Event()
        self.end_event = anyio.Event()
        self.failure: str | None = None

    def on_lost(self, reason: str) -> None:
        self.lost.append(reason)
        self.lost_event.set()

    def on_head_end(self, reason: str | None) -> None:
        self.head_end.append(reason)
        self.end_event.set()


@asynccontextmanager
async def head(
    seen: Seen, settings: LinkSettings = SETTINGS
) -> AsyncIterator[tuple[HeadLink, int]]:
    link = HeadLink(
        settings, on_lost=seen.on_lost, note=seen.notes.append, outcome=lambda: seen.failure
    )
    port = free_port()
    async with anyio.create_task_group() as tg:
        await tg.start(link.run, "127.0.0.1", port)
        yield link, port
        tg.cancel_scope.cancel()


def worker(seen: Seen, settings: LinkSettings = SETTINGS, rank: int = 1) -> WorkerLink:
    return WorkerLink(
        settings,
        rank,
        on_ready=seen.ready.append,
        on_head_end=seen.on_head_end,
        note=seen.notes.append,
        outcome=lambda: seen.failure,
    )


async def test_join_up_ready_and_a_normal_end(anyio_backend: str) -> None:
    at_head, at_worker = Seen(), Seen()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as outer:
            async with head(at_head) as (link, port):
                node = worker(at_worker)
                await outer.start(node.run, "127.0.0.1", port)
                assert link.missing() == [1]
                node.up.set()
                await link.all_up.wait()
                await link.announce_ready("http://127.0.0.1:1234")
                for _ in range(500):
                    if at_worker.ready:
                        break
                    await anyio.sleep(0.01)
                await anyio.sleep(0.3)  # heartbeats keep both sides alive past ... beats
                assert not at_head.lost
            await at_worker.end_event.wait()
    assert at_worker.ready == ["http://127.0.0.1:1234"]
    assert at_worker.head_end == [None]
    assert any("node 1 joined" in note for note in at_head.notes)


async def test_a_failed_head_tells_its_reason(anyio_backend: str) -> None:
    at_head, at_worker = Seen(), Seen()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as outer:
            async with head(at_head) as (_, port):
                await outer.start(worker(at_worker).run, "127.0.0.1", port)
                at_head.failure = "fatal line: CUDA out of memory"
            await at_worker.end_event.wait()
    assert at_worker.head_end == ["the head failed: fatal line: CUDA out of memory"]


async def test_a_worker_ending_or_failing_fails_the_head(anyio_backend: str) -> None:
    for failure, expected in [
        (None, "ended its scope"),
        ("server exited with code 1", "failed: server exited with code 1"),
    ]:
        at_head, at_worker = Seen(), Seen()
        with anyio.fail_after(10):
            async with head(at_head) as (_, port):
                async with anyio.create_task_group() as tg:
                    await tg.start(worker(at_worker).run, "127.0.0.1", port)
                    at_worker.failure = failure
                    tg.cancel_scope.cancel()
                await at_head.lost_event.wait()
        assert at_head.lost == [
            f"node 1 (127.0.0.1:{at_head.lost[0].split(':')[1].split(')')[0]}) {expected}"
        ]


async def joined_socket(
    port: int, rank: int = 1, token: str = "job-token"
) -> anyio.abc.SocketStream:
    """A hand-made node: authenticates, then does whatever the test does."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    hello = b""
    while not hello.endswith(b"\n"):
        hello += await stream.receive(1)
    nonce = hello.decode().split()[1]
    await stream.send(encode("JOIN", str(rank), "2", join_mac(token, nonce, rank, 2)))
    return stream


async def test_a_node_killed_or_silent_is_lost_within_node_timeout(anyio_backend: str) -> None:
    # Killed: the kernel closes its connection, with no END.
    at_head = Seen()
    with anyio.fail_after(10):
        async with head(at_head) as (_, port):
            stream = await joined_socket(port)
            await anyio.sleep(0.1)
            await stream.aclose()
            await at_head.lost_event.wait()
    assert "its link closed without an END" in at_head.lost[0]
    # Silent (cut off, hung): nothing for node_timeout.
    at_head = Seen()
    with anyio.fail_after(10):
        async with head(at_head) as (_, port):
            stream = await joined_socket(port)
            started = anyio.current_time()
            await at_head.lost_event.wait()
            waited = anyio.current_time() - started
            await stream.aclose()
    assert "nothing heard for 0.5 s" in at_head.lost[0]
    assert 0.4 <= waited < 3


@asynccontextmanager
async def fake_head(welcome: Callable[[str], str]) -> AsyncIterator[int]:
    """A listener that says HELLO, reads the JOIN, answers ``WELCOME welcome(nonce)`` and
    then stays silent; yields its port."""
    port = free_port()
    async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port) as listener:

        async def answer(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                await stream.send(encode("HELLO", "n0"))
                await stream.receive()
                await stream.send(encode("WELCOME", welcome("n0")))
                await anyio.sleep(5)

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, answer)
            yield port
            tg.cancel_scope.cancel()


async def test_a_silent_or_vanished_head_is_lost(anyio_backend: str) -> None:
    at_worker = Seen()
    with anyio.fail_after(10):
        async with fake_head(lambda nonce: welcome_mac("job-token", nonce, 1)) as port:
            await worker(at_worker).run("127.0.0.1", port)
    assert at_worker.head_end == [
        "the head is lost: nothing heard for 0.5 s (node_timeout): dead or cut off"
    ]


async def test_strangers_are_refused_and_the_head_goes_on(anyio_backend: str) -> None:
    at_head, at_worker = Seen(), Seen()
    with anyio.fail_after(10):
        async with head(at_head) as (_, port):
            # wrong token, garbage, an endless line, a rank that is not a worker's
            bad = await joined_socket(port, token="guess")
            assert b"REFUSED wrong token" in await bad.receive()
            await bad.aclose()
            garbage = await anyio.connect_tcp("127.0.0.1", port)
            await garbage.send(b"\xff\x00" * 2000 + b"\n")
            await garbage.aclose()
            rank0 = await joined_socket(port, rank=0)
            assert b"REFUSED rank 0 is not a worker rank" in await rank0.receive()
            await rank0.aclose()
            with pytest.raises(HeadRefused, match="wrong token"):
                await worker(Seen(), LinkSettings("other", 2, 0.05, 0.5)).run("127.0.0.1", port)
            with pytest.raises(HeadRefused, match="expects 3 nodes"):
                await worker(Seen(), LinkSettings("job-token", 3, 0.05, 0.5)).run("127.0.0.1", port)
            async with anyio.create_task_group() as tg:
                await tg.start(worker(at_worker).run, "127.0.0.1", port)
                with pytest.raises(HeadRefused, match="node 1 has joined already"):
                    await worker(Seen()).run("127.0.0.1", port)
                tg.cancel_scope.cancel()
            await at_head.lost_event.wait()
    assert sum("refused a liveness connection" in note for note in at_head.notes) >= 5
    assert len(at_head.lost) == 1  # only the one real node, when it ended


async def test_an_impostor_head_cannot_end_a_node(anyio_backend: str) -> None:
    with anyio.fail_after(10):
        async with fake_head(lambda nonce: "00" * 32) as port:
            with pytest.raises(HeadRefused, match="did not prove it holds the job's token"):
                await worker(Seen()).run("127.0.0.1", port)


async def test_a_worker_waits_for_a_head_not_listening_yet(anyio_backend: str) -> None:
    at_head, at_worker = Seen(), Seen()
    port = free_port()
    link = HeadLink(
        SETTINGS, on_lost=at_head.on_lost, note=at_head.notes.append, outcome=lambda: None
    )
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            node = worker(at_worker)
            tg.start_soon(node.run, "127.0.0.1", port)
            await anyio.sleep(0.6)  # refused a few times meanwhile
            await tg.start(link.run, "127.0.0.1", port)
            node.up.set()
            await link.all_up.wait()
            tg.cancel_scope.cancel()
