"""What a backend that launches a process provides: a command line, an environment,
its log patterns and its readiness path. The machinery that runs it is shared."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from .._config import ServerConfig
from .._logscan import PatternTable
from .._redact import looks_secret

__all__ = [
    "ADDRESS_IN_USE",
    "EngineConfig",
    "ProcessConfig",
    "ProcessSpec",
    "cli_args",
    "connect_host",
    "engine_flags",
    "flag_value",
    "has_flag",
    "runs_this_python",
]

ADDRESS_IN_USE = r"(?i)address already in use"


@dataclass(frozen=True)
class ProcessSpec:
    """Everything needed to launch one server process on one port.

    Attributes:
        health_path: probed until it answers 200 (readiness), at once on a ready line.
        ready_line_required: ready only once a ready line was printed *and* the probe
            answers 200 (SGLang's port answers before its warm-up is done).
        dead_status: a status ``health_path`` answers after readiness only once the engine
            died (vLLM's 503: its API server lives ~5 s longer, then exits 0): a crash at once.
        connect_host: where clients connect (the server may listen more widely).
        compile_key: serialise start-ups of this configuration across jobs sharing a
            filesystem until the first one is ready (vLLM's torch.compile cache).
    """

    argv: list[str]
    patterns: PatternTable
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # may hold an API key
    health_path: str = "/v1/models"
    ready_line_required: bool = False
    dead_status: int | None = None
    connect_host: str = "127.0.0.1"
    compile_key: str | None = None


class ProcessConfig(ServerConfig):
    """Base of the configs whose server is a local process."""

    def process_spec(self, port: int) -> ProcessSpec:  # pragma: no cover - abstract
        """The command, environment and patterns for a start on ``port``."""
        raise NotImplementedError


class EngineConfig(ProcessConfig):
    """What the vLLM and SGLang configs share.

    Attributes:
        tp / dp / pp: tensor, data and pipeline parallel sizes.
        args: more flags for the engine; a flag given here wins over the fields.
        host: the address to listen on (``0.0.0.0`` opens the server to the network).
        python: the interpreter the engine is installed in.
    """

    tp: int = Field(default=1, ge=1)
    dp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    args: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    host: str = "127.0.0.1"
    python: str = sys.executable

    def secrets(self) -> list[str]:
        """The base's secrets and the values of secret flags in ``args`` (``hf-token``)."""
        flags = [str(value) for key, value in self.args.items() if looks_secret(key) and value]
        return [*super().secrets(), *flags]

    def connect_host(self) -> str:
        """Where clients reach the server: its listen address (``args`` win), wildcards
        meaning loopback."""
        return connect_host(str(flag_value(self.args, "host") or self.host))


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


def _flag(name: str) -> str:
    """A flag's name as the engines read it: ``--tp_size`` and ``tp-size`` are ``tp-size``."""
    return name.lstrip("-").replace("_", "-")


def has_flag(args: Mapping[str, Any], *names: str) -> bool:
    """Whether ``args`` sets any of the flags ``names`` (``tp``, ``--tp``, ``tp_size``...)."""
    given = {_flag(key) for key in args}
    return any(_flag(name) in given for name in names)


def flag_value(args: Mapping[str, Any], name: str) -> Any:
    """The value ``args`` gives flag ``name`` under any spelling, or ``None``."""
    for key, value in args.items():
        if _flag(key) == _flag(name):
            return value
    return None


def engine_flags(
    args: Mapping[str, Any],
    *,
    host: str,
    length: tuple[str, int | None],
    sizes: Sequence[tuple[int, tuple[str, ...]]],
) -> list[str]:
    """An engine's ``--host``, context-length flag and parallel sizes, unless ``args``
    sets them itself (explicit args win). ``sizes``: (size, (alias, ..., flag name)); a
    size of 1 is the engines' default and is left out."""
    argv = []
    if not has_flag(args, "host"):
        argv += ["--host", host]
    flag, value = length
    if value is not None and not has_flag(args, flag):
        argv += [f"--{flag}", str(value)]
    for size, names in sizes:
        if size > 1 and not has_flag(args, *names):
            argv += [f"--{names[-1]}", str(size)]
    return argv


def runs_this_python(python: str) -> bool:
    """Whether ``python`` is the interpreter running servescope (what it has, we can see)."""
    return Path(python).resolve() == Path(sys.executable).resolve()


def connect_host(host: str) -> str:
    """The address to reach a server listening on ``host`` (wildcards: loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host
