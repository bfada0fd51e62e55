"""The in-process dummy backend through the public API."""

from __future__ import annotations

import json

import anyio
import httpx
import pytest

import servescope
from servescope import DummyConfig, open_server

pytestmark = pytest.mark.anyio


async def test_chat_complete_and_request() -> None:
    with anyio.fail_after(10):
        async with open_server(DummyConfig(completion_tokens=7, text="hello there")) as server:
            await server.wait_ready()
            assert server.ready and server.base_url.startswith("http://127.0.0.1:")
            chat = await server.chat([{"role": "user", "content": "x" * 40}])
            assert chat.text == "hello there" and chat.finish_reason == "stop"
            assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (10, 7)
            assert chat.raw["object"] == "chat.completion" and chat.raw["model"] == "dummy"
            text = await server.complete("abcd" * 3, max_tokens=2)
            assert (text.text, text.finish_reason, text.usage.total_tokens) == (
                "hello there",
                "length",
                5,
            )
            raw = await server.request({"messages": [{"role": "user", "content": "hi"}]})
            assert raw["choices"][0]["message"]["content"] == "hello there"


async def test_openai_shapes_and_stream() -> None:
    async with (
        open_server(DummyConfig(text="one two three")) as server,
        httpx.AsyncClient(base_url="", trust_env=False) as client,
    ):
        await server.wait_ready()
        models = (await client.get(server.base_url + "/v1/models")).json()
        assert models["object"] == "list" and models["data"][0]["id"] == "dummy"
        assert (await client.get(server.base_url + "/health")).status_code == 200
        payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        response = await client.post(server.base_url + "/v1/chat/completions", json=payload)
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
        assert text == "one two three"
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        bad = await client.post(server.base_url + "/v1/chat/completions", content=b"{nope")
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]


async def test_bad_request_is_classified() -> None:
    async with open_server(DummyConfig()) as server:
        with pytest.raises(servescope.BadRequest) as info:
            await server.request({"messages": "not a list"})
        assert info.value.status_code == 400
        assert "'messages' must be a non-empty list" in str(info.value)


async def test_body_exception_propagates_unchanged() -> None:
    class Boom(Exception):
        pass

    error = Boom("from the body")
    with pytest.raises(Boom) as info:
        async with open_server(DummyConfig()) as server:
            await server.wait_ready()
            raise error
    assert info.value is error
    with pytest.raises(servescope.ServeError, match="closed"):
        await server.wait_ready()


async def test_cancelled_from_outside() -> None:
    with anyio.move_on_after(0.5) as scope:
        async with open_server(DummyConfig(latency=30)) as server:
            await server.chat([{"role": "user", "content": "slow"}])
    assert scope.cancelled_caught


async def test_defaults_fill_the_payload() -> None:
    config = DummyConfig(model="my-model", default_params={"max_tokens": 3}, use_chat=False)
    async with open_server(config) as server:
        raw = await server.request({"prompt": "hi"})
        assert raw["model"] == "my-model" and raw["object"] == "text_completion"
        assert raw["usage"]["completion_tokens"] == 3
        raw = await server.request({"prompt": "hi", "max_tokens": 5, "model": "other"})
        assert raw["model"] == "other" and raw["usage"]["completion_tokens"] == 5
