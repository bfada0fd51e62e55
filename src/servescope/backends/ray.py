"""One Ray node as a supervised process: ``ray start --block`` (head or worker).

Facts it relies on (ray 2.60, measured across two network namespaces; see
``shared/MULTINODE.md``):

* With ``--block`` every Ray daemon (``gcs_server``, ``raylet``, the agents) is a child of
  ``ray start`` and in its process group: supervising ``ray start --block`` and tearing
  its group down (SIGTERM, grace, SIGKILL) ends the node. ``ray stop`` is never used: it
  kills every Ray process on the machine by name, other jobs' included.
* ``ray start`` prints ``Ray runtime started.`` once the node is up; with ``--block`` it
  exits (code 1, ``Some Ray subprocesses exited unexpectedly``) when one of its daemons
  dies, so a killed raylet ends the node's scope at once.
* A lost node is seen by the head's GCS only after its health check fails (65 s by
  default): the head is started with a 1 s period and timeout, 3 failures. A worker node
  waits 60 s for a vanished head (and for ever across a partition): it is started with a
  5 s reconnect timeout and 1 s keepalives. servescope's own liveness channel does not
  wait for either.
* On SIGTERM ``ray start`` drains for up to 30 s (``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S``,
  set to 0 here); Ray's worker processes (vLLM's ranks) sit in process groups of their own
  in its session: the reaper signals every descendant, not only the group.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import Field

from .._config import Integer, Text
from .._logscan import PatternTable
from ._base import FlagArgs, ProcessConfig, ProcessSpec, cli_args, has_flag

__all__ = ["RAY_GRACE", "RAY_HEALTH_ENV", "RAY_PATTERNS", "RAY_WORKER_ENV", "RayNodeConfig"]

#: A Ray node keeps nothing worth a long SIGTERM grace, and its ``gcs_server`` takes
#: 10-20 s to act on SIGTERM (its orphaned agents ignore it): SIGKILL after this.
RAY_GRACE = 1.0

RAY_PATTERNS = PatternTable.build(
    ready=[r"Ray runtime started"],
    fatal=[
        r"Some Ray subprocesses exited unexpectedly",
        r"The current node timed out during startup",
        r"Failed to connect to GCS",
        r"Unable to connect to GCS",
        r"ConnectionError: ",
        r"Address already in use",
        r"ValueError: ",
    ],
)

#: The head's GCS declares a silent node dead after 3 missed 1 s checks (default: 65 s).
RAY_HEALTH_ENV = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
#: A worker node gives up on a vanished or unreachable head after ~5 s instead of 60 s
#: (its raylet exits, and with it ``ray start --block``).
RAY_WORKER_ENV = {
    "RAY_gcs_rpc_server_reconnect_timeout_s": "5",
    "RAY_grpc_client_keepalive_time_ms": "1000",
    "RAY_grpc_client_keepalive_timeout_ms": "1000",
}


class RayNodeConfig(ProcessConfig):
    """``ray start --block`` for one node of a multi-node server (servescope builds it).

    Attributes:
        role: ``"head"`` (``--head --port``) or ``"worker"`` (``--address``).
        address: the head's ``IP:PORT`` (a worker's ``--address``).
        port: the head's GCS port.
        node_ip: ``--node-ip-address``: this node's address on the cluster network.
        args: more ``ray start`` flags (``{"num-gpus": 1}``); they win over the above.
        python: the interpreter Ray is installed in (its ``ray`` script is beside it).
    """

    backend: Literal["ray-node"] = "ray-node"
    model: Text = "ray"
    role: Literal["head", "worker"]
    address: Text = ""
    port: Integer = Field(default=6379, ge=1, le=65535)
    node_ip: Text
    args: FlagArgs = Field(default_factory=dict)
    python: Text = sys.executable

    def launcher(self) -> list[str]:
        """``ray`` beside ``python``, or its module entry point."""
        script = Path(self.python).parent / "ray"
        if script.exists():
            return [str(script)]
        return [self.python, "-m", "ray.scripts.scripts"]

    def process_spec(self, port: int) -> ProcessSpec:
        """``ray start --block ...``: ready on its line; no HTTP (``port`` is unused)."""
        argv = [*self.launcher(), "start", "--block"]
        if self.role == "head":
            argv += ["--head", f"--port={self.port}"]
            if not has_flag(self.args, "include-dashboard"):
                argv.append("--include-dashboard=false")
        else:
            argv.append(f"--address={self.address}")
        argv += [f"--node-ip-address={self.node_ip}", "--disable-usage-stats"]
        argv += cli_args(self.args)
        env = {
            "PYTHONUNBUFFERED": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            **(RAY_HEALTH_ENV if self.role == "head" else RAY_WORKER_ENV),
        }
        patterns = RAY_PATTERNS.extended(ready=self.ready_patterns, fatal=self.fatal_patterns)
        return ProcessSpec(
            argv,
            patterns,
            {**env, **self.env},
            health_path=None,
            ready_line_required=True,
            max_grace=RAY_GRACE,
        )
