"""Configuration shared by every backend.

Configs are frozen pydantic models: a typo in a key, a negative timeout or an
invalid regular expression is rejected when the config is built, with a
``ConfigError`` that names the key — not when the server is half started.

Numbers are strict (``True`` and ``"7"`` are not numbers; an int is a float), finite and
bounded above: each field's bounds are in its ``Field(...)``. An error message never
echoes a mapping or a list, cuts long values, and never shows a secret: a value whose
key looks secret is not echoed, and every secret in the input is masked in the message.
A repr or a dump of a config masks secrets too (``env={"HF_TOKEN": ...}``), while the
server process gets the real values.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, get_args

import pydantic
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    Strict,
    ValidationInfo,
    field_validator,
    model_serializer,
)
from pydantic_core import ErrorDetails

from ._errors import ConfigError
from ._redact import Redactor, looks_secret, masked, secret_values, without_userinfo

__all__ = [
    "DAY",
    "MAX_SECONDS",
    "Flag",
    "Integer",
    "Number",
    "PathText",
    "ServerConfig",
    "Settings",
    "Text",
    "config_error",
    "excerpt",
]

_T = TypeVar("_T")
_C = TypeVar("_C", bound="Settings")

#: The upper bound of timeouts and intervals: ~116 days, past any real start-up.
MAX_SECONDS = 10**7
#: The upper bound of backoffs and of an honoured ``Retry-After``.
DAY = 86_400
#: ``default_params`` are sent as JSON with every request: this deep, this many values.
MAX_PARAMS_DEPTH = 32
MAX_PARAMS_VALUES = 100_000
#: An error message lists this many problems, then counts the rest.
_MAX_PROBLEMS = 10
#: Close-match hints are looked for only for keys this short (difflib is quadratic).
_MAX_HINTED_KEY = 64


def _no_nul(value: _T) -> _T:
    if "\0" in str(value):
        raise ValueError("must not contain a NUL character (no process can receive it)")
    return value


#: A float setting: an int is accepted, a bool or a string is not; never inf or NaN.
Number = Annotated[float, Strict(), AllowInfNan(False)]
#: An int setting: a bool, a float or a string is not accepted.
Integer = Annotated[int, Strict()]
#: A bool setting: ``1``, ``"true"``, ``"yes"`` are not accepted.
Flag = Annotated[bool, Strict()]
#: Text that may reach a command line or an environment (no NUL).
Text = Annotated[str, AfterValidator(_no_nul)]
#: A path that may reach a command line or a file system call (no NUL).
PathText = Annotated[Path, AfterValidator(_no_nul)]


class Settings(BaseModel):
    """A frozen settings model whose every way in (the constructor, ``build``, pydantic's
    ``model_validate``) raises one clean ``ConfigError``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    if not TYPE_CHECKING:  # keep the pydantic plugin's typed signature for mypy

        def __init__(self, /, **values: Any) -> None:
            try:
                super().__init__(**values)
            except pydantic.ValidationError as exc:
                raise config_error(exc, type(self), values) from None

    @classmethod
    def build(cls: type[_C], values: Mapping[str, Any]) -> _C:
        """Validate a mapping into this config, raising ``ConfigError`` on bad input."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"invalid {cls.__name__}: expected a mapping, not {excerpt(values)}")
        problem = _text_keys_problem(values)
        if problem is not None:
            raise ConfigError(f"invalid {cls.__name__}: {problem}")
        return cls(**values)

    @field_validator("*", mode="before")
    @classmethod
    def _nested_by_keyword(cls, value: Any, info: ValidationInfo) -> Any:
        """A nested settings model (``nodes``) is built by keyword, through its
        ``__init__``: a mapping with a key that is not text is refused here, by name,
        before Python's call would fail with a bare ``TypeError``."""
        if isinstance(value, Mapping) and info.field_name in _nested_settings(cls):
            problem = _text_keys_problem(value)
            if problem is not None:
                raise ValueError(problem)
        return value

    @classmethod
    def model_validate(cls: type[_C], obj: Any, **options: Any) -> _C:
        """pydantic's entry point, raising ``ConfigError`` like the others."""
        problem = _text_keys_problem(obj) if isinstance(obj, Mapping) else None
        if problem is not None:
            raise ConfigError(f"invalid {cls.__name__}: {problem}")
        try:
            return super().model_validate(obj, **options)
        except pydantic.ValidationError as exc:
            # pydantic wraps the ConfigError of __init__ in a "Value error" echoing obj.
            inner = [error.get("ctx", {}).get("error") for error in exc.errors()]
            clean = next((error for error in inner if isinstance(error, ConfigError)), None)
            values = obj if isinstance(obj, Mapping) else None
            raise clean or config_error(exc, cls, values) from None

    @classmethod
    def model_validate_json(
        cls: type[_C], json_data: str | bytes | bytearray, **options: Any
    ) -> _C:
        """pydantic's entry point, raising ``ConfigError`` like the others."""
        try:
            values = json.loads(json_data)
        except (ValueError, RecursionError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else exc
            raise ConfigError(f"invalid {cls.__name__}: not valid JSON: {why}") from None
        return cls.model_validate(values, **options)


def _text_keys_problem(values: Mapping[Any, Any]) -> str | None:
    """Why ``values`` cannot be keyword arguments (a key that is not text), or ``None``."""
    for key in values:
        if not isinstance(key, str):
            return f"keys must be strings, not {excerpt(key)}"
    return None


@functools.cache
def _nested_settings(cls: type[Settings]) -> frozenset[str]:
    """The names of ``cls``'s fields that hold a settings model (``nodes``)."""

    def holds(annotation: Any) -> bool:
        if isinstance(annotation, type) and issubclass(annotation, Settings):
            return True
        return any(holds(arg) for arg in get_args(annotation))

    return frozenset(name for name, field in cls.model_fields.items() if holds(field.annotation))


class ServerConfig(Settings):
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
        env: extra environment variables for the server process (those named like
            secrets, ``HF_TOKEN``, are masked in a repr or a dump, never in the process).
        use_chat: ``server.request`` posts to ``/v1/chat/completions`` (else ``/v1/completions``).
        default_params: request parameters used unless a call sets them (JSON: at most
            ``MAX_PARAMS_DEPTH`` levels deep).
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

    model: Text
    startup_timeout: Number = Field(default=900.0, gt=0, le=MAX_SECONDS)
    start_attempts: Integer = Field(default=2, ge=1, le=1_000)
    shutdown_grace: Number = Field(default=10.0, ge=0, le=MAX_SECONDS)
    log_dir: PathText | None = None
    log_tail_lines: Integer = Field(default=50, ge=1, le=100_000)
    log_max_bytes: Integer = Field(default=20 * 1024 * 1024, ge=4096, le=2**40)
    ready_patterns: tuple[str, ...] = ()
    fatal_patterns: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    use_chat: Flag = True
    default_params: dict[str, Any] = Field(default_factory=dict)
    request_timeout: Number = Field(default=600.0, gt=0, le=MAX_SECONDS)
    connect_timeout: Number = Field(default=10.0, gt=0, le=MAX_SECONDS)
    max_concurrency: Integer = Field(default=500, ge=1, le=1_000_000)
    max_retries: Integer = Field(default=6, ge=0, le=1_000)
    backoff_base: Number = Field(default=0.5, ge=0, le=DAY)
    backoff_max: Number = Field(default=30.0, ge=0, le=DAY)
    retry_after_max: Number = Field(default=300.0, ge=0, le=DAY)
    health_interval: Number | None = Field(default=1.0, gt=0, le=MAX_SECONDS)
    health_timeout: Number = Field(default=10.0, gt=0, le=MAX_SECONDS)
    unhealthy_after: Number = Field(default=30.0, gt=0, le=MAX_SECONDS)

    @field_validator("ready_patterns", "fatal_patterns")
    @classmethod
    def _valid_regex(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {excerpt(pattern)}: {exc}") from None
            except (RecursionError, OverflowError):
                why = "nested too deeply or too large"
                raise ValueError(f"invalid regular expression {excerpt(pattern)}: {why}") from None
        return patterns

    @field_validator("env")
    @classmethod
    def _valid_env(cls, env: dict[str, str]) -> dict[str, str]:
        for name, value in env.items():
            if not name or "=" in name or "\0" in name:
                raise ValueError(f"{excerpt(name)} is not a variable name (empty, '=' or NUL)")
            if "\0" in value:
                raise ValueError(f"{excerpt(name)}: the value must not contain a NUL character")
        return env

    @field_validator("default_params")
    @classmethod
    def _json_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        problem = _json_problem(params)
        if problem is not None:
            raise ValueError(problem)
        return params

    def secrets(self) -> list[str]:
        """Every secret value this config holds: ``env`` entries and ``default_params``
        named like secrets (a backend adds its API key, secret flags...). Kept out of
        logs, messages, reprs and dumps."""
        return [*secret_values(self.env), *secret_values(self.default_params)]

    def client_options(self) -> dict[str, Any]:
        """httpx client settings: a local server is reached directly, never via a proxy."""
        return {"trust_env": False}

    def _shown(self, name: str, value: Any) -> Any:
        """Field ``name``'s value as a repr or a dump shows it: secrets masked."""
        if name in ("env", "default_params"):
            return masked(value)
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, value if name is None else self._shown(name, value)

    @model_serializer(mode="wrap")
    def _masked_dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {name: self._shown(name, value) for name, value in data.items()}


def config_error(
    exc: pydantic.ValidationError,
    cls: type[pydantic.BaseModel],
    values: Mapping[str, Any] | None = None,
) -> ConfigError:
    """One readable ``ConfigError`` from pydantic's error list: each bad key, why, and
    for an unknown key the closest known one and the full list. Every secret found in
    ``values`` (the input) is masked in it."""
    allowed = sorted(cls.model_fields)
    errors = exc.errors(include_url=False)
    problems = [_problem(error, allowed) for error in errors[:_MAX_PROBLEMS]]
    if len(errors) > _MAX_PROBLEMS:
        problems.append(f"and {len(errors) - _MAX_PROBLEMS} more")
    message = f"invalid {cls.__name__}: " + "; ".join(problems)
    if any(error["type"] == "extra_forbidden" for error in errors):
        message += f". Allowed keys: {', '.join(allowed)}"
    redact = Redactor(secret_values(values) if values is not None else ())
    return ConfigError(without_userinfo(redact(message)))


def _problem(error: ErrorDetails, allowed: list[str]) -> str:
    loc = error["loc"]
    key = ".".join(_key_part(part) for part in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        name = str(loc[-1])
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close and len(name) <= _MAX_HINTED_KEY else ""
        return f"unknown key {excerpt(name)}{hint}"
    if error["type"] == "missing":
        return f"{key}: required"
    why = error["msg"] if len(error["msg"]) <= 300 else error["msg"][:300] + "..."
    value = error.get("input")
    if any(isinstance(part, str) and looks_secret(part) for part in loc):
        return f"{key}: {why}"  # never echo what might be a secret
    if error["type"] == "value_error" and isinstance(value, Mapping | list | tuple):
        return f"{key}: {why}"  # the validator's message says where
    return f"{key}: {why} (got {excerpt(value)})"


def _key_part(part: str | int) -> str:
    text = str(part)
    return text if len(text) <= 40 and text.isprintable() else excerpt(text, 40)


def excerpt(value: object, limit: int = 80) -> str:
    """A short rendering of an input for a message: text and numbers (cut to ``limit``
    characters), anything else (a mapping, a list, an object) by its type only."""
    if isinstance(value, str):
        if len(value) <= limit:
            return str.__repr__(value)
        return f"{str.__repr__(value[:limit])}... ({len(value)} characters)"
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    name = type(value).__name__[:40]
    return f"{'an' if name[:1].lower() in tuple('aeiou') else 'a'} {name}"


def _json_problem(params: Mapping[str, Any]) -> str | None:
    """Why ``params`` cannot go out as a request's JSON, or ``None`` (walked without
    recursion: the input may nest deeper than the interpreter's stack, or contain itself)."""
    stack: list[tuple[Any, int, str]] = [(value, 1, str(key)) for key, value in params.items()]
    seen = 0
    while stack:
        value, depth, path = stack.pop()
        seen += 1
        where = excerpt(path, 60) if len(path) > 60 else path
        if seen > MAX_PARAMS_VALUES:
            return f"too large (more than {MAX_PARAMS_VALUES} values)"
        if depth > MAX_PARAMS_DEPTH:
            return f"{where}: nested too deeply (more than {MAX_PARAMS_DEPTH} levels)"
        if isinstance(value, Mapping):
            if not all(isinstance(key, str) for key in value):
                return f"{where}: keys must be strings"
            stack += [(item, depth + 1, f"{path}.{key}") for key, item in value.items()]
        elif isinstance(value, list | tuple):
            stack += [(item, depth + 1, f"{path}.{i}") for i, item in enumerate(value)]
        elif isinstance(value, float) and not math.isfinite(value):
            return f"{where}: NaN and infinities are not JSON"
        elif isinstance(value, int) and value.bit_length() > 64:
            return f"{where}: an integer this large is not sent (at most 64 bits)"
        elif not (value is None or isinstance(value, str | int | float)):
            return f"{where}: {excerpt(value)} is not JSON"
    return None
