"""A per-replica circuit breaker: stop sending to a replica that keeps failing, for a while.

Pure code with injected times (``now``: seconds on one clock that never goes back;
the pool passes ``anyio.current_time()``). The pool asks ``allows`` before it picks a
replica and reports each attempt's outcome with ``success`` or ``failure`` (a 5xx, a
connection error, a timeout: LiteLLM never cooled a deployment on a connection error,
so a dead host kept taking traffic). A 429 calls ``cool`` with its ``Retry-After``.

=============  =======================================================================
state          meaning
=============  =======================================================================
``CLOSED``     allowed; ``failures_to_open`` failures, each less than ``window``
               seconds old and with no success since, open it for ``cooldown``
``OPEN``       refused until ``opened_until``; outcomes of attempts sent before it
               opened are ignored (they neither extend nor shorten the deadline)
``HALF_OPEN``  the deadline has passed: allowed; ``successes_to_close`` successes
               close it, one failure opens it again for a fresh ``cooldown``
=============  =======================================================================

Deadlines only move later while open: ``cool`` keeps the later of the current
deadline and its own (LiteLLM's users' bug: a second cooldown kept the earlier,
shorter deadline, so a replica that asked for 60 s was hit again after 5 s).
Memory is bounded: at most ``failures_to_open`` failure times are kept.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field

from ._errors import ConfigError

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(enum.Enum):
    """Where a circuit breaker is at a given moment."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(eq=False)
class CircuitBreaker:
    """One replica's circuit breaker; see the module docstring for its rules.

    Attributes:
        failures_to_open: failures within ``window`` seconds that open it.
        window: how long, in seconds, a failure counts.
        cooldown: how long, in seconds, it stays open before it half-opens.
        successes_to_close: successes while half-open that close it.
    """

    failures_to_open: int = 5
    window: float = 60.0
    cooldown: float = 30.0
    successes_to_close: int = 2
    _opened_until: float | None = field(default=None, init=False, repr=False)
    _failures: deque[float] = field(init=False, repr=False)
    _successes: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        _check(self.failures_to_open >= 1, "failures_to_open", self.failures_to_open, ">= 1")
        _check(self.successes_to_close >= 1, "successes_to_close", self.successes_to_close, ">= 1")
        _check(0 < self.window < math.inf, "window", self.window, "> 0 and finite")
        _check(0 <= self.cooldown < math.inf, "cooldown", self.cooldown, ">= 0 and finite")
        self._failures = deque(maxlen=self.failures_to_open)

    @property
    def opened_until(self) -> float | None:
        """When it stops being open (``None``: closed); at or past it, it is half-open."""
        return self._opened_until

    def state(self, now: float) -> BreakerState:
        """Its state at ``now``: open turns half-open by itself once the deadline passes."""
        if self._opened_until is None:
            return BreakerState.CLOSED
        return BreakerState.OPEN if now < self._opened_until else BreakerState.HALF_OPEN

    def allows(self, now: float) -> bool:
        """Whether a request may be sent to the replica at ``now`` (closed or half-open)."""
        return self.state(now) is not BreakerState.OPEN

    def success(self, now: float) -> None:
        """An attempt succeeded: closed, the failure history is cleared; half-open, it
        counts toward closing."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            self._failures.clear()
        elif state is BreakerState.HALF_OPEN:
            self._successes += 1
            if self._successes >= self.successes_to_close:
                self._opened_until, self._successes = None, 0

    def failure(self, now: float) -> None:
        """An attempt failed: closed, it opens at ``failures_to_open`` within ``window``;
        half-open, it opens again for a fresh ``cooldown``."""
        state = self.state(now)
        if state is BreakerState.HALF_OPEN:
            self._open(now + self.cooldown)
        elif state is BreakerState.CLOSED:
            self._failures.append(now)
            if self._recent_failures(now) >= self.failures_to_open:
                self._open(now + self.cooldown)

    def cool(self, now: float, seconds: float) -> None:
        """Open at once for ``seconds`` (a 429's ``Retry-After``), unless already open
        until later: a shorter cooldown never shortens the current one."""
        if not 0 <= seconds < math.inf:
            raise ValueError(f"a cooldown's seconds must be >= 0 and finite, not {seconds!r}")
        self._open(now + seconds)

    def _open(self, until: float) -> None:
        """Open (or stay open) until ``until`` or the current deadline, whichever is later."""
        current = self._opened_until
        self._opened_until = until if current is None else max(current, until)
        self._failures.clear()
        self._successes = 0

    def _recent_failures(self, now: float) -> int:
        """How many of the kept failures are less than ``window`` seconds old."""
        return sum(1 for t in self._failures if now - t < self.window)


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    """Raise ``ConfigError`` naming the setting unless ``ok``."""
    if not ok:
        raise ConfigError(f"circuit breaker {name} must be {allowed}, not {value!r}")
