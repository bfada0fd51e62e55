"""What a backend that launches a process provides: a command line, an environment,
its log patterns and its readiness path. The machinery that runs it is shared."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._config import ServerConfig
from .._logscan import PatternTable

__all__ = ["ADDRESS_IN_USE", "ProcessConfig", "ProcessSpec", "cli_args"]

ADDRESS_IN_USE = r"(?i)address already in use"


@dataclass(frozen=True)
class ProcessSpec:
    """Everything needed to launch one server process on one port."""

    argv: list[str]
    patterns: PatternTable
    env: Mapping[str, str] = field(default_factory=dict)
    health_path: str = "/v1/models"


class ProcessConfig(ServerConfig):
    """Base of the configs whose server is a local process."""

    def process_spec(self, port: int) -> ProcessSpec:  # pragma: no cover - abstract
        """The command, environment and patterns for a start on ``port``."""
        raise NotImplementedError


def cli_args(args: Mapping[str, Any]) -> list[str]:
    """Map ``{key: value}`` to flags as datatrove does.

    ``True`` → ``--key``, ``False`` → ``--no-key``, ``None`` → nothing, anything else
    → ``--key=value``. Keys are used as written (a script's parser may define
    ``--max_tokens`` and not ``--max-tokens``).
    """
    argv = []
    for key, value in args.items():
        flag = "--" + key.lstrip("-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + flag[2:])
        elif value is not None:
            argv.append(f"{flag}={value}")
    return argv
