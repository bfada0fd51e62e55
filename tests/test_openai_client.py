"""The official openai client understands the dummy backend's answers."""

from __future__ import annotations

import openai
import pytest

from servescope import DummyConfig, open_server

pytestmark = pytest.mark.anyio


# On trio, the openai client's own SSE generators (openai._streaming, its httpx2) are
# garbage-collected unfinished even after the stream is closed; that is theirs, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_openai_client_parses_the_dummy() -> None:
    async with open_server(DummyConfig(text="alpha beta", completion_tokens=5)) as server:
        await server.wait_ready()
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused")
        async with client:
            chat = await client.chat.completions.create(
                model="dummy", messages=[{"role": "user", "content": "hi"}]
            )
            assert chat.choices[0].message.content == "alpha beta"
            assert chat.choices[0].finish_reason == "stop"
            assert chat.usage is not None and chat.usage.completion_tokens == 5
            text = await client.completions.create(model="dummy", prompt="once", max_tokens=2)
            assert text.choices[0].text == "alpha beta"
            assert text.choices[0].finish_reason == "length"
            stream = await client.chat.completions.create(
                model="dummy",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            pieces, usage = [], None
            async with stream:  # closes the stream's generators on trio too
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        pieces.append(chunk.choices[0].delta.content)
                    usage = chunk.usage or usage
            assert "".join(pieces) == "alpha beta"
            assert usage is not None and usage.completion_tokens == 5
            models = [model.id async for model in client.models.list()]
            assert models == ["dummy"]
