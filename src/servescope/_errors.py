"""The exceptions servescope raises, all under one root.

Everything a caller has to handle comes out of ``open_server`` and the request
methods as one of these — never a bare ``ExceptionGroup``, an anyio, httpx or
OS exception, or a pydantic ``ValidationError``::

    ServeError
     ├─ ConfigError            a configuration value is missing, unknown or invalid
     ├─ ServerError            the server itself failed (carries reason and log tail)
     │   ├─ ServerStartError   ... before it became ready (bad model, OOM at load, exit, timeout)
     │   ├─ ServerCrashed      ... after it became ready (death line, exit, hung or dead health)
     │   └─ PoolFailed         every replica of a pool failed for good (each one's reason)
     ├─ ServerClosed           the server's scope has ended; it takes no more requests
     ├─ ControlError           a pool control signal its state does not allow (stop while running)
     └─ RequestError           one request failed (malformed response, transport failure)
         ├─ BadRequest         the request itself is refused (4xx, or unsendable); never retried
         ├─ RetriesExhausted   a retryable failure persisted through every retry
         ├─ RequestTimeout     no answer within the request timeout
         ├─ StreamInterrupted  a streamed answer broke off after its first bytes
         └─ NotHeadNode        sent to a worker node of a multi-node server (no HTTP)

A ``ServerError`` is fatal for the whole server scope: it cancels the body of
``async with open_server(...)`` and is raised from it. A ``RequestError`` is
raised from the one request that failed and leaves the server running.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BadRequest",
    "ConfigError",
    "ControlError",
    "NotHeadNode",
    "PoolFailed",
    "RequestError",
    "RequestTimeout",
    "RetriesExhausted",
    "ServeError",
    "ServerClosed",
    "ServerCrashed",
    "ServerError",
    "ServerStartError",
    "StreamInterrupted",
]


class ServeError(Exception):
    """Root of every exception servescope raises on purpose."""


class ConfigError(ServeError, ValueError):
    """A configuration is invalid; the message names the key and what is allowed."""


class ServerError(ServeError):
    """The server failed; the whole ``open_server`` scope is torn down.

    Attributes:
        reason: one line saying why (the matched fatal line, the exit code, the timeout).
        exit_code: the server's exit status if it exited (negative: killed by that signal).
        matched_line: the log line that matched a fatal pattern, if that was the cause.
        log_tail: the last lines the server printed, oldest first.
    """

    def __init__(
        self,
        reason: str,
        *,
        exit_code: int | None = None,
        matched_line: str | None = None,
        log_tail: Sequence[str] = (),
    ) -> None:
        self.reason = reason
        self.exit_code = exit_code
        self.matched_line = matched_line
        self.log_tail = tuple(log_tail)
        super().__init__(reason)

    def __str__(self) -> str:
        if not self.log_tail:
            return self.reason
        tail = "\n".join(f"    {line}" for line in self.log_tail)
        return f"{self.reason}\n  last {len(self.log_tail)} lines of the server log:\n{tail}"


class ServerStartError(ServerError):
    """The server never became ready."""


class ServerCrashed(ServerError):
    """The server failed after it had become ready."""


class PoolFailed(ServerError):
    """Every replica of a pool failed and none can come back (each over its restart
    budget): the pool's scope is torn down. ``reason`` lists each replica's reason;
    ``replica_errors`` holds each replica's last ``ServerError``, by replica index.
    """

    def __init__(self, reason: str, *, replica_errors: Sequence[ServerError] = ()) -> None:
        self.replica_errors = tuple(replica_errors)
        super().__init__(reason)


class ControlError(ServeError):
    """A control signal the pool's state does not allow (``stop`` while running,
    ``resume`` while not paused, anything once stopped): raised, never ignored."""


class ServerClosed(ServeError):
    """The server's scope has ended (normally or not): it takes no more requests.

    Raised to requests made, or still waiting, after ``async with open_server(...)`` was
    left — from tasks outside the scope — so that none of them waits forever.
    """


class RequestError(ServeError):
    """One request failed; the server scope goes on."""


class BadRequest(RequestError):
    """The request itself is refused: the server answered 400, 401, 403, 404, 413 or 422
    (``status_code``), or it could not be sent at all (``status_code`` is ``None``: a
    payload that is not JSON-encodable, a header value with a line break, ...).

    Sending it again cannot help, so it is never retried.
    """

    def __init__(self, message: str, *, status_code: int | None, body: str = "") -> None:
        self.status_code = status_code
        self.body = body
        super().__init__(message)


class RetriesExhausted(RequestError):
    """Every attempt failed with a retryable error; ``__cause__`` is the last one."""


class RequestTimeout(RequestError):
    """The server did not answer within the request timeout."""


class StreamInterrupted(RequestError):
    """A streamed answer broke off after its first bytes had been handed out: the
    connection broke, the server stopped sending for longer than the request timeout,
    the server failed, it reported an error inside the stream, or the stream ended
    without its end marker (``data: [DONE]``).

    Part of the answer was already consumed, so it is never retried: the caller decides.
    """


class NotHeadNode(RequestError):
    """A request sent to a worker node of a multi-node server: only the head (node 0)
    serves HTTP; the message names it (and its URL once it said it)."""
