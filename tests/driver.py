"""A driver process for test_driver_killed: opens a server with children, then waits.

Usage: python driver.py BACKEND PID_FILE READY_FILE
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio

import servescope
import servescope.dummy

DUMMY = Path(servescope.dummy.__file__)


async def main(pid_file: str, ready_file: str) -> None:
    config = servescope.CustomConfig(
        script=DUMMY,
        extra_args=(
            "--ignore-sigterm",
            "--child",
            "ignore-sigterm",
            "--child",
            "new-group",
            "--child",
            "orphan",
            "--pid-file",
            pid_file,
        ),
    )
    with anyio.fail_after(60):
        async with servescope.open_server(config) as server:
            await server.wait_ready()
            await anyio.Path(ready_file).write_text(str(server.pid))
            await anyio.sleep(60)


if __name__ == "__main__":
    anyio.run(main, sys.argv[2], sys.argv[3], backend=sys.argv[1])
