"""datatrove's InferenceConfig → servescope configs: each field where it goes, and each
field that cannot be mapped a ConfigError naming it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("servescope.integrations.datatrove", exc_type=ImportError)

import servescope
from servescope._config import MAX_SECONDS
from servescope.integrations._datatrove_config import ServerPlan, map_config
from servescope.integrations.datatrove import InferenceConfig, InferenceRunner

SCRIPT = "/opt/server.py"


def config(server_type: str = "vllm", **fields: Any) -> Any:
    fields.setdefault("model_name_or_path", "org/model")
    if server_type == "custom":
        fields.setdefault("model_kwargs", {"server_script": SCRIPT})
    if server_type == "endpoint":
        fields.setdefault("endpoint_url", "https://api.example.com/v1")
    return InferenceConfig(server_type=server_type, **fields)


def plan(server_type: str = "vllm", **fields: Any) -> ServerPlan:
    return map_config(config(server_type, **fields), env={})


def refused(match: str, server_type: str = "vllm", **fields: Any) -> str:
    with pytest.raises(servescope.ConfigError, match=match) as info:
        plan(server_type, **fields)
    return str(info.value)


@pytest.mark.parametrize(
    ("server_type", "cls"),
    [
        ("dummy", servescope.DummyConfig),
        ("vllm", servescope.VLLMConfig),
        ("sglang", servescope.SGLangConfig),
        ("custom", servescope.CustomConfig),
        ("endpoint", servescope.EndpointConfig),
    ],
)
def test_server_type_picks_the_backend(server_type: str, cls: type) -> None:
    found = plan(server_type)
    assert type(found.config) is cls
    assert found.replicas == 1
    assert found.config.model == "org/model"


def test_unknown_server_type() -> None:
    refused(r"InferenceConfig\.server_type='tgi': must be one of dummy, vllm", "tgi")


def test_model_max_context() -> None:
    vllm = plan("vllm", model_max_context=4096).config
    sglang = plan("sglang", model_max_context=4096).config
    assert isinstance(vllm, servescope.VLLMConfig) and vllm.max_model_len == 4096
    assert isinstance(sglang, servescope.SGLangConfig) and sglang.context_length == 4096
    assert plan("vllm").config.max_model_len == 8192  # type: ignore[attr-defined]
    for server_type in ("dummy", "custom", "endpoint"):
        refused(
            r"InferenceConfig\.model_max_context=4096: .*no such setting",
            server_type,
            model_max_context=4096,
        )
        plan(server_type)  # the default is fine


@pytest.mark.parametrize("server_type", ["dummy", "vllm", "sglang", "custom", "endpoint"])
def test_use_chat_timeouts_concurrency_logs(server_type: str, tmp_path: Path) -> None:
    found = plan(
        server_type,
        use_chat=False,
        request_timeout=12.5,
        max_concurrent_generations=64,
        server_log_folder=str(tmp_path),
    ).config
    assert found.use_chat is False
    assert found.request_timeout == 12.5
    assert found.max_concurrency == 64
    assert found.log_dir == tmp_path
    assert plan(server_type).config.request_timeout == MAX_SECONDS  # None: no limit
    assert plan(server_type).config.log_dir is None


def test_startup_window() -> None:
    found = plan(
        "vllm",
        server_start_timeout_sec=10,
        server_ready_max_attempts=20,
        server_ready_delay_sec=3.0,
        server_start_max_retries=2,
    ).config
    assert found.start_attempts == 3
    assert found.startup_timeout == 3 * (10 + 20 * 3.0)
    default = plan("vllm").config
    assert default.startup_timeout == 2 * (60 + 300 * 5.0)
    assert default.start_attempts == 2


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("server_ready_max_attempts", 2.5, "an integer"),
        ("server_start_max_retries", True, "an integer"),
        ("server_ready_max_attempts", 10**9, "readiness window"),
        ("server_start_timeout_sec", float("inf"), "finite"),
    ],
)
def test_startup_window_refused(field: str, value: object, match: str) -> None:
    refused(rf"InferenceConfig\.{field}=.*{match}", "vllm", **{field: value})


def test_endpoint_url_and_api_key() -> None:
    found = plan("endpoint", endpoint_url="https://api.example.com/v1", api_key="sk-abc").config
    assert isinstance(found, servescope.EndpointConfig)
    assert found.url == "https://api.example.com/v1"
    assert found.api_key is not None and found.api_key.get_secret_value() == "sk-abc"
    vllm = plan("vllm", api_key="sk-abc").config
    assert isinstance(vllm, servescope.VLLMConfig) and vllm.api_key is not None
    with pytest.raises(servescope.ConfigError, match=r"InferenceConfig\.endpoint_url=None"):
        map_config(InferenceConfig(server_type="endpoint", model_name_or_path="m"), env={})
    refused(
        r"InferenceConfig\.endpoint_url='http://x': it is for server_type='endpoint'",
        "vllm",
        endpoint_url="http://x",
    )
    refused(r"InferenceConfig\.endpoint_url=", "dummy", endpoint_url="http://x")
    refused(
        r"url: .*must start with http.* url <- InferenceConfig\.endpoint_url",
        "endpoint",
        endpoint_url="x",
    )


@pytest.mark.parametrize("server_type", ["sglang", "dummy", "custom"])
def test_api_key_refused_where_unused(server_type: str) -> None:
    message = refused(r"InferenceConfig\.api_key=\(not shown\)", server_type, api_key="sk-sec")
    assert "sk-sec" not in message


def test_parallel_sizes() -> None:
    found = plan("vllm", tp=2, pp=2, dp=3)
    assert isinstance(found.config, servescope.VLLMConfig)
    assert (found.config.tp, found.config.pp, found.config.dp, found.replicas) == (2, 2, 1, 3)
    sglang = plan("sglang", tp=4, dp=2)
    assert sglang.replicas == 2 and sglang.config.tp == 4  # type: ignore[attr-defined]
    assert plan("dummy", dp=4).replicas == 4
    # datatrove's own flags in model_kwargs: read as the sizes, not passed twice
    from_kwargs = plan("vllm", model_kwargs={"tensor-parallel-size": 2, "data-parallel-size": 2})
    assert from_kwargs.config.tp == 2 and from_kwargs.replicas == 2  # type: ignore[attr-defined]
    assert from_kwargs.config.args == {"trust-remote-code": True}  # type: ignore[attr-defined]
    sglang_kwargs = plan("sglang", tp=2, model_kwargs={"tp-size": 2})
    assert sglang_kwargs.config.tp == 2  # type: ignore[attr-defined]


def test_parallel_sizes_refused() -> None:
    refused(
        r"model_kwargs\['tensor-parallel-size'\]=4: contradicts tp=2",
        tp=2,
        model_kwargs={"tensor-parallel-size": 4},
    )
    refused(r"InferenceConfig\.tp=0: must be an integer", tp=0)
    refused(r"InferenceConfig\.pp=2: the dummy server has no such setting", "dummy", pp=2)
    refused(r"InferenceConfig\.tp=2: the endpoint server", "endpoint", tp=2)
    refused(r"InferenceConfig\.dp=2: datatrove runs one custom server", "custom", dp=2)
    refused(r"InferenceConfig\.dp=2: an endpoint", "endpoint", dp=2)


def test_model_kwargs_engines() -> None:
    vllm = plan("vllm", model_kwargs={"enforce-eager": True, "dtype": "float16"}).config
    assert vllm.args == {"trust-remote-code": True, "enforce-eager": True, "dtype": "float16"}  # type: ignore[attr-defined]
    assert plan("vllm", model_kwargs={"trust-remote-code": False}).config.args == {  # type: ignore[attr-defined]
        "trust-remote-code": False
    }
    sglang = plan("sglang", model_kwargs={"mem-fraction-static": 0.8}).config
    assert sglang.args == {  # type: ignore[attr-defined]
        "allow-auto-truncate": True,
        "log-level-http": "warning",
        "mem-fraction-static": 0.8,
    }
    message = refused(
        r"sets the port.*args <- InferenceConfig\.model_kwargs", model_kwargs={"port": 8000}
    )
    assert message.startswith("invalid VLLMConfig")


def test_model_kwargs_custom() -> None:
    kwargs = {"server_script": SCRIPT, "batch-size": 8}
    found = plan("custom", model_kwargs=kwargs).config
    assert isinstance(found, servescope.CustomConfig)
    assert found.script == Path(SCRIPT) and found.args == {"batch-size": 8}
    assert kwargs == {"server_script": SCRIPT, "batch-size": 8}  # not consumed (datatrove does)
    refused(
        r"InferenceConfig\.model_kwargs\['server_script'\]=None: server_type='custom' needs",
        "custom",
        model_kwargs={"batch-size": 8},
    )


def test_model_kwargs_dummy_and_endpoint() -> None:
    found = plan("dummy", model_kwargs={"latency": 0.5, "text": "hi"}).config
    assert isinstance(found, servescope.DummyConfig)
    assert (found.latency, found.text) == (0.5, "hi")
    refused(
        r"InferenceConfig\.model_kwargs\['dtype'\]='bf16': the dummy server takes only",
        "dummy",
        model_kwargs={"dtype": "bf16"},
    )
    refused(
        r"InferenceConfig\.model_kwargs\['dtype'\]='bf16': an endpoint starts no server",
        "endpoint",
        model_kwargs={"dtype": "bf16"},
    )
    refused(
        r"latency: .* latency <- InferenceConfig\.model_kwargs\['latency'\]",
        "dummy",
        model_kwargs={"latency": -1},
    )


@pytest.mark.parametrize("server_type", ["dummy", "endpoint", "vllm"])
def test_secret_kwargs_are_not_echoed(server_type: str) -> None:
    kwargs = {"hf_token": "hf_verysecretvalue"}
    if server_type == "vllm":  # an engine takes it; its error masks it
        kwargs["port"] = "1"
    with pytest.raises(servescope.ConfigError, match=r"hf_token|port") as info:
        plan(server_type, model_kwargs=kwargs)
    assert "hf_verysecretvalue" not in str(info.value)


TWO_NODES = {"DATATROVE_NODE_IPS": "10.0.0.1,10.0.0.2", "DATATROVE_NODE_RANK": "0"}


def test_master_port_and_nodes() -> None:
    refused(r"InferenceConfig\.master_port=1234: it is used only across nodes", master_port=1234)
    assert map_config(config(), env={"DATATROVE_NODE_IPS": "localhost"}).config.nodes is None  # type: ignore[attr-defined]
    for server_type in ("vllm", "sglang"):
        found = map_config(config(server_type, master_port=1234, tp=2), env=TWO_NODES)
        assert found.replicas == 1
        nodes = found.config.nodes  # type: ignore[attr-defined]
        assert nodes is not None and nodes.master_port == 1234
        assert nodes.nnodes is None  # the roles: from datatrove's environment, when it runs
    default = map_config(config(), env=TWO_NODES).config.nodes  # type: ignore[attr-defined]
    assert default.master_port == 9810


@pytest.mark.parametrize("server_type", ["dummy", "custom", "endpoint"])
def test_only_engines_span_nodes(server_type: str) -> None:
    with pytest.raises(servescope.ConfigError, match="only vllm and sglang servers span nodes"):
        map_config(config(server_type), env=TWO_NODES)


def test_nodes_settings() -> None:
    with pytest.raises(servescope.ConfigError, match=r"InferenceConfig\.dp=2: replicas of a"):
        map_config(config(dp=2), env=TWO_NODES)
    settings = {"nodes": {"node_ip": "10.0.0.1", "node_timeout": 5, "token": "t0ken-value"}}
    nodes = map_config(config(), settings, env=TWO_NODES).config.nodes  # type: ignore[attr-defined]
    assert (nodes.node_ip, nodes.node_timeout, nodes.master_port) == ("10.0.0.1", 5, 9810)
    with pytest.raises(servescope.ConfigError, match=r"from InferenceConfig\.master_port"):
        map_config(config(), {"nodes": {"master_port": 1}}, env=TWO_NODES)


@pytest.mark.parametrize("server_type", ["dummy", "vllm", "sglang", "custom", "endpoint"])
def test_runner_fields_are_left_to_the_runner(server_type: str) -> None:
    found = plan(
        server_type,
        metric_interval=5,
        default_generation_params={"temperature": 0.0},
        rollouts_per_document=3,
        max_concurrent_documents=7,
    ).config
    assert found.default_params == {}  # datatrove's runner adds them to each payload


def test_a_field_it_does_not_know_is_refused() -> None:
    @dataclasses.dataclass
    class NewerConfig(InferenceConfig):  # type: ignore[misc]
        speculative_model: str | None = None

    newer = NewerConfig(server_type="vllm", model_name_or_path="m", speculative_model="draft")
    with pytest.raises(servescope.ConfigError, match=r"InferenceConfig\.speculative_model='draft'"):
        map_config(newer, env={})
    map_config(NewerConfig(server_type="vllm", model_name_or_path="m"), env={})


def test_servescope_settings() -> None:
    found = map_config(config("dummy"), {"shutdown_grace": 0.5, "unhealthy_after": 5}, env={})
    assert found.config.shutdown_grace == 0.5 and found.config.unhealthy_after == 5
    with pytest.raises(servescope.ConfigError, match=r"from InferenceConfig\.model_name_or_path"):
        map_config(config("dummy"), {"model": "x"}, env={})
    with pytest.raises(servescope.ConfigError, match="unknown key 'shutdown_grase'"):
        map_config(config("dummy"), {"shutdown_grase": 1}, env={})


def test_runner_refuses_at_construction() -> None:
    from datatrove.pipeline.writers import JsonlWriter  # type: ignore[import-not-found, import-untyped, unused-ignore]

    async def rollout(document: Any, generate: Any) -> None:
        return None

    with pytest.raises(servescope.ConfigError, match=r"InferenceConfig\.tp=2"):
        InferenceRunner(rollout, config("dummy", tp=2), JsonlWriter("/nonexistent-unused"))
