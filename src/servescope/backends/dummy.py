"""The dummy backend: an OpenAI-shaped server with no model, for pipelines and tests.

By default it is served by hypercorn *inside* the server's task group, on a
socket bound to 127.0.0.1 port 0 (no port race, no thread, no process). The same
app also runs as a scripted fake engine process: ``python -m servescope.dummy``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .._config import ServerConfig
from .._dummy_app import DEFAULT_TEXT, DummySettings

__all__ = ["DummyConfig"]


class DummyConfig(ServerConfig):
    """The built-in dummy server.

    Attributes:
        text: the completion text of every answer.
        completion_tokens: the completion token count reported (capped by ``max_tokens``).
        latency: seconds each completion takes.
    """

    backend: Literal["dummy"] = "dummy"
    model: str = "dummy"
    text: str = DEFAULT_TEXT
    completion_tokens: int = Field(default=100, ge=1)
    latency: float = Field(default=0.0, ge=0)

    def settings(self) -> DummySettings:
        """What the dummy app answers."""
        return DummySettings(self.model, self.text, self.completion_tokens, self.latency)
