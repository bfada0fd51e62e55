"""The public surface: everything exported is documented and comes from servescope."""

from __future__ import annotations

import inspect

import servescope

EXPECTED = {
    "BadRequest",
    "EndpointConfig",
    "MetricsSnapshot",
    "Completion",
    "ConfigError",
    "ControlError",
    "Pool",
    "PoolConfig",
    "PoolFailed",
    "ReplicaInfo",
    "CustomConfig",
    "DummyConfig",
    "RequestError",
    "RequestTimeout",
    "RetriesExhausted",
    "SGLangConfig",
    "ServeError",
    "Server",
    "ServerClosed",
    "ServerCrashed",
    "ServerConfig",
    "ServerError",
    "ServerStartError",
    "StreamInterrupted",
    "Chunk",
    "Usage",
    "VLLMConfig",
    "load_config",
    "load_pool_config",
    "open_pool",
    "open_server",
    "Front",
    "FrontConfig",
    "open_front",
    "NodesConfig",
    "NodeRole",
    "WorkerNode",
    "NotHeadNode",
}


def test_exported_members() -> None:
    exported = {name for name in dir(servescope) if not name.startswith("_")}
    # Submodules appear once something imports them (backends, cli, the dummy script).
    exported = {name for name in exported if not inspect.ismodule(getattr(servescope, name))}
    assert exported == EXPECTED
    for name in EXPECTED:
        member = getattr(servescope, name)
        assert member.__module__.startswith("servescope"), name
        assert member.__doc__, f"{name} has no docstring"


def test_error_tree() -> None:
    for name in ("ConfigError", "ServerError", "ServerClosed", "RequestError"):
        assert issubclass(getattr(servescope, name), servescope.ServeError)
    assert issubclass(servescope.ServerStartError, servescope.ServerError)
    assert issubclass(servescope.ServerCrashed, servescope.ServerError)
    for name in ("BadRequest", "RetriesExhausted", "RequestTimeout", "StreamInterrupted"):
        assert issubclass(getattr(servescope, name), servescope.RequestError)
