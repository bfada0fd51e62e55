"""The endpoint backend against a dummy served over HTTP and HTTPS (trustme certificates)."""

from __future__ import annotations

import gzip
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
import trustme

import servescope
from servescope import (
    BadRequest,
    ConfigError,
    EndpointConfig,
    RequestError,
    RetriesExhausted,
    ServerStartError,
    open_server,
)
from servescope._asgi import listen_socket, serve_asgi
from servescope._dummy_app import DummyApp, DummySettings
from servescope._http import _client_post

from .test_transport import OK, PeakRss, RawServer, Script, always, gzip_of_zeros, raw_server

pytestmark = pytest.mark.anyio
KEY = "sk-test-5f1e9a-very-secret"


@asynccontextmanager
async def external_dummy(ca: trustme.CA | None = None) -> AsyncIterator[str]:
    """A dummy on 127.0.0.1 that requires the API key, over TLS if ``ca`` is given."""
    sock = listen_socket()
    tls = None
    if ca is not None:
        import ssl

        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(tls)
    app = DummyApp(DummySettings(api_key=KEY))
    scheme = "https" if ca else "http"
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: serve_asgi(app, sock, tls=tls, task_status=task_status))
        yield f"{scheme}://127.0.0.1:{sock.getsockname()[1]}/v1"
        tg.cancel_scope.cancel()


async def test_endpoint_over_https_with_ca_bundle(tmp_path: Path) -> None:
    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    async with external_dummy(ca) as url:
        config = EndpointConfig(url=url, api_key=KEY, ca_bundle=bundle, model="m")
        async with open_server(config) as server:
            await server.wait_ready()
            out = await server.chat([{"role": "user", "content": "hi"}], max_tokens=3)
            assert out.usage.completion_tokens == 3
            assert server.base_url == url.removesuffix("/v1")


async def test_wrong_ca_fails_clearly(tmp_path: Path) -> None:
    bundle = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(bundle))
    async with external_dummy(trustme.CA()) as url:
        config = EndpointConfig(url=url, api_key=KEY, ca_bundle=bundle, model="m")
        with pytest.raises(ServerStartError, match="TLS verification failed") as info:
            async with open_server(config) as server:
                await server.wait_ready()
    assert KEY not in str(info.value)


async def test_system_cas_do_not_trust_a_private_ca() -> None:
    async with external_dummy(trustme.CA()) as url:
        with pytest.raises(ServerStartError, match="TLS verification failed"):
            async with open_server(EndpointConfig(url=url, api_key=KEY, model="m")):
                pass


async def test_rejected_key_and_missing_api() -> None:
    async with external_dummy() as url:
        with pytest.raises(ServerStartError, match=r"rejected the API key \(401\)") as info:
            async with open_server(EndpointConfig(url=url, api_key="sk-wrong", model="m")):
                pass
        assert "sk-wrong" not in str(info.value)
        with pytest.raises(ServerStartError, match=r"no OpenAI API at .* 404"):
            config = EndpointConfig(url=url + "/nothing-here", api_key=KEY, model="m")
            async with open_server(config):
                pass


async def test_refused_connection() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        with anyio.fail_after(10), pytest.raises(ServerStartError, match="cannot connect to"):
            async with open_server(EndpointConfig(url=f"http://127.0.0.1:{port}", model="m")):
                pass


def test_the_key_stays_secret() -> None:
    config = EndpointConfig(url="https://example.invalid/v1", api_key=KEY, model="m")
    assert KEY not in repr(config)
    assert KEY not in str(config)
    assert KEY not in config.model_dump_json()


async def test_endpoint_through_a_proxy_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``trust_env`` (the default), requests go through ``HTTP_PROXY`` as httpx sends them."""
    body = json.dumps({"choices": [{"message": {"content": "via proxy"}, "finish_reason": "stop"}]})
    answer = f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n\r\n{body}".encode()
    async with raw_server(always(answer)) as proxy:
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        config = EndpointConfig(url="http://api.example.invalid/v1", api_key=KEY, model="m")
        async with open_server(config) as server:
            out = await server.chat([{"role": "user", "content": "hi"}])
    assert out.text == "via proxy"
    targets = [head.split(b" ")[:2] for head in proxy.requests]
    assert targets == [
        [b"GET", b"http://api.example.invalid/v1/models"],
        [b"POST", b"http://api.example.invalid/v1/chat/completions"],
    ]
    auth = f"authorization: bearer {KEY}".lower().encode()
    assert all(auth in head.lower() for head in proxy.requests)


def models_then(body: bytes, recorder: list[RawServer]) -> Script:
    """A proxy that answers GET /v1/models plainly and every POST with a gzip ``body``."""
    models = b'{"object": "list", "data": []}'
    plain = f"HTTP/1.1 200 OK\r\ncontent-length: {len(models)}\r\n\r\n".encode() + models
    head = f"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: {len(body)}\r\n\r\n"

    def script(connection: int, request: int) -> tuple[bytes, bool]:
        if recorder[0].requests[-1].startswith(b"GET"):
            return plain, False
        return head.encode() + body, False

    return script


@asynccontextmanager
async def proxied_endpoint(
    monkeypatch: pytest.MonkeyPatch, body: bytes
) -> AsyncIterator[tuple[servescope.Server, RawServer]]:
    """An endpoint reached through ``HTTP_PROXY``, a raw server answering ``body`` (gzip)."""
    recorder: list[RawServer] = []
    async with raw_server(models_then(body, recorder)) as proxy:
        recorder.append(proxy)
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        config = EndpointConfig(
            url="http://api.example.invalid/v1", model="m", max_retries=1, backoff_base=0.001
        )
        with anyio.fail_after(30):
            async with open_server(config) as server:
                yield server, proxy


async def test_proxied_gzip_bomb_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = gzip_of_zeros(400)  # 0.4 MB of gzip, 400 MB decoded
    async with proxied_endpoint(monkeypatch, bomb) as (server, proxy):
        await server.wait_ready()
        with PeakRss() as rss, pytest.raises(RequestError, match="over") as info:
            await server.chat([{"role": "user", "content": "hi"}])
    assert rss.growth < 200 * 1024 * 1024, f"grew {rss.growth / 2**20:.0f} MiB"
    assert isinstance(info.value, RequestError)
    posts = [head for head in proxy.requests if head.startswith(b"POST")]
    assert all(b"accept-encoding: identity" in head.lower() for head in posts)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + b"not deflate at all" * 10, "decode"),
        (gzip.compress(b'{"choices": [{"text": "cut short"}]}')[:-12], "compressed stream"),
    ],
    ids=["broken", "truncated"],
)
async def test_proxied_bad_gzip_is_a_request_error(
    monkeypatch: pytest.MonkeyPatch, body: bytes, problem: str
) -> None:
    async with proxied_endpoint(monkeypatch, body) as (server, _):
        with pytest.raises(RequestError, match=problem) as info:
            await server.chat([{"role": "user", "content": "hi"}])
    assert isinstance(info.value, RetriesExhausted)


async def test_proxied_gzip_answer_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server may compress though asked not to: a sound gzip body still works."""
    body = gzip.compress(b'{"choices": [{"message": {"content": "zipped"}}]}')
    async with proxied_endpoint(monkeypatch, body) as (server, _):
        out = await server.chat([{"role": "user", "content": "hi"}])
    assert out.text == "zipped"


async def test_proxied_unsendable_header_is_a_bad_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpcore's refusal quotes the value; the error names the header instead."""
    async with proxied_endpoint(monkeypatch, b"") as (server, proxy):
        await server.wait_ready()
        with pytest.raises(BadRequest, match="header 'x-token'") as info:
            await server.request({"prompt": "hi"}, headers={"x-token": f"{KEY}\r\nx-evil: 1"})
    assert info.value.status_code is None
    assert KEY not in str(info.value)
    assert not any(head.startswith(b"POST") for head in proxy.requests)


async def test_proxied_post_names_a_bad_client_header_not_its_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The proxied path's client carries the API key; httpcore's refusal would quote it."""
    async with raw_server(always(OK)) as server:
        headers = {"authorization": f"Bearer {KEY}\n"}
        async with httpx.AsyncClient(headers=headers, trust_env=False) as client:
            post = _client_post(client)
            with pytest.raises(httpx.LocalProtocolError, match="header 'authorization'") as info:
                await post(f"http://127.0.0.1:{server.port}/v1/x", b"{}", [])
    assert KEY not in str(info.value)
    assert KEY not in caplog.text  # httpcore logs what it refuses at DEBUG
    assert server.requests == []


@pytest.mark.parametrize(
    "proxy",
    ["http://user:pw@[::1", "ftp://user:pw@127.0.0.1"],
    ids=["bad-url", "bad-scheme"],
)
async def test_unusable_proxy_from_env_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, proxy: str
) -> None:
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy)
    config = EndpointConfig(url="http://api.example.invalid/v1", model="m")
    with anyio.fail_after(10), pytest.raises(ConfigError, match="HTTP_PROXY") as info:
        async with open_server(config):
            pass
    assert "pw" not in str(info.value)
