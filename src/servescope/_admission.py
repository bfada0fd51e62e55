"""Admission control at the front: at most ``max_concurrency`` requests are worked on,
at most ``queue_size`` wait their turn (first come, first served), none for longer than
``queue_timeout`` — never an unbounded queue. A request turned away gets an HTTP status
and a ``Retry-After`` the client can honour (the openai SDK does): 429 when the queue is
full, 503 when its wait ran out.

``decide`` is the pure decision (table-tested); ``Admission`` holds the counters and the
queue and hands a freed slot straight to the longest waiter, so a newcomer can never
overtake the queue.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

__all__ = ["Admission", "Decision", "Rejected", "decide"]

#: What a turned-away client is told to wait before trying again (seconds).
RETRY_AFTER = 1


class Decision(enum.Enum):
    RUN = "run"
    QUEUE = "queue"
    REJECT = "reject"


def decide(running: int, waiting: int, max_concurrency: int, queue_size: int) -> Decision:
    """What to do with a new request, given how many run and wait."""
    if running < max_concurrency and waiting == 0:
        return Decision.RUN
    if waiting < queue_size:
        return Decision.QUEUE
    return Decision.REJECT


@dataclass(frozen=True)
class Rejected(Exception):
    """A request the front turns away: the status to answer, why, and Retry-After."""

    status: int
    reason: str
    retry_after: int = RETRY_AFTER

    def __str__(self) -> str:
        return self.reason


class Admission:
    """The front's request slots and their queue."""

    def __init__(self, max_concurrency: int, queue_size: int, queue_timeout: float) -> None:
        self.max_concurrency = max_concurrency
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.running = 0
        self.rejected = collections.Counter[int]()  # by status
        self._queue: collections.deque[anyio.Event] = collections.deque()

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot now."""
        return len(self._queue)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot for the block; ``Rejected`` if none can be had."""
        await self._enter()
        try:
            yield
        finally:
            self._leave()

    async def _enter(self) -> None:
        decision = decide(self.running, len(self._queue), self.max_concurrency, self.queue_size)
        if decision is Decision.RUN:
            self.running += 1
            return
        if decision is Decision.REJECT:
            self.rejected[429] += 1
            raise Rejected(
                429, f"the front is at capacity: {self.running} running, {self.waiting} queued"
            )
        turn = anyio.Event()
        self._queue.append(turn)
        try:
            with anyio.move_on_after(self.queue_timeout):
                await turn.wait()
        except BaseException:
            if turn.is_set():  # handed a slot, then cancelled: pass it on
                self._leave()
            else:
                self._queue.remove(turn)
            raise
        if not turn.is_set():
            self._queue.remove(turn)
            self.rejected[503] += 1
            raise Rejected(503, f"no turn within the queue timeout ({self.queue_timeout:g} s)")

    def _leave(self) -> None:
        if self._queue:
            self._queue.popleft().set()  # the slot goes straight to the longest waiter
        else:
            self.running -= 1
