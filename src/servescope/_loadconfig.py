"""``load_config``: a TOML or JSON file (or a mapping) into the right config class.

The ``backend`` key picks the class (``dummy`` when absent); every other key is a field
of that class, checked as the library checks it, so a typo is an error that names the
key, the closest known one and the allowed keys — never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._config import ServerConfig, excerpt
from ._errors import ConfigError
from ._poolconfig import POOL_KEYS, PoolConfig
from .backends.custom import CustomConfig
from .backends.dummy import DummyConfig
from .backends.endpoint import EndpointConfig
from .backends.sglang import SGLangConfig
from .backends.vllm import VLLMConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

__all__ = ["BACKENDS", "load_config", "load_pool_config", "read_config_file"]

BACKENDS: dict[str, type[ServerConfig]] = {
    "dummy": DummyConfig,
    "vllm": VLLMConfig,
    "sglang": SGLangConfig,
    "endpoint": EndpointConfig,
    "custom": CustomConfig,
}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a ``.toml`` or ``.json`` file (``ConfigError`` if unreadable)."""
    path = Path(path)
    name = excerpt(str(path), 200)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise ConfigError(f"config file {name}: use a .toml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: a NUL in the path
        raise ConfigError(f"cannot read config file {name}: {exc}") from None
    try:
        data = json.loads(text) if suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = suffix[1:].upper()
        raise ConfigError(f"config file {name} is not valid {kind}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {name}: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {name} must hold a table/object of settings")
    return data


def load_config(source: str | Path | Mapping[str, Any]) -> ServerConfig:
    """A config from a TOML/JSON file path or a mapping; its ``backend`` picks the class.

    A source that also sets up a pool (``replicas``, ``routing``, ...) is refused with a
    pointer to ``load_pool_config``: its pool settings would otherwise be lost.
    """
    values = _values(source)
    pool_keys = sorted(POOL_KEYS.intersection(values))
    if pool_keys:
        keys = ", ".join(pool_keys)
        raise ConfigError(f"pool settings ({keys}) in a server config: use load_pool_config")
    return _server_config(values)


def load_pool_config(source: str | Path | Mapping[str, Any]) -> tuple[ServerConfig, PoolConfig]:
    """A replica's config and the pool's settings from one TOML/JSON file or mapping:
    the pool's keys (``replicas``, ``routing``, ``max_restarts``, ...) beside the
    server's. ``open_pool(config, **pool.model_dump())`` runs it."""
    values = _values(source)
    pool = {key: values.pop(key) for key in sorted(POOL_KEYS.intersection(values))}
    return _server_config(values), PoolConfig.build(pool)


def _values(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, str | os.PathLike):
        return read_config_file(source)
    raise ConfigError(f"a config comes from a path or a mapping, not {excerpt(source)}")


def _server_config(values: dict[str, Any]) -> ServerConfig:
    backend = values.pop("backend", "dummy")
    cls = BACKENDS.get(backend) if isinstance(backend, str) else None
    if cls is None:
        allowed = ", ".join(sorted(BACKENDS))
        raise ConfigError(f"unknown backend {excerpt(backend)}; allowed: {allowed}")
    return cls.build(values)
