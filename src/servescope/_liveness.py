"""servescope's own liveness channel between the node scopes of a multi-node server.

The engines do not watch each other (an idle vLLM head never notices a dead worker
node; a headless worker outlives its head; Ray notices a partition after 65 s), so the
scopes do: the head listens on its liveness port, every other node connects to it, and
both ends send a heartbeat every ``heartbeat_interval`` seconds. Nothing heard for
``node_timeout`` seconds, or the connection closed without an ``END``, means the other
side is lost.

Frames are ASCII lines of at most ``MAX_FRAME`` bytes::

    head → node      HELLO <nonce>                 on connect: the challenge
    node → head      JOIN <rank> <nnodes> <mac>    HMAC-SHA256(token, nonce, rank, nnodes)
    head → node      WELCOME <mac>                 HMAC(token, "welcome", nonce, rank): the
                                                   head knows the token too
                     REFUSED <why>                 (then closes)
    node → head      UP                            its part is up (Ray joined, engine spawned)
    head → node      READY <url>                   the head serves requests at url
    both             BEAT                          a heartbeat
    both             END ok | END failed <reason>  the scope ends (normally, or why not)

A connection that does not authenticate within ``node_timeout`` is closed and noted,
never a failure: anyone on the network may knock. The frames are decided here
(``parse_frame``, ``join_mac``, ``welcome_mac``: pure); ``HeadLink`` and ``WorkerLink``
do the I/O and report what they see through callbacks.
"""

from __future__ import annotations

import hmac
import itertools
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import sha256

import anyio
from anyio.abc import SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

__all__ = [
    "MAX_FRAME",
    "Frame",
    "HeadLink",
    "LinkSettings",
    "WorkerLink",
    "encode",
    "join_mac",
    "parse_frame",
    "welcome_mac",
]

MAX_FRAME = 512
#: How long the head's ``END`` may take to reach the nodes as its scope ends.
END_SEND_LIMIT = 1.0
#: A node retries a refused connection to the head this often while it starts.
CONNECT_RETRY = 0.25
_KINDS = frozenset({"HELLO", "JOIN", "WELCOME", "REFUSED", "UP", "READY", "BEAT", "END"})


@dataclass(frozen=True)
class Frame:
    """One frame: its kind and its space-separated arguments (the last one may hold spaces)."""

    kind: str
    args: tuple[str, ...] = ()


def parse_frame(line: bytes) -> Frame | None:
    """The frame in ``line`` (without its newline), or ``None`` if it is not one."""
    if len(line) > MAX_FRAME or not line.isascii():
        return None
    text = line.decode("ascii").strip()
    kind, _, rest = text.partition(" ")
    if kind not in _KINDS or not text.isprintable():
        return None
    if kind in ("HELLO", "WELCOME", "READY"):
        return Frame(kind, (rest,)) if rest and " " not in rest else None
    if kind == "JOIN":
        parts = rest.split(" ")
        if len(parts) != 3 or not all(part.isdigit() and len(part) <= 6 for part in parts[:2]):
            return None
        return Frame(kind, tuple(parts))
    if kind in ("REFUSED", "END"):
        return Frame(kind, (rest,)) if rest else None
    return Frame(kind) if not rest else None


def encode(kind: str, *args: str) -> bytes:
    """A frame's line, cut to ``MAX_FRAME`` bytes, non-ASCII and line breaks replaced."""
    text = " ".join((kind, *args)).encode("ascii", "replace").decode("ascii")
    text = "".join(char if char.isprintable() else " " for char in text)
    return text[: MAX_FRAME - 1].encode("ascii") + b"\n"


def join_mac(token: str, nonce: str, rank: int, nnodes: int) -> str:
    """The node's proof that it holds the job's token (bound to this challenge)."""
    message = f"join|{nonce}|{rank}|{nnodes}".encode()
    return hmac.new(token.encode(), message, sha256).hexdigest()


def welcome_mac(token: str, nonce: str, rank: int) -> str:
    """The head's proof that it holds the token too (a stranger cannot end our nodes)."""
    return hmac.new(token.encode(), f"welcome|{nonce}|{rank}".encode(), sha256).hexdigest()


@dataclass(frozen=True)
class LinkSettings:
    """What both ends share: the job's token, the node count, the timing."""

    token: str
    nnodes: int
    heartbeat_interval: float
    node_timeout: float


class _Peer:
    """One connection: frames in, frames out (one sender at a time), heartbeats."""

    def __init__(self, stream: SocketStream, settings: LinkSettings) -> None:
        self.stream = stream
        self.frames = BufferedByteReceiveStream(stream)
        self.settings = settings
        self.lock = anyio.Lock()
        self.address = _remote(stream)

    async def send(self, kind: str, *args: str) -> bool:
        """Send a frame; ``False`` if the connection is gone (the reader will say why)."""
        try:
            async with self.lock:
                await self.stream.send(encode(kind, *args))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return False
        return True

    async def receive(self, limit: float) -> Frame | str:
        """The next frame, or why none came: ``"closed"``, ``"silent"``, ``"garbage"``."""
        with anyio.move_on_after(limit):
            try:
                line = await self.frames.receive_until(b"\n", MAX_FRAME)
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                return "closed"
            except anyio.DelimiterNotFound:
                return "garbage"
            except (anyio.ClosedResourceError, OSError):
                return "closed"
            frame = parse_frame(line)
            return frame if frame is not None else "garbage"
        return "silent"

    async def beat(self) -> None:
        """Send heartbeats until the connection breaks (or the task is cancelled)."""
        for _ in itertools.count():
            if not await self.send("BEAT"):
                return
            await anyio.sleep(self.settings.heartbeat_interval)

    async def end(self, reason: str | None) -> None:
        """Say how the scope ends, within ``END_SEND_LIMIT``, then close."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(END_SEND_LIMIT):
            if reason is None:
                await self.send("END", "ok")
            else:
                await self.send("END", "failed", reason)
            await self.stream.aclose()


def _remote(stream: SocketStream) -> str:
    try:
        address = stream.extra(anyio.abc.SocketAttribute.remote_address)
    except (anyio.TypedAttributeLookupError, OSError):
        return "(unknown)"
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address)


def _lost_reason(why: str, timeout: float) -> str:
    if why == "silent":
        return f"nothing heard for {timeout:g} s (node_timeout): dead or cut off"
    if why == "garbage":
        return "sent something that is not a liveness frame"
    return "its link closed without an END (its scope or machine died)"


class HeadLink:
    """The head's end: accepts each other node once, hears it, tells it how things go.

    ``on_lost(reason)`` is called once when a joined node is lost (or ends), naming it;
    ``all_up`` is set once every node has said ``UP``; ``outcome()`` (called as the
    scope ends) says how it ends: ``None`` normally, else the failure's reason.
    """

    def __init__(
        self,
        settings: LinkSettings,
        *,
        on_lost: Callable[[str], None],
        note: Callable[[str], None],
        outcome: Callable[[], str | None],
    ) -> None:
        self.settings = settings
        self.on_lost = on_lost
        self.note = note
        self.outcome = outcome
        self.joined: dict[int, _Peer] = {}
        self.up: set[int] = set()
        self.all_up = anyio.Event()
        self.ready_url: str | None = None
        self.port: int | None = None
        if settings.nnodes == 1:
            self.all_up.set()

    def missing(self) -> list[int]:
        """The nodes that have not said ``UP`` yet."""
        return [rank for rank in range(1, self.settings.nnodes) if rank not in self.up]

    async def run(self, host: str, port: int, *, task_status: TaskStatus[None]) -> None:
        """Listen on ``host:port`` (started once listening) until cancelled; then each
        joined node is told how the scope ended (``END``)."""
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        self.port = port
        async with listener, anyio.create_task_group() as tg:
            task_status.started()
            await listener.serve(self._serve, task_group=tg)

    async def announce_ready(self, url: str) -> None:
        """Tell every node (and those joining later) that the head serves at ``url``."""
        self.ready_url = url
        for peer in list(self.joined.values()):
            await peer.send("READY", url)

    async def _serve(self, stream: SocketStream) -> None:
        peer = _Peer(stream, self.settings)
        rank = None
        reason = None
        try:
            rank = await self._admit(peer)
            if rank is None:
                return
            self.joined[rank] = peer
            self.note(f"node {rank} joined from {peer.address}")
            async with anyio.create_task_group() as tg:
                tg.start_soon(peer.beat)
                if self.ready_url is not None:
                    await peer.send("READY", self.ready_url)
                reason = await self._hear(peer, rank)
                tg.cancel_scope.cancel()
        finally:
            if rank is not None and reason is None:  # the head's scope ends: say how
                await peer.end(self.outcome())
            else:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
        self.on_lost(f"node {rank} ({peer.address}) {reason}")

    async def _admit(self, peer: _Peer) -> int | None:
        """The node's rank once it proved it holds the token; ``None`` (noted) if not."""
        nonce = secrets.token_hex(16)
        await peer.send("HELLO", nonce)
        frame = await peer.receive(self.settings.node_timeout)
        why = None
        if not isinstance(frame, Frame) or frame.kind != "JOIN":
            why = "no JOIN"
        else:
            rank, nnodes, mac = int(frame.args[0]), int(frame.args[1]), frame.args[2]
            expected = join_mac(self.settings.token, nonce, rank, nnodes)
            if not hmac.compare_digest(mac, expected):
                why = "wrong token"
            elif nnodes != self.settings.nnodes:
                why = f"it expects {nnodes} nodes, this head {self.settings.nnodes}"
            elif not 0 < rank < self.settings.nnodes:
                why = f"rank {rank} is not a worker rank of {self.settings.nnodes} nodes"
            elif rank in self.joined:
                why = f"node {rank} has joined already"
            else:
                await peer.send("WELCOME", welcome_mac(self.settings.token, nonce, rank))
                return rank
        self.note(f"refused a liveness connection from {peer.address}: {why}")
        await peer.send("REFUSED", why)
        return None

    async def _hear(self, peer: _Peer, rank: int) -> str:
        """Read the node's frames until it is lost; why it was."""
        timeout = self.settings.node_timeout
        while True:
            frame = await peer.receive(timeout)
            if not isinstance(frame, Frame):
                return _lost_reason(frame, timeout)
            if frame.kind == "UP":
                self.up.add(rank)
                self.note(f"node {rank} is up")
                if not self.missing():
                    self.all_up.set()
            elif frame.kind == "END":
                outcome = frame.args[0]
                if outcome == "ok":
                    return "ended its scope"
                return f"failed: {outcome.removeprefix('failed').strip()}"


class HeadRefused(Exception):
    """The head refused this node (wrong token, rank or node count)."""


class WorkerLink:
    """A worker node's end: joins the head, says when it is up, hears how the head goes.

    ``on_ready(url)`` when the head serves; ``on_head_end(reason)`` once when the head's
    scope ends (``None``: normally) or it is lost (the reason).
    """

    def __init__(
        self,
        settings: LinkSettings,
        rank: int,
        *,
        on_ready: Callable[[str], None],
        on_head_end: Callable[[str | None], None],
        note: Callable[[str], None],
        outcome: Callable[[], str | None],
    ) -> None:
        self.settings = settings
        self.rank = rank
        self.on_ready = on_ready
        self.on_head_end = on_head_end
        self.note = note
        self.outcome = outcome
        self.up = anyio.Event()

    async def run(
        self, host: str, port: int, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect (retrying while the head is not listening yet), join, then hear the
        head until it ends; started once joined. Raises ``HeadRefused`` if refused."""
        stream = await self._connect(host, port)
        peer = _Peer(stream, self.settings)
        try:
            await self._join(peer)
            task_status.started()
            async with anyio.create_task_group() as tg:
                tg.start_soon(peer.beat)
                tg.start_soon(self._say_up, peer)
                ended = await self._hear(peer)
                tg.cancel_scope.cancel()
        finally:
            await peer.end(self.outcome())  # closes the connection
        self.on_head_end(ended)

    async def _connect(self, host: str, port: int) -> SocketStream:
        while True:
            try:
                return await anyio.connect_tcp(host, port)
            except OSError:
                await anyio.sleep(CONNECT_RETRY)

    async def _join(self, peer: _Peer) -> None:
        hello = await peer.receive(self.settings.node_timeout)
        if not isinstance(hello, Frame) or hello.kind != "HELLO":
            raise HeadRefused(f"{peer.address} is not a servescope head (no HELLO)")
        nonce = hello.args[0]
        mac = join_mac(self.settings.token, nonce, self.rank, self.settings.nnodes)
        await peer.send("JOIN", str(self.rank), str(self.settings.nnodes), mac)
        answer = await peer.receive(self.settings.node_timeout)
        if isinstance(answer, Frame) and answer.kind == "REFUSED":
            raise HeadRefused(f"the head at {peer.address} refused this node: {answer.args[0]}")
        expected = welcome_mac(self.settings.token, nonce, self.rank)
        if not (
            isinstance(answer, Frame)
            and answer.kind == "WELCOME"
            and hmac.compare_digest(answer.args[0], expected)
        ):
            raise HeadRefused(f"{peer.address} did not prove it holds the job's token")
        self.note(f"joined the head at {peer.address} as node {self.rank}")

    async def _say_up(self, peer: _Peer) -> None:
        await self.up.wait()
        await peer.send("UP")

    async def _hear(self, peer: _Peer) -> str | None:
        timeout = self.settings.node_timeout
        while True:
            frame = await peer.receive(timeout)
            if not isinstance(frame, Frame):
                return f"the head is lost: {_lost_reason(frame, timeout)}"
            if frame.kind == "READY":
                self.on_ready(frame.args[0])
            elif frame.kind == "END":
                outcome = frame.args[0]
                if outcome == "ok":
                    return None
                return f"the head failed: {outcome.removeprefix('failed').strip()}"
