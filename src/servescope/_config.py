"""Configuration shared by every backend.

Configs are frozen pydantic models: a typo in a key, a negative timeout or an
invalid regular expression is rejected when the config is built, with a
``ConfigError`` that names the key — not when the server is half started.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ._errors import ConfigError
from ._redact import looks_secret

__all__ = ["ServerConfig", "config_error"]


class ServerConfig(BaseModel):
    """Settings every backend understands.

    Attributes:
        model: the model name sent in requests (and, for launched engines, loaded).
        startup_timeout: seconds to wait for readiness, over all start attempts.
        start_attempts: how many times to start the server (each on a fresh port)
            when a start fails in a way a new port can fix (``Address already in use``).
        shutdown_grace: seconds between SIGTERM and SIGKILL on teardown.
        log_dir: where to write ``server_rank_{rank:05d}_node_{node}.log``; none if unset.
        log_tail_lines: how many recent log lines an error message carries.
        log_max_bytes: the log file is rotated (one ``.1`` kept) when it grows past this.
        ready_patterns / fatal_patterns: regular expressions added to the backend's own.
        env: extra environment variables for the server process.
        use_chat: ``server.request`` posts to ``/v1/chat/completions`` (else ``/v1/completions``).
        default_params: request parameters used unless a call sets them.
        request_timeout / connect_timeout: per-attempt limits, in seconds.
        max_concurrency: requests in flight at once (others wait for a slot).
        max_retries: retries of a retryable failure before ``RetriesExhausted``.
        backoff_base / backoff_max: the exponential backoff's first step and cap (full jitter).
        retry_after_max: the longest ``Retry-After`` honoured, in seconds.
        health_interval: after readiness, seconds between health probes (``None``: no
            watch). A probe answered with a 5xx, refused or not answered in time is a miss.
        health_timeout: seconds a health probe may take before it counts as a miss.
        unhealthy_after: a server whose health probe went unanswered this long has hung:
            the scope fails with ``ServerCrashed``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    startup_timeout: float = Field(default=900.0, gt=0)
    start_attempts: int = Field(default=2, ge=1)
    shutdown_grace: float = Field(default=10.0, ge=0)
    log_dir: Path | None = None
    log_tail_lines: int = Field(default=50, ge=1)
    log_max_bytes: int = Field(default=20 * 1024 * 1024, ge=4096)
    ready_patterns: tuple[str, ...] = ()
    fatal_patterns: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    use_chat: bool = True
    default_params: dict[str, Any] = Field(default_factory=dict)
    request_timeout: float = Field(default=600.0, gt=0)
    connect_timeout: float = Field(default=10.0, gt=0)
    max_concurrency: int = Field(default=500, ge=1)
    max_retries: int = Field(default=6, ge=0)
    backoff_base: float = Field(default=0.5, ge=0)
    backoff_max: float = Field(default=30.0, ge=0)
    retry_after_max: float = Field(default=300.0, ge=0)
    health_interval: float | None = Field(default=1.0, gt=0)
    health_timeout: float = Field(default=10.0, gt=0)
    unhealthy_after: float = Field(default=30.0, gt=0)

    if not TYPE_CHECKING:  # keep the pydantic plugin's typed signature for mypy

        def __init__(self, **values: Any) -> None:
            try:
                super().__init__(**values)
            except pydantic.ValidationError as exc:
                raise config_error(exc, type(self)) from None

    @field_validator("ready_patterns", "fatal_patterns")
    @classmethod
    def _valid_regex(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
        return patterns

    def secrets(self) -> list[str]:
        """Every secret value this config holds: ``env`` entries named like secrets (a
        backend adds its API key, secret flags...). Kept out of logs and messages."""
        return [value for name, value in self.env.items() if looks_secret(name)]

    def client_options(self) -> dict[str, Any]:
        """httpx client settings: a local server is reached directly, never via a proxy."""
        return {"trust_env": False}

    @classmethod
    def build(cls, values: Mapping[str, Any]) -> ServerConfig:
        """Validate a mapping into this config, raising ``ConfigError`` on bad input."""
        try:
            return cls.model_validate(dict(values))
        except pydantic.ValidationError as exc:
            raise config_error(exc, cls) from None


def config_error(exc: pydantic.ValidationError, cls: type[pydantic.BaseModel]) -> ConfigError:
    """One readable ``ConfigError`` from pydantic's error list: each bad key, why, and
    for an unknown key the closest known one and the full list."""
    problems = []
    allowed = sorted(cls.model_fields)
    unknown = False
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            unknown = True
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown key {key!r}{hint}")
        elif error["type"] == "missing":
            problems.append(f"{key}: required")
        elif any(word in key.lower() for word in ("key", "secret", "token", "password")):
            problems.append(f"{key}: {error['msg']}")  # never echo what might be a secret
        else:
            problems.append(f"{key}: {error['msg']} (got {error.get('input')!r})")
    message = f"invalid {cls.__name__}: " + "; ".join(problems)
    if unknown:
        message += f". Allowed keys: {', '.join(allowed)}"
    return ConfigError(message)
