"""``open_pool``: many replicas of one model under one coordinator that owns their
processes and routes among them — and never loses or duplicates a request.

::

    open_pool(config, replicas=4)        one task group: the body + a task per replica
     ├─ Replica.run, N of them                serve / fail / restart within a budget (_replica)
     └─ the dispatcher                   each attempt of each request: a ready replica,
                                         chosen by a routing policy (_routing), its load
                                         counted, its breaker consulted (_breaker)

A replica's failure is a value the pool handles: the requests on it are cancelled at
once and sent to another replica, the replica is restarted (or given up). Requests wait
while no replica can take them — every replica restarting, the pool paused — bounded by
``request_timeout``; they fail only when none can ever come back (``PoolFailed``, which
also ends the scope) or the pool is stopped (``ServerClosed``). Control signals
(``pause``, ``resume``, ``drain``, ``stop``) follow ``_control``: an invalid one raises
``ControlError``; each returns once every replica has acknowledged it.
"""

from __future__ import annotations

import collections
import copy
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from ._client import ChunkStream, Outcome, RawStream, RequestClient, Target, Wire
from ._config import ServerConfig
from ._control import DISPATCHES, PoolState, Signal, control
from ._errors import ConfigError, ControlError, PoolFailed, RequestTimeout, ServerClosed
from ._gpus import gpu_slices, slice_env, visible_devices
from ._http import http_client
from ._metrics import MetricsSnapshot
from ._poolconfig import PoolConfig
from ._redact import Redactor
from ._replica import Replica, ReplicaInfo
from ._replica_state import ReplicaState
from ._responses import Completion
from ._routing import Candidate, Policy, RouteKey, make_policy, prefix_of
from ._scopes import one_exception, one_exception_cause
from ._transport import Reply
from .backends._base import EngineConfig
from .backends.endpoint import EndpointConfig

__all__ = ["Pool", "open_pool"]

logger = logging.getLogger("servescope.pool")


class Observer(Protocol):
    """Told how long each attempt on a replica took (the front's latency histograms)."""

    def attempt(self, replica: int, seconds: float) -> None:
        """An attempt on ``replica`` ended (answered or failed) after ``seconds``."""

    def first_byte(self, replica: int, seconds: float) -> None:
        """A streamed answer from ``replica`` began ``seconds`` after it was sent."""


@dataclass(frozen=True)
class _Route:
    """What the dispatcher knows of one request: its number (for the routing log) and
    its routing key."""

    number: int
    key: RouteKey


class _Dispatch:
    """Each attempt to a replica that can take it, chosen by the routing policy.

    Load counters are taken here (``acquire``) and given back here (``release``), once
    per attempt on every way out: they cannot drift. Waiters queue; a freed slot wakes
    one, a change in the replicas (ready, failed, resumed) wakes all.
    """

    def __init__(self, pool: Pool, policy: Policy, timeout: float) -> None:
        self._pool = pool
        self._policy = policy
        self._timeout = timeout
        self._waiters: collections.deque[anyio.Event] = collections.deque()
        self._watchers: set[anyio.Event] = set()  # ``changed``: woken by changes only
        self._requests = 0
        self.busy = 0
        self.idle = anyio.Event()
        self.idle.set()

    def route(self, payload: Mapping[str, Any], routing_key: str | None) -> _Route:
        self._requests += 1
        prefix = prefix_of(payload) if self._policy.name == "prefix" else ""
        return _Route(self._requests, RouteKey(prefix, routing_key))

    async def acquire(self, tried: Sequence[Target], route: _Route) -> Target:
        deadline = None  # set by the first wait: most requests never wait
        while True:
            self.check_open()
            if self._pool.state in DISPATCHES:
                replica = self._choose(tried, route)
                if replica is not None:
                    replica.in_flight += 1
                    replica.retries += bool(tried)
                    self.busy += 1
                    self.idle = anyio.Event() if self.idle.is_set() else self.idle
                    return replica
            if deadline is None:
                deadline = anyio.current_time() + self._timeout
            await self._wait(deadline)

    def release(
        self, target: Target, outcome: Outcome, retry_after: float | None, elapsed: float
    ) -> None:
        assert isinstance(target, Replica)
        target.record(outcome, retry_after, anyio.current_time())
        observer = self._pool.observer
        if observer is not None and outcome is not Outcome.ABANDONED:
            observer.attempt(target.index, elapsed)
        self.busy -= 1
        if self.busy == 0:
            self.idle.set()
        self.wake_one()

    def check_open(self) -> None:
        self._pool._check_open()

    async def backoff(self, seconds: float, tried: Sequence[Target]) -> None:
        """A retry to a replica this request has not tried goes at once: the backoff
        spares one server a retry storm, and another replica is not that server (a
        killed replica's requests see its broken connections before its exit is known)."""
        now = anyio.current_time()
        if any(r.takes_requests(now) and r not in tried for r in self._pool._replicas):
            return
        with anyio.move_on_after(seconds):
            await self._pool._ended.wait()

    def waiting(self) -> int:
        return len(self._waiters)

    def first_byte(self, target: Target, seconds: float) -> None:
        """A stream's first body bytes came from ``target`` after ``seconds``."""
        observer = self._pool.observer
        if observer is not None:
            assert isinstance(target, Replica)
            observer.first_byte(target.index, seconds)

    def wake_one(self) -> None:
        """A slot was freed: the longest waiter may take it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.is_set():
                waiter.set()
                return

    def wake_all(self) -> None:
        """The replicas changed: every waiter looks again."""
        waiters, self._waiters = self._waiters, collections.deque()
        for waiter in [*waiters, *self._watchers]:
            waiter.set()

    async def changed(self) -> None:
        """Until the replicas (or the pool's state) change. Not a waiter for a slot: a
        freed slot's ``wake_one`` must go to a request, never to a watcher."""
        event = anyio.Event()
        self._watchers.add(event)
        try:
            await event.wait()
        finally:
            self._watchers.discard(event)

    def _choose(self, tried: Sequence[Target], route: _Route) -> Replica | None:
        now = anyio.current_time()
        able = [replica for replica in self._pool._replicas if replica.takes_requests(now)]
        fresh = [replica for replica in able if replica not in tried] or able
        if not fresh:
            return None
        candidates = [Candidate(replica.index, replica.in_flight) for replica in fresh]
        chosen = self._policy.choose(candidates, route.key)
        self._pool._log_decision(route, len(tried) + 1, candidates, chosen.index)
        return next(replica for replica in fresh if replica.index == chosen.index)

    async def _wait(self, deadline: float) -> None:
        """Until a replica may take the request: a change, a breaker's cool-down ending,
        or ``RequestTimeout`` at ``deadline``."""
        now = anyio.current_time()
        if now >= deadline:
            raise RequestTimeout(f"no replica could take the request within {self._timeout:g} s")
        until = min([deadline, *self._pool._reopening()])
        waiter = anyio.Event()
        self._waiters.append(waiter)
        try:
            with anyio.move_on_after(max(0.0, until - now)):
                await waiter.wait()
        finally:
            if not waiter.is_set():
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass


class Pool:
    """Replicas of one model behind one request surface (``chat``, ``complete``,
    ``request``, ``metrics``, as on ``Server``), with their state (``replicas``) and the
    control signals ``pause``, ``resume``, ``drain`` and ``stop``.

    Valid inside the ``async with open_pool(...)`` block that produced it.
    """

    def __init__(
        self,
        replicas: list[Replica],
        settings: PoolConfig,
        config: ServerConfig,
        *,
        open_membership: bool = False,
    ) -> None:
        self._replicas = replicas
        self.settings = settings
        self.config = config
        self.open_membership = open_membership
        self.observer: Observer | None = None  # told each attempt's latency
        self._next_index = len(replicas)
        self.state = PoolState.RUNNING
        self.failure: PoolFailed | None = None
        self._closed = False
        self._ended = anyio.Event()
        self._tg: TaskGroup | None = None
        self._routing_log: IO[str] | None = None
        self._dispatch = _Dispatch(
            self, make_policy(settings.routing, seed=settings.seed), config.request_timeout
        )
        secrets = [secret for replica in replicas for secret in replica.config.secrets()]
        self._redact = Redactor([*config.secrets(), *secrets])
        self._client = RequestClient(config, dispatch=self._dispatch, redact=self._redact)

    # -- requests ---------------------------------------------------------------------------

    def request(
        self,
        payload: Mapping[str, Any],
        *,
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
        routing_key: str | None = None,
    ) -> Coroutine[Any, Any, dict[str, Any]]:
        """POST an OpenAI payload to a replica; await the JSON reply (see ``Server.request``).

        ``routing_key``: with ``routing="sticky"``, one key goes to one replica."""
        self._check_open()
        return self._client.request(payload, path=path, headers=headers, routing_key=routing_key)

    async def chat(
        self, messages: list[dict[str, Any]], *, routing_key: str | None = None, **params: Any
    ) -> Completion:
        """A chat completion from one of the replicas."""
        self._check_open()
        return await self._client.chat(messages, routing_key=routing_key, **params)

    async def complete(
        self, prompt: str, *, routing_key: str | None = None, **params: Any
    ) -> Completion:
        """A text completion from one of the replicas."""
        self._check_open()
        return await self._client.complete(prompt, routing_key=routing_key, **params)

    def request_raw(
        self,
        payload: Mapping[str, Any],
        *,
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
        routing_key: str | None = None,
        body: bytes | None = None,
    ) -> Coroutine[Any, Any, Reply]:
        """As ``request``, but the reply unparsed: a 2xx, or a 4xx about the request,
        as the replica sent it (a proxy passes it through)."""
        self._check_open()
        return self._client.request_raw(
            payload, path=path, headers=headers, routing_key=routing_key, body=body
        )

    def stream_raw(
        self,
        payload: Mapping[str, Any],
        *,
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
        routing_key: str | None = None,
        body: bytes | None = None,
    ) -> AbstractAsyncContextManager[RawStream]:
        """A streamed answer's status, headers and raw body chunks from a replica
        (retried elsewhere only before its first byte; see ``RequestClient.stream_raw``)."""
        self._check_open()
        return self._client.stream_raw(
            payload, path=path, headers=headers, routing_key=routing_key, body=body
        )

    def stream_chat(
        self, messages: list[dict[str, Any]], *, routing_key: str | None = None, **params: Any
    ) -> ChunkStream:
        """A chat completion from one of the replicas, chunk by chunk as it is generated."""
        self._check_open()
        return self._client.stream_chat(messages, routing_key=routing_key, **params)

    def stream_complete(
        self, prompt: str, *, routing_key: str | None = None, **params: Any
    ) -> ChunkStream:
        """A text completion from one of the replicas, chunk by chunk."""
        self._check_open()
        return self._client.stream_complete(prompt, routing_key=routing_key, **params)

    def parse_completion(self, response: dict[str, Any]) -> Completion:
        """A ``Completion`` from a ``request()`` answer, secrets kept out of its errors."""
        return self._client.parse_completion(response)

    @property
    def metrics(self) -> MetricsSnapshot:
        """The pool's request metrics (each replica's are in ``replicas``)."""
        return self._client.metrics

    @property
    def replicas(self) -> list[ReplicaInfo]:
        """Each replica now: state, address, load, restarts, outcomes, last error."""
        return [replica.info() for replica in self._replicas]

    async def wait_ready(self, min_ready: int | None = None) -> None:
        """Wait until ``min_ready`` replicas (default: the config's ``min_ready``) are
        ready; ``PoolFailed`` if too many have failed for good to get there (an open pool
        waits for replicas to join, unless every replica it has failed for good)."""
        wanted = self.settings.min_ready if min_ready is None else min_ready
        most = 1024 if self.open_membership else len(self._replicas)
        if not 1 <= wanted <= most:
            raise ConfigError(f"min_ready must be 1 to {most}, not {wanted}")
        while True:
            self._check_open()
            if self.ready_count() >= wanted:
                return
            able = sum(not replica.given_up for replica in self._replicas)
            # An open pool may still get replicas: it waits, unless every one it has
            # failed for good (then nothing here will ever be ready without a join).
            hopeless = able == 0 < len(self._replicas) if self.open_membership else able < wanted
            if hopeless:
                reasons = self._reasons(given_up_only=True)
                raise PoolFailed(
                    f"only {able} replicas can still serve, {wanted} wanted: {reasons}"
                )
            await self._dispatch.changed()

    async def changed(self) -> None:
        """Until a replica's state changes (or one joins or leaves)."""
        await self._dispatch.changed()

    def ready_count(self) -> int:
        """How many replicas are ready now."""
        return sum(replica.state is ReplicaState.READY for replica in self._replicas)

    # -- membership -------------------------------------------------------------------------

    def add_endpoint(self, url: str, *, api_key: str | None = None) -> int:
        """A new replica: the OpenAI server someone else runs at ``url`` (checked before
        it takes requests, then watched and re-checked for ever, as every endpoint
        replica); its index. Only in a pool opened with ``open_membership=True``."""
        self._check_open()
        if not self.open_membership:
            message = (
                "this pool's replicas are fixed; open_pool(..., open_membership=True) takes more"
            )
            raise ControlError(message)
        config = _endpoint_config(self.config, url, api_key)
        http, wire = http_client(config)
        replica = Replica(
            self._next_index,
            config,
            wire,
            http,
            self.settings,
            env={},
            on_change=self._replica_changed,
        )
        self._next_index += 1
        self._redact.add(config.secrets())
        self._replicas.append(replica)
        assert self._tg is not None
        self._tg.start_soon(_run_with_client, replica, http)
        logger.info("pool: replica %d added: %s", replica.index, self._redact(config.url))
        self._dispatch.wake_all()
        return replica.index

    def member(self, index: int) -> Replica | None:
        """The replica with this index, if it is in the pool."""
        return next((replica for replica in self._replicas if replica.index == index), None)

    async def remove(self, index: int, *, drain_timeout: float = 30.0) -> None:
        """Take replica ``index`` out of the pool gently: no new request goes to it, those
        on it finish (for at most ``drain_timeout`` s; the rest are sent elsewhere), then
        it is stopped and forgotten."""
        replica = self._known(index)
        replica.drain()
        with anyio.move_on_after(drain_timeout):
            await replica.wait_idle()
        await self._forget(replica)

    async def eject(self, index: int, reason: str) -> None:
        """Take replica ``index`` out of the pool now: the requests on it are sent to
        other replicas at once."""
        replica = self._known(index)
        logger.warning("pool: replica %d ejected: %s", index, reason)
        await self._forget(replica)

    def _known(self, index: int) -> Replica:
        replica = self.member(index)
        if replica is None:
            raise ControlError(f"the pool has no replica {index}")
        return replica

    async def _forget(self, replica: Replica) -> None:
        replica.stop()
        await replica.stopped.wait()
        if replica in self._replicas:
            self._replicas.remove(replica)
        self._dispatch.wake_all()

    # -- control ----------------------------------------------------------------------------

    async def pause(self) -> None:
        """No new request is dispatched (callers wait); returns once the requests in
        flight on every replica have finished."""
        self._signal(Signal.PAUSE)
        await self._dispatch.idle.wait()

    async def resume(self) -> None:
        """Dispatch again after ``pause``."""
        self._signal(Signal.RESUME)
        self._dispatch.wake_all()

    async def drain(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 (the API asked for)
        """Finish the requests in flight (for at most ``timeout`` s; those left after it
        are cancelled), then stop every replica; later requests get ``ServerClosed``."""
        self._signal(Signal.DRAIN)
        self._dispatch.wake_all()
        for replica in self._replicas:
            replica.drain()
        with anyio.move_on_after(timeout):
            await self._dispatch.idle.wait()
        await self._stop_replicas()

    async def stop(self) -> None:
        """Stop every replica (after ``pause``: with none in flight); later requests get
        ``ServerClosed``. Returns once every replica's process tree is gone."""
        self._signal(Signal.STOP)
        await self._stop_replicas()

    def _signal(self, signal: Signal) -> None:
        # Only a failed pool or an ended scope refuses here; what a pool state allows is
        # ``control``'s to say (a STOP while draining is allowed, a PAUSE once stopped
        # is a ControlError), not ServerClosed's, which is for requests.
        self._check_scope()
        self.state = control(self.state, signal)
        logger.info("pool: %s -> %s", signal.name, self.state.name)

    async def _stop_replicas(self) -> None:
        for replica in self._replicas:
            replica.stop()
        for replica in self._replicas:
            await replica.stopped.wait()
        if self.state is not PoolState.STOPPED:
            self.state = control(self.state, Signal.STOP)
        self._dispatch.wake_all()

    # -- bookkeeping ------------------------------------------------------------------------

    def _check_scope(self) -> None:
        """Raise if the pool failed for good or its scope has ended."""
        if self.failure is not None:
            raise copy.copy(self.failure)  # a copy per caller, as ServerState.check_open
        if self._closed:
            raise ServerClosed("the pool is closed; it takes no more requests")

    def _check_open(self) -> None:
        self._check_scope()
        if self.state in (PoolState.DRAINING, PoolState.STOPPED):
            raise ServerClosed(f"the pool is {self._state_name()}; it takes no more requests")

    def _state_name(self) -> str:
        return "closed" if self._closed else self.state.name.lower()

    def _replica_changed(self, replica: Replica) -> None:
        """A replica may take requests, or no longer: waiters look again; if none can
        ever serve again, the pool fails."""
        self._dispatch.wake_all()
        if self.open_membership:
            return  # replicas may still join: the pool serves whoever is there
        if self.failure is None and all(r.given_up for r in self._replicas):
            self.failure = PoolFailed(
                f"every replica failed for good: {self._reasons(given_up_only=True)}",
                replica_errors=[r.last_error for r in self._replicas if r.last_error],
            )
            logger.error("pool: %s", self.failure.reason)
            if self._tg is not None:
                self._tg.cancel_scope.cancel()

    def _reasons(self, *, given_up_only: bool) -> str:
        parts = []
        for replica in self._replicas:
            if given_up_only and not replica.given_up:
                continue
            error = replica.last_error
            why = error.reason if error is not None else replica.state.value
            parts.append(f"replica {replica.index} ({replica.restarts} restarts): {why}")
        return "; ".join(parts)

    def _reopening(self) -> list[float]:
        """When the open breakers of replicas that could serve will let requests again.

        Only deadlines still ahead: a breaker past its deadline is half-open and keeps it
        until it closes, and a waiter woken at once for it would spin (a paused pool, a
        replica at its concurrency limit)."""
        now = anyio.current_time()
        times = []
        for replica in self._replicas:
            until = replica.breaker.opened_until
            if until is not None and until > now and replica.state is ReplicaState.READY:
                times.append(until)
        return times

    def _log_decision(
        self, route: _Route, attempt: int, candidates: list[Candidate], chosen: int
    ) -> None:
        if self._routing_log is None:
            return
        record = {
            "time": time.time(),
            "request": route.number,
            "attempt": attempt,
            "policy": self.settings.routing,
            "candidates": [[c.index, c.in_flight] for c in candidates],
            "chosen": chosen,
        }
        self._routing_log.write(json.dumps(record) + "\n")

    def _end(self) -> None:
        self._closed = True
        self._ended.set()
        self._dispatch.wake_all()
        if self._routing_log is not None:
            self._routing_log.close()

    def __repr__(self) -> str:
        states = collections.Counter(replica.state.value for replica in self._replicas)
        shown = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
        return f"<Pool {len(self._replicas)} replicas: {shown}; {self._state_name()}>"


def _resolve(
    config: ServerConfig | Sequence[ServerConfig],
    replicas: int | None,
    settings: Mapping[str, Any],
    open_membership: bool,
) -> tuple[list[ServerConfig], PoolConfig]:
    """The replicas' configs and the pool's settings, checked."""
    if isinstance(config, ServerConfig):
        pool = PoolConfig.build(
            {**settings, **({} if replicas is None else {"replicas": replicas})}
        )
        if pool.replicas == 0 and not open_membership:
            message = "a pool of 0 replicas serves nothing (unless replicas join: open_membership)"
            raise ConfigError(message)
        if pool.replicas > 1 and _multinode(config):
            raise ConfigError(
                "the replicas of a pool of multi-node servers need one config each (each "
                "group its own nodes.master_port and liveness_port): pass a list of configs"
            )
        _check_heads([config])
        return [config] * pool.replicas, pool
    configs = list(config)
    if not configs or not all(isinstance(item, ServerConfig) for item in configs):
        raise ConfigError("open_pool needs a config, or a non-empty list of configs")
    if replicas is not None and replicas != len(configs):
        raise ConfigError(f"replicas={replicas} but {len(configs)} configs were given")
    models = {item.model for item in configs}
    if len(models) > 1:
        raise ConfigError(f"the replicas of a pool serve one model, not {sorted(models)}")
    _check_heads(configs)
    return configs, PoolConfig.build({**settings, "replicas": len(configs)})


def _multinode(config: ServerConfig) -> bool:
    return isinstance(config, EngineConfig) and config.nodes is not None


def _check_heads(configs: list[ServerConfig]) -> None:
    """A multi-node replica is a group of nodes whose head the pool runs: the other nodes
    run ``servescope serve`` (or ``open_server``) themselves and join it."""
    for config in configs:
        if isinstance(config, EngineConfig) and config.nodes is not None:
            rank = config.nodes.node_rank
            if rank is not None and rank != 0:
                raise ConfigError(
                    f"a pool runs the head (node 0) of a multi-node replica, not node {rank}: "
                    "run the other nodes with `servescope serve` or open_server"
                )


def _gpus_per_replica(config: ServerConfig, pool: PoolConfig) -> int:
    if pool.gpus_per_replica is not None:
        return pool.gpus_per_replica
    if isinstance(config, EngineConfig):
        nnodes = config.nodes.nnodes if config.nodes is not None else None
        # A multi-node replica's head holds its share of the GPUs (vLLM and SGLang split
        # the parallel sizes evenly over the nodes).
        return max(1, config.tp * config.pp * config.dp // (nnodes or 1))
    return 0


async def _gpu_envs(configs: list[ServerConfig], pool: PoolConfig) -> list[dict[str, str]]:
    """Each replica's ``CUDA_VISIBLE_DEVICES`` slice (none for replicas without GPUs)."""
    per = {_gpus_per_replica(config, pool) for config in configs}
    if per == {0}:
        return [{} for _ in configs]
    if len(per) > 1:
        raise ConfigError(f"replicas need different GPU counts {sorted(per)}: set gpus_per_replica")
    devices = await anyio.to_thread.run_sync(visible_devices, dict(os.environ))
    if devices is None:
        if pool.gpus_per_replica is not None:
            raise ConfigError(
                "gpus_per_replica is set but no GPU is visible (no CUDA_VISIBLE_DEVICES, no driver)"
            )
        logger.info("pool: no GPU visible; the replicas share whatever device they find")
        return [{} for _ in configs]
    return [slice_env(devices) for devices in gpu_slices(devices, per.pop(), len(configs))]


@asynccontextmanager
async def open_pool(
    config: ServerConfig | Sequence[ServerConfig],
    *,
    replicas: int | None = None,
    open_membership: bool = False,
    **settings: Any,
) -> AsyncIterator[Pool]:
    """Start ``replicas`` copies of ``config`` (or one replica per config of a list);
    yield the pool at once — requests wait for a ready replica by themselves.

    ``settings`` are ``PoolConfig`` fields (``routing="prefix"``, ``max_restarts=5``,
    ...). A replica's failure is handled inside the pool (its requests re-sent, it is
    restarted); the scope fails with ``PoolFailed`` only when every replica has failed
    for good. On every way out every replica's process tree is torn down.

    ``open_membership``: replicas may join (``add_endpoint``) and leave (``remove``,
    ``eject``) while it runs, ``replicas=0`` is allowed (``config`` then only gives the
    model and the request settings), and it never fails for want of replicas: it
    waits for some to join.
    """
    configs, pool_config = _resolve(config, replicas, settings, open_membership)
    envs = await _gpu_envs(configs, pool_config)
    async with AsyncExitStack() as stack:
        wires: dict[int, tuple[Any, Wire]] = {}
        members = []
        pool: Pool | None = None

        def changed(replica: Replica) -> None:
            if pool is not None:
                pool._replica_changed(replica)

        for index, (item, env) in enumerate(zip(configs, envs, strict=True)):
            if id(item) not in wires:  # replicas of one config share its client
                http, wire = http_client(item)
                wires[id(item)] = (await stack.enter_async_context(http), wire)
            http, wire = wires[id(item)]
            members.append(
                Replica(index, item, wire, http, pool_config, env=env, on_change=changed)
            )
        pool = Pool(members, pool_config, config_of(config), open_membership=open_membership)
        if pool_config.routing_log is not None:
            pool._routing_log = _open_routing_log(pool_config.routing_log)
        try:
            async with anyio.create_task_group() as tg:
                pool._tg = tg
                for member in members:
                    tg.start_soon(member.run)
                try:
                    yield pool
                finally:
                    for member in members:
                        member.stop()
        except BaseException as exc:
            raise one_exception(exc, pool.failure) from one_exception_cause(exc, pool.failure)
        finally:
            pool._end()
        if pool.failure is not None:
            raise pool.failure from None


def config_of(config: ServerConfig | Sequence[ServerConfig]) -> ServerConfig:
    """The config whose request settings the pool's client uses: the first."""
    return config if isinstance(config, ServerConfig) else config[0]


def _endpoint_config(template: ServerConfig, url: str, api_key: str | None) -> EndpointConfig:
    """An endpoint replica at ``url`` with the pool's request and health settings;
    ``ConfigError`` naming what is wrong with the URL or key (never quoting the key)."""
    fields = (
        "request_timeout",
        "connect_timeout",
        "max_concurrency",
        "max_retries",
        "use_chat",
        "health_interval",
        "health_timeout",
        "unhealthy_after",
    )
    values = {name: getattr(template, name) for name in fields}
    values.update(url=url, model=template.model)
    if api_key is not None:
        values["api_key"] = api_key
    return EndpointConfig.build(values)


async def _run_with_client(replica: Replica, http: Any) -> None:
    """A joined replica's life, its HTTP client closed at its end."""
    async with http:
        await replica.run()


def _open_routing_log(path: Path) -> IO[str]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("a", encoding="utf-8", buffering=1)
    except OSError as exc:
        raise ConfigError(f"routing_log {str(path)!r} cannot be written: {exc}") from None
