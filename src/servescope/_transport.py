"""An httpx transport that stays fast at hundreds of requests in flight.

httpx's default connection pool scans its connection list on every request and
wake-up, so its cost grows with concurrency (measured here against hypercorn:
~650 requests/s at 8 in flight, ~180 at 256). The request pool already bounds
requests in flight with a ``CapacityLimiter``, so the transport only needs a stack
of idle keep-alive connections per origin: a request pops one (or opens one), uses
it, and pushes it back if it is still reusable. At most ``max_concurrency``
connections exist, each used by one request at a time.

Bodies are read whole before returning (completion responses are small), so a
connection is always back on its stack, or closed, when the call returns.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator

import anyio
import httpcore
import httpx

__all__ = ["SlotTransport"]

_EXCEPTIONS: list[tuple[type[Exception], type[httpx.TransportError]]] = [
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.TimeoutException, httpx.TimeoutException),
]


@contextlib.contextmanager
def _httpx_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for core, mapped in _EXCEPTIONS:
            if isinstance(exc, core):
                raise mapped(str(exc) or type(exc).__name__, request=request) from exc
        raise


class SlotTransport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 connections reused last-in first-out, one request each at a time."""

    def __init__(
        self, *, ssl_context: ssl.SSLContext | None = None, keepalive_expiry: float = 30.0
    ) -> None:
        self._ssl_context = ssl_context
        self._keepalive_expiry = keepalive_expiry
        self._idle: dict[tuple[bytes, bytes, int], list[httpcore.AsyncHTTPConnection]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        port = url.port or _default_port(url)
        origin = (url.raw_scheme, url.raw_host, port)  # httpcore.Origin is not hashable
        connection = await self._take(origin)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        try:
            with _httpx_errors(request):
                response = await connection.handle_async_request(core_request)
                content = await response.aread()
                await response.aclose()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await connection.aclose()
            raise
        if connection.is_available():
            self._idle.setdefault(origin, []).append(connection)
        else:
            await connection.aclose()
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            content=content,
            extensions=response.extensions,
        )

    async def _take(self, origin: tuple[bytes, bytes, int]) -> httpcore.AsyncHTTPConnection:
        idle = self._idle.get(origin, [])
        while idle:
            connection = idle.pop()
            if connection.is_available() and not connection.has_expired():
                return connection
            await connection.aclose()
        return httpcore.AsyncHTTPConnection(
            httpcore.Origin(*origin),
            ssl_context=self._ssl_context,
            keepalive_expiry=self._keepalive_expiry,
        )

    async def aclose(self) -> None:
        """Close every idle connection."""
        idle, self._idle = self._idle, {}
        with anyio.CancelScope(shield=True):
            for connections in idle.values():
                for connection in connections:
                    await connection.aclose()


def _default_port(url: httpx.URL) -> int:
    return 443 if url.scheme == "https" else 80
