"""The dummy backend's ASGI app: an OpenAI-shaped server that answers without a model.

Shared by the in-process dummy (served by hypercorn inside the server's task group)
and the subprocess fake engine (``python -m servescope.dummy``).

A streamed answer (``"stream": true``) goes out as server-sent events, one chunk per
word, ``token_latency`` seconds apart, then ``data: [DONE]``. While it streams, the app
watches for the client going away (ASGI ``http.disconnect``) and stops at once, as vLLM
aborts a request whose client disconnected: ``in_flight`` (``GET /dummy/stats``) drops.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio

from ._faults import Fault, FaultSchedule, parse_fault

__all__ = ["DEFAULT_TEXT", "DummyApp", "DummySettings"]

_T = TypeVar("_T")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_TEXT = (
    "This is dummy text content for debugging purposes. "
    "Page contains sample text to simulate model output."
)
MAX_BODY_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class DummySettings:
    """What the dummy answers, and how slowly."""

    model: str = "dummy"
    text: str = DEFAULT_TEXT
    completion_tokens: int = 100
    latency: float = 0.0
    api_key: str | None = None  # if set, /v1/ routes require "Authorization: Bearer KEY"
    token_latency: float = 0.0  # seconds between the chunks of a streamed answer


class _HTTPError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        retry_after: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.retry_after = retry_after


class _Drop(Exception):
    """Raised after a partial body: the server then cuts the connection."""


class DummyApp:
    """ASGI app for ``/v1/models``, ``/health``, ``/v1/chat/completions``, ``/v1/completions``.

    ``on_request(method, path, status)`` is called before each response is sent
    (the subprocess fake engine uses it to report when it first answered 200).
    """

    def __init__(
        self,
        settings: DummySettings,
        on_request: Callable[[str, str, int], None] | None = None,
        faults: FaultSchedule | None = None,
    ) -> None:
        self.settings = settings
        self.on_request = on_request
        self.faults = faults or FaultSchedule()
        self.healthy = True  # False: /health answers 503, as an engine that died
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        self.completions = 0  # chat and text completions answered (2xx)
        self._attempts: dict[str, int] = {}
        self._created = int(time.time())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await self._http(scope, receive, send)
            finally:
                self.in_flight -= 1

    def stats(self) -> dict[str, int]:
        """Counters tests read (``GET /dummy/stats`` serves them too)."""
        return {
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "requests": self.requests,
            "completions": self.completions,
        }

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        try:
            headers = dict(scope["headers"])
            self._authorize(headers, path)
            fault = self._fault(headers, path)
            body = await _read_body(receive)
            if fault.delay or self.settings.latency:  # it "generates" a while: abort if
                answer = await _unless_disconnected(
                    receive, self._answered(fault, method, path, body)
                )
                if answer is None:
                    return  # the client went away: no answer, as vLLM's with_cancellation
                status, payload = answer
            else:
                status, payload = await self._answered(fault, method, path, body)
        except _HTTPError as exc:
            status, payload = exc.status, _error_body(str(exc), exc.kind)
            fault = Fault(retry_after=exc.retry_after)
        if self.on_request is not None:
            self.on_request(method, path, status)
        if isinstance(payload, list):
            await _send_events(send, receive, payload, self.settings.token_latency)
        else:
            await _send_json(send, status, payload, fault)

    async def _answered(
        self, fault: Fault, method: str, path: str, body: bytes
    ) -> tuple[int, dict[str, Any] | list[dict[str, Any]]]:
        if fault.delay:
            await anyio.sleep(fault.delay)
        if fault.status is not None:
            raise _HTTPError(fault.status, "injected fault", retry_after=fault.retry_after)
        return await self._route(method, path, body)

    def _authorize(self, headers: dict[bytes, bytes], path: str) -> None:
        key = self.settings.api_key
        if key is None or not path.startswith("/v1/"):
            return
        if headers.get(b"authorization", b"") != f"Bearer {key}".encode():
            raise _HTTPError(401, "invalid or missing API key", "authentication_error")

    def _fault(self, headers: dict[bytes, bytes], path: str) -> Fault:
        directives = headers.get(b"x-servescope-fault")
        if directives is None:
            return self.faults.next() if path.startswith("/v1/c") else Fault()
        steps = directives.decode("latin-1").split("|")
        key = headers.get(b"x-servescope-fault-id", b"").decode("latin-1")
        attempt = self._attempts.get(key, 0) if key else 0
        if key:
            self._attempts[key] = attempt + 1
        try:
            return parse_fault(steps[min(attempt, len(steps) - 1)])
        except ValueError as exc:
            raise _HTTPError(400, str(exc)) from None

    async def _route(
        self, method: str, path: str, body: bytes
    ) -> tuple[int, dict[str, Any] | list[dict[str, Any]]]:
        routes = {
            ("GET", "/dummy/stats"): self._stats,
            ("GET", "/health"): self._health,
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completion,
        }
        handler = routes.get((method, path))
        if handler is None:
            if any(route_path == path for _, route_path in routes):
                raise _HTTPError(405, f"method {method} not allowed on {path}")
            raise _HTTPError(404, f"no route {path}", "not_found_error")
        return 200, await handler(body)

    async def _health(self, body: bytes) -> dict[str, Any]:
        if not self.healthy:
            raise _HTTPError(503, "engine is not healthy", "server_error")
        return {}

    async def _stats(self, body: bytes) -> dict[str, Any]:
        return dict(self.stats())

    async def _models(self, body: bytes) -> dict[str, Any]:
        model = {
            "id": self.settings.model,
            "object": "model",
            "created": self._created,
            "owned_by": "servescope",
        }
        return {"object": "list", "data": [model]}

    async def _chat(self, body: bytes) -> dict[str, Any] | list[dict[str, Any]]:
        request = _json_object(body)
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _HTTPError(400, "'messages' must be a non-empty list")
        prompt_chars = sum(_content_chars(message) for message in messages)
        return await self._answer(request, prompt_chars, chat=True)

    async def _completion(self, body: bytes) -> dict[str, Any] | list[dict[str, Any]]:
        request = _json_object(body)
        prompt = request.get("prompt")
        if not isinstance(prompt, str):
            raise _HTTPError(400, "'prompt' must be a string")
        return await self._answer(request, len(prompt), chat=False)

    async def _answer(
        self, request: dict[str, Any], prompt_chars: int, *, chat: bool
    ) -> dict[str, Any] | list[dict[str, Any]]:
        max_tokens = request.get("max_tokens", request.get("max_completion_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise _HTTPError(400, "'max_tokens' must be a positive integer")
        tokens = self.settings.completion_tokens
        finish = "stop"
        if max_tokens is not None and max_tokens < tokens:
            tokens, finish = max_tokens, "length"
        usage = {
            "prompt_tokens": max(1, prompt_chars // 4),
            "completion_tokens": tokens,
            "total_tokens": max(1, prompt_chars // 4) + tokens,
        }
        if self.settings.latency > 0:
            await anyio.sleep(self.settings.latency)
        self.completions += 1
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": request.get("model") or self.settings.model,
        }
        if request.get("stream"):
            return _stream_chunks(head, self.settings.text, finish, usage, chat, request)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": self.settings.text}
        else:
            choice["text"] = self.settings.text
        kind = "chat.completion" if chat else "text_completion"
        return {**head, "object": kind, "choices": [choice], "usage": usage}


def _stream_chunks(
    head: dict[str, Any],
    text: str,
    finish: str,
    usage: dict[str, int],
    chat: bool,
    request: dict[str, Any],
) -> list[dict[str, Any]]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    pieces = [word + " " for word in text.split(" ")]
    pieces[-1] = pieces[-1][:-1]

    def chunk(content: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if content is not None:
                delta["content"] = content
            choice["delta"] = delta
        else:
            choice["text"] = content or ""
        return {**head, "object": kind, "choices": [choice]}

    chunks = [chunk("", None, role=True)] if chat else []
    chunks += [chunk(piece, None) for piece in pieces]
    chunks.append(chunk(None if chat else "", finish))
    if (request.get("stream_options") or {}).get("include_usage"):
        chunks.append({**head, "object": kind, "choices": [], "usage": usage})
    return chunks


def _content_chars(message: Any) -> int:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(part.get("text", "")) for part in content if isinstance(part, dict))
    return 0


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _HTTPError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise _HTTPError(400, "body must be a JSON object")
    return request


def _error_body(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


async def _read_body(receive: Receive) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return bytes(body)
        body += message.get("body", b"")
        if len(body) > MAX_BODY_BYTES:
            raise _HTTPError(413, f"body larger than {MAX_BODY_BYTES} bytes")
        if not message.get("more_body", False):
            return bytes(body)


async def _send_json(send: Send, status: int, payload: dict[str, Any], fault: Fault) -> None:
    body = json.dumps(payload).encode()
    if fault.body == "malformed":
        body = b"<html><body>502 Bad Gateway</body></html>"
    elif fault.body == "no-choices":
        body = json.dumps({"id": payload.get("id"), "object": "chat.completion"}).encode()
    elif fault.body == "truncated":
        body = body[: len(body) // 2]
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if fault.retry_after is not None:
        headers.append((b"retry-after", fault.retry_after.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    if fault.drop:
        await send({"type": "http.response.body", "body": body[:5], "more_body": True})
        raise _Drop("injected fault: connection dropped")
    if fault.slow_body:
        await anyio.sleep(fault.slow_body)
    await send({"type": "http.response.body", "body": body})


async def _send_events(
    send: Send, receive: Receive, chunks: list[dict[str, Any]], token_latency: float
) -> None:
    """Stream ``chunks`` as events, ``token_latency`` apart; stop as soon as the client
    disconnects (watched alongside)."""
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()  # the client is gone: abort, as an engine does

        tg.start_soon(watch)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for number, chunk in enumerate(chunks):
            if number and token_latency > 0:
                await anyio.sleep(token_latency)
            data = b"data: " + json.dumps(chunk).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        tg.cancel_scope.cancel()


async def _unless_disconnected(receive: Receive, work: Awaitable[_T]) -> _T | None:
    """``work``'s result, or ``None`` if the client disconnects first (``work`` is then
    cancelled, as an engine aborts a request whose client went away)."""
    result: list[_T] = []
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result.append(await work)
        except Exception as exc:  # raised below, not wrapped in the group's ExceptionGroup
            failure = exc
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return result[0] if result else None


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
