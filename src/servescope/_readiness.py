"""Readiness: when a server starts to serve, and whether it goes on serving.

Two loops over one probe (GET the backend's health path, within a time limit):

* ``wait_until_ready``: at once on a ready line, else with a backoff from 20 ms to 2 s,
  until the probe answers 200 — for a backend that requires it, only after the ready line
  (SGLang answers before its warm-up is done). After a ready line the probe stays brisk:
  uvicorn prints "Application startup complete." just *before* it listens.
* ``watch_health``: after readiness, every ``health_interval`` seconds, each outcome fed
  to the pure ``HealthWatch`` (``_health``): healthy or not for a pool's routing, and a
  verdict when the engine says it died or has been silent for too long.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from ._health import HealthWatch, Probe

__all__ = ["PROBE_TIMEOUT", "HealthProbe", "ReadySignal", "wait_until_ready", "watch_health"]

PROBE_FIRST_DELAY = 0.02
PROBE_MAX_DELAY = 2.0
PROBE_AFTER_LINE_MAX = 0.05
#: A readiness probe's time limit (after readiness, ``health_timeout`` holds).
PROBE_TIMEOUT = 5.0

#: GET the health path within the time limit given: its status, or ``None`` (no answer).
HealthProbe = Callable[[float], Awaitable["int | None"]]


class ReadySignal:
    """What the log tells the probe: a ready line was seen, so probe now (and briskly)."""

    def __init__(self) -> None:
        self.wake = anyio.Event()
        self.line_seen = False

    def ready_line(self) -> None:
        """A ready line was printed."""
        self.line_seen = True
        self.wake.set()


async def wait_until_ready(
    probe: HealthProbe, signal: ReadySignal, *, line_required: bool, deadline: float
) -> bool:
    """Probe until the server answers 200 (after a ready line, if ``line_required``);
    ``False`` if ``deadline`` (an ``anyio.current_time()``) passes first."""
    delay = PROBE_FIRST_DELAY
    while not ((signal.line_seen or not line_required) and await probe(PROBE_TIMEOUT) == 200):
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            return False
        with anyio.move_on_after(min(delay, remaining)):
            await signal.wake.wait()
        if signal.wake.is_set():  # a ready line: probe again at once, then briskly
            signal.wake = anyio.Event()
            delay = PROBE_FIRST_DELAY
        ceiling = PROBE_AFTER_LINE_MAX if signal.line_seen else PROBE_MAX_DELAY
        delay = min(delay * 1.5, ceiling)
    return True


async def watch_health(
    probe: HealthProbe,
    watch: HealthWatch,
    *,
    path: str,
    interval: float,
    on_health: Callable[[bool], None],
) -> str:
    """Probe every ``interval`` s; tell ``on_health`` each time the server turns healthy
    or unhealthy; return why it failed once it is dead or hung."""
    healthy = watch.healthy
    while True:
        await anyio.sleep(interval)
        status = await probe(watch.probe_timeout(anyio.current_time()))
        now = anyio.current_time()
        if watch.record(status, now) is Probe.DEAD:
            return f"GET {path} answered {status} after the server was ready: its engine died"
        if watch.healthy != healthy:
            healthy = watch.healthy
            on_health(healthy)
        silent = watch.silent_for(now)
        if silent is not None:
            return watch.describe(path, silent)
