"""If the process running open_server is SIGKILLed, the server's tree dies anyway.

This is the OOM-killer / SLURM-preemption case: nothing in the driver can clean up,
so the reaper (see ``servescope/_reaper.py``) must.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

DRIVER = Path(__file__).with_name("driver.py")


def alive(pids: list[int]) -> list[int]:
    running = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.NoSuchProcess:
            pass
    return running


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_driver_sigkill_kills_the_tree(tmp_path: Path, backend: str) -> None:
    ready = tmp_path / "ready"
    driver = subprocess.Popen(
        [sys.executable, str(DRIVER), backend, str(tmp_path / "pids.json"), str(ready)]
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert driver.poll() is None, "the driver exited early"
            assert time.monotonic() < deadline, "the driver's server never became ready"
            time.sleep(0.05)
        tree = [proc.pid for proc in psutil.Process(driver.pid).children(recursive=True)]
        # reaper, server, its two children and the orphan re-parented to the reaper
        assert len(alive(tree)) == 5, tree
        driver.kill()
        driver.wait()
        killed_at = time.monotonic()
        while alive(tree) and time.monotonic() - killed_at < 10:
            time.sleep(0.05)
        assert not alive(tree), f"left running after the driver died: {alive(tree)}"
        # The default shutdown_grace is 10 s; an orphaned tree gets at most 2 s.
        assert time.monotonic() - killed_at < 4
    finally:
        driver.kill()
        driver.wait()
