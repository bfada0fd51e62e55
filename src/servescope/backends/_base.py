"""What a backend that launches a process provides: a command line, an environment,
its log patterns and its readiness path. The machinery that runs it is shared."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, SecretStr, field_validator

from .._config import Integer, ServerConfig, Text, excerpt
from .._logscan import PatternTable
from .._nodes import NodesConfig
from .._redact import masked, secret_values

if TYPE_CHECKING:
    from .._multinode import NodePlan

__all__ = [
    "ADDRESS_IN_USE",
    "EngineConfig",
    "FlagArgs",
    "ProcessConfig",
    "ProcessSpec",
    "argv_flag_value",
    "argv_has_flag",
    "check_api_key",
    "check_args",
    "cli_args",
    "connect_host",
    "engine_flags",
    "flag_value",
    "has_flag",
    "runs_this_python",
]

ADDRESS_IN_USE = r"(?i)address already in use"

#: Flags for a server's command line: ``{name: value}`` (see ``cli_args``).
FlagArgs = dict[str, str | int | float | bool | None]


@dataclass(frozen=True)
class ProcessSpec:
    """Everything needed to launch one server process on one port.

    Attributes:
        health_path: probed until it answers 200 (readiness), at once on a ready line;
            ``None``: no HTTP server (a worker node's part, a Ray node): up on its ready
            line if ``ready_line_required``, else once spawned.
        ready_line_required: ready only once a ready line was printed *and* the probe
            answers 200 (SGLang's port answers before its warm-up is done).
        dead_status: a status ``health_path`` answers after readiness only once the engine
            died (vLLM's 503: its API server lives ~5 s longer, then exits 0): a crash at once.
        connect_host: where clients connect (the server may listen more widely).
        compile_key: serialise start-ups of this configuration across jobs sharing a
            filesystem until the first one is ready (vLLM's torch.compile cache).
        max_grace: a cap on the SIGTERM-to-SIGKILL grace, for a process with nothing
            worth a longer one (a Ray node).
    """

    argv: list[str]
    patterns: PatternTable
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # may hold an API key
    health_path: str | None = "/v1/models"
    ready_line_required: bool = False
    dead_status: int | None = None
    connect_host: str = "127.0.0.1"
    compile_key: str | None = None
    max_grace: float | None = None


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
        nodes: one model across several nodes (``_nodes.NodesConfig``): every node runs
            the same config; node 0 serves, the others run their part of the engine.
    """

    tp: Integer = Field(default=1, ge=1, le=4096)
    dp: Integer = Field(default=1, ge=1, le=4096)
    pp: Integer = Field(default=1, ge=1, le=4096)
    args: FlagArgs = Field(default_factory=dict)
    host: Text = "127.0.0.1"
    python: Text = sys.executable
    nodes: NodesConfig | None = None

    @field_validator("args")
    @classmethod
    def _valid_args(cls, args: FlagArgs) -> FlagArgs:
        return check_args(args)

    def node_process_spec(self, port: int, plan: NodePlan) -> ProcessSpec:  # pragma: no cover
        """The command for this node's part of a multi-node server (``plan``)."""
        raise NotImplementedError

    @field_validator("model", "host")
    @classmethod
    def _not_a_flag(cls, value: str) -> str:
        if value.startswith("-"):
            raise ValueError("must not start with '-' (the engine would read it as a flag)")
        return value

    def secrets(self) -> list[str]:
        """The base's secrets, the values of secret flags in ``args`` (``hf-token``), the
        nodes' liveness token."""
        nodes = self.nodes.secrets() if self.nodes is not None else []
        return [*super().secrets(), *secret_values(self.args), *nodes]

    def _shown(self, name: str, value: Any) -> Any:
        return masked(value) if name == "args" else super()._shown(name, value)

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


def check_args(args: FlagArgs) -> FlagArgs:
    """``args`` if every flag can be passed as given; ``ValueError`` naming the flag if
    not. The port is refused: servescope picks it (a free one per start), and a server
    told another one would never be found."""
    for key, value in args.items():
        name = _flag(key)
        if not name or "\0" in key:
            raise ValueError(f"{excerpt(key)} is not a flag name")
        if name == "port":
            raise ValueError(f"{excerpt(key)} sets the port, which servescope picks; remove it")
        if name == "host" and not isinstance(value, str):
            raise ValueError(f"{excerpt(key)}: the host must be an address (a string)")
        if isinstance(value, str) and "\0" in value:
            raise ValueError(f"{excerpt(key)}: the value must not contain a NUL character")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{excerpt(key)}: the value must be finite")
        if isinstance(value, int) and value.bit_length() > 64:
            raise ValueError(f"{excerpt(key)}: the value is too large (at most 64 bits)")
    return args


def check_api_key(key: SecretStr | None) -> SecretStr | None:
    """``key`` if it can go into an ``Authorization`` header as it is (never echoed)."""
    if key is None:
        return key
    value = key.get_secret_value()
    if not 0 < len(value) <= 4096 or not all("!" <= char <= "~" for char in value):
        raise ValueError(
            "must be 1 to 4096 printable ASCII characters, without spaces or control "
            "characters (a line break would split the request's headers)"
        )
    return key


def argv_has_flag(argv: Sequence[str], name: str) -> bool:
    """Whether ``argv`` has flag ``name`` (``--name``, ``--name=X``, ``-name``, ``--na_me``)."""
    return any(arg.startswith("-") and _flag(arg.partition("=")[0]) == _flag(name) for arg in argv)


def argv_flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value the last ``--name X`` or ``--name=X`` in ``argv`` gives, or ``None``."""
    found = None
    for i, arg in enumerate(argv):
        flag, equals, value = arg.partition("=")
        if not arg.startswith("-") or _flag(flag) != _flag(name):
            continue
        if equals:
            found = value
        elif i + 1 < len(argv):
            found = argv[i + 1]
    return found


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
