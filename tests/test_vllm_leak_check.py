"""The real-vLLM tests' leak check, checked without vLLM: it counts only what the test
started (processes carrying this run's token), never a vLLM running beside the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .vllm.conftest import processes_left

#: Looks like a vLLM server to anything reading command lines.
LOOKALIKE = [sys.executable, "-c", "import time; time.sleep(60)", "vllm", "serve", "some/model"]


@contextmanager
def running(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(LOOKALIKE, env=env)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_counts_the_tests_processes_not_a_vllm_beside_them() -> None:
    since = time.time()
    theirs_env = {k: v for k, v in os.environ.items() if k != "SERVESCOPE_TEST_RUN"}
    with running(theirs_env) as theirs, running(dict(os.environ)) as ours:
        left = processes_left(since)
    pids = [int(line.split(":", 1)[0]) for line in left]
    assert ours.pid in pids and theirs.pid not in pids, left
    assert not processes_left(since)
