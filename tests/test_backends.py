"""vLLM and SGLang backends: command building, and real log transcripts played by fakes.

The fakes are packages named ``vllm`` and ``sglang`` put first on the server's
``PYTHONPATH``: the backends launch them exactly as they launch the real engines
(``python -m vllm.entrypoints.openai.api_server`` / ``python -m sglang.launch_server``),
and they play a transcript from ``tests/transcripts`` (``servescope.dummy --replay``):
upstream's log lines, when its socket answers, ``/health`` turning 503, its exit.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import servescope
from servescope import SGLangConfig, VLLMConfig, open_server
from servescope._config import ServerConfig
from servescope.backends import sglang as sglang_backend

TRANSCRIPTS = Path(__file__).with_name("transcripts")

FAKE_ENGINE = """\
import json, os, sys
from pathlib import Path
from servescope.dummy import main
argv = sys.argv[1:]
record = {"argv": sys.argv, "env": {k: os.environ.get(k) for k in
          ("VLLM_API_KEY", "USE_TF", "TRANSFORMERS_NO_TF", "PYTHONUNBUFFERED")}}
Path(os.environ["FAKE_RECORD"]).write_text(json.dumps(record))
port = argv[argv.index("--port") + 1]
main(["--port", port, "--replay", os.environ["FAKE_TRANSCRIPT"], "--api-key-env", "VLLM_API_KEY"])
"""


def fake_packages(root: Path) -> Path:
    """``vllm`` and ``sglang`` packages whose entry points play a transcript."""
    for module in [
        "vllm/entrypoints/openai/api_server.py",
        "vllm/entrypoints/cli/main.py",
        "sglang/launch_server.py",
    ]:
        path = root / module
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(FAKE_ENGINE)
        for parent in path.relative_to(root).parents:
            if parent != Path("."):
                (root / parent / "__init__.py").touch()
    return root


def fake_env(tmp_path: Path, transcript: Path | str) -> dict[str, str]:
    path = transcript if isinstance(transcript, Path) else TRANSCRIPTS / transcript
    return {
        "PYTHONPATH": str(fake_packages(tmp_path / "fakes")),
        "FAKE_TRANSCRIPT": str(path),
        "FAKE_RECORD": str(tmp_path / "record.json"),
    }


def vllm(tmp_path: Path, transcript: Path | str, **options: Any) -> VLLMConfig:
    options.setdefault("shutdown_grace", 2.0)
    options.setdefault("compile_lock", False)
    return VLLMConfig(model="org/model", env=fake_env(tmp_path, transcript), **options)


def sglang(tmp_path: Path, transcript: str, **options: Any) -> SGLangConfig:
    options.setdefault("shutdown_grace", 2.0)
    return SGLangConfig(model="org/model", env=fake_env(tmp_path, transcript), **options)


# -- command building ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected", "absent"),
    [
        ({}, ["org/model", "--port", "8001", "--host", "127.0.0.1"], ["--tensor-parallel-size"]),
        ({"host": "0.0.0.0"}, ["--host", "0.0.0.0"], ["127.0.0.1"]),
        ({"max_model_len": 4096}, ["--max-model-len", "4096"], []),
        (
            {"tp": 2, "dp": 4, "pp": 2},
            [
                "--tensor-parallel-size",
                "2",
                "--data-parallel-size",
                "4",
                "--pipeline-parallel-size",
                "2",
            ],
            [],
        ),
        ({"tp": 2, "args": {"tensor-parallel-size": 8}}, ["--tensor-parallel-size=8"], ["2"]),
        ({"tp": 2, "args": {"tensor_parallel_size": 8}}, ["--tensor_parallel_size=8"], ["2"]),
        ({"args": {"enforce-eager": True, "dtype": "float32"}}, ["--enforce-eager"], []),
        ({"args": {"enable-prefix-caching": False}}, ["--no-enable-prefix-caching"], []),
        ({}, ["--disable-uvicorn-access-log"], []),
    ],
)
def test_vllm_command(options: dict[str, Any], expected: list[str], absent: list[str]) -> None:
    argv = VLLMConfig(model="org/model", **options).process_spec(8001).argv
    joined = " ".join(argv)
    assert " ".join(expected) in joined, argv
    for text in absent:
        assert text not in argv, argv


def test_vllm_launchers(tmp_path: Path) -> None:
    config = VLLMConfig(model="m", executable=("apptainer", "exec", "vllm.sif", "vllm"))
    argv = config.process_spec(1).argv
    assert argv[:6] == ["apptainer", "exec", "vllm.sif", "vllm", "serve", "m"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vllm").touch()
    other = VLLMConfig(model="m", python=str(bin_dir / "python"))
    assert other.process_spec(1).argv[:3] == [str(bin_dir / "vllm"), "serve", "m"]
    # This interpreter has no ``vllm`` script beside it: the module entry point.
    module = VLLMConfig(model="m").process_spec(1).argv
    assert module[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert module[3:5] == ["--model", "m"]


def test_vllm_environment_and_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("USE_TF", raising=False)
    monkeypatch.setenv("TRANSFORMERS_NO_TF", "0")
    config = VLLMConfig(model="m", api_key="sk-secret-123", env={"A": "b"})
    spec = config.process_spec(1)
    assert spec.env["VLLM_API_KEY"] == "sk-secret-123"
    assert spec.env["USE_TF"] == "0"
    assert "TRANSFORMERS_NO_TF" not in spec.env  # the user's own setting is kept
    assert spec.env["A"] == "b"
    for text in (repr(config), str(config), repr(spec), str(config.model_dump())):
        assert "sk-secret-123" not in text
    assert not any("sk-secret-123" in arg for arg in spec.argv), spec.argv
    assert config.client_options()["headers"] == {"Authorization": "Bearer sk-secret-123"}
    assert (spec.health_path, spec.dead_status, config.health_interval) == ("/health", 503, 0.5)
    assert config.secrets() == ["sk-secret-123"]


def test_vllm_compile_key_follows_the_configuration() -> None:
    key = VLLMConfig(model="m", tp=2).process_spec(1).compile_key
    assert key == VLLMConfig(model="m", tp=2).process_spec(2).compile_key
    assert key != VLLMConfig(model="m", tp=4).process_spec(1).compile_key
    assert key != VLLMConfig(model="m", tp=2, args={"dtype": "half"}).process_spec(1).compile_key
    assert VLLMConfig(model="m", compile_lock=False).process_spec(1).compile_key is None


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, ["--model-path", "org/model", "--port", "8001", "--host", "127.0.0.1"]),
        ({"context_length": 8192}, ["--context-length", "8192"]),
        ({"tp": 2, "dp": 2, "pp": 2}, ["--tp-size", "2", "--dp-size", "2", "--pp-size", "2"]),
        ({"tp": 2, "args": {"tp-size": 4}}, ["--tp-size=4"]),
        ({"strict_ports": True}, ["--strict-ports"]),
    ],
)
def test_sglang_command(options: dict[str, Any], expected: list[str]) -> None:
    argv = SGLangConfig(model="org/model", **options).process_spec(8001).argv
    assert argv[:3] == [sys.executable, "-m", "sglang.launch_server"]
    assert " ".join(expected) in " ".join(argv), argv
    if "args" in options:
        assert "--tp-size 2" not in " ".join(argv)


def test_sglang_strict_ports_when_the_installed_sglang_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "--strict-ports" not in SGLangConfig(model="m").process_spec(1).argv
    server_args = tmp_path / "sglang" / "srt" / "server_args.py"
    server_args.parent.mkdir(parents=True)
    for package in (tmp_path / "sglang", tmp_path / "sglang" / "srt"):
        (package / "__init__.py").touch()
    server_args.write_text('parser.add_argument("--strict-ports", action="store_true")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [name for name in sys.modules if name.startswith("sglang")]:
        monkeypatch.delitem(sys.modules, name)
    assert sglang_backend.sglang_supports_strict_ports()
    assert "--strict-ports" in SGLangConfig(model="m").process_spec(1).argv
    assert "--strict-ports" not in SGLangConfig(model="m", strict_ports=False).process_spec(1).argv


# -- transcripts --------------------------------------------------------------------------


async def expect_failure(config: ServerConfig) -> servescope.ServerError:
    with anyio.fail_after(30), pytest.raises(servescope.ServerError) as caught:
        async with open_server(config) as server:
            await server.wait_ready()
            await anyio.sleep(30)
    return caught.value


@pytest.mark.anyio
async def test_vllm_ready_transcript(tmp_path: Path) -> None:
    config = vllm(tmp_path, "vllm_ready.log", api_key="sk-secret-123")
    with anyio.fail_after(30):
        async with open_server(config) as server:
            await server.wait_ready()
            out = await server.chat([{"role": "user", "content": "hi"}], max_tokens=3)
            assert out.finish_reason in ("stop", "length")
            tail = "\n".join(server.log_tail())
            assert "Application startup complete." in tail
    # The fake required the key on /v1/ (as vLLM does): requests sent it.
    record = json.loads((tmp_path / "record.json").read_text())
    assert "sk-secret-123" not in " ".join(record["argv"])
    assert record["env"]["VLLM_API_KEY"] == "sk-secret-123"
    assert record["argv"][record["argv"].index("--host") + 1] == "127.0.0.1"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("transcript", "error", "matched"),
    [
        ("vllm_cuda_oom_load.log", servescope.ServerStartError, "CUDA out of memory"),
        ("vllm_placement_group.log", servescope.ServerStartError, "World size (4) is larger"),
        ("vllm_no_cache_memory.log", servescope.ServerStartError, "No available memory"),
        ("vllm_worker_died.log", servescope.ServerCrashed, "VllmWorker-1 died unexpectedly"),
        ("sglang_scheduler_exception.log", servescope.ServerStartError, "CUDA out of memory"),
        ("sglang_sigquit.log", servescope.ServerCrashed, "crashed with exit code -9"),
        ("sglang_warmup_failed.log", servescope.ServerStartError, "warmup error"),
    ],
)
async def test_fatal_transcripts(
    tmp_path: Path, transcript: str, error: type[Exception], matched: str
) -> None:
    make = sglang if transcript.startswith("sglang") else vllm
    failure = await expect_failure(make(tmp_path, transcript))
    assert type(failure) is error, failure
    assert failure.matched_line is not None and matched in failure.matched_line, failure
    assert matched in str(failure)


@pytest.mark.anyio
@pytest.mark.parametrize("transcript", ["vllm_address_in_use.log", "sglang_address_in_use.log"])
async def test_address_in_use_is_retried_on_another_port(tmp_path: Path, transcript: str) -> None:
    make = sglang if transcript.startswith("sglang") else vllm
    failure = await expect_failure(make(tmp_path, transcript))
    assert isinstance(failure, servescope.ServerStartError)
    assert "after 2 attempts" in str(failure)
    assert failure.matched_line is not None
    assert "address already in use" in failure.matched_line.lower()


@pytest.mark.anyio
async def test_vllm_health_503_after_ready_is_a_crash_within_a_second(tmp_path: Path) -> None:
    """The engine died without a line we know: ``/health`` turns 503, the process lives on."""
    lines = (TRANSCRIPTS / "vllm_ready.log").read_text().replace("@hang", "")
    transcript = tmp_path / "silent_death.log"
    transcript.write_text(lines + "\n@sleep 0.5\n@unhealthy\n@hang\n")
    config = vllm(tmp_path, transcript)
    with anyio.fail_after(30), pytest.raises(servescope.ServerCrashed, match="503") as caught:
        async with open_server(config) as server:
            await server.wait_ready()
            ready_at = time.monotonic()
            await anyio.sleep(30)
    detected = time.monotonic() - ready_at - 0.5
    assert detected < 1.5, f"503 noticed {detected:.2f} s after it began"
    assert caught.value.exit_code is None  # the process was still running


@pytest.mark.anyio
async def test_sglang_is_ready_only_on_its_ready_line(tmp_path: Path) -> None:
    """Its port answers (``Uvicorn running on``) before the warm-up: that is not readiness."""
    config = sglang(tmp_path, "sglang_ready.log")
    with anyio.fail_after(30):
        async with open_server(config) as server:
            while not any("Uvicorn running on" in line for line in server.log_tail()):  # noqa: ASYNC110
                await anyio.sleep(0.01)
            assert not server.ready
            await server.wait_ready()
            assert any("fired up and ready to roll" in line for line in server.log_tail())
            out = await server.complete("Once upon a time", max_tokens=2)
            assert out.text


@pytest.mark.anyio
async def test_compile_lock_serialises_first_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two jobs start one configuration at once: the second waits until the first is ready,
    then starts from the marker without the lock; a failed start leaves no marker."""
    monkeypatch.setenv("SERVESCOPE_COMPILE_LOCK_DIR", str(tmp_path / "locks"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    failing = vllm(tmp_path / "a", "vllm_cuda_oom_load.log", compile_lock=True)
    with anyio.fail_after(30), pytest.raises(servescope.ServerStartError):
        async with open_server(failing) as server:
            await server.wait_ready()
    assert list((tmp_path / "locks").glob("*.done")) == []  # a failed start marks nothing

    first = vllm(tmp_path / "a", "vllm_ready.log", compile_lock=True)
    second = vllm(tmp_path / "b", "vllm_ready.log", compile_lock=True)
    order: list[str] = []

    async def start(name: str, config: VLLMConfig) -> list[str]:
        async with open_server(config) as server:
            await server.wait_ready()
            order.append(name)
            await anyio.sleep(0.2)
            return server.log_tail()

    tails: dict[str, list[str]] = {}

    async def run(name: str, config: VLLMConfig) -> None:
        tails[name] = await start(name, config)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "first", first)
            await anyio.sleep(0.05)
            tg.start_soon(run, "second", second)
    assert order == ["first", "second"]
    assert any("this job compiles first" in line for line in tails["first"])
    assert any("waiting for the compile lock" in line for line in tails["second"])
    assert not any("this job compiles first" in line for line in tails["second"])
    assert len(list((tmp_path / "locks").glob("*.done"))) == 1


@pytest.mark.anyio
async def test_unusable_compile_lock_directory_does_not_stop_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SERVESCOPE_COMPILE_LOCK_DIR", str(blocker / "locks"))
    config = vllm(tmp_path, "vllm_ready.log", compile_lock=True)
    with anyio.fail_after(30):
        async with open_server(config) as server:
            await server.wait_ready()
            assert any("compile lock unavailable" in line for line in server.log_tail())


@pytest.mark.parametrize(
    ("line", "fatal"),
    [
        # Ray, an existing placement group too small: fatal (vllm/v1/executor/ray_utils.py).
        (
            "ValueError: The number of required GPUs exceeds the total number of available GPUs "
            "in the placement group. Required number of devices: 4. Total number of devices: 1.",
            True,
        ),
        # The same sentence without the tail is a WARNING while vLLM waits for its own group.
        (
            "WARNING 11-23 10:00:01 [ray_utils.py:300] The number of required GPUs exceeds the "
            "total number of available GPUs in the placement group.",
            False,
        ),
        ("Cannot provide a placement group requiring 4 GPUs within 1800 seconds.", True),
        ("INFO 11-23 10:00:01 [loader.py:1] Loading weights took 0.5 seconds", False),
        ("RuntimeError: Executor failed.", False),  # a consequence line; the cause is matched
    ],
)
def test_vllm_placement_group_lines(line: str, fatal: bool) -> None:
    from servescope._logscan import LineKind
    from servescope.backends.vllm import VLLM_PATTERNS

    event = VLLM_PATTERNS.classify(line)
    assert (event is not None and event.kind is LineKind.FATAL) == fatal, event


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, "127.0.0.1"),
        ({"host": "0.0.0.0"}, "127.0.0.1"),
        ({"host": "::"}, "::1"),
        ({"args": {"--host": "10.1.2.3"}}, "10.1.2.3"),
        ({"host": "10.9.9.9", "args": {"host": "10.1.2.3"}}, "10.1.2.3"),
    ],
)
def test_clients_connect_where_the_engine_listens(options: dict[str, Any], expected: str) -> None:
    for cls in (VLLMConfig, SGLangConfig):
        assert cls(model="m", **options).process_spec(1).connect_host == expected


@pytest.mark.parametrize("cls", [VLLMConfig, SGLangConfig])
@pytest.mark.parametrize("key", ["port", "--port", "-port"])
def test_engine_port_is_servescopes(cls: type[VLLMConfig | SGLangConfig], key: str) -> None:
    with pytest.raises(servescope.ConfigError, match=r"args: .*port.*servescope picks"):
        cls(model="m", args={key: 9000})


@pytest.mark.parametrize(
    ("cls", "key", "message"),
    [
        (VLLMConfig, "api-key", "use api_key="),
        (VLLMConfig, "--api_key", "use api_key="),
        (SGLangConfig, "api-key", "would be refused"),
    ],
)
def test_engine_api_key_flag_is_refused(
    cls: type[VLLMConfig | SGLangConfig], key: str, message: str
) -> None:
    with pytest.raises(servescope.ConfigError, match=message) as info:
        cls(model="m", args={key: "sk-in-argv"})
    assert "sk-in-argv" not in str(info.value)


def test_secret_flags_are_masked_but_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    from servescope._redact import MASK

    config = VLLMConfig(
        model="m",
        args={"hf-token": "hf_flag_secret", "max-num-batched-tokens": 8192},
        env={"HF_TOKEN": "hf_env_secret"},
    )
    for text in (repr(config), str(config), config.model_dump_json(), str(config.model_dump())):
        assert "hf_flag_secret" not in text and "hf_env_secret" not in text, text
        assert MASK in text and "8192" in text
    spec = config.process_spec(1)
    assert "--hf-token=hf_flag_secret" in spec.argv
    assert spec.env["HF_TOKEN"] == "hf_env_secret"
    assert sorted(config.secrets()) == ["hf_env_secret", "hf_flag_secret"]


@pytest.mark.parametrize("cls", [VLLMConfig, SGLangConfig])
@pytest.mark.parametrize("options", [{"model": "--port"}, {"model": "m", "host": "-h"}])
def test_values_that_would_be_read_as_flags(
    cls: type[VLLMConfig | SGLangConfig], options: dict[str, Any]
) -> None:
    with pytest.raises(servescope.ConfigError, match="must not start with '-'"):
        cls(**options)
