"""The custom backend: the user's own server script, run as ``python SCRIPT --port P``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import Field

from .._logscan import PatternTable
from ._base import ADDRESS_IN_USE, ProcessConfig, ProcessSpec, cli_args

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
    """

    backend: Literal["custom"] = "custom"
    model: str = "custom"
    script: Path
    args: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    extra_args: tuple[str, ...] = ()
    python: str = sys.executable
    health_path: str = "/v1/models"

    def process_spec(self, port: int) -> ProcessSpec:
        """``python SCRIPT --port P [args] [extra_args]``, unbuffered."""
        argv = [self.python, str(self.script), "--port", str(port)]
        argv += cli_args(self.args) + list(self.extra_args)
        patterns = CUSTOM_PATTERNS.extended(ready=self.ready_patterns, fatal=self.fatal_patterns)
        env = {"PYTHONUNBUFFERED": "1", **self.env}
        return ProcessSpec(argv, patterns, env, self.health_path)
