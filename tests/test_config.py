"""Config validation and command building: pure functions, table-driven."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from servescope import ConfigError, CustomConfig, DummyConfig, VLLMConfig
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


# -- hostile values --------------------------------------------------------------------------

#: The smallest valid settings of each backend.
MINIMAL: dict[str, dict[str, Any]] = {
    "dummy": {},
    "vllm": {"model": "m"},
    "sglang": {"model": "m"},
    "endpoint": {"model": "m", "url": "http://127.0.0.1:8000/v1"},
    "custom": {"script": "server.py"},
}

#: Every numeric setting and its upper bound (the lower ones are older and tested above).
UPPER_BOUNDS: dict[str, int | float] = {
    "startup_timeout": 10**7,
    "start_attempts": 1_000,
    "shutdown_grace": 10**7,
    "log_tail_lines": 100_000,
    "log_max_bytes": 2**40,
    "request_timeout": 10**7,
    "connect_timeout": 10**7,
    "max_concurrency": 1_000_000,
    "max_retries": 1_000,
    "backoff_base": 86_400,
    "backoff_max": 86_400,
    "retry_after_max": 86_400,
    "health_interval": 10**7,
    "health_timeout": 10**7,
    "unhealthy_after": 10**7,
    "completion_tokens": 1_000_000,
    "latency": 3_600,
    "token_latency": 3_600,
    "fault_rate": 1,
    "fault_seed": 2**63 - 1,
    "tp": 4_096,
    "dp": 4_096,
    "pp": 4_096,
    "max_model_len": 2**31 - 1,
    "context_length": 2**31 - 1,
}


def _kinds(annotation: Any) -> set[Any]:
    import types
    import typing

    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return {kind for arg in typing.get_args(annotation) for kind in _kinds(arg)}
    if typing.get_origin(annotation) is typing.Annotated:
        return _kinds(typing.get_args(annotation)[0])
    return {annotation}


def fields_of_kind(*kinds: type) -> list[tuple[str, str]]:
    """(backend, field) for every config field whose type is one of ``kinds`` (or None)."""
    from servescope._loadconfig import BACKENDS

    return [
        (backend, name)
        for backend, cls in BACKENDS.items()
        for name, field in cls.model_fields.items()
        if _kinds(field.annotation) - {type(None)} <= set(kinds)
        and _kinds(field.annotation) & set(kinds)
    ]


NUMERIC_FIELDS = fields_of_kind(int, float)
BOOL_FIELDS = fields_of_kind(bool)


def build(backend: str, **values: Any) -> Any:
    import servescope

    return servescope.load_config({"backend": backend, **MINIMAL[backend], **values})


def test_every_numeric_field_has_an_upper_bound() -> None:
    assert {name for _, name in NUMERIC_FIELDS} == set(UPPER_BOUNDS)


@pytest.mark.parametrize(("backend", "name"), NUMERIC_FIELDS)
@pytest.mark.parametrize(
    "value",
    [True, False, "7", float("inf"), float("-inf"), float("nan"), 1e300, 10**30, 10**5000],
    ids=["True", "False", "str", "inf", "-inf", "nan", "1e300", "1e30", "1e5000"],
)
def test_numeric_fields_are_strict_finite_and_bounded(backend: str, name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"^invalid \w+Config: {name}: Input should be") as info:
        build(backend, **{name: value})
    assert len(str(info.value)) < 300


@pytest.mark.parametrize(("backend", "name"), NUMERIC_FIELDS)
def test_numeric_upper_bounds(backend: str, name: str) -> None:
    bound = UPPER_BOUNDS[name]
    assert getattr(build(backend, **{name: bound}), name) == bound
    with pytest.raises(ConfigError, match=rf"{name}: Input should be less than or equal to"):
        build(backend, **{name: bound + 1})


@pytest.mark.parametrize(("backend", "name"), BOOL_FIELDS)
@pytest.mark.parametrize("value", [1, 0, "true", "yes", "off", 1.0])
def test_bool_fields_are_strict(backend: str, name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"{name}: Input should be a valid boolean"):
        build(backend, **{name: value})


def test_ints_are_accepted_for_float_fields() -> None:
    config = build("dummy", startup_timeout=30, latency=1, fault_rate=1, backoff_base=0)
    assert (config.startup_timeout, config.latency, config.fault_rate) == (30.0, 1.0, 1.0)
    assert isinstance(config.startup_timeout, float)


def test_cli_values_still_build() -> None:
    from servescope.cli import _parser, build_config

    argv = ["serve", "--backend", "vllm", "--model", "m", "--tp", "2", "--concurrency", "8"]
    argv += ["--startup-timeout", "30", "--max-model-len", "4096"]
    argv += ["--set", "health_interval=2", "--set", "use_chat=false", "--set", "shutdown_grace=1.5"]
    argv += ["--set", 'env={"HF_TOKEN": "hf_cli_secret"}', "--set", "log_max_bytes=1048576"]
    config = build_config(_parser().parse_args(argv))
    assert isinstance(config, VLLMConfig)
    assert (config.tp, config.max_concurrency, config.startup_timeout) == (2, 8, 30.0)
    assert (config.health_interval, config.use_chat, config.shutdown_grace) == (2.0, False, 1.5)
    assert config.process_spec(1).env["HF_TOKEN"] == "hf_cli_secret"
    with pytest.raises(ConfigError, match="max_concurrency: Input should be less than or equal"):
        build_config(_parser().parse_args(["serve", "--concurrency", str(2**40)]))


def test_one_clean_message_without_the_api_key() -> None:
    import servescope

    values = {"backend": "vllm", "model": "m", "api_key": "sk-x-secret", "tp": "x"}
    with pytest.raises(ConfigError) as info:
        servescope.load_config(values)
    assert str(info.value) == "invalid VLLMConfig: tp: Input should be a valid integer (got 'x')"


LONG = "y" * 100_000


@pytest.mark.parametrize(
    ("values", "expected", "absent"),
    [
        # Containers are named, never echoed.
        ({"model": {"a": "b" * 50}}, "model: Input should be a valid string (got a dict)", "bbb"),
        ({"model": ["z" * 500]}, "(got a list)", "zzz"),
        # Long scalars are cut.
        ({"use_chat": LONG}, "use_chat: Input should be a valid boolean (got 'yyy", "y" * 200),
        ({"latency": "x" * 10_000}, "latency: Input should be a valid number (got 'xxx", "x" * 200),
        ({"latency": 10**5000}, "latency: Input should be a valid number", None),
        # A value under a secret-looking name is never echoed.
        ({"env": {"HF_TOKEN": 12345678}}, "env.HF_TOKEN: Input should be a valid string", "1234"),
        ({"api_key": 99999999, "url": "http://h/v1"}, "api_key: Input should be a", "9999"),
        ({"default_params": {"x": {"api_key": "sk-nested"}}, "latency": "sk-nested"}, None, "sk-n"),
        # ... nor a password in a URL, anywhere.
        ({"model": "http://user:hunter22@h/v1", "latency": "x"}, None, "hunter22"),
        ({"url": "ftp://user:pw@h/v1"}, "url: Value error, must start with http", "pw@"),
        # Unknown keys: excerpted, no slow close-match search on a huge one.
        ({LONG: 1}, "unknown key 'yyy", "y" * 200),
        ({"latncy": 1}, "(did you mean 'latency'?)", None),
        ({f"k{i}": i for i in range(5000)}, "unknown key 'k0'", "k4999"),
    ],
)
def test_error_messages_are_short_and_keep_secrets(
    values: dict[str, Any], expected: str | None, absent: str | None
) -> None:
    import time

    import servescope

    backend = "endpoint" if "api_key" in values or "url" in values else "dummy"
    values = {"model": "m", **values} if backend == "endpoint" else values
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        servescope.load_config({"backend": backend, **values})
    message = str(info.value)
    assert time.monotonic() - start < 1
    assert len(message) < 2000, message[:3000]
    if expected is not None:
        assert expected in message
    if absent is not None:
        assert absent not in message


@pytest.mark.parametrize("key", [1, None, ("a",), b"model"])
def test_keys_must_be_strings(key: Any) -> None:
    import servescope

    with pytest.raises(ConfigError, match=r"^invalid DummyConfig: .*keys must be strings"):
        servescope.load_config({key: 1})
    with pytest.raises(ConfigError, match="keys must be strings"):
        DummyConfig.build({"latency": 1, key: 2})


@pytest.mark.parametrize("key", [0, None, ("a",), b"nnodes"])
def test_nested_settings_keys_must_be_strings(key: Any) -> None:
    """A nested settings model is built by keyword: a key that is not text is named in a
    ConfigError (it was a bare TypeError, 'keywords must be strings', found by the fuzz)."""
    import servescope
    from servescope._nodes import NodesConfig

    expected = r"^invalid VLLMConfig: nodes: .*keys must be strings, not "
    with pytest.raises(ConfigError, match=expected):
        VLLMConfig(model="m", nodes={key: None})
    with pytest.raises(ConfigError, match=expected):
        servescope.load_config({"backend": "vllm", "model": "m", "nodes": {"nnodes": 2, key: 1}})
    with pytest.raises(ConfigError, match=expected):
        VLLMConfig.model_validate({"model": "m", "nodes": {key: None}})
    with pytest.raises(ConfigError, match=r"^invalid NodesConfig: keys must be strings"):
        NodesConfig.model_validate({key: None})
    assert VLLMConfig(model="m", nodes={"nnodes": 2}).nodes == NodesConfig(nnodes=2)


@pytest.mark.parametrize("source", [3, ["a"], None])
def test_load_config_needs_a_path_or_a_mapping(source: Any) -> None:
    import servescope

    with pytest.raises(ConfigError, match="a path or a mapping"):
        servescope.load_config(source)


def deep(levels: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("suffix", "text"),
    [
        (".json", '{"default_params": {"x": ' + "[" * 5000 + "]" * 5000 + "}}"),
        (".json", "[" * 100_000),
        (".toml", "default_params = { x = " + "[" * 5000 + "]" * 5000 + " }"),
        (".toml", "a = " + "{ b = " * 5000),
        (".json", '{"default_params": {"x": ' + "[" * 100 + "]" * 100 + "}}"),
    ],
)
def test_deeply_nested_files(tmp_path: Path, suffix: str, text: str) -> None:
    import servescope

    path = tmp_path / f"config{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match="nested too deeply"):
        servescope.load_config(path)


@pytest.mark.parametrize("levels", [33, 10_000, 200_000])
def test_deeply_nested_mappings(levels: int) -> None:
    import servescope

    with pytest.raises(ConfigError, match=r"default_params: .*nested too deeply") as info:
        servescope.load_config({"default_params": {"x": deep(levels)}, "latency": "x"})
    assert len(str(info.value)) < 500
    assert servescope.load_config({"default_params": {"x": deep(31)}}).default_params


def test_self_referencing_params() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(ConfigError, match="nested too deeply"):
        DummyConfig.build({"default_params": {"x": cycle}})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"x": {1, 2}}, "default_params: Value error, x: a set is not JSON"),
        ({"x": float("nan")}, "default_params: Value error, x: NaN and infinities are not JSON"),
        (
            {"x": [1, float("inf")]},
            "default_params: Value error, x.1: NaN and infinities are not JSON",
        ),
        ({"x": 10**5000}, "default_params: Value error, x: an integer this large"),
        ({"x": {2: "a"}}, "default_params: Value error, x: keys must be strings"),
        ({"x": b"a"}, "default_params: Value error, x: a bytes is not JSON"),
    ],
)
def test_default_params_are_json(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DummyConfig.build({"default_params": params})


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h:70000/v1", "port"),
        ("http://h:0/v1", "port"),
        ("http://h:x/v1", "port"),
        ("http://[::1/v1", "not a valid URL"),
        ("http:///v1", "no host"),
        ("http://", "no host"),
        ("https://user:hunter22@h/v1", "api_key"),
        ("https://user@h/v1", "api_key"),
        ("http://h/v1\n", "spaces or control characters"),
        ("http://h /v1", "spaces or control characters"),
        ("http://h/v1?key=1", "query"),
        ("ws://h/v1", "must start with http:// or https://"),
    ],
)
def test_endpoint_urls(url: str, message: str) -> None:
    from servescope import EndpointConfig

    with pytest.raises(ConfigError, match=r"^invalid EndpointConfig: url: ") as info:
        EndpointConfig(model="m", url=url)
    assert message in str(info.value)
    assert "hunter22" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000/v1", "https://api.example.com/v1/", "http://[::1]:80", "http://h"],
)
def test_valid_endpoint_urls(url: str) -> None:
    from servescope import EndpointConfig

    assert EndpointConfig(model="m", url=url).url == url


@pytest.mark.parametrize("key", ["sk-1\r\nX-Evil: 1", "sk\x00", "sk\x7f", "", " sk", "sk ", "clé"])
@pytest.mark.parametrize("backend", ["vllm", "endpoint"])
def test_api_keys_must_be_printable_ascii(backend: str, key: str) -> None:
    with pytest.raises(ConfigError, match=r"api_key: .*printable ASCII") as info:
        build(backend, api_key=key)
    assert key.strip() not in str(info.value) or not key.strip()


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("api_key", True),
        ("HF_TOKEN", True),
        ("--hf-token", True),
        ("HUGGING_FACE_HUB_TOKEN", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("password", True),
        ("db-passwd", True),
        ("accessToken", True),
        ("max_tokens", False),
        ("max-num-batched-tokens", False),
        ("tokenizer", False),
        ("--tokenizer-mode", False),
        ("TOKENIZERS_PARALLELISM", False),
        ("skip_tokenizer_init", False),
        ("dtype", False),
    ],
)
def test_looks_secret(name: str, secret: bool) -> None:
    from servescope._redact import looks_secret

    assert looks_secret(name) == secret


def test_secret_env_and_params_are_masked_but_used() -> None:
    from servescope._redact import MASK

    config = CustomConfig(
        script=Path("s.py"),
        env={"HF_TOKEN": "hf_env_secret", "TOKENIZERS_PARALLELISM": "false"},
        default_params={"max_tokens": 16, "extra": {"api_key": "sk-param-secret"}},
        args={"hf-token": "hf_arg_secret", "n": 1},
        extra_args=("--auth-token", "tok_extra_1", "--password=pw_extra_2", "--verbose"),
    )
    secrets = ["hf_env_secret", "sk-param-secret", "hf_arg_secret", "tok_extra_1", "pw_extra_2"]
    assert sorted(config.secrets()) == sorted(secrets)
    shown = [repr(config), str(config), config.model_dump_json(), str(config.model_dump())]
    for text in shown:
        assert MASK in text
        assert not any(secret in text for secret in secrets), text
        assert "false" in text and "16" in text and "--verbose" in text
    dumped = config.model_dump()
    assert dumped["env"] == {"HF_TOKEN": MASK, "TOKENIZERS_PARALLELISM": "false"}
    assert dumped["extra_args"] == ("--auth-token", MASK, f"--password={MASK}", "--verbose")
    spec = config.process_spec(1)
    assert spec.env["HF_TOKEN"] == "hf_env_secret"
    assert "--hf-token=hf_arg_secret" in spec.argv and "tok_extra_1" in spec.argv
    assert config.default_params["extra"] == {"api_key": "sk-param-secret"}


@pytest.mark.parametrize(
    "options",
    [
        {"args": {"port": 9000}},
        {"args": {"--port": "9000"}},
        {"args": {"-port": 9000}},
        {"extra_args": ("--port", "9000")},
        {"extra_args": ("--port=9000",)},
        {"extra_args": ("-port", "9000")},
    ],
)
def test_custom_port_is_servescopes(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"port.*servescope picks"):
        CustomConfig(script=Path("s.py"), **options)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, "127.0.0.1"),
        ({"args": {"host": "10.1.2.3"}}, "10.1.2.3"),
        ({"args": {"--host": "0.0.0.0"}}, "127.0.0.1"),
        ({"extra_args": ("--host", "10.1.2.3")}, "10.1.2.3"),
        ({"extra_args": ("--host=::",)}, "::1"),
        ({"args": {"host": "10.9.9.9"}, "extra_args": ("--host", "10.1.2.3")}, "10.1.2.3"),
    ],
)
def test_custom_clients_connect_where_the_script_listens(
    options: dict[str, Any], expected: str
) -> None:
    assert CustomConfig(script=Path("s.py"), **options).process_spec(1).connect_host == expected


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"env": {"A=B": "1"}}, "env: .*variable name"),
        ({"env": {"": "1"}}, "env: .*variable name"),
        ({"env": {"A": "x\x00y"}}, "NUL"),
        ({"model": "m\x00"}, "model: .*NUL"),
        ({"python": "/usr/bin/python\x00"}, "python: .*NUL"),
        ({"script": "s\x00.py"}, "script: .*NUL"),
        ({"extra_args": ("a\x00",)}, "extra_args.0: .*NUL"),
        ({"args": {"x": "a\x00"}}, "args: .*NUL"),
        ({"args": {"": 1}}, "args: .*not a flag name"),
        ({"args": {"x": 10**5000}}, "args: .*too large"),
        ({"args": {"x": float("nan")}}, "args: .*finite"),
        ({"args": {"host": True}}, "args: .*host"),
        ({"fatal_patterns": ["(" * 5000]}, "fatal_patterns: .*invalid regular expression"),
        ({"health_path": "health"}, "health_path: .*start with /"),
    ],
)
def test_process_settings_that_cannot_reach_a_process(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        CustomConfig.build({"script": "s.py", **values})
    assert len(str(info.value)) < 500


def test_a_script_named_like_an_option_is_still_a_script() -> None:
    argv = CustomConfig(script=Path("-c.py")).process_spec(1).argv
    assert argv[1] == "./-c.py"


def test_a_secret_flag_value_of_the_wrong_type_is_not_echoed() -> None:
    values = {"script": "s.py", "extra_args": ["--hf-token", 12345678], "model": 12345678}
    with pytest.raises(ConfigError, match=r"extra_args.1: Input should be a valid string") as info:
        CustomConfig.build(values)
    assert "12345678" not in str(info.value)


def test_url_passwords_in_settings_are_secrets() -> None:
    config = DummyConfig(env={"HTTPS_PROXY": "http://me:pw_in_proxy@proxy:3128", "A": "x@y"})
    assert config.secrets() == ["pw_in_proxy"]
    assert "pw_in_proxy" not in repr(config) and "pw_in_proxy" not in config.model_dump_json()
    assert config.env["HTTPS_PROXY"] == "http://me:pw_in_proxy@proxy:3128"


def test_an_empty_port_is_the_default_port() -> None:
    from servescope import EndpointConfig

    assert EndpointConfig(model="m", url="http://h:/v1").root_url() == "http://h:"


def test_pydantic_entry_points_raise_config_error_too() -> None:
    with pytest.raises(
        ConfigError, match=r"^invalid DummyConfig: latency: Input should be a valid"
    ):
        DummyConfig.model_validate({"latency": "x", "env": {"HF_TOKEN": "hf_validate"}})
    with pytest.raises(ConfigError, match=r"^invalid DummyConfig: latency: ") as info:
        DummyConfig.model_validate_json(
            '{"latency": "hf_json_secret", "env": {"HF_TOKEN": "hf_json_secret"}}'
        )
    assert "hf_json_secret" not in str(info.value)
    with pytest.raises(ConfigError, match="not valid JSON"):
        DummyConfig.model_validate_json("{" * 10)
    assert DummyConfig.model_validate({"latency": 1}).latency == 1.0
