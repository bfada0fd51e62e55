"""The request client: where each attempt goes, retries with jittered backoff, errors.

Each attempt asks a ``Dispatcher`` for a ``Target`` — the one server of ``open_server``,
a replica a pool's routing picks — and hands it back with the attempt's ``Outcome``,
exactly once, on every way out (success, error, cancellation): a dispatcher's load
counters and concurrency slots cannot drift. An attempt holds a slot only while it is
on the wire: the backoff sleep before a retry happens *without* one, so a server
answering 503 does not starve every other request of slots. A target that fails while
an attempt is on it cancels the attempt at once (``Target.attempts``); the request is
then sent again without a backoff (to another replica, or it fails with the error).

Classification (see ``_responses`` for statuses): connection errors, timeouts and
408/429/500/502/503/504 are retried up to ``max_retries`` times, then
``RetriesExhausted`` is raised with the last failure as its cause; 400/401/403/404/
413/422 raise ``BadRequest`` at once; a 2xx whose body is not the JSON object it
should be raises ``RequestError`` at once, with an excerpt of what came back.

``request_raw`` follows the same rules but hands back the final ``Reply`` unparsed, a
4xx no retry can help included (for a proxy to pass through). A streamed request
(``stream_raw``; ``stream_chat`` and ``stream_complete`` parse its server-sent events
into ``Chunk``s) follows them only until its first body bytes are handed out: the
attempt holds its target until the body ends, each read has its own deadline
(``request_timeout``, the longest gap allowed) and its own scope in ``Target.attempts``
(never held across a ``yield``), and anything going wrong after the first bytes —
a broken body, a stall, the target failing, an error event, no ``[DONE]`` — raises
``StreamInterrupted``, never a truncated answer. Leaving a stream early closes its
connection, which is how an engine learns to abort the generation.

A request that cannot be sent at all — a payload that is not strict JSON, a header
HTTP cannot carry, a path that is not text — is ``BadRequest`` with ``status_code``
``None``, before anything goes on the wire; a server URL that cannot be used is a
``RequestError``. Neither is retried. Messages name a bad header, never its value,
and everything quoted from a server passes through ``redact`` first.
"""

from __future__ import annotations

import collections
import enum
import json
import random
import time
from collections.abc import Awaitable, Coroutine, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import anyio
import httpx

from ._config import ServerConfig
from ._errors import (
    BadRequest,
    RequestError,
    RequestTimeout,
    RetriesExhausted,
    StreamInterrupted,
)
from ._metrics import Metrics, MetricsSnapshot
from ._responses import (
    RETRYABLE_STATUSES,
    Chunk,
    Completion,
    Redact,
    Usage,
    classify_status,
    parse_chunk,
    parse_completion,
    parse_json,
    usage_of,
)
from ._retry import parse_retry_after, retry_delay
from ._sse import SSEDecoder
from ._transport import Reply, SlotTransport, bad_header

__all__ = [
    "BodyStream",
    "ChunkStream",
    "Dispatcher",
    "OpenStream",
    "Outcome",
    "Post",
    "RawStream",
    "RequestClient",
    "Target",
]

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


class Post(Protocol):
    """Sends one POST and returns the whole reply (``SlotTransport.post`` or a client's)."""

    def __call__(
        self, url: str, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> Awaitable[Reply]: ...


class BodyStream(Protocol):
    """A response whose body is read as it arrives (``_transport.ResponseStream``)."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> list[tuple[bytes, bytes]]: ...

    async def receive(self) -> bytes:
        """The next piece of the body, ``b""`` once it is complete; httpx errors."""
        ...

    async def aclose(self) -> None:
        """Stop: an unfinished response's connection is closed."""
        ...


class OpenStream(Protocol):
    """Sends one POST and returns once the response's head has come
    (``SlotTransport.open_stream``)."""

    def __call__(
        self, url: str, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> Awaitable[BodyStream]: ...


class Outcome(enum.Enum):
    """How an attempt on a target ended, as its dispatcher learns it."""

    ANSWERED = "answered"  # the server answered as it meant to (2xx, a 4xx about the request)
    FAILED = "failed"  # a retryable failure: a 5xx, a broken or missing answer
    THROTTLED = "throttled"  # 429: the server asked for a pause (``retry_after``)
    LOST = "lost"  # the target failed while the attempt was on it
    ABANDONED = "abandoned"  # nothing learnt: cancelled by the caller, never sent


@dataclass(frozen=True)
class Wire:
    """How requests reach one server: the function that posts, and the headers every
    request carries (its API key). A configured header that cannot be encoded makes
    every request a ``BadRequest`` saying so (``unsendable``).

    ``stream`` opens a streamed response; without one (a client that only posts, as
    httpx's behind a proxy), a streamed request is read whole and handed out at once.
    """

    post: Post
    headers: list[tuple[bytes, bytes]]
    unsendable: str = ""
    stream: OpenStream | None = None

    @classmethod
    def build(
        cls, post: Post, headers: Mapping[str, str], stream: OpenStream | None = None
    ) -> Wire:
        """A wire for ``post`` with ``headers`` encoded once (and ``stream``: a
        ``SlotTransport``'s own ``open_stream`` if ``post`` is its ``post``)."""
        owner = getattr(post, "__self__", None)
        if stream is None and isinstance(owner, SlotTransport):
            stream = owner.open_stream
        try:
            return cls(post, encode_headers(headers), stream=stream)
        except BadRequest as exc:
            return cls(post, [], str(exc), stream)

    async def open_stream(
        self, url: str, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> BodyStream:
        """A streamed response to a POST (a whole one, if this wire cannot stream)."""
        if self.stream is not None:
            return await self.stream(url, body, headers)
        return _WholeBody(await self.post(url, body, headers))

    def headers_with(self, extra: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """Its headers with a caller's ``extra`` ones on top."""
        if self.unsendable:
            raise BadRequest(self.unsendable, status_code=None)
        if not extra:
            return self.headers
        names = {name for name, _ in extra}
        return [item for item in self.headers if item[0] not in names] + extra


class _WholeBody:
    """A whole reply as a ``BodyStream`` (for a wire that cannot stream)."""

    def __init__(self, reply: Reply) -> None:
        self.status = reply.status
        self.headers = reply.headers
        self._content = reply.content

    async def receive(self) -> bytes:
        content, self._content = self._content, b""
        return content

    async def aclose(self) -> None:
        self._content = b""


class Target(Protocol):
    """Where an attempt goes: a server's address and wire, and the attempts on the wire
    to it (which it cancels if it fails)."""

    @property
    def base_url(self) -> str: ...

    @property
    def wire(self) -> Wire: ...

    @property
    def lost(self) -> bool: ...

    @property
    def attempts(self) -> set[anyio.CancelScope]: ...


class Dispatcher(Protocol):
    """Gives each attempt a target and takes it back."""

    def route(self, payload: Mapping[str, Any], routing_key: str | None) -> Any:
        """What ``acquire`` needs to know of a request to route it (once per request)."""
        ...

    async def acquire(self, tried: Sequence[Target], route: Any) -> Target:
        """A target for the next attempt (``tried``: those this request already tried);
        waits until one can take it; raises the scope's error once none ever will."""
        ...

    def release(
        self, target: Target, outcome: Outcome, retry_after: float | None, elapsed: float
    ) -> None:
        """``target`` back, after one attempt on it (called once per ``acquire``);
        ``elapsed``: seconds since the attempt was sent."""
        ...

    def check_open(self) -> None:
        """Raise the scope's error (or ``ServerClosed``) if it takes no more requests."""
        ...

    async def backoff(self, seconds: float, tried: Sequence[Target]) -> None:
        """Wait before a retry: ``seconds``, or less if the scope ends meanwhile (a pool:
        not at all if a target this request has not tried can take it now)."""
        ...

    def waiting(self) -> int:
        """Requests waiting for a target now."""
        ...

    def first_byte(self, target: Target, seconds: float) -> None:
        """A streamed answer's first body bytes came from ``target``, ``seconds`` after its
        attempt was sent (a time to first token); called once per stream, before release."""
        ...


@dataclass(frozen=True)
class _Retry:
    """A failed attempt that may be retried."""

    error: RequestError
    retry_after: float | None = None
    outcome: Outcome = Outcome.FAILED


@dataclass(frozen=True)
class _Refused:
    """An attempt whose error no retry can help: raised once the target is back."""

    error: RequestError
    outcome: Outcome = Outcome.ANSWERED


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """The request body for ``payload``, or ``BadRequest`` (never sent) saying why not.

    Strict JSON: NaN and infinities are refused here rather than by the server.
    """
    try:
        return json.dumps(payload, allow_nan=False).encode()
    except RecursionError:
        message = "the request payload is nested too deeply to encode as JSON"
        raise BadRequest(message, status_code=None) from None
    except (TypeError, ValueError) as exc:  # ValueError: NaN/inf, a circular reference
        raise BadRequest(f"the request payload is not JSON: {exc}", status_code=None) from exc


def encode_headers(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """Headers as bytes (names in lower case), or ``BadRequest`` naming one that cannot be.

    Only the types and the encoding are checked here; what HTTP allows in a name or a
    value is the transport's to refuse. A value is never shown: it may be a secret.
    """
    if not isinstance(headers, Mapping):
        message = (
            f"the request cannot be sent: headers must be a mapping, not {type(headers).__name__}"
        )
        raise BadRequest(message, status_code=None)
    encoded = []
    for name, value in headers.items():
        if not isinstance(name, str):
            problem = f"header names must be str, not {type(name).__name__}"
        elif not isinstance(value, str):
            problem = f"header {name!r}: values must be str, not {type(value).__name__}"
        else:
            try:
                encoded.append((name.lower().encode(), value.encode()))
                continue
            except UnicodeEncodeError:
                problem = f"header {name!r} cannot be encoded as UTF-8 (a lone surrogate?)"
        raise BadRequest(f"the request cannot be sent: {problem}", status_code=None)
    return encoded


def _as_is(text: str) -> str:
    return text


class RequestClient:
    """Posts OpenAI requests over keep-alive connections (``post``), each attempt to the
    target its ``dispatch`` gives it.

    Requests wait for a target by themselves, see its current address, and fail fast
    with the scope's own error once it has failed. ``redact`` (the scope's ``Redactor``)
    blanks secrets out of every error message built from what a server sent: a server
    may quote the API key back.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        dispatch: Dispatcher,
        rng: random.Random | None = None,
        redact: Redact | None = None,
    ) -> None:
        self._redact = redact or _as_is
        self._config = config
        self._dispatch = dispatch
        self._rng = rng or random.Random()
        self._metrics = Metrics()

    @property
    def metrics(self) -> MetricsSnapshot:
        """A snapshot of this client's request metrics."""
        return self._metrics.snapshot(waiting=self._dispatch.waiting())

    def request(
        self,
        payload: Mapping[str, Any],
        *,
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
        routing_key: str | None = None,
    ) -> Coroutine[Any, Any, dict[str, Any]]:
        """POST ``payload`` (model and default params filled in); await the JSON answer.

        ``routing_key``: a pool's ``sticky`` routing sends requests with one key to one
        replica while it serves. (Not itself a coroutine: one frame less per request held
        in flight.)"""
        return self._call(payload, path, headers, routing_key, False)

    def request_raw(
        self,
        payload: Mapping[str, Any],
        *,
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
        routing_key: str | None = None,
        body: bytes | None = None,
    ) -> Coroutine[Any, Any, Reply]:
        """As ``request``, but await the final ``Reply`` with its body unparsed: a 2xx as
        it came, and a 4xx no retry can help (400, 404, 422, ...) as it came too, not
        raised, so that a proxy can pass its status and body through. Retryable failures
        are retried, and raise as ``request`` raises them once retries are spent.

        ``body``: ``payload`` as JSON already, sent as it is (a proxy passes a client's
        bytes on; ``payload`` then only routes, and nothing is filled in)."""
        return self._call(payload, path, headers, routing_key, True, body=body)

    def _prepare(
        self, payload: Mapping[str, Any], path: str | None, body: bytes | None
    ) -> tuple[bytes, str]:
        """The body and path of a request, or ``BadRequest`` (never sent) saying why not."""
        if not isinstance(payload, Mapping):
            message = f"the request payload is not a mapping: a {type(payload).__name__}"
            raise BadRequest(message, status_code=None)
        if body is not None:
            data = body
        else:
            data = encode_payload(
                {"model": self._config.model, **self._config.default_params, **payload}
            )
        path = path or (CHAT_PATH if self._config.use_chat else COMPLETIONS_PATH)
        if not isinstance(path, str):
            message = (
                f"the request cannot be sent: its path must be a str, not {type(path).__name__}"
            )
            raise BadRequest(message, status_code=None)
        return data, path

    async def _call(
        self,
        payload: Mapping[str, Any],
        path: str | None,
        headers: Mapping[str, str] | None,
        routing_key: str | None,
        raw: bool,
        stream: bool = False,
        body: bytes | None = None,
    ) -> Any:
        """The retry loop of every request: parsed (``request``), raw (``request_raw``),
        or a stream up to its first body bytes (``stream``; ``raw``: a refusal is handed
        out as it came). A stream holds its target from then on, until it ends."""
        data, path = self._prepare(payload, path, body)
        dispatch = self._dispatch
        dispatch.check_open()
        self._metrics.started += 1
        try:  # one frame for the whole retry loop: it is held for every request in flight
            config, started = self._config, 0.0
            extra = encode_headers(headers) if headers else []
            route = dispatch.route(payload, routing_key)
            tried: list[Target] = []
            for retry in range(config.max_retries + 1):
                target = await dispatch.acquire(tried, route)
                started = started or time.monotonic()
                result: dict[str, Any] | Reply | _Opened | _Retry | _Refused | None = None
                self._metrics.in_flight += 1
                sent = time.monotonic()
                try:
                    if stream:
                        result = await self._open_attempt(target, path, data, extra, raw)
                        if isinstance(result, _Opened):  # from here the stream gives it back
                            return RawStream(self, target, path, result, started, raw)
                    else:
                        result = await self._attempt(target, path, data, extra, raw)
                finally:
                    if not isinstance(result, _Opened):
                        self._metrics.in_flight -= 1
                        _release(dispatch, target, result, sent)
                if isinstance(result, _Refused):
                    raise result.error
                if not isinstance(result, _Retry):
                    assert not isinstance(result, _Opened | None)
                    if isinstance(result, Reply):
                        if result.status >= 300:  # a refusal passed through
                            self._metrics.failed += 1
                            return result
                        usage = _usage_in(result.content)
                    else:
                        usage = usage_of(result)
                    latency = time.monotonic() - started
                    self._metrics.success(latency, usage.prompt_tokens, usage.completion_tokens)
                    return result
                if retry == config.max_retries:
                    attempts = config.max_retries + 1
                    raise RetriesExhausted(
                        f"{path} failed {attempts} times; last: {result.error}"
                    ) from result.error
                self._metrics.retried += 1
                tried.append(target)
                if result.outcome is Outcome.LOST:
                    continue  # its target is gone: send it again at once
                await dispatch.backoff(self._delay(retry, result), tried)
        except Exception:
            self._metrics.failed += 1
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _delay(self, retry: int, result: _Retry) -> float:
        config = self._config
        return retry_delay(
            retry,
            result.retry_after,
            base=config.backoff_base,
            cap=config.backoff_max,
            retry_after_cap=config.retry_after_max,
            rng=self._rng,
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
        """POST ``payload`` and read the answer as it arrives:
        ``async with client.stream_raw(payload) as stream`` gives a ``RawStream``
        (``.status``, ``.headers``, ``async for piece in stream``: raw body bytes).

        Failures are retried only before the first body bytes are handed out; after
        that, a broken answer, a gap between pieces longer than ``request_timeout``, or
        the server failing raises ``StreamInterrupted``. A 4xx no retry can help is
        handed out as it came (its status, its body) for a proxy to pass through.
        Leaving the block before the end closes the connection: the engine aborts the
        generation. The payload is sent as given: ``"stream": true`` is the caller's
        (``body``: as for ``request_raw``).
        """
        return _StreamContext(self, payload, path, headers, routing_key, body)

    def stream_chat(
        self, messages: list[dict[str, Any]], *, routing_key: str | None = None, **params: Any
    ) -> ChunkStream:
        """A streamed chat completion: ``async for chunk in ...`` (or ``async with ... as
        chunks``, which closes the connection if left early) gives ``Chunk``s."""
        payload = {"messages": messages, **params, "stream": True}
        return ChunkStream(self, payload, CHAT_PATH, routing_key)

    def stream_complete(
        self, prompt: str, *, routing_key: str | None = None, **params: Any
    ) -> ChunkStream:
        """A streamed text completion of ``prompt``, as ``stream_chat``."""
        payload = {"prompt": prompt, **params, "stream": True}
        return ChunkStream(self, payload, COMPLETIONS_PATH, routing_key)

    async def chat(
        self, messages: list[dict[str, Any]], *, routing_key: str | None = None, **params: Any
    ) -> Completion:
        """A chat completion for ``messages``."""
        payload = {"messages": messages, **params}
        response = await self.request(payload, path=CHAT_PATH, routing_key=routing_key)
        return self.parse_completion(response)

    async def complete(
        self, prompt: str, *, routing_key: str | None = None, **params: Any
    ) -> Completion:
        """A text completion of ``prompt``."""
        payload = {"prompt": prompt, **params}
        response = await self.request(payload, path=COMPLETIONS_PATH, routing_key=routing_key)
        return self.parse_completion(response)

    def parse_completion(self, response: dict[str, Any]) -> Completion:
        """``parse_completion`` with this pool's secrets kept out of its errors."""
        return parse_completion(response, self._redact)

    async def _attempt(
        self, target: Target, path: str, body: bytes, extra: list[tuple[bytes, bytes]], raw: bool
    ) -> dict[str, Any] | Reply | _Retry | _Refused:
        limit, redact = self._config.request_timeout, self._redact
        reply = None
        try:
            headers = target.wire.headers_with(extra)
        except BadRequest as exc:
            return _Refused(exc, Outcome.ABANDONED)
        # A bare CancelScope, not fail_after: lighter per request held in flight. The
        # target cancels it if it fails meanwhile.
        scope = anyio.CancelScope(deadline=anyio.current_time() + limit)
        target.attempts.add(scope)
        try:
            with scope:
                reply = await target.wire.post(target.base_url + path, body, headers)
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            return self._failure(exc, target, path, headers)
        finally:
            target.attempts.discard(scope)
        if reply is None:
            return _lost(target) or _Retry(
                RequestTimeout(f"no complete answer from {path} within {limit:g} s")
            )
        error = classify_status(reply.status, reply.content, redact)
        if error is not None:
            if raw and 400 <= reply.status < 500:
                return reply  # a refusal, for a proxy to pass through
            return _Refused(error)
        if reply.status >= 300:
            return _retry_status(reply.status, reply.headers, path)
        if raw:
            return reply
        try:
            return parse_json(reply.content, redact)
        except RequestError as exc:
            return _Refused(exc)

    def _failure(
        self,
        exc: Exception,
        target: Target,
        path: str,
        headers: list[tuple[bytes, bytes]],
    ) -> _Retry | _Refused:
        """What a transport error before the answer means: a retry, or a refusal."""
        redact = self._redact
        if isinstance(exc, httpx.TimeoutException):
            return _lost(target) or _Retry(
                RequestTimeout(redact(f"no answer from {path} in time ({exc})"))
            )
        if isinstance(exc, httpx.LocalProtocolError):
            # Not chained: httpcore's message (the proxied path) quotes the bad header's value.
            problem = redact(bad_header(headers) or str(exc))
            message = f"{path} cannot be sent: {problem}"
            return _Refused(BadRequest(message, status_code=None), Outcome.ABANDONED)
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
            # Not chained: the cause would repeat the URL, unredacted.
            return _Refused(RequestError(redact(f"{path}: {exc}")), Outcome.ABANDONED)
        # the transport's message may quote what the server sent
        return _lost(target) or _Retry(RequestError(redact(f"{path}: {type(exc).__name__}: {exc}")))

    async def _open_attempt(
        self,
        target: Target,
        path: str,
        body: bytes,
        extra: list[tuple[bytes, bytes]],
        passthrough: bool,
    ) -> _Opened | _Retry | _Refused:
        """One attempt at a stream, up to its first body bytes (or its end)."""
        limit, redact = self._config.request_timeout, self._redact
        try:
            headers = target.wire.headers_with(extra)
        except BadRequest as exc:
            return _Refused(exc, Outcome.ABANDONED)
        scope = anyio.CancelScope(deadline=anyio.current_time() + limit)
        target.attempts.add(scope)
        response: BodyStream | None = None
        first, sent = None, time.monotonic()
        try:
            with scope:
                response = await target.wire.open_stream(target.base_url + path, body, headers)
                if response.status not in RETRYABLE_STATUSES:
                    first = await response.receive()
        except (httpx.TransportError, httpx.InvalidURL) as exc:  # the transport closed it
            return self._failure(exc, target, path, headers)
        except BaseException:
            if response is not None:
                await response.aclose()
            raise
        finally:
            target.attempts.discard(scope)
        if response is None or (first is None and response.status not in RETRYABLE_STATUSES):
            if response is not None:
                await response.aclose()
            return _lost(target) or _Retry(
                RequestTimeout(f"no answer from {path} within {limit:g} s")
            )
        status = response.status
        if first is None:  # a retryable status: its body is not wanted
            await response.aclose()
            return _retry_status(status, response.headers, path)
        if 200 <= status < 300:
            if first:
                self._dispatch.first_byte(target, time.monotonic() - sent)
            return _Opened(response, first, ok=True, sent=sent)
        if passthrough and 400 <= status < 500:
            return _Opened(response, first, ok=False, sent=sent)
        await response.aclose()
        error = classify_status(status, first, redact) or RequestError(
            f"server answered {status} to {path}"
        )
        return _Refused(error)


def _lost(target: Target) -> _Retry | None:
    """The retry for an attempt whose target failed under it, if it did."""
    if not target.lost:
        return None
    error = RequestError("the server failed (or stopped answering) while the request was on it")
    return _Retry(error, None, Outcome.LOST)


def _retry_status(status: int, headers: list[tuple[bytes, bytes]], path: str) -> _Retry:
    """The retry for a retryable status (429: the server asked for a pause)."""
    retry_after = parse_retry_after(_header(headers, b"retry-after"))
    message = f"server answered {status} to {path}"
    outcome = Outcome.THROTTLED if status == 429 else Outcome.FAILED
    return _Retry(RequestError(message), retry_after, outcome)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _usage_in(content: bytes) -> Usage:
    """The token counts in a raw answer, for the metrics (zeros if it has none)."""
    if b'"usage"' not in content:
        return Usage()
    try:
        value = json.loads(content)
    except (ValueError, RecursionError):
        return Usage()
    return usage_of(value) if isinstance(value, dict) else Usage()


@dataclass(frozen=True)
class _Opened:
    """A stream whose head and first body bytes came (``ok``: a 2xx, else a refusal
    passed through)."""

    response: BodyStream
    first: bytes
    ok: bool
    sent: float  # when its attempt was sent (``time.monotonic()``)


def _release(
    dispatch: Dispatcher,
    target: Target,
    result: dict[str, Any] | Reply | _Opened | _Retry | _Refused | None,
    sent: float,
) -> None:
    """Give ``target`` back with what the attempt on it, sent at ``sent``, taught
    (``None``: cancelled)."""
    elapsed = time.monotonic() - sent
    if result is None:
        dispatch.release(target, Outcome.ABANDONED, None, elapsed)
    elif isinstance(result, _Retry):
        dispatch.release(target, result.outcome, result.retry_after, elapsed)
    elif isinstance(result, _Refused):
        dispatch.release(target, result.outcome, None, elapsed)
    else:
        dispatch.release(target, Outcome.ANSWERED, None, elapsed)


class RawStream:
    """A streamed answer being read: ``status``, ``headers``, then ``async for`` over the
    raw body's pieces (or ``receive()``: ``b""`` at the end).

    It holds its target (a concurrency slot, a replica's load) until the body ends, a
    read fails, or it is closed, and gives it back exactly once. Each read has its own
    deadline (``request_timeout``) and its own cancel scope in ``target.attempts`` —
    none is held between reads — so the target failing interrupts a read in progress.
    After the first bytes nothing is retried: a failure is ``StreamInterrupted``.
    """

    def __init__(
        self,
        client: RequestClient,
        target: Target,
        path: str,
        opened: _Opened,
        started: float,
        whole_at_end: bool = True,
    ) -> None:
        self.status = opened.response.status
        self.headers = opened.response.headers
        self.usage: Usage | None = None  # the token counts, where a parser found them
        self._client = client
        self._target: Target | None = target
        self._path = path
        self._response = opened.response
        self._pending = opened.first
        self._ok = opened.ok
        self._started = started
        self._sent = opened.sent
        self._error: StreamInterrupted | None = None
        # False: a parser says whether the answer was whole (``_end``) or not (``_fail``).
        self._whole_at_end = whole_at_end
        if not opened.first and whole_at_end:  # the body was empty and is over
            self._finish(Outcome.ANSWERED, ok=opened.ok)

    @property
    def done(self) -> bool:
        """Whether it has given its target back (ended, failed or closed)."""
        return self._target is None

    def __aiter__(self) -> RawStream:
        return self

    async def __anext__(self) -> bytes:
        data = await self.receive()
        if not data:
            raise StopAsyncIteration
        return data

    async def receive(self) -> bytes:
        """The next piece of the body, or ``b""`` once it has ended whole;
        ``StreamInterrupted`` if it broke off (and again on every later call)."""
        if self._pending:
            first, self._pending = self._pending, b""
            return first
        target = self._target
        if target is None:
            if self._error is not None:
                raise self._error
            return b""
        limit, path = self._client._config.request_timeout, self._path
        if target.lost:  # it failed between two reads
            await self._response.aclose()
            raise self._interrupt(f"{path}: the server failed while streaming the answer", target)
        scope = anyio.CancelScope(deadline=anyio.current_time() + limit)
        target.attempts.add(scope)
        data: bytes | None = None
        try:
            with scope:
                data = await self._response.receive()
        except httpx.TransportError as exc:  # the transport closed the connection
            problem = self._client._redact(f"{type(exc).__name__}: {exc}")
            raise self._interrupt(f"{path}: the answer broke off: {problem}", target) from exc
        except BaseException:  # the caller's cancellation: nothing learnt
            await self._response.aclose()
            self._finish(Outcome.ABANDONED, ok=None)
            raise
        finally:
            target.attempts.discard(scope)
        if data is None:
            await self._response.aclose()
            if target.lost:
                message = f"{path}: the server failed while streaming the answer"
            else:
                message = f"{path}: no more of the answer for {limit:g} s"
            raise self._interrupt(message, target)
        if not data and self._whole_at_end:
            self._finish(Outcome.ANSWERED, ok=self._ok)
        return data

    async def aclose(self) -> None:
        """Stop reading; before the end, the connection is closed (the engine aborts)."""
        self._pending = b""
        if self._target is not None:
            await self._response.aclose()
            self._finish(Outcome.ABANDONED, ok=None)

    async def _fail(self, error: RequestError) -> StreamInterrupted | RequestError:
        """The server sent what cannot be read: close, count it failed, and return
        ``error`` to raise (every later read raises it as ``StreamInterrupted``)."""
        self._pending = b""
        if self._target is not None:
            await self._response.aclose()
            self._finish(Outcome.FAILED, ok=False)
        self._error = (
            error if isinstance(error, StreamInterrupted) else StreamInterrupted(str(error))
        )
        return error

    async def _end(self, seconds: float) -> None:
        """After the end marker: read to the body's end for the connection's reuse, but
        no longer than ``seconds``; either way the answer counts as whole."""
        self._pending = b""
        with anyio.move_on_after(seconds):
            try:
                while self._target is not None and await self._response.receive():
                    pass
            except httpx.TransportError:
                pass
        if self._target is not None:
            await self._response.aclose()
            self._finish(Outcome.ANSWERED, ok=self._ok)

    def __del__(self) -> None:
        # Left unfinished without ``aclose`` (a bare ``async for`` left by ``break``):
        # give the slot back at least; the connection closes as its socket is collected.
        if self._target is not None:
            try:
                self._finish(Outcome.ABANDONED, ok=None)
            except Exception:  # pragma: no cover - a finalizer must not raise
                pass

    def _interrupt(self, message: str, target: Target) -> StreamInterrupted:
        self._finish(Outcome.LOST if target.lost else Outcome.FAILED, ok=False)
        self._error = StreamInterrupted(message)
        return self._error

    def _finish(self, outcome: Outcome, *, ok: bool | None) -> None:
        """Give the target back, once, and count the request (``ok``: ``None`` if
        abandoned, neither a success nor a failure)."""
        target, self._target = self._target, None
        if target is None:
            return
        client = self._client
        client._metrics.in_flight -= 1
        client._dispatch.release(target, outcome, None, time.monotonic() - self._sent)
        if ok:
            usage = self.usage or Usage()
            latency = time.monotonic() - self._started
            client._metrics.success(latency, usage.prompt_tokens, usage.completion_tokens)
        elif ok is not None:
            client._metrics.failed += 1


class _StreamContext:
    """``async with client.stream_raw(...) as stream``: opened on entry, closed on exit."""

    def __init__(
        self,
        client: RequestClient,
        payload: Mapping[str, Any],
        path: str | None,
        headers: Mapping[str, str] | None,
        routing_key: str | None,
        body: bytes | None,
    ) -> None:
        self._open = (client, payload, path, headers, routing_key, body)
        self._stream: RawStream | None = None

    async def __aenter__(self) -> RawStream:
        client, payload, path, headers, routing_key, body = self._open
        self._stream = await client._call(
            payload, path, headers, routing_key, True, stream=True, body=body
        )
        return self._stream

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._stream is not None:
            await self._stream.aclose()


class ChunkStream:
    """A streamed completion's ``Chunk``s: ``async for chunk in stream`` or
    ``async with stream as chunks: async for chunk in chunks``.

    It ends at ``data: [DONE]``. A stream that ends without it, or that carries an
    ``{"error": ...}`` event, raises ``StreamInterrupted``; a chunk that is not the JSON
    it should be raises ``RequestError``. Only the ``async with`` form closes the
    connection at once when left early (a bare ``async for`` left by ``break`` closes
    it when the stream is garbage-collected).
    """

    _DRAIN_SECONDS = 1.0

    def __init__(
        self,
        client: RequestClient,
        payload: dict[str, Any],
        path: str,
        routing_key: str | None,
    ) -> None:
        self._client = client
        self._request = (payload, path, routing_key)
        self._raw: RawStream | None = None
        self._decoder = SSEDecoder()
        self._events: collections.deque[Any] = collections.deque()
        self._over = False

    async def __aenter__(self) -> ChunkStream:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop: before the end, the connection is closed (the engine aborts)."""
        self._over = True
        if self._raw is not None:
            await self._raw.aclose()

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._raw is None and not self._over:
            await self._open()
        raw = self._raw
        if raw is None or self._over:
            raise StopAsyncIteration
        redact = self._client._redact
        while not self._events:
            data = await raw.receive()
            if not data:
                self._over = True
                raise await raw._fail(
                    StreamInterrupted(f"{self._request[1]}: the stream ended without [DONE]")
                )
            try:
                self._events.extend(self._decoder.feed(data))
            except RequestError as exc:
                self._over = True
                raise await raw._fail(exc) from None
        event = self._events.popleft()
        if event.data == "[DONE]":
            self._over = True
            await raw._end(min(self._DRAIN_SECONDS, self._client._config.request_timeout))
            raise StopAsyncIteration
        try:
            chunk = parse_chunk(parse_json(event.data.encode(), redact), redact)
        except RequestError as exc:
            self._over = True
            raise await raw._fail(exc) from None
        if chunk.usage is not None:
            raw.usage = chunk.usage
        return chunk

    async def _open(self) -> None:
        payload, path, routing_key = self._request
        self._over = False
        self._raw = await self._client._call(payload, path, None, routing_key, False, stream=True)
