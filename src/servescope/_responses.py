"""OpenAI responses in, typed results or classified errors out — pure code, no I/O.

Status classification (``classify_status``):

========================================  =====================================
status                                     outcome
========================================  =====================================
2xx                                        parsed; a malformed body → RequestError
400, 401, 403, 404, 405, 413, 422          BadRequest, never retried
408, 429, 500, 502, 503, 504               retryable
any other                                  RequestError, not retried
========================================  =====================================

A streamed answer (``"stream": true``) is a sequence of chunks, each parsed by
``parse_chunk`` as a whole answer is by ``parse_completion``: the same fields (text,
reasoning, finish reason, usage) as deltas. A chunk carrying ``{"error": ...}`` (what
vLLM and SGLang send when generation fails mid-stream) raises ``StreamInterrupted``
with the server's message.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from ._errors import BadRequest, RequestError, StreamInterrupted

__all__ = [
    "BAD_REQUEST_STATUSES",
    "RETRYABLE_STATUSES",
    "Chunk",
    "Completion",
    "Redact",
    "Usage",
    "classify_status",
    "excerpt",
    "parse_chunk",
    "parse_completion",
    "parse_json",
    "usage_of",
]

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
BAD_REQUEST_STATUSES = frozenset({400, 401, 403, 404, 405, 413, 422})
EXCERPT_CHARS = 300

Redact: TypeAlias = Callable[[str], str]
"""Blanks secrets out of a text (``servescope._redact.Redactor``)."""


@dataclass(frozen=True)
class Usage:
    """Token counts the server reported (zero where it reported none)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True)
class Completion:
    """One generated answer.

    Attributes:
        text: the generated text (``message.content`` for chat, ``text`` otherwise).
        finish_reason: why generation stopped (``"stop"``, ``"length"``, ...), if given.
        usage: token counts.
        reasoning: the reasoning text (``reasoning`` or ``reasoning_content``), if any.
        raw: the whole response as the server sent it.
    """

    text: str
    finish_reason: str | None
    usage: Usage
    reasoning: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Chunk:
    """One piece of a streamed answer.

    Attributes:
        text: the text it adds (``delta.content`` for chat, ``text`` otherwise; ``""``
            if none, as in a chunk that only carries a role or the usage).
        finish_reason: why generation stopped, in the chunk that says so, else ``None``.
        usage: token counts, in a chunk that has them (``stream_options``
            ``{"include_usage": true}`` asks for a last one), else ``None``.
        reasoning: the reasoning text it adds (``reasoning`` or ``reasoning_content``), if any.
        index: the choice it belongs to (several with ``n`` > 1).
        raw: the chunk as the server sent it.
    """

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    reasoning: str | None = None
    index: int = 0
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def excerpt(body: bytes | str, limit: int = EXCERPT_CHARS, redact: Redact | None = None) -> str:
    """The start of a response body, safe to put in an error message.

    Secrets are blanked before the cut, so that none is left half shown at the end.
    """
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = text if redact is None else redact(text)
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


def classify_status(status: int, body: bytes, redact: Redact | None = None) -> RequestError | None:
    """The error for a non-2xx status, or ``None`` if the request may be retried.

    A 2xx status returns ``None`` too; the caller parses the body.
    """
    if 200 <= status < 300 or status in RETRYABLE_STATUSES:
        return None
    quoted = excerpt(body, redact=redact)
    message = f"server answered {status}: {quoted}"
    if status in BAD_REQUEST_STATUSES:
        return BadRequest(message, status_code=status, body=quoted)
    return RequestError(message)


def parse_json(body: bytes, redact: Redact | None = None) -> dict[str, Any]:
    """A JSON object from a response body, or ``RequestError`` with an excerpt.

    ``ValueError`` covers bad UTF-8 and an integer past Python's digit limit as well as
    bad syntax; nesting deeper than the interpreter's recursion limit is its own case.
    """
    try:
        value = json.loads(body)
    except RecursionError:
        message = f"response JSON is nested too deeply to parse: {excerpt(body, redact=redact)!r}"
        raise RequestError(message) from None
    except ValueError as exc:
        message = f"response is not valid JSON ({exc}): {excerpt(body, redact=redact)!r}"
        raise RequestError(message) from None
    if not isinstance(value, dict):
        raise RequestError(f"response is not a JSON object: {excerpt(body, redact=redact)!r}")
    return value


def parse_completion(response: dict[str, Any], redact: Redact | None = None) -> Completion:
    """A ``Completion`` from a chat or text completion response.

    Raises ``RequestError`` naming what is missing or mistyped — never ``KeyError``.
    """
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise RequestError(f"response has no choices: {_quote(response, redact)}")
    choice = choices[0]
    text, reasoning = _text_of(choice, "message", "response", redact)
    finish = choice.get("finish_reason")
    return Completion(
        text=text,
        finish_reason=finish if isinstance(finish, str) else None,
        usage=usage_of(response),
        reasoning=reasoning,
        raw=response,
    )


def parse_chunk(chunk: dict[str, Any], redact: Redact | None = None) -> Chunk:
    """A ``Chunk`` from one streamed chat or text completion chunk.

    A chunk without choices is fine (the last, usage-only one); an ``error`` member
    raises ``StreamInterrupted`` with the server's message; anything mistyped raises
    ``RequestError`` naming it — never ``KeyError``.
    """
    error = chunk.get("error")
    if error is not None:
        message = error.get("message") if isinstance(error, dict) else error
        said = message if isinstance(message, str) else _quote(error, None)
        raise StreamInterrupted(
            f"the server reported an error mid-stream: {excerpt(said, redact=redact)}"
        )
    usage = usage_of(chunk) if isinstance(chunk.get("usage"), dict) else None
    choices = chunk.get("choices", [])
    if not isinstance(choices, list):
        raise RequestError(f"stream chunk has choices that are not a list: {_quote(chunk, redact)}")
    if not choices:
        return Chunk(text="", usage=usage, raw=chunk)
    choice = choices[0]
    if not isinstance(choice, dict):
        raise RequestError(
            f"stream chunk has a choice that is not an object: {_quote(chunk, redact)}"
        )
    text, reasoning = _text_of(choice, "delta", "stream chunk", redact)
    finish = choice.get("finish_reason")
    index = choice.get("index", 0)
    return Chunk(
        text=text,
        finish_reason=finish if isinstance(finish, str) else None,
        usage=usage,
        reasoning=reasoning,
        index=index if isinstance(index, int) and not isinstance(index, bool) else 0,
        raw=chunk,
    )


def _text_of(
    choice: dict[str, Any], part: str, what: str, redact: Redact | None
) -> tuple[str, str | None]:
    """A choice's text and reasoning: from its ``part`` (``message`` of a chat answer,
    ``delta`` of a chat chunk) or its ``text`` (a text completion); ``RequestError``
    naming ``what`` if either is not a string."""
    inner = choice.get(part)
    reasoning: Any = None
    if isinstance(inner, dict):
        text = inner.get("content")
        reasoning = inner.get("reasoning_content", inner.get("reasoning"))
    else:
        text = choice.get("text")
    if text is None:
        text = ""
    if not isinstance(text, str) or not isinstance(reasoning, str | None):
        raise RequestError(f"{what} text is not a string: {_quote(choice, redact)}")
    return text, reasoning


def _quote(value: Any, redact: Redact | None) -> str:
    """An excerpt of a parsed value as JSON, for an error message; never raises."""
    try:
        return excerpt(json.dumps(value, ensure_ascii=False), redact=redact)
    except RecursionError:
        return "[JSON nested too deeply to quote]"
    except (TypeError, ValueError):  # not from json.loads: a caller built it
        return f"[a {type(value).__name__} that is not JSON]"


def usage_of(response: dict[str, Any]) -> Usage:
    """The token counts of a response (zeros where missing or mistyped)."""
    value = response.get("usage")
    if not isinstance(value, dict):
        return Usage()
    counts = {}
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        count = value.get(key, 0)
        counts[key] = count if isinstance(count, int) and not isinstance(count, bool) else 0
    return Usage(**counts)
