"""Node roles (``_nodes.resolve_role``): from the config, torchrun, SLURM or datatrove;
incomplete or disagreeing sources are clear errors. Pure: the environment is a dict."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from servescope import ConfigError, NodesConfig, VLLMConfig
from servescope._multinode import _first_host, plan_nodes
from servescope._nodes import NodeRole, first_slurm_host, resolve_role

NONE = NodesConfig()


def role(env: dict[str, str], nodes: NodesConfig = NONE, **config: Any) -> NodeRole:
    if config:
        nodes = NodesConfig(**config)
    return resolve_role(nodes, env, lambda nodelist: first_slurm_host(nodelist))


TABLE = [
    # (config, env, (nnodes, rank, master, port, source))
    (
        {"nnodes": 2, "node_rank": 1, "master_addr": "10.0.0.1"},
        {},
        (2, 1, "10.0.0.1", 29500, "config"),
    ),
    (
        {"nnodes": 2, "node_rank": 0, "master_addr": "h0", "master_port": 7000},
        {"NNODES": "4", "NODE_RANK": "3", "MASTER_ADDR": "x"},
        (2, 0, "h0", 7000, "config"),
    ),
    (
        {},
        {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"},
        (2, 1, "h0", 1234, "torchrun"),
    ),
    (
        {"master_port": 9000},
        {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"},
        (2, 0, "h0", 9000, "torchrun"),
    ),
    (
        {},
        {"SLURM_NNODES": "3", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[007-009]"},
        (3, 2, "gpu007", 29500, "slurm"),
    ),
    (
        {},
        {"SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_NODELIST": "a1,b2"},
        (2, 0, "a1", 29500, "slurm"),
    ),
    (
        {},
        {"DATATROVE_NODE_RANK": "1", "DATATROVE_NODE_IPS": "10.1.0.5,10.1.0.6"},
        (2, 1, "10.1.0.5", 29500, "datatrove"),
    ),
    ({}, {"DATATROVE_NODE_RANK": "-1"}, (1, 0, "127.0.0.1", 29500, "datatrove")),
    # torchrun first; SLURM agreeing on count and rank is fine
    (
        {},
        {
            "NNODES": "2",
            "NODE_RANK": "1",
            "MASTER_ADDR": "h0",
            "SLURM_NNODES": "2",
            "SLURM_NODEID": "1",
            "SLURM_JOB_NODELIST": "n[1-2]",
        },
        (2, 1, "h0", 29500, "torchrun"),
    ),
    # an incomplete later source is not compared
    (
        {},
        {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "h0", "SLURM_NNODES": "5"},
        (2, 1, "h0", 29500, "torchrun"),
    ),
    ({"nnodes": 1, "node_rank": 0}, {}, (1, 0, "127.0.0.1", 29500, "config")),
]


@pytest.mark.parametrize(("config", "env", "expected"), TABLE)
def test_roles_from_the_first_source_set(
    config: dict[str, Any], env: dict[str, str], expected: tuple[Any, ...]
) -> None:
    found = role(env, **config) if config else role(env)
    assert (
        found.nnodes,
        found.rank,
        found.master_addr,
        found.master_port,
        found.source,
    ) == expected
    assert found.is_head == (expected[1] == 0)


ERRORS = [
    ({}, {}, "no node roles for a multi-node server"),
    ({"nnodes": 2, "node_rank": 0}, {}, "nodes.master_addr not set"),
    ({"node_rank": 0}, {}, "nodes.nnodes not set"),
    ({"nnodes": 2, "node_rank": 2, "master_addr": "h"}, {}, "node rank 2 from config"),
    ({}, {"NNODES": "2", "MASTER_ADDR": "h"}, "incomplete node roles from torchrun"),
    ({}, {"NNODES": "two", "NODE_RANK": "0", "MASTER_ADDR": "h"}, "NNODES='two' is not a number"),
    (
        {},
        {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "99999"},
        "MASTER_PORT='99999'",
    ),
    (
        {},
        {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "-rf"},
        "MASTER_ADDR: '-rf' is not a host",
    ),
    (
        {},
        {
            "NNODES": "2",
            "NODE_RANK": "1",
            "MASTER_ADDR": "h0",
            "SLURM_NNODES": "4",
            "SLURM_NODEID": "1",
            "SLURM_JOB_NODELIST": "n[1-4]",
        },
        "the node roles disagree: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT say node 1 of 2, "
        "SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST say node 1 of 4",
    ),
    (
        {},
        {
            "SLURM_NNODES": "2",
            "SLURM_NODEID": "0",
            "SLURM_JOB_NODELIST": "a,b",
            "DATATROVE_NODE_RANK": "1",
            "DATATROVE_NODE_IPS": "x,y",
        },
        "the node roles disagree",
    ),
    ({}, {"SLURM_NNODES": "2", "SLURM_NODEID": "1"}, "SLURM_JOB_NODELIST not set"),
    ({}, {"DATATROVE_NODE_RANK": "1"}, "DATATROVE_NODE_IPS not set"),
    ({}, {"DATATROVE_NODE_RANK": "3", "DATATROVE_NODE_IPS": "a,b"}, "node rank 3 from datatrove"),
    ({}, {"DATATROVE_NODE_RANK": "0", "DATATROVE_NODE_IPS": "a,b c"}, "DATATROVE_NODE_IPS: 'b c'"),
    (
        {},
        {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": ",n1"},
        "names no host",
    ),
]


@pytest.mark.parametrize(("config", "env", "message"), ERRORS)
def test_bad_roles_are_clear_errors(
    config: dict[str, Any], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        role(env, **config) if config else role(env)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("gpu[003-005,9],cpu1", "gpu003"),
        ("n1", "n1"),
        ("a[7]", "a7"),
        ("x-1,x-2", "x-1"),
        ("  h[10-12]", "h10"),
    ],
)
def test_first_slurm_host(nodelist: str, first: str) -> None:
    assert first_slurm_host(nodelist) == first


def test_nodes_config_validation_and_secrets() -> None:
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        NodesConfig(heartbeat_interval=0)
    with pytest.raises(ConfigError, match="master_addr: Value error, must be a host"):
        NodesConfig(master_addr="--evil")
    with pytest.raises(ConfigError, match="executor"):
        NodesConfig(executor="slurm")
    with pytest.raises(ConfigError, match="sets the port"):
        NodesConfig(ray_args={"port": 1})
    config = VLLMConfig(model="m", nodes=NodesConfig(token="s3cret-token-value"))
    assert "s3cret-token-value" not in repr(config)
    assert "s3cret-token-value" not in str(config.model_dump())
    assert "s3cret-token-value" in config.secrets()


def test_slurm_head_from_scontrol_when_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where SLURM is installed, ``scontrol show hostnames`` expands the node list (its
    first host is the head); without it, the list is read here."""
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "alpha\\nbeta\\n"\n')
    scontrol.chmod(0o755)
    assert _first_host("weird[list") == "weird"  # no scontrol on PATH here
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert _first_host("anything") == "alpha"


@pytest.mark.anyio
async def test_the_plan_finds_this_nodes_address_and_interface(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVESCOPE_NODE_TOKEN", "t")
    nodes = NodesConfig(nnodes=2, node_rank=1, master_addr="127.0.0.1", master_port=4000)
    plan = await plan_nodes(nodes)
    assert plan is not None and not plan.is_head
    assert plan.node_ip == "127.0.0.1" and plan.interface == "lo"
    assert plan.liveness_port == 3999 and plan.token == "t"
    assert plan.network_env() == {
        "VLLM_HOST_IP": "127.0.0.1",
        "GLOO_SOCKET_IFNAME": "lo",
        "NCCL_SOCKET_IFNAME": "lo",
    }
    assert await plan_nodes(None) is None
    assert await plan_nodes(NodesConfig(nnodes=1, node_rank=0)) is None  # one node: no plan
    with pytest.raises(ConfigError, match="cannot resolve the head's address"):
        await plan_nodes(NodesConfig(nnodes=2, node_rank=1, master_addr="no-such-host.invalid"))
    with pytest.raises(ConfigError, match="no liveness port below master_port 1"):
        await plan_nodes(NodesConfig(nnodes=2, node_rank=0, master_addr="127.0.0.1", master_port=1))
