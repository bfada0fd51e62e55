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

A request that cannot be sent at all — a payload that is not strict JSON, a header
HTTP cannot carry, a path that is not text — is ``BadRequest`` with ``status_code``
``None``, before anything goes on the wire; a server URL that cannot be used is a
``RequestError``. Neither is retried. Messages name a bad header, never its value,
and everything quoted from a server passes through ``redact`` first.
"""

from __future__ import annotations

import enum
import json
import random
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import httpx

from ._config import ServerConfig
from ._errors import BadRequest, RequestError, RequestTimeout, RetriesExhausted
from ._metrics import Metrics, MetricsSnapshot
from ._responses import (
    Completion,
    Redact,
    classify_status,
    parse_completion,
    parse_json,
    usage_of,
)
from ._retry import parse_retry_after, retry_delay
from ._transport import Reply, bad_header

__all__ = ["Dispatcher", "Outcome", "Post", "RequestClient", "Target"]

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


class Post(Protocol):
    """Sends one POST and returns the whole reply (``SlotTransport.post`` or a client's)."""

    def __call__(
        self, url: str, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> Awaitable[Reply]: ...


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
    every request a ``BadRequest`` saying so (``unsendable``)."""

    post: Post
    headers: list[tuple[bytes, bytes]]
    unsendable: str = ""

    @classmethod
    def build(cls, post: Post, headers: Mapping[str, str]) -> Wire:
        """A wire for ``post`` with ``headers`` encoded once."""
        try:
            return cls(post, encode_headers(headers))
        except BadRequest as exc:
            return cls(post, [], str(exc))

    def headers_with(self, extra: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """Its headers with a caller's ``extra`` ones on top."""
        if self.unsendable:
            raise BadRequest(self.unsendable, status_code=None)
        if not extra:
            return self.headers
        names = {name for name, _ in extra}
        return [item for item in self.headers if item[0] not in names] + extra


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

    def release(self, target: Target, outcome: Outcome, retry_after: float | None) -> None:
        """``target`` back, after one attempt on it (called once per ``acquire``)."""
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

    async def request(
        self,
        payload: Mapping[str, Any],
        *,
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
        routing_key: str | None = None,
    ) -> dict[str, Any]:
        """POST ``payload`` (model and default params filled in); the JSON answer.

        ``routing_key``: a pool's ``sticky`` routing sends requests with one key to one
        replica while it serves."""
        if not isinstance(payload, Mapping):
            message = f"the request payload is not a mapping: a {type(payload).__name__}"
            raise BadRequest(message, status_code=None)
        data = encode_payload(
            {"model": self._config.model, **self._config.default_params, **payload}
        )
        path = path or (CHAT_PATH if self._config.use_chat else COMPLETIONS_PATH)
        if not isinstance(path, str):
            message = (
                f"the request cannot be sent: its path must be a str, not {type(path).__name__}"
            )
            raise BadRequest(message, status_code=None)
        dispatch = self._dispatch
        dispatch.check_open()
        self._metrics.started += 1
        try:  # one frame for the whole retry loop: it is held for every request in flight
            config, started = self._config, None
            extra = encode_headers(headers) if headers else []
            route = dispatch.route(payload, routing_key)
            tried: list[Target] = []
            for retry in range(config.max_retries + 1):
                target = await dispatch.acquire(tried, route)
                started = started or time.monotonic()
                result: dict[str, Any] | _Retry | _Refused | None = None
                self._metrics.in_flight += 1
                try:
                    result = await self._attempt(target, path, data, extra)
                finally:
                    self._metrics.in_flight -= 1
                    _release(dispatch, target, result)
                if isinstance(result, _Refused):
                    raise result.error
                if not isinstance(result, _Retry):
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
                delay = retry_delay(
                    retry,
                    result.retry_after,
                    base=config.backoff_base,
                    cap=config.backoff_max,
                    retry_after_cap=config.retry_after_max,
                    rng=self._rng,
                )
                await dispatch.backoff(delay, tried)
        except Exception:
            self._metrics.failed += 1
            raise
        raise AssertionError("unreachable")  # pragma: no cover

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
        self, target: Target, path: str, body: bytes, extra: list[tuple[bytes, bytes]]
    ) -> dict[str, Any] | _Retry | _Refused:
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
        except httpx.TimeoutException as exc:
            return _lost(target) or _Retry(
                RequestTimeout(redact(f"no answer from {path} in time ({exc})"))
            )
        except httpx.LocalProtocolError as exc:
            # Not chained: httpcore's message (the proxied path) quotes the bad header's value.
            problem = redact(bad_header(headers) or str(exc))
            message = f"{path} cannot be sent: {problem}"
            return _Refused(BadRequest(message, status_code=None), Outcome.ABANDONED)
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            # Not chained: the cause would repeat the URL, unredacted.
            return _Refused(RequestError(redact(f"{path}: {exc}")), Outcome.ABANDONED)
        except httpx.TransportError as exc:  # h11's message may quote what the server sent
            return _lost(target) or _Retry(
                RequestError(redact(f"{path}: {type(exc).__name__}: {exc}"))
            )
        finally:
            target.attempts.discard(scope)
        if reply is None:
            return _lost(target) or _Retry(
                RequestTimeout(f"no complete answer from {path} within {limit:g} s")
            )
        error = classify_status(reply.status, reply.content, redact)
        if error is not None:
            return _Refused(error)
        if reply.status >= 300:
            retry_after = parse_retry_after(reply.header(b"retry-after"))
            message = f"server answered {reply.status} to {path}"
            outcome = Outcome.THROTTLED if reply.status == 429 else Outcome.FAILED
            return _Retry(RequestError(message), retry_after, outcome)
        try:
            return parse_json(reply.content, redact)
        except RequestError as exc:
            return _Refused(exc)


def _lost(target: Target) -> _Retry | None:
    """The retry for an attempt whose target failed under it, if it did."""
    if not target.lost:
        return None
    error = RequestError("the server failed (or stopped answering) while the request was on it")
    return _Retry(error, None, Outcome.LOST)


def _release(
    dispatch: Dispatcher, target: Target, result: dict[str, Any] | _Retry | _Refused | None
) -> None:
    """Give ``target`` back with what the attempt on it taught (``None``: cancelled)."""
    if result is None:
        dispatch.release(target, Outcome.ABANDONED, None)
    elif isinstance(result, _Retry):
        dispatch.release(target, result.outcome, result.retry_after)
    elif isinstance(result, _Refused):
        dispatch.release(target, result.outcome, None)
    else:
        dispatch.release(target, Outcome.ANSWERED, None)
