"""The router front: one OpenAI endpoint that many clients share, in front of a pool.

::

    open_front(pool, config)             the caller's task group, or one of its own
     ├─ serve_http                        connections; each request → Front.handle
     └─ Front.expire_leases               registered replicas that stopped renewing → ejected

Routes (``Front.handle``):

- ``POST /v1/chat/completions``, ``POST /v1/completions``: whole or streamed (``"stream":
  true``), bodies passed through both ways, ``model`` checked against the pool's. A
  request waits for a turn (``_admission``), goes to a replica the pool picks, is
  retried elsewhere if that replica fails before answering — for a stream, only before
  its first byte; a replica dying mid-stream ends the stream with an SSE error event
  (``data: {"error": ...}``, which the openai SDK raises as ``APIError``), never a
  silent truncation. A client that goes away cancels its request: the connection to the
  replica is closed, and the engine aborts the generation.
- ``GET /v1/models``; ``GET /health`` (the front answers); ``GET /readiness`` (200 once
  ``min_ready`` replicas are ready, else 503); ``GET /metrics`` (Prometheus).
- Admin, with the admin token as a bearer token (401 without it): ``GET /workers``,
  ``POST /workers`` (``{"url": ..., "api_key"?: ..., "lease"?: true}``: checked before
  it takes traffic), ``POST /workers/{id}/lease`` (renew), ``DELETE /workers/{id}``
  (drain, then remove), ``POST /pause``, ``/resume``, ``/drain``.

``x-request-id`` is taken from the client (if it is a sane token) or assigned, sent to
the replica, returned to the client, and logged. Every error answer is OpenAI-shaped
(``{"error": {"message", "type", "code"}}``) and carries no secret.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import TaskGroup

from ._admission import Admission, Rejected
from ._asgi import listen_socket
from ._errors import (
    BadRequest,
    ConfigError,
    ControlError,
    PoolFailed,
    RequestError,
    RequestTimeout,
    RetriesExhausted,
    ServeError,
    ServerClosed,
    StreamInterrupted,
)
from ._frontconfig import FrontConfig, is_loopback
from ._frontmetrics import CONTENT_TYPE, FrontMetrics
from ._httpserver import Request, Responder, serve_http
from ._leases import RENEW_EVERY, Leases
from ._pool import Pool
from ._redact import Redactor
from ._replica_state import ReplicaState
from ._sse import encode_data

__all__ = ["Front", "open_front", "start_front"]

logger = logging.getLogger("servescope.front")

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
_JSON = (b"content-type", b"application/json")
_EVENT_STREAM = (b"content-type", b"text/event-stream")
_NO_CACHE = (b"cache-control", b"no-cache")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_WORKER = re.compile(r"/workers/(\d{1,9})(/lease)?")
#: How a ServeError from the pool becomes an HTTP status for the client.
_STATUS_OF: list[tuple[type[ServeError], int, str]] = [
    (RequestTimeout, 504, "timeout"),
    (RetriesExhausted, 502, "upstream_error"),
    (ServerClosed, 503, "unavailable"),
    (PoolFailed, 503, "unavailable"),
    (RequestError, 502, "upstream_error"),
]


class _Answer(Exception):
    """An error answer decided deep in a handler: status, message, type, headers."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.headers = list(headers)


class Front:
    """The front's routes over one pool (see the module docstring)."""

    def __init__(self, pool: Pool, config: FrontConfig) -> None:
        self.pool = pool
        self.config = config
        self.admission = Admission(config.max_concurrency, config.queue_size, config.queue_timeout)
        self.metrics = FrontMetrics(pool, self.admission)
        pool.observer = self.metrics
        self.leases = Leases(config.lease_ttl)
        self.address: tuple[str, int] | None = None
        self._redact = Redactor(config.secrets())
        self._leases_changed = anyio.Event()
        self._created = int(time.time())
        self._defaults = bool(pool.config.default_params)
        admin: dict[tuple[str, str], Callable[[Request], Awaitable[tuple[int, Any]]]] = {
            ("GET", "/workers"): self._workers,
            ("POST", "/workers"): self._register,
            ("POST", "/pause"): self._pause,
            ("POST", "/resume"): self._resume,
            ("POST", "/drain"): self._drain,
        }
        self._admin = admin
        token = config.admin_token
        self._admin_auth = f"Bearer {token.get_secret_value()}".encode() if token else None
        key = config.api_key
        self._client_auth = f"Bearer {key.get_secret_value()}".encode() if key else None

    @property
    def renew_every(self) -> float:
        """How often a registered server is told to renew: three renewals per lease."""
        return min(RENEW_EVERY, self.leases.ttl / 3)

    @property
    def url(self) -> str:
        """Where clients reach it (``http://host:port``)."""
        assert self.address is not None
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    # -- the request surface ----------------------------------------------------------------

    async def handle(self, request: Request, responder: Responder) -> None:
        """Answer one request (the ``serve_http`` handler)."""
        method, path = request.method, request.path
        route = path if path in (CHAT_PATH, COMPLETIONS_PATH) else "other"
        try:
            if method == "POST" and route != "other":
                await self._proxy(request, responder, path)
            elif method == "GET" and path == "/health":
                await self._json(responder, 200, {"status": "ok"})
            elif method == "GET" and path == "/readiness":
                await self._readiness(responder)
            elif method == "GET" and path == "/v1/models":
                self._authorize_client(request)
                await self._json(responder, 200, self._models())
            elif method == "GET" and path == "/metrics":
                await responder.respond(
                    200, self.metrics.render(), [(b"content-type", CONTENT_TYPE)]
                )
            else:
                await self._admin_route(request, responder)
        except _Answer as answer:
            if not responder.started:
                await self._error(
                    responder, answer.status, str(answer), answer.kind, answer.headers
                )
        if responder.status is not None:
            self.metrics.requests.labels(route, str(responder.status)).inc()

    def _authorize_client(self, request: Request) -> None:
        if self._client_auth is None:
            return
        given = request.header(b"authorization") or ""
        if not hmac.compare_digest(given.encode("latin-1"), self._client_auth):
            raise _Answer(401, "invalid or missing API key", "authentication_error")

    async def _proxy(self, request: Request, responder: Responder, path: str) -> None:
        self._authorize_client(request)
        rid = _request_id(request)
        tag = [(b"x-request-id", rid.encode())]
        payload = _payload(request.body, self.pool.config.model)
        streamed = payload.get("stream") is True
        # The client's bytes go on as they came, unless the model or defaults must be added.
        body = request.body if "model" in payload and not self._defaults else None
        try:
            async with self.admission.slot():
                headers = {"x-request-id": rid}
                if streamed:
                    await self._stream(payload, body, path, headers, responder, tag, rid)
                else:
                    reply = await self.pool.request_raw(
                        payload, path=path, headers=headers, body=body
                    )
                    kind = reply.header(b"content-type")
                    head = [(b"content-type", kind.encode("latin-1")) if kind else _JSON, *tag]
                    await responder.respond(reply.status, reply.content, head)
        except Rejected as rejected:
            logger.warning("front: request %s turned away: %s", rid, rejected)
            retry = [(b"retry-after", b"%d" % rejected.retry_after), *tag]
            raise _Answer(rejected.status, str(rejected), "overloaded", retry) from None
        except BadRequest as exc:
            status = exc.status_code or 400
            raise _Answer(status, self._redact(str(exc)), "invalid_request_error", tag) from None
        except ServeError as exc:
            status, kind = next((s, k) for cls, s, k in _STATUS_OF if isinstance(exc, cls))
            message = self._redact(str(exc))
            logger.warning("front: request %s failed (%d): %s", rid, status, message)
            raise _Answer(status, message, kind, tag) from None
        if logger.isEnabledFor(logging.INFO):
            logger.info("front: %s %s %s -> %d", rid, request.method, path, responder.status)

    async def _stream(
        self,
        payload: dict[str, Any],
        body: bytes | None,
        path: str,
        headers: dict[str, str],
        responder: Responder,
        tag: list[tuple[bytes, bytes]],
        rid: str,
    ) -> None:
        upstream_stream = self.pool.stream_raw(payload, path=path, headers=headers, body=body)
        async with upstream_stream as upstream:
            kind = _header(upstream.headers, b"content-type")
            head = [(b"content-type", kind) if kind else _EVENT_STREAM, _NO_CACHE, *tag]
            await responder.start(upstream.status, head)
            try:
                async for chunk in upstream:
                    await responder.send(chunk)
            except StreamInterrupted as exc:
                message = self._redact(str(exc))
                logger.warning("front: stream %s broke off: %s", rid, message)
                error = {"error": {"message": message, "type": "upstream_error", "code": 502}}
                await responder.send(encode_data(json.dumps(error)))

    async def _readiness(self, responder: Responder) -> None:
        ready, wanted = self.pool.ready_count(), self.config.min_ready
        body = {"ready": ready, "min_ready": wanted, "replicas": len(self.pool.replicas)}
        await self._json(responder, 200 if ready >= wanted else 503, body)

    def _models(self) -> dict[str, Any]:
        model = {
            "id": self.pool.config.model,
            "object": "model",
            "created": self._created,
            "owned_by": "servescope",
        }
        return {"object": "list", "data": [model]}

    # -- admin --------------------------------------------------------------------------------

    async def _admin_route(self, request: Request, responder: Responder) -> None:
        method, path = request.method, request.path
        handler = self._admin.get((method, path))
        worker = _WORKER.fullmatch(path)
        if handler is None and worker is None:
            known = {p for _, p in self._admin} | {CHAT_PATH, COMPLETIONS_PATH, "/health"}
            known |= {"/readiness", "/v1/models", "/metrics"}
            if path in known:
                raise _Answer(
                    405, f"method {method} not allowed on {path}", "invalid_request_error"
                )
            raise _Answer(404, f"no route {path}", "not_found_error")
        self._authorize_admin(request)
        if handler is not None:
            status, body = await handler(request)
        else:
            assert worker is not None
            index, lease = int(worker.group(1)), worker.group(2)
            if method == "POST" and lease:
                status, body = self._renew(index)
            elif method == "DELETE" and not lease:
                status, body = await self._deregister(index)
            else:
                raise _Answer(
                    405, f"method {method} not allowed on {path}", "invalid_request_error"
                )
        await self._json(responder, status, body)

    def _authorize_admin(self, request: Request) -> None:
        if self._admin_auth is None:
            return  # loopback only (FrontConfig refuses any other address without a token)
        given = request.header(b"authorization") or ""
        if not hmac.compare_digest(given.encode("latin-1"), self._admin_auth):
            raise _Answer(401, "the admin API needs the admin token", "authentication_error")

    async def _workers(self, request: Request) -> tuple[int, Any]:
        now = anyio.current_time()
        workers = []
        for info in self.pool.replicas:
            item = {
                "id": info.index,
                "url": info.base_url,
                "state": info.state,
                "in_flight": info.in_flight,
                "restarts": info.restarts,
                "answered": info.answered,
                "failed": info.failed,
                "lost": info.lost,
                "breaker": info.breaker,
                "last_error": info.last_error,
                "lease_left": self.leases.left(info.index, now),
            }
            workers.append(item)
        return 200, {"workers": workers}

    async def _register(self, request: Request) -> tuple[int, Any]:
        body = _json_object(request.body)
        url, api_key, lease = body.get("url"), body.get("api_key"), body.get("lease", False)
        if not isinstance(url, str) or not url:
            raise _Answer(400, "'url' must be a non-empty string", "invalid_request_error")
        if api_key is not None and not isinstance(api_key, str):
            raise _Answer(400, "'api_key' must be a string", "invalid_request_error")
        if not isinstance(lease, bool):
            raise _Answer(400, "'lease' must be true or false", "invalid_request_error")
        url = url.rstrip("/").removesuffix("/v1")
        if self._is_self(url):
            raise _Answer(400, "that is this front's own address", "invalid_request_error")
        now = anyio.current_time()
        index = self.leases.holder(url) if lease else None
        if index is None:
            index = next((i.index for i in self.pool.replicas if i.base_url == url), None)
        if index is not None:  # the same server again (a restart on the same address)
            if lease:
                self.leases.grant(index, url, now)
                self._leases_changed.set()
            return 200, self._registered(index, lease)
        try:
            index = self.pool.add_endpoint(url, api_key=api_key)
        except ConfigError as exc:
            raise _Answer(400, f"invalid worker: {exc}", "invalid_request_error") from None
        except (ServerClosed, ControlError) as exc:
            raise _Answer(409, str(exc), "conflict") from None
        if lease:
            self.leases.grant(index, url, now)
            self._leases_changed.set()
        status = await self._checked(index)
        logger.info("front: worker %d registered (%s), state %s", index, url, status)
        return (201 if status == "ready" else 202), self._registered(index, lease)

    def _is_self(self, url: str) -> bool:
        """Whether ``url`` reaches this front (a replica there would route to itself)."""
        try:
            parts = urllib.parse.urlsplit(url)
            host, port = parts.hostname or "", parts.port
        except ValueError:
            return False  # not a URL: the replica's config says so
        if self.address is None or port != self.address[1]:
            return False
        return host == self.address[0] or (is_loopback(host) and is_loopback(self.address[0]))

    async def _checked(self, index: int) -> str:
        """The new replica's state once its first check is done (or the probe timeout
        passed); one that failed its check is removed again (``_Answer`` 502)."""
        with anyio.move_on_after(self.config.probe_timeout):
            while True:
                replica = self.pool.member(index)
                if replica is None:
                    return "stopped"
                if replica.state is ReplicaState.READY:
                    return "ready"
                if replica.last_error is not None:
                    reason = self._redact(replica.last_error.reason)
                    self.leases.drop(index)
                    await self.pool.remove(index, drain_timeout=0)
                    raise _Answer(502, f"the worker failed its check: {reason}", "upstream_error")
                await self.pool.changed()
        return "starting"

    def _registered(self, index: int, lease: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"id": index}
        if lease:
            body.update(lease_ttl=self.leases.ttl, renew_every=self.renew_every)
        return body

    def _renew(self, index: int) -> tuple[int, Any]:
        if not self.leases.renew(index, anyio.current_time()):
            raise _Answer(404, f"worker {index} holds no lease: register again", "not_found_error")
        return 200, {"id": index, "lease_ttl": self.leases.ttl}

    async def _deregister(self, index: int) -> tuple[int, Any]:
        if self.pool.member(index) is None:
            raise _Answer(404, f"no worker {index}", "not_found_error")
        self.leases.drop(index)
        await self.pool.remove(index, drain_timeout=self.config.drain_timeout)
        logger.info("front: worker %d removed", index)
        return 200, {"id": index, "removed": True}

    async def _pause(self, request: Request) -> tuple[int, Any]:
        return await self._control(self.pool.pause(), "paused")

    async def _resume(self, request: Request) -> tuple[int, Any]:
        return await self._control(self.pool.resume(), "running")

    async def _drain(self, request: Request) -> tuple[int, Any]:
        return await self._control(self.pool.drain(self.config.drain_timeout), "stopped")

    async def _control(self, signal: Awaitable[None], state: str) -> tuple[int, Any]:
        try:
            await signal
        except (ControlError, ServerClosed, PoolFailed) as exc:
            raise _Answer(409, str(exc), "conflict") from None
        return 200, {"state": state}

    async def expire_leases(self) -> None:
        """Eject each registered replica whose lease lapses (runs until cancelled)."""
        while True:
            self._leases_changed = anyio.Event()
            expiry = self.leases.next_expiry()
            wait = 3600.0 if expiry is None else max(0.0, expiry - anyio.current_time())
            with anyio.move_on_after(wait):
                await self._leases_changed.wait()
            for index in self.leases.lapsed(anyio.current_time()):
                if self.pool.member(index) is not None:
                    ttl = self.leases.ttl
                    await self.pool.eject(index, f"its lease lapsed (not renewed for {ttl:g} s)")

    # -- answers --------------------------------------------------------------------------------

    async def _json(self, responder: Responder, status: int, body: Any) -> None:
        await responder.respond(status, json.dumps(body).encode(), [_JSON])

    async def _error(
        self,
        responder: Responder,
        status: int,
        message: str,
        kind: str,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        error = {"error": {"message": message, "type": kind, "param": None, "code": status}}
        await responder.respond(status, json.dumps(error).encode(), [_JSON, *headers])


def _request_id(request: Request) -> str:
    """The client's ``x-request-id`` if it is a sane token, else a new one."""
    given = request.header(b"x-request-id")
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    return os.urandom(16).hex()  # as random as uuid4().hex, at a third of its cost


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except RecursionError:
        raise _Answer(400, "the body is nested too deeply", "invalid_request_error") from None
    except ValueError as exc:
        raise _Answer(400, f"the body is not valid JSON: {exc}", "invalid_request_error") from None
    if not isinstance(value, dict):
        raise _Answer(400, "the body must be a JSON object", "invalid_request_error")
    return value


def _payload(body: bytes, model: str) -> dict[str, Any]:
    """The request's JSON object, its ``model`` checked (404 for another model, as
    vLLM answers)."""
    payload = _json_object(body)
    asked = payload.get("model")
    if asked is not None and asked != model:
        shown = json.dumps(asked)[:200]
        raise _Answer(
            404,
            f"the model {shown} does not exist here (this front serves {model!r})",
            "not_found_error",
        )
    return payload


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((value for key, value in headers if key == name), None)


async def start_front(tg: TaskGroup, pool: Pool, config: FrontConfig) -> Front:
    """Listen on ``config.host:port`` and serve ``pool`` there from ``tg`` (until ``tg``
    is cancelled); the running front (``front.url``)."""
    front = Front(pool, config)
    try:
        sock = listen_socket(config.host, config.port)
    except OSError as exc:
        raise ConfigError(
            f"the front cannot listen on {config.host}:{config.port}: {exc}"
        ) from None
    front.address = sock.getsockname()[:2]
    try:
        await tg.start(serve_http, front.handle, sock)
    except BaseException:
        sock.close()
        raise
    tg.start_soon(front.expire_leases)
    logger.info("front: serving %s on %s", pool.config.model, front.url)
    return front


@asynccontextmanager
async def open_front(pool: Pool, config: FrontConfig) -> AsyncIterator[Front]:
    """A front for ``pool`` for the duration of the block."""
    async with anyio.create_task_group() as tg:
        front = await start_front(tg, pool, config)
        try:
            yield front
        finally:
            tg.cancel_scope.cancel()
