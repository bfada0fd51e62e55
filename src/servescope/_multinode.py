"""A multi-node server: this node's part, tied to the others by the liveness channel.

::

    open_server(config with nodes=...)        the same program on every node
     ├─ head (node 0)                         a Server: serves requests
     │   ├─ liveness listener                 ``_liveness.HeadLink``: a lost node fails
     │   │                                    the scope (ServerCrashed naming it)
     │   ├─ Ray head (executor "ray")         ``ray start --head --block``, supervised;
     │   │                                    the engine starts once every node is up
     │   └─ the engine                        vLLM / SGLang with its multi-node flags
     └─ worker (node ≥ 1)                     a WorkerNode: refuses requests
         ├─ liveness link                     ``_liveness.WorkerLink``: the head's end
         │                                    (or loss) ends this scope within seconds
         └─ its part                          headless vLLM, SGLang rank R, or
                                              ``ray start --address ... --block``

``plan_nodes`` resolves the roles (``_nodes``) and the addresses at the I/O edge;
``NodeCoordinator`` is what the supervisor calls at each step (before the engine, the
process to run, spawned, ready). Processes are torn down as for one server.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import psutil

from ._errors import ConfigError, ServerStartError
from ._liveness import HeadLink, HeadRefused, LinkSettings, WorkerLink
from ._nodes import TOKEN_VARIABLE, NodeRole, NodesConfig, first_slurm_host, resolve_role
from .backends._base import ProcessSpec

if TYPE_CHECKING:
    from ._supervisor import ServerState, Supervisor
    from .backends._base import EngineConfig

__all__ = ["NodeCoordinator", "NodePlan", "plan_nodes"]


@dataclass(frozen=True)
class NodePlan:
    """Everything this node needs to play its part.

    Attributes:
        role: how many nodes, which one this is, where the head is.
        settings: the config's ``nodes`` section.
        node_ip: this node's address as the others reach it.
        interface: the network interface holding ``node_ip`` (``GLOO_SOCKET_IFNAME``).
        token: the liveness channel's shared secret.
        liveness_port: the head's liveness port.
    """

    role: NodeRole
    settings: NodesConfig
    node_ip: str
    interface: str | None
    token: str
    liveness_port: int

    @property
    def is_head(self) -> bool:
        """Node 0."""
        return self.role.is_head

    def link_settings(self) -> LinkSettings:
        """What both ends of the liveness channel share."""
        s = self.settings
        return LinkSettings(self.token, self.role.nnodes, s.heartbeat_interval, s.node_timeout)

    def network_env(self) -> dict[str, str]:
        """What the engines need to find each other on this node's network."""
        env = {"VLLM_HOST_IP": self.node_ip}
        if self.interface is not None:
            env["GLOO_SOCKET_IFNAME"] = self.interface
            env["NCCL_SOCKET_IFNAME"] = self.interface
        return env

    def ray_address(self) -> str:
        """The Ray head's GCS address."""
        return f"{self.role.master_addr}:{self.settings.ray_port}"


async def plan_nodes(nodes: NodesConfig | None) -> NodePlan | None:
    """This node's plan, or ``None`` for a single-node server (no ``nodes`` section, or
    one node in all). Reads the environment; ``ConfigError`` if the roles or the
    token are missing or do not fit."""
    if nodes is None:
        return None
    role = await anyio.to_thread.run_sync(resolve_role, nodes, dict(os.environ), _first_host)
    if role.nnodes == 1:
        return None
    token = nodes.token.get_secret_value() if nodes.token is not None else None
    token = token or os.environ.get(TOKEN_VARIABLE)
    if not token:
        raise ConfigError(
            f"a multi-node server needs a token shared by its nodes: set nodes.token, or "
            f"{TOKEN_VARIABLE} in the job's environment (e.g. `export {TOKEN_VARIABLE}="
            "$(openssl rand -hex 16)` before srun)"
        )
    node_ip = nodes.node_ip
    if not node_ip:
        node_ip = await anyio.to_thread.run_sync(_route_source, role)
    # Below the engine's port: SGLang takes master_port + 1 and the next few itself.
    liveness_port = nodes.liveness_port or role.master_port - 1
    if liveness_port < 1:
        raise ConfigError(f"no liveness port below master_port {role.master_port}: set one")
    interface = await anyio.to_thread.run_sync(_interface_of, node_ip)
    return NodePlan(role, nodes, node_ip, interface, token, liveness_port)


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``scontrol show hostnames`` where SLURM is
    installed, else the list read here."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        try:
            found = subprocess.run(
                [scontrol, "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            pass
        else:
            hosts = found.stdout.split()
            if hosts:
                return hosts[0]
    return first_slurm_host(nodelist)


def _route_source(role: NodeRole) -> str:
    """The local address packets to the head leave from (no packet is sent)."""
    try:
        infos = socket.getaddrinfo(role.master_addr, role.master_port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as exc:
        message = f"cannot resolve the head's address {role.master_addr!r}: {exc}"
        raise ConfigError(message) from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(address)
        except OSError as exc:
            raise ConfigError(
                f"no route to the head {role.master_addr} from this node ({exc}): set nodes.node_ip"
            ) from None
        return str(probe.getsockname()[0])


def _interface_of(ip: str) -> str | None:
    for name, addresses in psutil.net_if_addrs().items():
        if any(address.address.split("%")[0] == ip for address in addresses):
            return name
    return None


def _is_vllm(config: EngineConfig) -> bool:
    return getattr(config, "backend", None) == "vllm"


class NodeCoordinator:
    """One node's part of a multi-node server, as its supervisor drives it."""

    def __init__(self, plan: NodePlan, supervisor: Supervisor) -> None:
        self.plan = plan
        self.supervisor = supervisor
        self.state: ServerState = supervisor.state
        self.head: HeadLink | None = None
        self.worker: WorkerLink | None = None
        self.head_url: str | None = None
        self.head_ended = anyio.Event()
        self.engine_env: dict[str, str] = plan.network_env()

    @property
    def name(self) -> str:
        """``node 1 of 2``."""
        return f"node {self.plan.role.rank} of {self.plan.role.nnodes}"

    def _outcome(self) -> str | None:
        failure = self.state.failure
        return None if failure is None else failure.reason

    async def before_engine(self, config: EngineConfig) -> None:
        """Start the liveness channel (and Ray); return once the engine may start."""
        plan = self.plan
        note = self.state.log.note
        if plan.is_head:
            self.head = HeadLink(
                plan.link_settings(), on_lost=self._node_lost, note=note, outcome=self._outcome
            )
            try:
                await self.supervisor.tg.start(self.head.run, plan.node_ip, plan.liveness_port)
            except OSError as exc:
                raise ServerStartError(
                    f"cannot listen for the other nodes on {plan.node_ip}:"
                    f"{plan.liveness_port} (liveness_port): {exc}"
                ) from exc
            note(f"{plan.role.describe()}: liveness channel on port {plan.liveness_port}")
            if plan.settings.executor == "ray" and _is_vllm(config):
                await self._start_ray_head(config)
        else:
            self.worker = WorkerLink(
                plan.link_settings(),
                plan.role.rank,
                on_ready=self._head_ready,
                on_head_end=self._head_end,
                note=note,
                outcome=self._outcome,
            )
            self.supervisor.tg.start_soon(self._run_worker_link)
            note(f"{plan.role.describe()}: joining the head's liveness channel")

    async def _run_worker_link(self) -> None:
        assert self.worker is not None
        plan = self.plan
        try:
            await self.worker.run(plan.role.master_addr, plan.liveness_port)
        except HeadRefused as exc:
            self.supervisor.fail(self.supervisor.error(f"{self.name}: {exc}"))

    async def _start_ray_head(self, config: EngineConfig) -> None:
        """The Ray head as a supervised process of this scope; then wait for every node."""
        from ._supervisor import ServerState, Supervisor
        from .backends.ray import RayNodeConfig

        plan = self.plan
        ray = RayNodeConfig(
            role="head",
            port=plan.settings.ray_port,
            node_ip=plan.node_ip,
            args=plan.settings.ray_args,
            python=config.python,
            env={**config.env, **plan.network_env()},
            startup_timeout=config.startup_timeout,
            shutdown_grace=config.shutdown_grace,
            log_dir=None if config.log_dir is None else config.log_dir / "ray",
            health_interval=None,
        )
        state = ServerState.create(ray, self.state.wire, rank=self.state.rank, node=0)

        def changed(ray_state: ServerState) -> None:
            if ray_state.failure is not None:
                reason = f"the Ray head on {self.name} failed: {ray_state.failure.reason}"
                self.supervisor.fail(self.supervisor.error(reason))

        state.on_change = changed
        supervisor = Supervisor(state, self.supervisor.tg, self.supervisor.client)
        await self.supervisor.tg.start(supervisor.run)
        self.supervisor.tg.start_soon(self._end_with_scope, supervisor, state)
        await state.wait_ready()
        self.state.log.note(f"Ray head up at {plan.ray_address()}; waiting for every node")
        assert self.head is not None
        await self.head.all_up.wait()
        self.engine_env["RAY_ADDRESS"] = plan.ray_address()

    async def _end_with_scope(self, supervisor: Supervisor, state: ServerState) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            supervisor.stop()
            state.end()
            state.log.close()

    def process_spec(self, config: EngineConfig, port: int) -> ProcessSpec:
        """The process this node runs: the engine with its multi-node flags, or (a Ray
        worker node) ``ray start --address ... --block``."""
        plan = self.plan
        if not plan.is_head and plan.settings.executor == "ray" and _is_vllm(config):
            from .backends.ray import RayNodeConfig

            ray = RayNodeConfig(
                role="worker",
                address=plan.ray_address(),
                node_ip=plan.node_ip,
                args=plan.settings.ray_args,
                python=config.python,
                env=config.env,
            )
            spec = ray.process_spec(port)
        else:
            spec = config.node_process_spec(port, plan)
        env = {**spec.env, **{k: v for k, v in self.engine_env.items() if k not in config.env}}
        return dataclasses.replace(spec, env=env)

    def part_up(self) -> None:
        """This node's process is up (spawned; a Ray node: joined): tell the head."""
        if self.worker is not None:
            self.worker.up.set()

    def ready(self, url: str) -> None:
        """The head serves at ``url``: tell every node (the address they reach it at, when
        it listens on every interface)."""
        if self.head is None:
            return
        host = getattr(self.supervisor.config, "host", None)
        if host in ("0.0.0.0", "::", ""):
            url = url.replace("//127.0.0.1:", f"//{self.plan.node_ip}:", 1)
        self.supervisor.tg.start_soon(self.head.announce_ready, url)

    def missing(self) -> str:
        """For a start that timed out: which nodes never came up."""
        if self.head is not None and self.head.missing():
            nodes = ", ".join(str(rank) for rank in self.head.missing())
            return (
                f"; node(s) {nodes} never joined the liveness channel on port "
                f"{self.plan.liveness_port} (are they started, with the same token?)"
            )
        if self.worker is not None and self.head_url is None:
            return f"; the head {self.plan.role.master_addr} never said it was ready"
        return ""

    def _node_lost(self, reason: str) -> None:
        self.supervisor.fail(self.supervisor.error(f"{reason}"))

    def _head_ready(self, url: str) -> None:
        self.head_url = url
        if not self.state.ready:
            self.state.address = url
            self.supervisor.set_ready()

    def _head_end(self, reason: str | None) -> None:
        self.head_ended.set()
        if reason is None:
            self.state.log.note("the head ended its scope: this node's part ends")
            self.supervisor.part_done()
        else:
            self.supervisor.fail(self.supervisor.error(f"{self.name}: {reason}"))
