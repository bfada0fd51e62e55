"""Request metrics: counters, token throughput over a window, latency percentiles.

Cheap enough to leave on: recording is a few integer updates and one append to a
bounded deque; the percentiles are computed only when a snapshot is taken.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass

__all__ = ["Metrics", "MetricsSnapshot"]

LATENCY_SAMPLES = 10_000
THROUGHPUT_WINDOW = 60.0


@dataclass(frozen=True)
class MetricsSnapshot:
    """A server's request metrics at one moment.

    ``tokens_per_second`` is completion tokens per second over the last
    ``THROUGHPUT_WINDOW`` seconds (or since the first request, if sooner); the
    latency percentiles are over the last ``LATENCY_SAMPLES`` successful requests.
    """

    started: int
    succeeded: int
    failed: int
    retried: int
    in_flight: int
    waiting: int
    prompt_tokens: int
    completion_tokens: int
    tokens_per_second: float
    latency_p50: float | None
    latency_p90: float | None
    latency_p99: float | None


class Metrics:
    """Mutable counters behind ``server.metrics``."""

    def __init__(self, clock: collections.abc.Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started = self.succeeded = self.failed = self.retried = 0
        self.in_flight = 0
        self.prompt_tokens = self.completion_tokens = 0
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)
        self._per_second: collections.deque[list[float]] = collections.deque()
        self._first: float | None = None

    def success(self, latency: float, prompt_tokens: int, completion_tokens: int) -> None:
        """Record a request that ended with an answer."""
        self.succeeded += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self._latencies.append(latency)
        now = self._clock()
        if self._first is None:
            self._first = now
        second = math.floor(now)
        if self._per_second and self._per_second[-1][0] == second:
            self._per_second[-1][1] += completion_tokens
        else:
            self._per_second.append([second, completion_tokens])
        while self._per_second and self._per_second[0][0] < now - THROUGHPUT_WINDOW:
            self._per_second.popleft()

    def snapshot(self, waiting: int) -> MetricsSnapshot:
        """The metrics now; ``waiting`` is how many requests wait for a slot."""
        now = self._clock()
        recent = [
            tokens for second, tokens in self._per_second if second >= now - THROUGHPUT_WINDOW
        ]
        span = min(THROUGHPUT_WINDOW, now - self._first) if self._first is not None else 0.0
        ordered = sorted(self._latencies)
        return MetricsSnapshot(
            started=self.started,
            succeeded=self.succeeded,
            failed=self.failed,
            retried=self.retried,
            in_flight=self.in_flight,
            waiting=waiting,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            tokens_per_second=sum(recent) / span if span > 0 else 0.0,
            latency_p50=_percentile(ordered, 0.50),
            latency_p90=_percentile(ordered, 0.90),
            latency_p99=_percentile(ordered, 0.99),
        )


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]
