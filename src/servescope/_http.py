"""How a server scope talks HTTP: its httpx client, the pool's ``Post``, and probes.

Local servers and direct endpoints go over one ``SlotTransport`` (keep-alive, one
connection per slot); an endpoint reached through a proxy from the environment uses
httpx's own transport, which is what speaks to proxies. Foreign exceptions stay httpx's
here; the pool and the supervisor classify them.

What a server sends is foreign, and may be hostile or broken: every request asks for
no compression, a body is read no further than its reader needs (``MAX_BODY`` for a
completion, ``PROBE_BYTES`` for a probe), and a compressed body is decoded no further
than ``MAX_BODY`` either, so that 0.4 MB of gzip cannot become 400 MB in memory.
"""

from __future__ import annotations

import ssl
import urllib.parse
import urllib.request
import zlib
from collections.abc import Mapping
from typing import Any

import anyio
import httpx

from ._client import Post, Wire
from ._config import ServerConfig
from ._errors import ConfigError
from ._transport import MAX_BODY, Reply, SlotTransport, bad_header
from .backends.endpoint import EndpointConfig

__all__ = ["PROBE_BYTES", "connect_problem", "fetch_excerpt", "http_client", "probe_status"]

PROBE_BYTES = 4096
"""How much of a probed body is read: enough to quote, nothing a server can inflate."""

_IDENTITY = (b"accept-encoding", b"identity")
_POST_HEADERS = [(b"content-type", b"application/json"), _IDENTITY]


def _ssl_context(verify: bool | ssl.SSLContext | None) -> ssl.SSLContext | None:
    """The TLS context for a config that asks for one; local servers speak plain HTTP."""
    if verify is None or isinstance(verify, ssl.SSLContext):
        return verify
    return httpx.create_ssl_context(verify)


def http_client(config: ServerConfig) -> tuple[httpx.AsyncClient, Wire]:
    """The httpx client (probes, checks), and how requests reach the server (``Wire``).

    Normally both go over one ``SlotTransport``. An endpoint reached through a proxy from
    the environment uses httpx's own transport, which is what speaks to proxies.
    """
    timeout = httpx.Timeout(config.request_timeout, connect=config.connect_timeout)
    options = config.client_options()
    headers: Mapping[str, str] = options.get("headers", {})
    if _proxied(config, options):
        slots = config.max_concurrency
        limits = httpx.Limits(max_connections=slots, max_keepalive_connections=slots)
        try:
            client = httpx.AsyncClient(timeout=timeout, limits=limits, **options)
        except (httpx.InvalidURL, ValueError, ImportError) as exc:  # bad URL, scheme, no socksio
            # httpx's messages show a proxy URL's password as [secure].
            message = (
                "the proxy from the environment (HTTP_PROXY, HTTPS_PROXY or ALL_PROXY) "
                f"cannot be used: {exc}"
            )
            raise ConfigError(message) from None
        client.headers["accept-encoding"] = "identity"
        return client, Wire.build(_client_post(client), {})
    transport = SlotTransport(
        ssl_context=_ssl_context(options.pop("verify", None)),
        connect_timeout=config.connect_timeout,
    )
    client = httpx.AsyncClient(transport=transport, timeout=timeout, **options)
    client.headers["accept-encoding"] = "identity"
    return client, Wire.build(transport.post, headers)


def _proxied(config: ServerConfig, options: Mapping[str, Any]) -> bool:
    """Whether httpx would send this server's requests through a proxy from the environment."""
    if not options.get("trust_env", True) or not isinstance(config, EndpointConfig):
        return False
    url = urllib.parse.urlsplit(config.url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    return bool(proxy) and not urllib.request.proxy_bypass(url.hostname or "")


def _client_post(client: httpx.AsyncClient) -> Post:
    """Post through ``client`` (and so through its proxies); the pool's ``Post``.

    The answer is read as ``SlotTransport`` reads it: whole, but no more than
    ``MAX_BODY`` after decoding (a server may gzip though asked not to, and 0.4 MB of
    gzip can be 400 MB of zeros), and every failure is an httpx ``TransportError``.
    """

    async def post(url: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> Reply:
        json_headers = [*_POST_HEADERS, *headers]
        # Checked before httpcore sees them: its refusal, and its debug log, quote the value.
        problem = bad_header([*client.headers.raw, *json_headers])
        if problem is not None:
            raise httpx.LocalProtocolError(problem)
        try:
            async with client.stream("POST", url, content=body, headers=json_headers) as response:
                raw, more = await _read_raw(response, MAX_BODY)
        except httpx.LocalProtocolError as exc:  # the headers passed: no value is quoted
            raise httpx.LocalProtocolError(f"HTTP/1.1 cannot carry this request: {exc}") from exc
        if more:
            raise httpx.RemoteProtocolError(f"response body over {MAX_BODY} bytes")
        content = _decode(raw, response.headers.get("content-encoding"))
        return Reply(response.status_code, response.headers.raw, content)

    return post


async def _read_raw(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of a streamed response's raw body, and whether there was more.

    Stopping early closes the response, then runs its byte iterator to its end: httpx's
    stream layers are async generators, and trio warns about each one dropped half-way.
    """
    raw = response.aiter_raw()
    chunks, size = [], 0
    async for chunk in raw:
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    else:
        return b"".join(chunks), False
    await response.aclose()
    try:
        async for _ in raw:  # after the close: at most what was already buffered
            pass
    except Exception:  # the closed stream's own error ends it; nothing here is wanted
        pass
    return b"".join(chunks)[:limit], True


def _decode(raw: bytes, content_encoding: str | None) -> bytes:
    """``raw`` decoded as ``content_encoding`` says, or ``RemoteProtocolError``.

    Only gzip and deflate (identity was asked for; they are what a server ignoring that
    sends), and never more than ``MAX_BODY`` bytes of output.
    """
    coding = (content_encoding or "identity").strip().lower()
    if coding == "identity" or not raw:  # no body (a 204, say) is no stream to decode
        return raw
    if coding in ("gzip", "x-gzip"):
        return _inflate(raw, 16 + zlib.MAX_WBITS)
    if coding == "deflate":  # zlib-wrapped as the RFC says, or raw as some servers send
        try:
            return _inflate(raw, zlib.MAX_WBITS)
        except httpx.RemoteProtocolError as exc:
            if not isinstance(exc.__cause__, zlib.error):
                raise
            return _inflate(raw, -zlib.MAX_WBITS)
    raise httpx.RemoteProtocolError(f"response body in an unsupported encoding {coding!r}")


def _inflate(raw: bytes, wbits: int) -> bytes:
    decompressor = zlib.decompressobj(wbits)
    try:
        # max_length bounds the output whatever the ratio; one byte over is enough to know.
        body = decompressor.decompress(raw, MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise httpx.RemoteProtocolError(f"response body over {MAX_BODY} bytes decoded")
        body += decompressor.flush()
        if not decompressor.eof:
            raise httpx.RemoteProtocolError("response body ends inside its compressed stream")
        return body
    except zlib.error as exc:
        message = f"the response body cannot be decoded as its content-encoding says: {exc}"
        raise httpx.RemoteProtocolError(message) from exc


async def probe_status(
    client: httpx.AsyncClient,
    url: str,
    timeout: float,  # noqa: ASYNC109 (not the caller's scope: httpx's phases need it too)
) -> int | None:
    """The status GET ``url`` answers, or ``None`` if it does not answer within ``timeout``
    seconds (refused, reset, broken, slow: any failure).

    Reads no more than ``PROBE_BYTES`` of the body, so a server's gzip bomb or endless
    body costs a probe nothing; the status is all a probe needs.
    """
    try:
        status, _ = await fetch_excerpt(client, url, timeout)
    except httpx.HTTPError:
        return None
    return status


async def fetch_excerpt(
    client: httpx.AsyncClient,
    url: str,
    timeout: float,  # noqa: ASYNC109 (as probe_status)
) -> tuple[int, bytes]:
    """GET ``url`` within ``timeout`` seconds in all: its status and the first
    ``PROBE_BYTES`` of its raw body, to quote in a message.

    Raises httpx ``HTTPError`` subclasses only: ``TimeoutException`` past ``timeout``
    (however slowly the server trickles bytes), ``UnsupportedProtocol`` for a URL that
    cannot be used, the transport's errors for the rest.
    """
    with anyio.move_on_after(timeout):
        try:
            async with client.stream("GET", url, headers=[_IDENTITY], timeout=timeout) as response:
                body, _ = await _read_raw(response, PROBE_BYTES)
                return response.status_code, body
        except httpx.InvalidURL as exc:
            raise httpx.UnsupportedProtocol(f"cannot GET {url!r}: {exc}") from exc
        except (httpx.StreamError, OSError) as exc:  # neither should get past httpx; if they do
            raise httpx.TransportError(f"GET {url} failed: {exc!r}") from exc
    raise httpx.ReadTimeout(f"no complete answer from {url} within {timeout:g} s")


def connect_problem(url: str, exc: BaseException) -> str:
    """What went wrong connecting to ``url``, in words (TLS, timeout, refused...)."""
    tls = _find_in_chain(exc, ssl.SSLError)
    if tls is not None:
        return f"TLS verification failed for {url}: {tls} (ca_bundle names a CA to trust)"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer from {url} in time"
    return f"cannot connect to {url}: {text}"


def _find_in_chain(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first ``kind`` among ``exc`` and its causes and contexts (they nest by backend)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
