"""The custom backend: the user's own server script, run as ``python SCRIPT --port P``."""

from __future__ import annotations

import sys
from typing import Any, Literal

from pydantic import Field, field_validator

from .._config import PathText, Text
from .._logscan import PatternTable
from .._redact import masked, masked_argv, secret_values
from ._base import (
    ADDRESS_IN_USE,
    FlagArgs,
    ProcessConfig,
    ProcessSpec,
    argv_flag_value,
    argv_has_flag,
    check_args,
    cli_args,
    connect_host,
    flag_value,
)

__all__ = ["CUSTOM_PATTERNS", "CustomConfig"]

#: uvicorn's start-up lines, and the failures datatrove's custom server watched for. Its
#: log format is unknown: after readiness they count only as a traceback's last line.
CUSTOM_PATTERNS = PatternTable.build(
    ready=[r"Application startup complete", r"Uvicorn running on"],
    fatal=[
        r"CUDA out of memory",
        r"RuntimeError.*CUDA|CUDA.*RuntimeError",
        r"\bImportError\b",
        r"\bModuleNotFoundError\b",
    ],
    retry=[ADDRESS_IN_USE],
)


class CustomConfig(ProcessConfig):
    """Run a Python server script that takes ``--port`` and speaks the OpenAI API.

    The command is ``python SCRIPT --port P`` followed by ``args`` mapped to flags
    (``True`` → ``--k``, ``False`` → ``--no-k``, else ``--k=v``) and ``extra_args``
    as given. It is ready on uvicorn's ``Application startup complete`` /
    ``Uvicorn running on`` and confirmed by ``GET health_path``.

    servescope picks the port: ``args`` and ``extra_args`` may not set one. A ``--host``
    there is where the script listens, so it is where clients connect (wildcards:
    loopback).
    """

    backend: Literal["custom"] = "custom"
    model: Text = "custom"
    script: PathText
    args: FlagArgs = Field(default_factory=dict)
    extra_args: tuple[Text, ...] = ()
    python: Text = sys.executable
    health_path: str = "/v1/models"

    @field_validator("args")
    @classmethod
    def _valid_args(cls, args: FlagArgs) -> FlagArgs:
        return check_args(args)

    @field_validator("extra_args")
    @classmethod
    def _no_port(cls, extra_args: tuple[str, ...]) -> tuple[str, ...]:
        if argv_has_flag(extra_args, "port"):
            raise ValueError("a --port flag sets the port, which servescope picks; remove it")
        return extra_args

    @field_validator("health_path")
    @classmethod
    def _valid_path(cls, path: str) -> str:
        if not path.startswith("/") or not all("!" <= char <= "~" for char in path):
            raise ValueError("must start with / and hold only printable ASCII, no spaces")
        return path

    def secrets(self) -> list[str]:
        """The base's secrets and the values of secret flags in ``args`` and ``extra_args``."""
        return [*super().secrets(), *secret_values(self.args), *secret_values(self.extra_args)]

    def _shown(self, name: str, value: Any) -> Any:
        if name == "args":
            return masked(value)
        if name == "extra_args":
            return type(value)(masked(masked_argv(value)))
        return super()._shown(name, value)

    def connect_host(self) -> str:
        """Where clients reach the script: a ``--host`` in ``extra_args``, else in ``args``,
        wildcards meaning loopback."""
        host = argv_flag_value(self.extra_args, "host") or flag_value(self.args, "host")
        return connect_host(str(host)) if host else "127.0.0.1"

    def process_spec(self, port: int) -> ProcessSpec:
        """``python SCRIPT --port P [args] [extra_args]``, unbuffered."""
        script = str(self.script)
        if script.startswith("-"):
            script = f"./{script}"  # a script, not an option of python's
        argv = [self.python, script, "--port", str(port)]
        argv += cli_args(self.args) + list(self.extra_args)
        patterns = CUSTOM_PATTERNS.extended(ready=self.ready_patterns, fatal=self.fatal_patterns)
        env = {"PYTHONUNBUFFERED": "1", **self.env}
        return ProcessSpec(argv, patterns, env, self.health_path, connect_host=self.connect_host())
