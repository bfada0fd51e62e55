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
from .backends.custom import CustomConfig
from .backends.dummy import DummyConfig
from .backends.endpoint import EndpointConfig
from .backends.sglang import SGLangConfig
from .backends.vllm import VLLMConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

__all__ = ["BACKENDS", "load_config", "read_config_file"]

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
    """A config from a TOML/JSON file path or a mapping; its ``backend`` picks the class."""
    if isinstance(source, Mapping):
        values = dict(source)
    elif isinstance(source, str | os.PathLike):
        values = read_config_file(source)
    else:
        raise ConfigError(f"a config comes from a path or a mapping, not {excerpt(source)}")
    backend = values.pop("backend", "dummy")
    cls = BACKENDS.get(backend) if isinstance(backend, str) else None
    if cls is None:
        allowed = ", ".join(sorted(BACKENDS))
        raise ConfigError(f"unknown backend {excerpt(backend)}; allowed: {allowed}")
    return cls.build(values)
