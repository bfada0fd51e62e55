"""How a server scope talks HTTP: its httpx client, the pool's ``Post``, and probes.

Local servers and direct endpoints go over one ``SlotTransport`` (keep-alive, one
connection per slot); an endpoint reached through a proxy from the environment uses
httpx's own transport, which is what speaks to proxies. Foreign exceptions stay httpx's
here; the pool and the supervisor classify them.
"""

from __future__ import annotations

import ssl
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

import httpx

from ._config import ServerConfig
from ._pool import Post
from ._transport import Reply, SlotTransport
from .backends.endpoint import EndpointConfig

__all__ = ["connect_problem", "http_client"]


def _ssl_context(verify: bool | ssl.SSLContext | None) -> ssl.SSLContext | None:
    """The TLS context for a config that asks for one; local servers speak plain HTTP."""
    if verify is None or isinstance(verify, ssl.SSLContext):
        return verify
    return httpx.create_ssl_context(verify)


def http_client(config: ServerConfig) -> tuple[httpx.AsyncClient, Post, Mapping[str, str]]:
    """The httpx client (probes, checks), how the pool posts, and the headers it adds.

    Normally both go over one ``SlotTransport``. An endpoint reached through a proxy from
    the environment uses httpx's own transport, which is what speaks to proxies.
    """
    timeout = httpx.Timeout(config.request_timeout, connect=config.connect_timeout)
    options = config.client_options()
    headers: Mapping[str, str] = options.get("headers", {})
    if _proxied(config, options):
        slots = config.max_concurrency
        limits = httpx.Limits(max_connections=slots, max_keepalive_connections=slots)
        client = httpx.AsyncClient(timeout=timeout, limits=limits, **options)
        return client, _client_post(client), {}
    transport = SlotTransport(
        ssl_context=_ssl_context(options.pop("verify", None)),
        connect_timeout=config.connect_timeout,
    )
    client = httpx.AsyncClient(transport=transport, timeout=timeout, **options)
    return client, transport.post, headers


def _proxied(config: ServerConfig, options: Mapping[str, Any]) -> bool:
    """Whether httpx would send this server's requests through a proxy from the environment."""
    if not options.get("trust_env", True) or not isinstance(config, EndpointConfig):
        return False
    url = urllib.parse.urlsplit(config.url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    return bool(proxy) and not urllib.request.proxy_bypass(url.hostname or "")


def _client_post(client: httpx.AsyncClient) -> Post:
    """Post through ``client`` (and so through its proxies); the pool's ``Post``."""

    async def post(url: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> Reply:
        json_headers = [(b"content-type", b"application/json"), *headers]
        response = await client.post(url, content=body, headers=json_headers)
        return Reply(response.status_code, response.headers.raw, response.content)

    return post


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
