"""The in-process dummy backend through the public API."""

from __future__ import annotations

import errno
import json
import logging
import sys
from pathlib import Path

import anyio
import httpx
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import servescope
from servescope import DummyConfig, open_server
from servescope._asgi import ACCEPT_ERRORS, AcceptErrorThrottle, SharedFilter

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
    with pytest.raises(servescope.ServerClosed, match="has ended"):
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


#: Runs the in-process dummy on the loop named by argv[1] with few descriptors, uses them
#: all up for argv[2] seconds, frees them, closes the dummy and carries on for 1.5 s (when
#: asyncio's pending accept retries would fire).
EXHAUSTED_DUMMY = """
import os, resource, sys
import anyio, servescope

async def main():
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    async with servescope.open_server(servescope.DummyConfig()) as server:
        await server.wait_ready()
        print(server.base_url.rsplit(":", 1)[1], flush=True)
        hogs = []
        try:
            while True:
                hogs.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        print("exhausted", flush=True)
        await anyio.sleep(float(sys.argv[2]))
        for fd in hogs:
            os.close(fd)
    await anyio.sleep(1.5)

anyio.run(main, backend=sys.argv[1])
"""
#: What each loop logs when accept() fails for want of descriptors.
LOGGED_ACCEPT_ERRORS = {
    "asyncio": b"socket.accept() out of system resource",
    "trio": b"accept returned EMFILE",
}


async def test_descriptor_exhaustion_does_not_flood_stderr(
    anyio_backend: str, tmp_path: Path
) -> None:
    """With no descriptor left, each loop's accept loop logs a traceback per attempt (on
    asyncio thousands a second): at most one such record gets through."""
    err_path = tmp_path / "stderr"
    command = [sys.executable, "-c", EXHAUSTED_DUMMY, anyio_backend, "3"]
    with anyio.fail_after(60), err_path.open("wb") as err:
        async with await anyio.open_process(command, stderr=err) as proc:
            assert proc.stdout is not None
            lines = BufferedByteReceiveStream(proc.stdout)
            port = int(await lines.receive_until(b"\n", 100))
            assert await lines.receive_until(b"\n", 100) == b"exhausted"
            with anyio.move_on_after(3):
                while True:
                    with anyio.move_on_after(0.2):
                        await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                    await anyio.sleep(0.01)
            assert await proc.wait() == 0
    written = err_path.read_bytes()
    logged = written.count(LOGGED_ACCEPT_ERRORS[anyio_backend])
    assert logged == 1 and len(written) < 20_000, f"{logged} in {len(written)} bytes"


def accept_error(logger: str, message: str, *args: object) -> logging.LogRecord:
    """A record as the loop's accept loop makes it, traceback included."""
    try:
        raise OSError(errno.EMFILE, "Too many open files")
    except OSError:
        exc_info = sys.exc_info()
    return logging.LogRecord(logger, logging.ERROR, __file__, 1, message, args, exc_info)


def test_accept_errors_pass_once_a_minute_the_first_with_its_traceback() -> None:
    now = [100.0]
    throttle = AcceptErrorThrottle(interval=60.0, clock=lambda: now[0])
    trio_message = "accept returned %s (%s); retrying in %s seconds"
    records = [
        accept_error("asyncio", ACCEPT_ERRORS["asyncio"][0] + "\nsocket: <...>"),
        accept_error("trio.serve_listeners", trio_message, "EMFILE", "Too many open files", 0.1),
        accept_error("asyncio", ACCEPT_ERRORS["asyncio"][1] + "<...>)\nhandle: <...>"),
    ]
    assert throttle.filter(records[0]) and records[0].exc_info is not None
    for second in range(1, 60):
        now[0] = 100.0 + second
        assert not throttle.filter(records[second % 3])
    now[0] = 160.0
    assert throttle.filter(records[1]) and records[1].exc_info is None
    assert records[1].getMessage() == (
        "accept returned EMFILE (Too many open files); retrying in 0.1 seconds"
        " (59 more since the last, not logged)"
    )


def test_other_records_pass_untouched() -> None:
    throttle = AcceptErrorThrottle(clock=lambda: 0.0)
    assert throttle.filter(accept_error("asyncio", ACCEPT_ERRORS["asyncio"][0]))
    others = [
        accept_error("asyncio", "Task exception was never retrieved"),
        accept_error("asyncio", "Exception in callback Server._wakeup()"),
        accept_error("trio.serve_listeners.x", ACCEPT_ERRORS["trio.serve_listeners"][0]),
        accept_error("servescope", ACCEPT_ERRORS["asyncio"][0]),
    ]
    for record in others:
        before = dict(vars(record))
        assert throttle.filter(record) and vars(record) == before


def test_the_filter_stays_while_any_server_runs() -> None:
    """Added by the first ``serve_asgi``, removed by the last; the loggers' own filters stay."""
    names = ("servescope.test.a", "servescope.test.b")
    loggers = [logging.getLogger(name) for name in names]
    theirs = logging.Filter("theirs")
    loggers[0].addFilter(theirs)
    shared = SharedFilter(names, AcceptErrorThrottle)
    with shared.installed():
        [ours] = loggers[1].filters
        with shared.installed():
            assert loggers[0].filters == [theirs, ours] and loggers[1].filters == [ours]
        assert loggers[0].filters == [theirs, ours] and loggers[1].filters == [ours]
    assert loggers[0].filters == [theirs] and loggers[1].filters == []
    loggers[0].removeFilter(theirs)
