"""One replica of a pool: its life (serve, fail, restart within a budget), its load, its
circuit breaker — a value the pool holds, never a cancellation of the pool.

::

    Replica.run                          one task in the pool's task group
     └─ each incarnation                 a ServerState + Supervisor in a group of its own:
                                         its failure ends that group only, and comes back
                                         here as a value: eject, then restart or give up

States follow ``_replica_state`` (starting → ready ⇄ unhealthy → failed → restarting →
starting; draining; stopped). A replica takes requests only when ready, answering its
health probe, its breaker closed, with a free slot. A process replica restarts with a
doubling backoff at most ``max_restarts`` times within ``restart_window``; past that it
stays failed, its reason and log tail kept. An endpoint replica (someone else's server)
is re-checked for ever: a server restarted on the same address rejoins (SGLang's router
never probed a failed worker again).
"""

from __future__ import annotations

import collections
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.lowlevel
import httpx

from ._breaker import CircuitBreaker
from ._client import Outcome, Wire
from ._config import ServerConfig
from ._errors import ServerError, ServerStartError
from ._poolconfig import PoolConfig
from ._replica_state import TAKES_REQUESTS, ReplicaEvent, ReplicaState, transition
from ._scopes import one_exception
from ._supervisor import ServerState, Supervisor
from .backends.endpoint import EndpointConfig

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["Replica", "ReplicaInfo"]

logger = logging.getLogger("servescope.pool")

_NO_ATTEMPTS: set[anyio.CancelScope] = set()


@dataclass(frozen=True)
class ReplicaInfo:
    """One replica of a pool, at one moment.

    Attributes:
        index: its place in the pool (its log file's rank).
        state: ``starting``, ``ready``, ``unhealthy``, ``failed``, ``restarting``,
            ``draining`` or ``stopped``.
        base_url / pid: its server's address and process (``None`` while it has none).
        in_flight: requests on it now.
        restarts: how many times it was restarted; ``given_up``: failed for good.
        answered / failed / throttled / lost: its attempts' outcomes so far.
        breaker: its circuit breaker's state (``closed``, ``open``, ``half-open``).
        last_error: why it last failed; ``log_tail``: the last lines of its server's log.
    """

    index: int
    state: str
    base_url: str | None
    pid: int | None
    in_flight: int
    restarts: int
    given_up: bool
    answered: int
    failed: int
    throttled: int
    lost: int
    breaker: str
    last_error: str | None
    log_tail: tuple[str, ...]


class Replica:
    """One replica: config, GPU slice, the server it runs now, load, breaker, restarts.

    It is also a request ``Target``: its current server's address, wire and attempts.
    ``on_change`` (the pool's) is called whenever it may take requests, or no longer.
    """

    def __init__(
        self,
        index: int,
        config: ServerConfig,
        wire: Wire,
        http: httpx.AsyncClient,
        settings: PoolConfig,
        *,
        env: dict[str, str],
        on_change: Callable[[Replica], None],
    ) -> None:
        self.index = index
        self.config = config
        self.wire = wire
        self.http = http
        self.settings = settings
        self.env = env
        self.on_change = on_change
        self.state = ReplicaState.STARTING
        self.server: ServerState | None = None
        self.in_flight = 0
        self.breaker = self._new_breaker()
        self.counts = collections.Counter[Outcome]()
        self.restarts = 0
        self.retries = 0  # attempts sent to it that were retries of a request
        self.restart_times: collections.deque[float] = collections.deque()
        self.given_up = False
        self.last_error: ServerError | None = None
        self.stopped = anyio.Event()
        self._stop = anyio.Event()
        self._supervisor: Supervisor | None = None
        self._idle: anyio.Event | None = None

    # -- as a request target --------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """Its server's address."""
        assert self.server is not None
        return self.server.base_url

    @property
    def lost(self) -> bool:
        """Whether a request on it will get no answer (failed, hung, stopping)."""
        return self.server is None or self.server.lost or self.state not in TAKES_REQUESTS

    @property
    def attempts(self) -> set[anyio.CancelScope]:
        """The requests on the wire to its current server."""
        return self.server.attempts if self.server is not None else _NO_ATTEMPTS

    def takes_requests(self, now: float) -> bool:
        """Ready, answering, breaker closed (or half-open), a slot free."""
        return (
            self.state in TAKES_REQUESTS
            and self.server is not None
            and not self.server.lost
            and self.in_flight < self.config.max_concurrency
            and self.breaker.allows(now)
        )

    def record(self, outcome: Outcome, retry_after: float | None, now: float) -> None:
        """An attempt on it ended: its load goes down, its breaker learns — unless the
        replica itself is failing (its requests' broken connections are its death, which
        its restart handles, not a reason to keep its next life out of rotation)."""
        self.in_flight -= 1
        if self.in_flight < 0:  # a bug: never let it drift below zero
            logger.error("replica %d: in-flight count went below zero", self.index)
            self.in_flight = 0
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()
        self.counts[outcome] += 1
        live = self.state in (ReplicaState.READY, ReplicaState.UNHEALTHY)
        if not live or (self.server is not None and self.server.failure is not None):
            return
        if outcome is Outcome.ANSWERED:
            self.breaker.success(now)
        elif outcome is Outcome.FAILED:
            self.breaker.failure(now)
        elif outcome is Outcome.THROTTLED:
            cooldown = self.settings.breaker_cooldown if retry_after is None else retry_after
            self.breaker.cool(now, min(cooldown, self.config.retry_after_max))

    async def wait_idle(self) -> None:
        """Until no request is on it."""
        while self.in_flight:
            self._idle = anyio.Event()
            await self._idle.wait()

    # -- its life ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve, and after each failure restart (within the budget) until stopped."""
        try:
            while not self._stop.is_set():
                failure = await self._serve_once()
                # A cancellation of the pool that ended the incarnation goes on up here.
                await anyio.lowlevel.checkpoint_if_cancelled()
                if self._stop.is_set():
                    break
                self._failed(failure)
                if self.state is ReplicaState.STOPPED:
                    break  # it failed while draining: nothing left to finish, no restart
                if not self._may_restart():
                    self.given_up = True
                    self.on_change(self)
                    return
                await self._wait_to_restart()
        finally:
            # Given up, it stays failed (its reason and log tail with it): "stopped" would
            # say someone stopped it, when it failed for good.
            if self.state is not ReplicaState.STOPPED and not self.given_up:
                self._to(ReplicaEvent.STOP)
            self.stopped.set()
            self.on_change(self)

    def stop(self) -> None:
        """Stop it: its server is torn down, it restarts no more."""
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.stop()

    def drain(self) -> None:
        """It takes no new request; those on it finish."""
        if self.state in (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.UNHEALTHY):
            self._to(ReplicaEvent.DRAIN)
            self.on_change(self)

    async def _serve_once(self) -> ServerError | None:
        """Run one incarnation until it fails (its error) or is stopped (``None``)."""
        server = ServerState.create(
            self.config,
            self.wire,
            rank=self.index,
            demotion=self.settings.demotion(),
            env=self.env,
        )
        server.on_change = self._server_changed
        server.head_only = True
        self.server = server
        try:
            async with anyio.create_task_group() as tg:
                self._supervisor = supervisor = Supervisor(server, tg, self.http)
                if self._stop.is_set():
                    supervisor.stop()
                await tg.start(supervisor.run)
                await self._stop.wait()
                supervisor.stop()
        except BaseException as exc:
            server.fail(_as_failure(exc, server))
        finally:
            self._supervisor = None
            server.end()
            server.log.close()
        return server.failure

    def _server_changed(self, server: ServerState) -> None:
        """Its server became ready, (un)healthy, or failed."""
        if server is not self.server:
            return
        live = (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.UNHEALTHY)
        if server.failure is not None:
            if self.state in live:
                self._to(ReplicaEvent.FAIL)
            self.last_error = server.failure
        elif self.state is ReplicaState.STARTING and server.ready:
            self._to(ReplicaEvent.READY)
        elif self.state is ReplicaState.READY and not server.healthy:
            self._to(ReplicaEvent.DEMOTE)
            server.cancel_attempts()  # a hung replica's requests go elsewhere now
        elif self.state is ReplicaState.UNHEALTHY and server.healthy:
            self._to(ReplicaEvent.PROMOTE)
        self.on_change(self)

    def _failed(self, failure: ServerError | None) -> None:
        if failure is not None:
            self.last_error = failure
        if self.state is not ReplicaState.FAILED:
            self._to(ReplicaEvent.FAIL)
        self.on_change(self)

    def _may_restart(self) -> bool:
        """Within its restart budget (an endpoint always is).

        Restarts older than ``restart_window`` are forgotten first, an endpoint's too:
        they size the next backoff, which starts short again after a quiet window, and
        an endpoint re-checked for ever must not keep every re-check's time."""
        since = anyio.current_time() - self.settings.restart_window
        while self.restart_times and self.restart_times[0] < since:
            self.restart_times.popleft()
        if isinstance(self.config, EndpointConfig):
            return True
        return len(self.restart_times) < self.settings.max_restarts

    async def _wait_to_restart(self) -> None:
        self._to(ReplicaEvent.RESTART)
        self.on_change(self)
        delay = self.settings.restart_delay(len(self.restart_times))
        with anyio.move_on_after(delay):
            await self._stop.wait()
        if self._stop.is_set():
            return
        self.restart_times.append(anyio.current_time())
        self.restarts += 1
        self.breaker = self._new_breaker()  # a new life: what failed before is not its own
        self._to(ReplicaEvent.RELAUNCH)
        self.on_change(self)

    def _new_breaker(self) -> CircuitBreaker:
        settings = self.settings
        return CircuitBreaker(
            settings.breaker_failures,
            settings.breaker_window,
            settings.breaker_cooldown,
            settings.breaker_successes,
        )

    def _to(self, event: ReplicaEvent) -> None:
        before = self.state
        self.state = transition(self.state, event)
        logger.debug("replica %d: %s -> %s", self.index, before.value, self.state.value)

    def info(self) -> ReplicaInfo:
        """A snapshot of it."""
        server = self.server
        error = self.last_error
        return ReplicaInfo(
            index=self.index,
            state=self.state.value,
            base_url=server.address if server is not None else None,
            pid=server.pid if server is not None else None,
            in_flight=self.in_flight,
            restarts=self.restarts,
            given_up=self.given_up,
            answered=self.counts[Outcome.ANSWERED],
            failed=self.counts[Outcome.FAILED],
            throttled=self.counts[Outcome.THROTTLED],
            lost=self.counts[Outcome.LOST],
            breaker=self.breaker.state(anyio.current_time()).value,
            last_error=error.reason if error is not None else None,
            log_tail=tuple(server.log.tail()) if server is not None else (),
        )


def _as_failure(exc: BaseException, server: ServerState) -> ServerError:
    """The ``ServerError`` for what ended an incarnation's group; a cancellation of the
    pool itself, or a ``KeyboardInterrupt``, goes on up."""
    cancelled = anyio.get_cancelled_exc_class()
    if isinstance(exc, cancelled) or (
        isinstance(exc, BaseExceptionGroup) and exc.subgroup(Exception) is None
    ):
        raise exc
    chosen = one_exception(exc, server.failure)
    if not isinstance(chosen, Exception):
        raise chosen
    if isinstance(chosen, ServerError):
        return chosen
    return ServerStartError(f"replica could not run: {type(chosen).__name__}: {chosen}")
