"""Where a server's log lines go: a per-rank file, the ``servescope.server`` logger,
and a bounded ring of recent lines for error messages."""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import TextIO

__all__ = ["ServerLog", "log_file_name"]

logger = logging.getLogger("servescope.server")
events = logging.getLogger("servescope")


def log_file_name(rank: int, node: int) -> str:
    """The per-rank log file name (datatrove's layout, so existing tooling finds it)."""
    return f"server_rank_{rank:05d}_node_{node}.log"


class ServerLog:
    """Collects one server's output lines.

    Lines are logged at INFO until the server is ready (start-up problems are then
    visible without configuration) and at DEBUG afterwards (a serving engine is chatty).
    """

    def __init__(self, *, rank: int, node: int, log_dir: Path | None, tail_lines: int = 50) -> None:
        self.rank = rank
        self.ready = False
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._file: TextIO | None = None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            path = log_dir / log_file_name(rank, node)
            self._file = path.open("a", encoding="utf-8", errors="replace")

    def add(self, stream: str, line: str) -> None:
        """Record one line the server printed on ``stream`` ("stdout" or "stderr")."""
        self._keep(line)
        level = logging.DEBUG if self.ready else logging.INFO
        if logger.isEnabledFor(level):
            logger.log(level, "[rank %d %s] %s", self.rank, stream, line)

    def note(self, message: str) -> None:
        """Record an event of servescope's own (start attempt, teardown) beside the lines."""
        self._keep(f"[servescope] {message}")
        self.flush()
        events.info("[rank %d] %s", self.rank, message)

    def _keep(self, line: str) -> None:
        self._tail.append(line)
        if self._file is not None:
            self._file.write(line + "\n")

    def flush(self) -> None:
        """Push buffered lines to the file (called once per chunk read, not per line)."""
        if self._file is not None:
            self._file.flush()

    def tail(self) -> list[str]:
        """The most recent lines, oldest first."""
        return list(self._tail)

    def close(self) -> None:
        """Close the log file."""
        if self._file is not None:
            self._file.close()
            self._file = None
