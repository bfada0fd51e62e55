"""The request pool: concurrency slots, retries with jittered backoff, error classes.

A request holds one of ``max_concurrency`` slots (an anyio ``CapacityLimiter``) only
while it is on the wire: the backoff sleep before a retry happens *without* a slot,
so a server answering 503 does not starve every other request of slots.

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

import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping
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

__all__ = ["Post", "RequestPool"]

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


class Post(Protocol):
    """Sends one POST and returns the whole reply (``SlotTransport.post`` or a client's)."""

    def __call__(
        self, url: str, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> Awaitable[Reply]: ...


@dataclass(frozen=True)
class _Retry:
    """A failed attempt that may be retried."""

    error: RequestError
    retry_after: float | None = None


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


class RequestPool:
    """Posts OpenAI requests to one server over keep-alive connections (``post``).

    ``base_url``, ``wait_ready`` and ``check_open`` come from the server scope:
    requests wait for readiness by themselves, see the current address after a
    restart, and fail fast with the server's own error once the scope has failed.
    ``redact`` (the scope's ``Redactor``) blanks secrets out of every error message
    built from what a server sent: a server may quote the API key back.
    """

    def __init__(
        self,
        post: Post,
        config: ServerConfig,
        *,
        headers: Mapping[str, str],
        base_url: Callable[[], str],
        wait_ready: Callable[[], Awaitable[None]],
        check_open: Callable[[], None],
        rng: random.Random | None = None,
        redact: Redact | None = None,
        backoff: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self._post = post
        # A configured header that cannot be encoded: every request says so.
        try:
            self._headers, self._unsendable = encode_headers(headers), ""
        except BadRequest as exc:
            self._headers, self._unsendable = [], str(exc)
        self._redact = redact or _as_is
        self._backoff = backoff
        self._config = config
        self._base_url = base_url
        self._wait_ready = wait_ready
        self._check_open = check_open
        self._rng = rng or random.Random()
        self._limiter = anyio.CapacityLimiter(config.max_concurrency)
        self._metrics = Metrics()

    @property
    def metrics(self) -> MetricsSnapshot:
        """A snapshot of this pool's request metrics."""
        return self._metrics.snapshot(waiting=self._limiter.statistics().tasks_waiting)

    async def request(
        self,
        payload: Mapping[str, Any],
        *,
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """POST ``payload`` (model and default params filled in); the JSON answer."""
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
        self._check_open()
        self._metrics.started += 1
        try:  # one frame for the whole retry loop: it is held for every request in flight
            config, started = self._config, None
            wire_headers = self._wire_headers(headers)
            for retry in range(config.max_retries + 1):
                await self._wait_ready()
                self._check_open()
                started = started or time.monotonic()
                async with self._limiter:
                    self._metrics.in_flight += 1
                    try:
                        outcome = await self._attempt(path, data, wire_headers)
                    finally:
                        self._metrics.in_flight -= 1
                if not isinstance(outcome, _Retry):
                    usage = usage_of(outcome)
                    latency = time.monotonic() - started
                    self._metrics.success(latency, usage.prompt_tokens, usage.completion_tokens)
                    return outcome
                if retry == config.max_retries:
                    attempts = config.max_retries + 1
                    raise RetriesExhausted(
                        f"{path} failed {attempts} times; last: {outcome.error}"
                    ) from outcome.error
                self._metrics.retried += 1
                delay = retry_delay(
                    retry,
                    outcome.retry_after,
                    base=config.backoff_base,
                    cap=config.backoff_max,
                    retry_after_cap=config.retry_after_max,
                    rng=self._rng,
                )
                await self._backoff(delay)
        except Exception:
            self._metrics.failed += 1
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> Completion:
        """A chat completion for ``messages``."""
        response = await self.request({"messages": messages, **params}, path=CHAT_PATH)
        return self.parse_completion(response)

    async def complete(self, prompt: str, **params: Any) -> Completion:
        """A text completion of ``prompt``."""
        response = await self.request({"prompt": prompt, **params}, path=COMPLETIONS_PATH)
        return self.parse_completion(response)

    def parse_completion(self, response: dict[str, Any]) -> Completion:
        """``parse_completion`` with this pool's secrets kept out of its errors."""
        return parse_completion(response, self._redact)

    def _wire_headers(self, headers: Mapping[str, str] | None) -> list[tuple[bytes, bytes]]:
        """The pool's headers with the caller's on top (once per request, not per attempt)."""
        if self._unsendable:
            raise BadRequest(self._unsendable, status_code=None)
        if not headers:
            return self._headers
        extra = dict(encode_headers(headers))
        return [item for item in self._headers if item[0] not in extra] + list(extra.items())

    async def _attempt(
        self, path: str, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> dict[str, Any] | _Retry:
        limit, redact = self._config.request_timeout, self._redact
        reply = None
        try:
            # A bare CancelScope, not fail_after: lighter per request held in flight.
            with anyio.CancelScope(deadline=anyio.current_time() + limit):
                reply = await self._post(self._base_url() + path, body, headers)
        except httpx.TimeoutException as exc:
            return _Retry(RequestTimeout(redact(f"no answer from {path} in time ({exc})")))
        except httpx.LocalProtocolError as exc:
            # Not chained: httpcore's message (the proxied path) quotes the bad header's value.
            problem = redact(bad_header(headers) or str(exc))
            raise BadRequest(f"{path} cannot be sent: {problem}", status_code=None) from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            # Not chained: the cause would repeat the URL, unredacted.
            raise RequestError(redact(f"{path}: {exc}")) from None
        except httpx.TransportError as exc:  # h11's message may quote what the server sent
            return _Retry(RequestError(redact(f"{path}: {type(exc).__name__}: {exc}")))
        if reply is None:
            return _Retry(RequestTimeout(f"no complete answer from {path} within {limit:g} s"))
        error = classify_status(reply.status, reply.content, redact)
        if error is not None:
            raise error
        if reply.status >= 300:
            retry_after = parse_retry_after(reply.header(b"retry-after"))
            message = f"server answered {reply.status} to {path}"
            return _Retry(RequestError(message), retry_after)
        return parse_json(reply.content, redact)
