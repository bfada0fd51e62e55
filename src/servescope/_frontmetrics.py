"""The front's ``/metrics``: the Prometheus text format, by ``prometheus_client``.

Per replica (label ``replica``, its index in the pool): its state and breaker state
(one series per possible value, 1 for the current one, as a Prometheus StateSet), the
requests on it, attempts by outcome, errors, retries sent to it, restarts, and two
histograms — the latency of each attempt and the time to the first byte of a streamed
answer (time to first token). For the front: requests by route and status, those
running and queued, those turned away. Gauges and counters are read from the pool when
scraped (nothing to keep in step); only the histograms are recorded as requests end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._admission import Admission
from ._pool import Pool
from ._replica_state import ReplicaState

__all__ = ["CONTENT_TYPE", "FrontMetrics"]

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_STATES = [state.value for state in ReplicaState]
_BREAKER_STATES = ("closed", "open", "half-open")


class FrontMetrics:
    """The registry behind ``GET /metrics`` and the histograms requests feed."""

    def __init__(self, pool: Pool, admission: Admission) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_PoolCollector(pool, admission))
        self.latency = Histogram(
            "servescope_replica_latency_seconds",
            "Time from sending an attempt to a replica to its whole answer",
            ["replica"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.ttft = Histogram(
            "servescope_replica_time_to_first_token_seconds",
            "Time from sending a streamed attempt to a replica to its first byte",
            ["replica"],
            registry=self.registry,
            buckets=TTFT_BUCKETS,
        )
        self.requests = Counter(
            "servescope_front_requests",
            "Requests the front answered, by route and HTTP status",
            ["route", "status"],
            registry=self.registry,
        )
        self._latency_of: dict[int, Callable[[float], None]] = {}
        self._ttft_of: dict[int, Callable[[float], None]] = {}

    def attempt(self, replica: int, seconds: float) -> None:
        """An attempt on ``replica`` ended after ``seconds``."""
        observe = self._latency_of.get(replica)
        if observe is None:
            observe = self._latency_of[replica] = self.latency.labels(str(replica)).observe
        observe(seconds)

    def first_byte(self, replica: int, seconds: float) -> None:
        """A streamed answer from ``replica`` began ``seconds`` after it was sent."""
        observe = self._ttft_of.get(replica)
        if observe is None:
            observe = self._ttft_of[replica] = self.ttft.labels(str(replica)).observe
        observe(seconds)

    def render(self) -> bytes:
        """The exposition, in the Prometheus text format."""
        return generate_latest(self.registry)


class _PoolCollector(Collector):
    """The pool's and the front's gauges and counters, read at scrape time."""

    def __init__(self, pool: Pool, admission: Admission) -> None:
        self._pool = pool
        self._admission = admission

    def describe(self) -> Iterable[Metric]:
        return []  # read at scrape time: nothing to check for duplicates up front

    def collect(self) -> Iterable[Metric]:
        def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=labels)

        state = gauge("servescope_replica_state", "1 for the replica's state", ["replica", "state"])
        breaker = gauge(
            "servescope_replica_breaker_state",
            "1 for the replica's circuit breaker state",
            ["replica", "state"],
        )
        in_flight = gauge("servescope_replica_in_flight", "Requests on the replica", ["replica"])
        attempts = counter(
            "servescope_replica_requests",
            "Attempts sent to the replica, by how they ended",
            ["replica", "outcome"],
        )
        errors = counter(
            "servescope_replica_errors",
            "Attempts on the replica that failed (5xx, broken or lost answers)",
            ["replica"],
        )
        retries = counter(
            "servescope_replica_retries", "Retries of requests sent to the replica", ["replica"]
        )
        restarts = counter("servescope_replica_restarts", "Restarts of the replica", ["replica"])
        for replica in self._pool._replicas:
            info = replica.info()
            label = str(info.index)
            for value in _STATES:
                state.add_metric([label, value], 1.0 if value == info.state else 0.0)
            for value in _BREAKER_STATES:
                breaker.add_metric([label, value], 1.0 if value == info.breaker else 0.0)
            in_flight.add_metric([label], info.in_flight)
            for outcome in ("answered", "failed", "throttled", "lost"):
                attempts.add_metric([label, outcome], getattr(info, outcome))
            errors.add_metric([label], info.failed + info.lost)
            retries.add_metric([label], replica.retries)
            restarts.add_metric([label], info.restarts)
        yield from (state, breaker, in_flight, attempts, errors, retries, restarts)
        ready = gauge("servescope_pool_ready_replicas", "Replicas ready now", [])
        ready.add_metric([], self._pool.ready_count())
        yield ready
        snapshot = self._pool.metrics
        pool_retries = counter("servescope_pool_retries", "Retries of requests, all replicas", [])
        pool_retries.add_metric([], snapshot.retried)
        yield pool_retries
        admission = self._admission
        running = gauge("servescope_front_running", "Requests the front is working on", [])
        running.add_metric([], admission.running)
        queued = gauge("servescope_front_queued", "Requests waiting for a turn", [])
        queued.add_metric([], admission.waiting)
        rejected = counter(
            "servescope_front_rejected", "Requests turned away, by HTTP status", ["status"]
        )
        for status in (429, 503):
            rejected.add_metric([str(status)], admission.rejected[status])
        yield from (running, queued, rejected)
