"""Config validation and command building: pure functions, table-driven."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from servescope import ConfigError, CustomConfig, DummyConfig
from servescope.backends._base import cli_args


@pytest.mark.parametrize(
    ("args", "argv"),
    [
        ({}, []),
        ({"enforce-eager": True}, ["--enforce-eager"]),
        ({"enforce-eager": False}, ["--no-enforce-eager"]),
        ({"max_tokens": 1024}, ["--max_tokens=1024"]),
        ({"--dtype": "float32"}, ["--dtype=float32"]),
        ({"skip": None, "temperature": 0.5}, ["--temperature=0.5"]),
        ({"name": "a b"}, ["--name=a b"]),
    ],
)
def test_cli_args(args: dict[str, Any], argv: list[str]) -> None:
    assert cli_args(args) == argv


def test_custom_command_line() -> None:
    config = CustomConfig(
        script=Path("/srv/app.py"),
        args={"enforce-eager": True, "max-tokens": 16},
        extra_args=("--verbose",),
        env={"A": "1"},
    )
    spec = config.process_spec(23456)
    assert spec.argv == [
        sys.executable,
        "/srv/app.py",
        "--port",
        "23456",
        "--enforce-eager",
        "--max-tokens=16",
        "--verbose",
    ]
    assert spec.env == {"PYTHONUNBUFFERED": "1", "A": "1"}
    assert spec.health_path == "/v1/models"


def test_user_patterns_join_the_backend_table() -> None:
    spec = CustomConfig(script=Path("s.py"), fatal_patterns=(r"engine \d+ died",)).process_spec(1)
    event = spec.patterns.classify("engine 7 died")
    assert event is not None and event.kind.value == "fatal"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"latncy": 1}, r"unknown key 'latncy'"),
        ({"latency": -1}, r"latency: Input should be greater than or equal to 0"),
        ({"shutdown_grace": "soon"}, r"shutdown_grace: Input should be a valid number"),
        ({"fatal_patterns": ["(oops"]}, r"fatal_patterns: Value error, invalid regular expression"),
        ({"start_attempts": 0}, r"start_attempts: Input should be greater than or equal to 1"),
    ],
)
def test_invalid_config_names_the_key(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DummyConfig.build(values)


def test_configs_are_frozen() -> None:
    config = DummyConfig()
    with pytest.raises(ValueError, match="frozen"):
        config.latency = 3  # type: ignore[misc]


def test_direct_construction_raises_config_error() -> None:
    with pytest.raises(
        ConfigError, match=r"invalid DummyConfig: faults: Value error, unknown fault"
    ):
        DummyConfig(faults=("explode",))
    with pytest.raises(ConfigError, match=r"unknown key 'scirpt'"):
        CustomConfig(scirpt="x.py")  # type: ignore[call-arg]
