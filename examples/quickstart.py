"""Open the built-in dummy server and send it a chat and a completion request.

Run it with ``python examples/quickstart.py`` (or ``... trio`` for the trio event loop).
"""

from __future__ import annotations

import sys

import anyio

import servescope


async def main() -> None:
    config = servescope.DummyConfig(completion_tokens=12)
    async with servescope.open_server(config) as server:
        await server.wait_ready()
        print(f"dummy server ready at {server.base_url}")
        answer = await server.chat([{"role": "user", "content": "Say hello."}], max_tokens=32)
        print(f"chat:       {answer.text!r} ({answer.finish_reason}, {answer.usage})")
        answer = await server.complete("Once upon a time", max_tokens=8)
        print(f"completion: {answer.text!r} ({answer.finish_reason}, {answer.usage})")
    print("server closed")


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
