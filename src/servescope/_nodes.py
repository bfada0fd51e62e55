"""Which node this is: a multi-node server's settings and the node's role, decided purely.

One model served across several nodes runs the same program on every node (as under
``srun``): each node must find out how many nodes there are, which one it is, and where
the head (node 0) is. ``resolve_role`` decides that from the first source that is set:

1. the config itself (``nodes.nnodes`` / ``node_rank`` / ``master_addr``),
2. torchrun's environment (``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``),
3. SLURM's (``SLURM_NNODES``, ``SLURM_NODEID``, the first host of ``SLURM_JOB_NODELIST``),
4. datatrove's (``DATATROVE_NODE_RANK``, ``DATATROVE_NODE_IPS``: the first is the head).

The source used must be complete, and two environment sources that are both set must
agree on the node count and this node's rank: otherwise a ``ConfigError`` names the
variables (a job that guessed wrong would hang in a rendezvous that never completes).
The config wins over the environment without a check: it is the user's explicit choice.

The environment and the SLURM host-list expansion are passed in: no I/O here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from ._config import MAX_SECONDS, Integer, Number, Settings, Text, excerpt
from ._errors import ConfigError

__all__ = [
    "DEFAULT_MASTER_PORT",
    "NodeRole",
    "NodesConfig",
    "first_slurm_host",
    "resolve_role",
]

#: The engines' rendezvous port when no source names one (torchrun's default).
DEFAULT_MASTER_PORT = 29500
#: The environment variable a job's nodes share their liveness token through.
TOKEN_VARIABLE = "SERVESCOPE_NODE_TOKEN"
_MAX_NODES = 4096
#: ``ray start`` flags: ``{name: value}`` (as ``backends._base.FlagArgs``).
RayArgs = dict[str, str | int | float | bool | None]


class NodesConfig(Settings):
    """One model across several nodes: who is who, and how the nodes watch each other.

    Attributes:
        nnodes / node_rank / master_addr / master_port: the node roles; unset, they come
            from torchrun's, SLURM's or datatrove's environment (see ``_nodes``).
        node_ip: this node's address as the other nodes reach it (``VLLM_HOST_IP``,
            Ray's ``--node-ip-address``); default: the local address that routes to
            ``master_addr``.
        executor: vLLM's way across nodes: ``"mp"`` (its own multi-node mode, a headless
            engine on each other node) or ``"ray"`` (a Ray cluster started here).
        ray_port: the Ray head's GCS port.
        ray_args: more ``ray start`` flags for every node (``{"num-gpus": 8}``).
        liveness_port: the head's port for servescope's own liveness channel
            (default: ``master_port - 1``: SGLang takes the ports just above its
            dist-init port for its own channels between nodes).
        token: the job's shared secret authenticating the liveness channel (default: the
            ``SERVESCOPE_NODE_TOKEN`` environment variable; required one way or the other).
        heartbeat_interval: seconds between heartbeats on the liveness channel.
        node_timeout: a node from which nothing came for this long is lost: the head's
            scope fails (``ServerCrashed`` naming it) and a worker's ends.
    """

    nnodes: Integer | None = Field(default=None, ge=1, le=_MAX_NODES)
    node_rank: Integer | None = Field(default=None, ge=0, lt=_MAX_NODES)
    master_addr: Text | None = None
    master_port: Integer | None = Field(default=None, ge=1, le=65535)
    node_ip: Text | None = None
    executor: Literal["mp", "ray"] = "mp"
    ray_port: Integer = Field(default=6379, ge=1, le=65535)
    ray_args: RayArgs = Field(default_factory=dict)
    liveness_port: Integer | None = Field(default=None, ge=1, le=65535)
    token: SecretStr | None = None
    heartbeat_interval: Number = Field(default=0.5, gt=0, le=60)
    node_timeout: Number = Field(default=3.0, gt=0, le=MAX_SECONDS)

    @field_validator("ray_args")
    @classmethod
    def _valid_ray_args(cls, args: RayArgs) -> RayArgs:
        from .backends._base import check_args

        return check_args(args)

    @field_validator("master_addr", "node_ip")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is not None and (not value or value.startswith("-") or " " in value):
            raise ValueError("must be a host name or an IP address")
        return value

    def secrets(self) -> list[str]:
        """The liveness token."""
        return [self.token.get_secret_value()] if self.token is not None else []


@dataclass(frozen=True)
class NodeRole:
    """This node's place in a multi-node server.

    ``source`` says where the roles came from (``"config"``, ``"torchrun"``, ``"slurm"``,
    ``"datatrove"``), for messages.
    """

    nnodes: int
    rank: int
    master_addr: str
    master_port: int
    source: str

    @property
    def is_head(self) -> bool:
        """Node 0 runs the HTTP server and the coordination."""
        return self.rank == 0

    def describe(self) -> str:
        """``node 1 of 2 (head 10.0.0.1, from slurm)``."""
        return f"node {self.rank} of {self.nnodes} (head {self.master_addr}, from {self.source})"


@dataclass(frozen=True)
class _Found:
    """What one source says; ``missing`` names what it lacks."""

    source: str
    names: str  # its variables, for messages
    nnodes: int | None
    rank: int | None
    master_addr: str | None
    master_port: int | None
    missing: tuple[str, ...]


def resolve_role(
    nodes: NodesConfig,
    env: Mapping[str, str],
    first_host: Callable[[str], str] = lambda nodelist: first_slurm_host(nodelist),
) -> NodeRole:
    """This node's role, from the first source that is set (see the module's docstring).

    ``first_host`` expands a SLURM node list to its first host name (``scontrol show
    hostnames``); it is called only when SLURM is the source.
    """
    found = _from_config(nodes)
    if found is None:
        candidates = [
            candidate
            for candidate in (_from_torchrun(env), _from_slurm(env), _from_datatrove(env))
            if candidate is not None
        ]
        if not candidates:
            raise ConfigError(
                "no node roles for a multi-node server: set nodes.nnodes, nodes.node_rank "
                "and nodes.master_addr, or run with NNODES/NODE_RANK/MASTER_ADDR "
                "(torchrun), under SLURM (SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST), "
                "or with DATATROVE_NODE_RANK/DATATROVE_NODE_IPS"
            )
        found = candidates[0]
        _check_agreement(found, candidates[1:])
    if found.missing:
        raise ConfigError(
            f"incomplete node roles from {found.source} ({found.names}): "
            f"{', '.join(found.missing)} not set"
        )
    assert found.nnodes is not None and found.rank is not None
    if found.rank >= found.nnodes:
        raise ConfigError(
            f"node rank {found.rank} from {found.source} ({found.names}) is not below "
            f"the node count {found.nnodes}"
        )
    master = found.master_addr
    if master is None and found.source == "slurm":
        master = _slurm_master(env, first_host)
    if master is None:
        if found.nnodes > 1:
            raise ConfigError(f"no head address from {found.source} ({found.names})")
        master = "127.0.0.1"
    port = nodes.master_port or found.master_port or DEFAULT_MASTER_PORT
    return NodeRole(found.nnodes, found.rank, master, port, found.source)


def _from_config(nodes: NodesConfig) -> _Found | None:
    if nodes.nnodes is None and nodes.node_rank is None and nodes.master_addr is None:
        return None
    missing = tuple(
        f"nodes.{name}"
        for name, value in (("nnodes", nodes.nnodes), ("node_rank", nodes.node_rank))
        if value is None
    )
    if nodes.nnodes is not None and nodes.nnodes > 1 and nodes.master_addr is None:
        missing += ("nodes.master_addr",)
    return _Found(
        "config",
        "nodes.nnodes, nodes.node_rank, nodes.master_addr",
        nodes.nnodes,
        nodes.node_rank,
        nodes.master_addr,
        nodes.master_port,
        missing,
    )


def _from_torchrun(env: Mapping[str, str]) -> _Found | None:
    names = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
    if not any(env.get(name) for name in names):
        return None
    nnodes = _integer(env, "NNODES", 1)
    rank = _integer(env, "NODE_RANK", 0)
    port = _integer(env, "MASTER_PORT", 1, 65535)
    master = _address(env, "MASTER_ADDR")
    missing = tuple(name for name in names[:3] if not env.get(name))
    return _Found("torchrun", ", ".join(names), nnodes, rank, master, port, missing)


def _from_slurm(env: Mapping[str, str]) -> _Found | None:
    names = ("SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_NODELIST")
    if not any(env.get(name) for name in names):
        return None
    nnodes = _integer(env, "SLURM_NNODES", 1)
    rank = _integer(env, "SLURM_NODEID", 0)
    has_list = bool(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST"))
    missing = tuple(name for name in names[:2] if not env.get(name))
    if not has_list:
        missing += ("SLURM_JOB_NODELIST",)
    return _Found("slurm", ", ".join(names), nnodes, rank, None, None, missing)


def _from_datatrove(env: Mapping[str, str]) -> _Found | None:
    names = ("DATATROVE_NODE_RANK", "DATATROVE_NODE_IPS")
    if not any(env.get(name) for name in names):
        return None
    rank = _integer(env, "DATATROVE_NODE_RANK", -1)
    ips = [ip.strip() for ip in env.get("DATATROVE_NODE_IPS", "").split(",") if ip.strip()]
    if rank == -1:  # datatrove's "single node"
        return _Found("datatrove", ", ".join(names), 1, 0, None, None, ())
    missing = tuple(name for name in names if not env.get(name))
    for ip in ips:
        _check_host(ip, "DATATROVE_NODE_IPS")
    nnodes = len(ips) if ips else None
    master = ips[0] if ips else None
    return _Found("datatrove", ", ".join(names), nnodes, rank, master, None, missing)


def _check_agreement(used: _Found, others: list[_Found]) -> None:
    for other in others:
        if other.missing or used.missing:
            continue
        if (other.nnodes, other.rank) != (used.nnodes, used.rank):
            raise ConfigError(
                f"the node roles disagree: {used.names} say node {used.rank} of "
                f"{used.nnodes}, {other.names} say node {other.rank} of {other.nnodes}; "
                "unset one, or set nodes.nnodes and nodes.node_rank in the config"
            )


def _integer(env: Mapping[str, str], name: str, low: int, high: int = _MAX_NODES) -> int | None:
    text = env.get(name)
    if not text:
        return None
    text = text.strip()
    if not re.fullmatch(r"-?[0-9]{1,9}", text) or not low <= int(text) <= high:
        raise ConfigError(f"{name}={excerpt(text, 40)} is not a number from {low} to {high}")
    return int(text)


def _address(env: Mapping[str, str], name: str) -> str | None:
    text = env.get(name)
    if not text:
        return None
    _check_host(text.strip(), name)
    return text.strip()


def _check_host(text: str, name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.:\[\]-]{1,253}", text) or text.startswith("-"):
        raise ConfigError(f"{name}: {excerpt(text, 60)} is not a host name or an IP address")


def _slurm_master(env: Mapping[str, str], first_host: Callable[[str], str]) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    host = first_host(nodelist)
    _check_host(host, "SLURM_JOB_NODELIST")
    return host


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list, as ``scontrol show hostnames`` lists it:
    ``gpu[003-005,9],cpu1`` → ``gpu003``."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist.strip())
    if match is None or (not match.group(1) and not match.group(2)):
        raise ConfigError(f"SLURM_JOB_NODELIST={excerpt(nodelist, 60)} names no host")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    if not first.isdigit():
        raise ConfigError(f"SLURM_JOB_NODELIST={excerpt(nodelist, 60)} is not a node list")
    return prefix + first
