"""datatrove's ``InferenceConfig`` as servescope configs: every field mapped, kept by the
runner, or refused with a ``ConfigError`` naming it. Pure: no datatrove import, no I/O.

Where each field goes (datatrove 0.10.1):

===============================  =====================================================
``server_type``                  the backend: ``DummyConfig``, ``VLLMConfig``,
                                 ``SGLangConfig``, ``CustomConfig``, ``EndpointConfig``
``model_name_or_path``           ``model``
``model_max_context``            vLLM ``max_model_len``, SGLang ``context_length``
``use_chat``                     ``use_chat``
``endpoint_url`` / ``api_key``   ``EndpointConfig.url`` / ``api_key`` (vLLM: ``api_key``)
``tp`` / ``pp``                  ``tp`` / ``pp`` (also read from ``model_kwargs``)
``dp``                           ``dp`` > 1: a pool of ``dp`` replicas (``open_pool``)
``model_kwargs``                 engine flags (``args``); custom: ``server_script`` and
                                 the script's flags; dummy: ``DummyConfig`` fields
``server_log_folder``            ``log_dir`` (same file names)
``request_timeout``              ``request_timeout`` (``None``: no limit)
``max_concurrent_generations``   the runner's semaphore and ``max_concurrency``
``server_start_timeout_sec``,    ``startup_timeout`` = attempts x (start timeout +
``server_ready_max_attempts``,   ready attempts x ready delay): datatrove's whole
``server_ready_delay_sec``       readiness window, probed faster
``server_start_max_retries``     ``start_attempts`` = retries + 1
``metric_interval``,             the runner's own, as in datatrove
``default_generation_params``,
``rollouts_per_document``,
``max_concurrent_documents``
``master_port``                  across nodes (``DATATROVE_NODE_IPS``, vllm/sglang):
                                 ``nodes.master_port``, the roles from datatrove's
                                 environment; on one node, refused unless at its default
===============================  =====================================================

A field a backend has no use for (``tp=2`` on the dummy, ``api_key`` on SGLang, a
``model_max_context`` on an endpoint, ...) is refused when it differs from its default,
and so is a field this module does not know (a newer datatrove): nothing is dropped
silently.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .._config import MAX_SECONDS, ServerConfig, excerpt
from .._errors import ConfigError
from .._redact import looks_secret
from ..backends.custom import CustomConfig
from ..backends.dummy import DummyConfig
from ..backends.endpoint import EndpointConfig
from ..backends.sglang import SGLangConfig
from ..backends.vllm import VLLMConfig

__all__ = ["DatatroveConfig", "ServerPlan", "map_config"]


class DatatroveConfig(Protocol):
    """The fields of datatrove 0.10.1's ``InferenceConfig`` this module reads."""

    server_type: str
    model_name_or_path: str
    model_max_context: int
    use_chat: bool
    endpoint_url: str | None
    api_key: str | None
    metric_interval: int
    tp: int
    dp: int
    pp: int
    default_generation_params: dict[str, Any]
    rollouts_per_document: int
    max_concurrent_generations: int
    max_concurrent_documents: int | None
    request_timeout: float | None
    model_kwargs: dict[str, Any] | None
    server_log_folder: str | None
    master_port: int
    server_start_timeout_sec: float
    server_ready_max_attempts: int
    server_ready_delay_sec: float
    server_start_max_retries: int


#: Fields datatrove's runner itself uses as before (the drop-in keeps its runner code).
RUNNER_FIELDS = frozenset(
    {
        "metric_interval",
        "default_generation_params",
        "rollouts_per_document",
        "max_concurrent_documents",
        "max_concurrent_generations",
    }
)
#: Fields mapped to a servescope setting (or refused where they cannot be).
SERVER_FIELDS = frozenset(
    {
        "server_type",
        "model_name_or_path",
        "model_max_context",
        "use_chat",
        "endpoint_url",
        "api_key",
        "tp",
        "dp",
        "pp",
        "request_timeout",
        "model_kwargs",
        "server_log_folder",
        "master_port",
        "server_start_timeout_sec",
        "server_ready_max_attempts",
        "server_ready_delay_sec",
        "server_start_max_retries",
    }
)
KNOWN_FIELDS = RUNNER_FIELDS | SERVER_FIELDS

BACKENDS = ("dummy", "vllm", "sglang", "custom", "endpoint")
#: The ``model_kwargs`` the dummy server takes: ``DummyConfig``'s own fields.
DUMMY_KWARGS = (
    "text",
    "completion_tokens",
    "latency",
    "token_latency",
    "faults",
    "fault_rate",
    "fault_seed",
)
#: Each parallel size's spellings as a ``model_kwargs`` flag (datatrove's first).
_SIZE_FLAGS = {
    "tp": ("tensor-parallel-size", "tp-size", "tp"),
    "dp": ("data-parallel-size", "dp-size", "dp"),
    "pp": ("pipeline-parallel-size", "pp-size", "pp"),
}
#: servescope's key → the InferenceConfig field it comes from, for error messages.
_SOURCES = {
    "model": "model_name_or_path",
    "max_model_len": "model_max_context",
    "context_length": "model_max_context",
    "use_chat": "use_chat",
    "url": "endpoint_url",
    "api_key": "api_key",
    "tp": "tp",
    "pp": "pp",
    "args": "model_kwargs",
    "script": "model_kwargs['server_script']",
    "log_dir": "server_log_folder",
    "request_timeout": "request_timeout",
    "max_concurrency": "max_concurrent_generations",
    "startup_timeout": "server_start_timeout_sec, server_ready_max_attempts, "
    "server_ready_delay_sec, server_start_max_retries",
    "start_attempts": "server_start_max_retries",
    "nodes": "master_port and DATATROVE_NODE_IPS",
}


@dataclass(frozen=True)
class ServerPlan:
    """What to start for one datatrove task: ``config``, as ``replicas`` replicas (1:
    ``open_server``; more: ``open_pool``)."""

    config: ServerConfig
    replicas: int = 1


def _defaults(config: object) -> dict[str, Any]:
    """Each dataclass field's default (a factory's product), by name."""
    found: dict[str, Any] = {}
    for item in dataclasses.fields(config):  # type: ignore[arg-type]
        if item.default is not dataclasses.MISSING:
            found[item.name] = item.default
        elif item.default_factory is not dataclasses.MISSING:
            found[item.name] = item.default_factory()
    return found


def _set(config: object, defaults: Mapping[str, Any], name: str) -> bool:
    """Whether field ``name`` differs from its default."""
    value = getattr(config, name)
    if name not in defaults:
        return True
    default = defaults[name]
    return bool(value != default) if value is not None or default is not None else False


def _refuse(name: str, value: object, why: str) -> ConfigError:
    shown = "(not shown)" if looks_secret(name) else excerpt(value)
    return ConfigError(f"InferenceConfig.{name}={shown}: {why}")


def _size(config: DatatroveConfig, name: str) -> int:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise _refuse(name, value, "must be an integer from 1 to 4096")
    return value


def _flag_name(key: str) -> str:
    return key.lstrip("-").replace("_", "-")


def _sizes(config: DatatroveConfig, kwargs: dict[str, Any]) -> dict[str, int]:
    """``tp``/``dp``/``pp``, each from its field or a ``model_kwargs`` flag (taken out of
    ``kwargs``); both set and different is a ``ConfigError`` naming both."""
    sizes = {}
    for name, flags in _SIZE_FLAGS.items():
        size = _size(config, name)
        for key in [key for key in kwargs if _flag_name(key) in flags]:
            value = kwargs.pop(key)
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise _refuse(f"model_kwargs[{key!r}]", value, "must be an integer")
            try:
                given = int(value)
            except ValueError:
                raise _refuse(f"model_kwargs[{key!r}]", value, "must be an integer") from None
            if size > 1 and given != size:
                raise _refuse(
                    f"model_kwargs[{key!r}]",
                    value,
                    f"contradicts {name}={size}; set the size in one of them",
                )
            size = given
        if not 1 <= size <= 4096:
            raise _refuse(name, size, "must be an integer from 1 to 4096")
        sizes[name] = size
    return sizes


def _startup(config: DatatroveConfig) -> tuple[float, int]:
    """``startup_timeout`` and ``start_attempts``: datatrove's whole readiness window."""
    numbers = {
        "server_start_timeout_sec": config.server_start_timeout_sec,
        "server_ready_delay_sec": config.server_ready_delay_sec,
        "server_ready_max_attempts": config.server_ready_max_attempts,
        "server_start_max_retries": config.server_start_max_retries,
    }
    for name, value in numbers.items():
        integer = name.endswith(("_attempts", "_retries"))
        kinds: tuple[type, ...] = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            raise _refuse(name, value, "must be a finite number" + (" (an integer)" * integer))
        if value < 0 or (value == 0 and name != "server_start_max_retries"):
            raise _refuse(name, value, "must be positive")
    attempts = config.server_start_max_retries + 1
    window = config.server_start_timeout_sec + (
        config.server_ready_max_attempts * config.server_ready_delay_sec
    )
    total = attempts * window
    if total > MAX_SECONDS or attempts > 1_000:
        raise _refuse(
            "server_ready_max_attempts",
            config.server_ready_max_attempts,
            f"the readiness window, (server_start_max_retries + 1) x (server_start_timeout_sec "
            f"+ server_ready_max_attempts x server_ready_delay_sec) = {total:g} s, is over "
            f"servescope's {MAX_SECONDS} s (or over 1000 attempts)",
        )
    return total, attempts


def _nodes(env: Mapping[str, str]) -> int:
    hosts = [host for host in env.get("DATATROVE_NODE_IPS", "").split(",") if host.strip()]
    return max(1, len(hosts))


def map_config(
    config: DatatroveConfig,
    settings: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    nodes_known: bool = True,
) -> ServerPlan:
    """The servescope server (or pool) for datatrove's ``config``.

    ``settings``: more servescope config fields the InferenceConfig has no field for
    (``shutdown_grace``, ``fatal_patterns``, ``health_interval``, ``env``, ...); one the
    mapping sets itself is refused (set it through its InferenceConfig field), except
    ``nodes`` across nodes, whose keys (``node_ip``, ``liveness_port``, ``token``,
    ``node_timeout``, ...) join the mapped ``master_port``. ``env``: the environment
    datatrove's executors describe the nodes in (default: this one). ``nodes_known=False``
    (where the pipeline is built, not run): ``master_port`` is not judged yet.

    Raises ``ConfigError`` naming the InferenceConfig field that cannot be mapped.
    """
    environ = os.environ if env is None else env
    if not dataclasses.is_dataclass(config):
        raise ConfigError(
            f"expected datatrove's InferenceConfig (a dataclass), not {excerpt(config)}"
        )
    defaults = _defaults(config)
    names = [item.name for item in dataclasses.fields(config)]
    for name in names:
        if name not in KNOWN_FIELDS and _set(config, defaults, name):
            raise _refuse(
                name,
                getattr(config, name),
                "a field this version of servescope's drop-in does not know (a newer "
                "datatrove?): it cannot be mapped; leave it at its default",
            )

    stype = config.server_type
    if stype not in BACKENDS:
        raise _refuse("server_type", stype, f"must be one of {', '.join(BACKENDS)}")
    nnodes = _nodes(environ)
    if nnodes > 1 and stype not in ("vllm", "sglang"):
        raise ConfigError(
            f"DATATROVE_NODE_IPS lists {nnodes} nodes, but only vllm and sglang servers span "
            f"nodes (server_type={stype!r}): run it on one node"
        )
    if nnodes == 1 and nodes_known and _set(config, defaults, "master_port"):
        raise _refuse(
            "master_port",
            config.master_port,
            "it is used only across nodes, and DATATROVE_NODE_IPS lists one; "
            "leave it at its default",
        )

    def unused(name: str, why: str = "") -> None:
        if _set(config, defaults, name):
            reason = why or f"the {stype} server has no such setting"
            raise _refuse(name, getattr(config, name), f"{reason}; leave it at its default")

    kwargs = dict(config.model_kwargs or {})
    if not all(isinstance(key, str) for key in kwargs):
        raise _refuse("model_kwargs", kwargs, "its keys must be strings (flag names)")
    sizes = _sizes(config, kwargs)
    startup_timeout, start_attempts = _startup(config)
    timeout = config.request_timeout
    values: dict[str, Any] = {
        "model": config.model_name_or_path,
        "use_chat": config.use_chat,
        "request_timeout": float(MAX_SECONDS) if timeout is None else timeout,
        "max_concurrency": config.max_concurrent_generations,
        "startup_timeout": startup_timeout,
        "start_attempts": start_attempts,
    }
    if config.server_log_folder is not None:
        values["log_dir"] = Path(config.server_log_folder)
    replicas = 1
    sources = dict(_SOURCES)
    cls: type[ServerConfig]
    if stype in ("vllm", "sglang"):
        replicas = sizes["dp"]
        values.update(tp=sizes["tp"], pp=sizes["pp"])
        if nnodes > 1:
            if replicas > 1:
                raise _refuse(
                    "dp",
                    replicas,
                    f"replicas of a server across {nnodes} nodes (DATATROVE_NODE_IPS) are not "
                    "mapped; give the engine its data parallelism in model_kwargs",
                )
            # The roles come from DATATROVE_NODE_RANK / DATATROVE_NODE_IPS (servescope's
            # _nodes reads them); the engine's rendezvous is on master_port.
            values["nodes"] = {"master_port": config.master_port}
        if stype == "vllm":
            cls = VLLMConfig
            # datatrove always passes --trust-remote-code (model_kwargs may say otherwise)
            flags = {} if _has(kwargs, "trust-remote-code") else {"trust-remote-code": True}
            values.update(max_model_len=config.model_max_context, args={**flags, **kwargs})
            if config.api_key is not None:
                values["api_key"] = config.api_key
        else:
            cls = SGLangConfig
            flags = {}
            if not _has(kwargs, "allow-auto-truncate"):
                flags["allow-auto-truncate"] = True
            if not _has(kwargs, "log-level-http"):
                flags["log-level-http"] = "warning"
            values.update(context_length=config.model_max_context, args={**flags, **kwargs})
            unused("api_key", "servescope's SGLang servers take no API key")
        unused("endpoint_url", f"it is for server_type='endpoint', not {stype!r}")
    else:
        for name in ("tp", "pp"):
            if sizes[name] > 1:
                raise _refuse(name, sizes[name], f"the {stype} server has no such setting")
        unused("model_max_context")
        if stype != "endpoint":
            unused("endpoint_url", f"it is for server_type='endpoint', not {stype!r}")
            unused("api_key")
        if stype == "dummy":
            cls = DummyConfig
            replicas = sizes["dp"]
            for key, value in kwargs.items():
                if key not in DUMMY_KWARGS:
                    raise _refuse(
                        f"model_kwargs[{key!r}]",
                        value,
                        f"the dummy server takes only {', '.join(DUMMY_KWARGS)}",
                    )
            values.update(kwargs)
            sources.update({key: f"model_kwargs[{key!r}]" for key in kwargs})
        elif stype == "custom":
            cls = CustomConfig
            if sizes["dp"] > 1:
                raise _refuse(
                    "dp",
                    sizes["dp"],
                    "datatrove runs one custom server, and the GPUs a custom script needs "
                    "are unknown: run replicas with servescope.open_pool(CustomConfig(...), "
                    "replicas=N, gpus_per_replica=G)",
                )
            script = kwargs.pop("server_script", None)
            if not isinstance(script, str | os.PathLike) or not str(script):
                raise _refuse(
                    "model_kwargs['server_script']",
                    script,
                    "server_type='custom' needs the server script's path here",
                )
            values.update(script=Path(script), args=kwargs)
        else:
            cls = EndpointConfig
            if sizes["dp"] > 1:
                raise _refuse("dp", sizes["dp"], "an endpoint is someone else's server")
            if kwargs:
                key = next(iter(kwargs))
                raise _refuse(f"model_kwargs[{key!r}]", kwargs[key], "an endpoint starts no server")
            if config.endpoint_url is None:
                raise _refuse("endpoint_url", None, "server_type='endpoint' needs the URL")
            values["url"] = config.endpoint_url
            if config.api_key is not None:
                values["api_key"] = config.api_key
    extra = dict(settings or {})
    if "nodes" in values and isinstance(extra.get("nodes"), Mapping):
        nodes = extra.pop("nodes")
        if "master_port" in nodes:
            raise ConfigError(
                "servescope setting nodes.master_port is set from InferenceConfig.master_port: "
                "set it there"
            )
        values["nodes"] = {**values["nodes"], **nodes}
    for key in extra:
        if key in values or key == "backend":
            source = _SOURCES.get(key, "server_type")
            raise ConfigError(
                f"servescope setting {excerpt(key)} is set from InferenceConfig.{source}: "
                "set it there"
            )
    values.update(extra)
    return ServerPlan(_build(cls, values, sources), replicas)


def _has(kwargs: Mapping[str, Any], flag: str) -> bool:
    return any(_flag_name(key) == flag for key in kwargs)


_KEY = re.compile(r"(?<![\w.])([a-z_]+)(?=[:.])")


def _build(
    cls: type[ServerConfig], values: dict[str, Any], sources: Mapping[str, str]
) -> ServerConfig:
    """``cls`` from ``values``; its ``ConfigError`` also says which InferenceConfig field
    each key it names comes from (``sources``)."""
    try:
        return cls.build(values)
    except ConfigError as exc:
        message = str(exc)
        named = dict.fromkeys(key for key in _KEY.findall(message) if key in sources)
        found = ", ".join(f"{key} <- InferenceConfig.{sources[key]}" for key in named)
        note = f" (from datatrove's InferenceConfig: {found})" if found else ""
        raise ConfigError(f"{message}{note}") from None
