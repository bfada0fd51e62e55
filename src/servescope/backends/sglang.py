"""The SGLang backend: ``python -m sglang.launch_server --model-path M --port P ...``.

Facts it relies on (checked against SGLang 0.5.23 source; see tests/transcripts/NOTES.md):

* Ready only on ``The server is fired up and ready to roll!``, printed after its own
  warm-up request. ``Uvicorn running on`` comes earlier and is *not* readiness, and
  ``/health`` answers 503 until the warm-up is done. The ready line alone is not trusted
  either: with its port taken by another SGLang, it warms up against that one and prints
  the line anyway. So readiness needs the line *and* ``/health`` answering 200, and an
  ``address already in use`` line before it moves the start to another port.
* On a child failure (scheduler, detokenizer) SGLang prints why, then kills its whole
  tree including itself with SIGKILL: the exit status is -9, the log says what happened.
* The main runtime has no ``--strict-ports`` (only its diffusion server does); where the
  installed SGLang accepts it, it is passed so the server never moves to another port.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from .._config import MAX_SECONDS, Flag, Integer, Number, Text
from .._logscan import PatternTable
from .._nodes import NodesConfig
from ._base import (
    ADDRESS_IN_USE,
    EngineConfig,
    FlagArgs,
    ProcessSpec,
    cli_args,
    engine_flags,
    has_flag,
    runs_this_python,
)

if TYPE_CHECKING:
    from .._multinode import NodePlan

__all__ = ["SGLANG_PATTERNS", "SGLangConfig", "sglang_supports_strict_ports"]

READY_LINE = r"The server is fired up and ready to roll!"

SGLANG_PATTERNS = PatternTable.build(
    ready=[READY_LINE],
    fatal=[
        # Causes first: of several fatal lines, the earliest pattern here is reported.
        r"CUDA out of memory",
        r"Not enough memory\. Please try to increase --mem-fraction-static",
        r"Subprocess \S+ \(pid=\d+\) crashed with exit code",
        r"scheduler died during initialization",
        r"(Scheduler|DetokenizerManager|TokenizerManager|DataParallelController) hit an exception",
        r"Multi(Tokenizer|Detokenizer)Router hit an exception",
        r"Initialization failed\. warmup error",
        # Consequences: SGLang's reaction to any of the above.
        r"Received sigquit from a child process",
        r"SIGQUIT received",
    ],
    retry=[ADDRESS_IN_USE],
    # After readiness: SGLang's own records announcing a child's death (its request log,
    # 'Receive: obj=...', may quote any prompt and cannot).
    death=[
        r"^Subprocess \S+ \(pid=\d+\) crashed with exit code",
        r"^SIGQUIT received",
        r"^Received sigquit from a child process",
        r"^(Scheduler|DetokenizerManager|TokenizerManager|DataParallelController) hit an exception",
        r"^Multi(Tokenizer|Detokenizer)Router hit an exception",
    ],
    # '[YYYY-MM-DD HH:MM:SS TP0] message' (0.5: no level); newer: 'LEVEL file.py:N: message'.
    record=r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?( [^\]]*)?\] "
    r"((?P<level>[A-Z]+) \S+:\d+: )?(?P<message>.*)",
)


def sglang_supports_strict_ports() -> bool:
    """Whether this interpreter's SGLang runtime accepts ``--strict-ports`` (read, not imported)."""
    try:
        spec = importlib.util.find_spec("sglang.srt.server_args")
    except (ImportError, ValueError):
        return False
    if spec is None or spec.origin is None:
        return False
    try:
        return "--strict-ports" in Path(spec.origin).read_text(errors="replace")
    except OSError:
        return False


class SGLangConfig(EngineConfig):
    """An SGLang server on this node.

    Attributes:
        model: ``--model-path`` (a local path or a Hugging Face id).
        context_length: ``--context-length``.
        tp / dp / pp: ``--tp-size`` / ``--dp-size`` / ``--pp-size``.
        args: more ``launch_server`` flags; a flag given here wins over the fields above.
        host: the address to listen on.
        strict_ports: pass ``--strict-ports``; ``None``: when the installed SGLang has it.
        python: the interpreter with SGLang installed.
    """

    backend: Literal["sglang"] = "sglang"
    model: Text
    context_length: Integer | None = Field(default=None, gt=0, le=2**31 - 1)
    strict_ports: Flag | None = None
    #: SGLang's ``/health`` runs a one-token generation (and takes >= 1 s): probe gently.
    health_interval: Number | None = Field(default=5.0, gt=0, le=MAX_SECONDS)

    @field_validator("args")
    @classmethod
    def _no_key_flag(cls, args: FlagArgs) -> FlagArgs:
        if has_flag(args, "api-key"):
            raise ValueError(
                "no api-key flag: servescope's requests carry no key for SGLang, so every "
                "one would be refused (401), and ps shows the command line to every user; "
                "keep host on 127.0.0.1 instead"
            )
        return args

    @field_validator("nodes")
    @classmethod
    def _no_ray(cls, nodes: NodesConfig | None) -> NodesConfig | None:
        if nodes is not None and nodes.executor != "mp":
            raise ValueError("SGLang runs across nodes by itself: executor must be 'mp'")
        return nodes

    def server_args(self) -> list[str]:
        """The flags after ``--port``."""
        args = self.args
        argv = engine_flags(
            args,
            host=self.host,
            length=("context-length", self.context_length),
            sizes=[
                (self.tp, ("tp", "tensor-parallel-size", "tp-size")),
                (self.dp, ("dp", "data-parallel-size", "dp-size")),
                (self.pp, ("pp", "pipeline-parallel-size", "pp-size")),
            ],
        )
        strict = self.strict_ports
        if strict is None:
            strict = runs_this_python(self.python) and sglang_supports_strict_ports()
        if strict and not has_flag(args, "strict-ports"):
            argv.append("--strict-ports")
        return argv + cli_args(args)

    def process_spec(self, port: int) -> ProcessSpec:
        """``python -m sglang.launch_server --model-path M --port P --host 127.0.0.1 ...``."""
        argv = [self.python, "-m", "sglang.launch_server", "--model-path", self.model]
        argv += ["--port", str(port), *self.server_args()]
        patterns = SGLANG_PATTERNS.extended(ready=self.ready_patterns, fatal=self.fatal_patterns)
        return ProcessSpec(
            argv,
            patterns,
            {"PYTHONUNBUFFERED": "1", **self.env},
            health_path="/health",
            ready_line_required=True,
            connect_host=self.connect_host(),
        )

    def node_process_spec(self, port: int, plan: NodePlan) -> ProcessSpec:
        """Every node runs ``launch_server`` with ``--nnodes --node-rank --dist-init-addr``;
        only node 0 serves HTTP (the others print no ready line and need no probe)."""
        spec = self.process_spec(port)
        role = plan.role
        flags = []
        for name, value in [
            ("nnodes", str(role.nnodes)),
            ("node-rank", str(role.rank)),
            ("dist-init-addr", f"{role.master_addr}:{role.master_port}"),
        ]:
            if not has_flag(self.args, name):
                flags += [f"--{name}", value]
        argv = [*spec.argv, *flags]
        if plan.is_head:
            return dataclasses.replace(spec, argv=argv)
        # No HTTP server, and no ready line to wait for: up once spawned.
        return dataclasses.replace(spec, argv=argv, health_path=None, ready_line_required=False)
