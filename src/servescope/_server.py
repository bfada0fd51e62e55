"""``open_server``: one server's whole life inside one anyio task group.

::

    open_server(config)                  the body of ``async with`` runs in the host task
     └─ Supervisor                       its launch, readiness, health, teardown
                                         (``_supervisor``), reported into a ServerState

A failure anywhere (``Supervisor.fail``) records one ``ServerError`` and cancels the
whole task group, the body included; teardown runs shielded on every way out; the
caller gets that one exception, never an ``ExceptionGroup``. Requests go through a
``RequestClient`` whose every attempt targets this one server (``_OneServer``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio

from ._client import ChunkStream, Outcome, RawStream, RequestClient, Target
from ._config import ServerConfig
from ._dummy_app import DummyApp
from ._errors import NotHeadNode
from ._http import http_client
from ._metrics import MetricsSnapshot
from ._multinode import plan_nodes
from ._nodes import NodeRole
from ._responses import Completion
from ._scopes import one_exception, one_exception_cause
from ._supervisor import ServerState, Supervisor
from ._transport import Reply
from .backends._base import EngineConfig

__all__ = ["Server", "WorkerNode", "open_server"]


class Server:
    """A server started by ``open_server``: its address, readiness and requests.

    Valid inside the ``async with`` block that produced it.
    """

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._client: RequestClient | None = None

    @property
    def config(self) -> ServerConfig:
        """The server's configuration."""
        return self._state.config

    @property
    def rank(self) -> int:
        """Its rank (the log file's name, the port's offset)."""
        return self._state.rank

    @property
    def node(self) -> int:
        """Its node."""
        return self._state.node

    @property
    def node_role(self) -> NodeRole | None:
        """Its place in a multi-node server (``None``: a single-node server)."""
        return None if self._state.nodes is None else self._state.nodes.role

    @property
    def pid(self) -> int | None:
        """The server process's id (``None`` for the in-process dummy and endpoints)."""
        return self._state.pid

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the server (it may change if a start is retried)."""
        return self._state.base_url

    @property
    def ready(self) -> bool:
        """Whether the server has answered its readiness probe."""
        return self._state.ready

    async def wait_ready(self) -> None:
        """Wait until the server is ready.

        If it fails first, the scope is cancelled and a waiter outside it gets the
        server's error; if the scope ends first, ``ServerClosed``.
        """
        await self._state.wait_ready()

    def log_tail(self) -> list[str]:
        """The last lines the server printed."""
        return self._state.log.tail()

    def request(
        self,
        payload: Mapping[str, Any],
        *,
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Coroutine[Any, Any, dict[str, Any]]:
        """POST an OpenAI payload (model and ``default_params`` filled in); await the JSON reply.

        The endpoint is ``/v1/chat/completions`` if the config's ``use_chat`` is set,
        else ``/v1/completions``, unless ``path`` is given. Retryable failures are
        retried with backoff; see ``servescope._client`` for the classification.
        """
        # Not itself a coroutine: one frame less per request held in flight.
        return self._requests().request(payload, path=path, headers=headers)

    def request_raw(
        self,
        payload: Mapping[str, Any],
        *,
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Coroutine[Any, Any, Reply]:
        """As ``request``, but await the final reply (status, headers, body) unparsed; a
        4xx no retry can help is returned as it came, not raised (for a proxy)."""
        return self._requests().request_raw(payload, path=path, headers=headers)

    def stream_raw(
        self,
        payload: Mapping[str, Any],
        *,
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AbstractAsyncContextManager[RawStream]:
        """``async with server.stream_raw(payload) as stream``: the answer's status and
        headers, then its raw body as it arrives (``async for piece in stream``).

        Retried only before the first body bytes; a break after them raises
        ``StreamInterrupted``. Leaving the block early closes the connection (the engine
        aborts). The payload is sent as given (with ``"stream": true`` for SSE).
        """
        return self._requests().stream_raw(payload, path=path, headers=headers)

    def stream_chat(self, messages: list[dict[str, Any]], **params: Any) -> ChunkStream:
        """A streamed chat completion: ``async for chunk in server.stream_chat(...)``, or
        ``async with server.stream_chat(...) as chunks`` (which closes the connection if
        left early); each ``Chunk`` has its text delta. Ends at ``[DONE]``; an answer
        broken off, or an error event from the server, raises ``StreamInterrupted``."""
        return self._requests().stream_chat(messages, **params)

    def stream_complete(self, prompt: str, **params: Any) -> ChunkStream:
        """A streamed text completion of ``prompt``, as ``stream_chat``."""
        return self._requests().stream_complete(prompt, **params)

    @property
    def metrics(self) -> MetricsSnapshot:
        """Request counts, tokens, tokens per second, latency percentiles, in flight, waiting."""
        assert self._client is not None
        return self._client.metrics

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> Completion:
        """A chat completion (``max_tokens=...``, ``temperature=...`` as keyword arguments)."""
        return await self._requests().chat(messages, **params)

    async def complete(self, prompt: str, **params: Any) -> Completion:
        """A text completion of ``prompt``."""
        return await self._requests().complete(prompt, **params)

    def parse_completion(self, response: dict[str, Any]) -> Completion:
        """A ``Completion`` from a ``request()`` answer, secrets kept out of its errors."""
        return self._requests().parse_completion(response)

    @property
    def _dummy_app(self) -> DummyApp | None:  # the in-process dummy, for tests
        return self._state.dummy_app

    def _requests(self) -> RequestClient:
        self._state.check_open()
        assert self._client is not None
        return self._client

    def __repr__(self) -> str:
        state = "ready" if self.ready else "starting"
        return f"<Server {self._state.name} {state}>"


class WorkerNode(Server):
    """A worker node (rank ≥ 1) of a multi-node server, from ``open_server`` on that node.

    It runs this node's part of the engine (a headless vLLM, an SGLang rank, a Ray node)
    and serves no HTTP: every request method raises ``NotHeadNode``. ``wait_ready()``
    returns once the head serves; ``wait_head_exit()`` once the head's scope ended
    normally — the body of a worker's ``async with`` is typically just that. If the head
    fails or is lost, the scope fails with ``ServerCrashed`` (within ``node_timeout``).
    """

    @property
    def head_url(self) -> str | None:
        """The head's URL, once it said it serves."""
        part = self._state.node_part
        return None if part is None else part.head_url

    async def wait_head_exit(self) -> None:
        """Wait until the head's scope has ended normally (this node's processes are torn
        down by then). If it failed or was lost, this scope fails instead."""
        part = self._state.node_part
        assert part is not None  # set before open_server yields
        await part.head_ended.wait()
        self._state.check_open()

    def _requests(self) -> RequestClient:
        self._state.check_open()
        role = self.node_role
        assert role is not None
        where = f" at {self.head_url}" if self.head_url else f" on {role.master_addr}"
        raise NotHeadNode(
            f"this is worker node {role.rank} of {role.nnodes}: it serves no requests; "
            f"send them to the head (node 0){where}"
        )

    def __repr__(self) -> str:
        state = "ready" if self.ready else "starting"
        return f"<WorkerNode {self._state.name} {state}>"


class _OneServer:
    """Every attempt goes to the one server, once it is ready, holding one of its
    ``max_concurrency`` slots while it is on the wire.

    A semaphore, not a ``CapacityLimiter``: a limiter lends one token per task, and one
    task may hold several streams open at once (each holds its slot until it ends)."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._limiter = anyio.Semaphore(state.config.max_concurrency)

    def route(self, payload: Mapping[str, Any], routing_key: str | None) -> None:
        return None

    async def acquire(self, tried: Sequence[Target], route: object) -> Target:
        await self._state.wait_ready()
        await self._limiter.acquire()
        try:
            self._state.check_open()
        except BaseException:
            self._limiter.release()
            raise
        return self._state

    def release(
        self, target: Target, outcome: Outcome, retry_after: float | None, elapsed: float
    ) -> None:
        self._limiter.release()

    def check_open(self) -> None:
        self._state.check_open()

    async def backoff(self, seconds: float, tried: Sequence[Target]) -> None:
        await self._state.backoff(seconds)

    def waiting(self) -> int:
        return self._limiter.statistics().tasks_waiting

    def first_byte(self, target: Target, seconds: float) -> None:
        return None  # one server: nothing to route by


@asynccontextmanager
async def open_server(
    config: ServerConfig, *, rank: int = 0, node: int = 0
) -> AsyncIterator[Server]:
    """Start the server ``config`` describes; yield it once its process exists.

    ``await server.wait_ready()`` waits for readiness (requests wait by themselves).
    If the server fails — it exits, prints a fatal line, hangs, or is not ready within
    ``startup_timeout`` — the body is cancelled and ``ServerStartError`` (before
    readiness) or ``ServerCrashed`` (after) is raised. On every way out the server's
    whole process tree is terminated (SIGTERM, ``shutdown_grace``, SIGKILL).
    """
    plan = None
    if isinstance(config, EngineConfig):
        plan = await plan_nodes(config.nodes)
    if plan is not None:
        node = plan.role.rank
    http, wire = http_client(config)
    state = ServerState.create(config, wire, rank=rank, node=node)
    state.nodes = plan
    server = Server(state) if plan is None or plan.is_head else WorkerNode(state)
    try:
        async with http, anyio.create_task_group() as tg:
            server._client = RequestClient(
                config, dispatch=_OneServer(state), redact=state.log.redact
            )
            supervisor = Supervisor(state, tg, http)
            await tg.start(supervisor.run)
            try:
                yield server
            finally:
                supervisor.stop()
    except BaseException as exc:
        raise one_exception(exc, state.failure) from one_exception_cause(exc, state.failure)
    finally:
        state.end()
        state.log.close()
    if state.failure is not None:
        # Our own cancellation is still the "exception being handled" here: hide it.
        raise state.failure from state.failure.__cause__
