"""Test fixtures: both event loops, and a check that no test leaves a process behind."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import servescope
import servescope.dummy

#: Every process a test starts inherits this; the leak check looks for it.
RUN_TOKEN = f"servescope-test-{uuid.uuid4().hex}"
os.environ["SERVESCOPE_TEST_RUN"] = RUN_TOKEN

DUMMY_SCRIPT = Path(servescope.dummy.__file__)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs on asyncio and on trio (a missing trio fails, not skips)."""
    return str(request.param)


def dummy_process(*dummy_args: str, **config: Any) -> servescope.CustomConfig:
    """A config that runs ``python -m servescope.dummy``'s script as a custom server."""
    config.setdefault("shutdown_grace", 2.0)
    return servescope.CustomConfig(script=DUMMY_SCRIPT, extra_args=dummy_args, **config)


def leftover_processes(since: float) -> list[psutil.Process]:
    """Live processes started since ``since`` that carry this run's token."""
    found = []
    for proc in psutil.process_iter(["create_time"]):
        if proc.pid == os.getpid() or proc.info["create_time"] < since - 1:
            continue
        try:
            if (
                proc.environ().get("SERVESCOPE_TEST_RUN") == RUN_TOKEN
                and proc.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail a test that leaves any process it started alive (and kill those)."""
    since = time.time()
    yield
    deadline = time.monotonic() + 1.0
    while (left := leftover_processes(since)) and time.monotonic() < deadline:
        time.sleep(0.05)
    described = []
    for proc in left:
        try:
            described.append((proc.pid, proc.cmdline()))
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    assert not described, f"processes left running: {described}"
