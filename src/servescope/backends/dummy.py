"""The dummy backend: an OpenAI-shaped server with no model, for pipelines and tests.

By default it is served by hypercorn *inside* the server's task group, on a
socket bound to 127.0.0.1 port 0 (no port race, no thread, no process). The same
app also runs as a scripted fake engine process: ``python -m servescope.dummy``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .._config import Integer, Number, ServerConfig, Text
from .._dummy_app import DEFAULT_TEXT, DummySettings
from .._faults import FaultSchedule, parse_fault

__all__ = ["DummyConfig"]


class DummyConfig(ServerConfig):
    """The built-in dummy server.

    Attributes:
        text: the completion text of every answer.
        completion_tokens: the completion token count reported (capped by ``max_tokens``).
        latency: seconds each completion takes.
        token_latency: seconds between the chunks of a streamed completion.
        faults / fault_rate / fault_seed: a seeded random fault schedule — each completion
            request, with probability ``fault_rate``, gets one of the ``faults``
            directives (see ``servescope._faults``: ``status=503,retry-after=1``,
            ``drop``, ``malformed``, ``truncated``, ``delay=0.5``, ...). A request can
            also carry its own directives in the ``x-servescope-fault`` header.
    """

    backend: Literal["dummy"] = "dummy"
    model: Text = "dummy"
    text: str = DEFAULT_TEXT
    completion_tokens: Integer = Field(default=100, ge=1, le=1_000_000)
    latency: Number = Field(default=0.0, ge=0, le=3_600)
    token_latency: Number = Field(default=0.0, ge=0, le=3_600)
    faults: tuple[str, ...] = ()
    fault_rate: Number = Field(default=0.0, ge=0, le=1)
    fault_seed: Integer = Field(default=0, ge=-(2**63), le=2**63 - 1)

    @field_validator("faults")
    @classmethod
    def _valid_faults(cls, faults: tuple[str, ...]) -> tuple[str, ...]:
        for fault in faults:
            parse_fault(fault)
        return faults

    def settings(self) -> DummySettings:
        """What the dummy app answers."""
        return DummySettings(
            self.model,
            self.text,
            self.completion_tokens,
            self.latency,
            token_latency=self.token_latency,
        )

    def fault_schedule(self) -> FaultSchedule:
        """A fresh seeded fault schedule."""
        return FaultSchedule(self.faults, self.fault_rate, self.fault_seed)
