"""Where a server's log lines go: a per-rank file, the ``servescope.server`` logger,
and a bounded ring of recent lines for error messages.

Logging never fails a server: a log directory that cannot be created, a file that
cannot be opened, a full or failing disk — each is noted once (in the ring, so it shows
in an error's log tail, and on the ``servescope`` logger) and the file is given up; the
ring and the logger go on. The file is rotated when it passes ``max_bytes`` (the
previous one kept as ``.1``), so a chatty or flooding engine cannot fill the disk.
Every line passes the scope's ``Redactor`` first: a secret the server prints (a key in
its argument dump) reaches neither the file, the logger, nor an error message.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import BinaryIO

from ._redact import Redactor

__all__ = ["ServerLog", "log_file_name"]

logger = logging.getLogger("servescope.server")
events = logging.getLogger("servescope")

DEFAULT_MAX_BYTES = 20 * 1024 * 1024


def log_file_name(rank: int, node: int) -> str:
    """The per-rank log file name (datatrove's layout, so existing tooling finds it)."""
    return f"server_rank_{rank:05d}_node_{node}.log"


class ServerLog:
    """Collects one server's output lines.

    Lines are logged at INFO until the server is ready (start-up problems are then
    visible without configuration) and at DEBUG afterwards (a serving engine is chatty).
    """

    def __init__(
        self,
        *,
        rank: int,
        node: int,
        log_dir: Path | None,
        tail_lines: int = 50,
        max_bytes: int = DEFAULT_MAX_BYTES,
        redact: Redactor | None = None,
    ) -> None:
        self.rank = rank
        self.ready = False
        self.max_bytes = max_bytes
        self.redact = redact or Redactor()
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.path = None if log_dir is None else log_dir / log_file_name(rank, node)
        self._file: BinaryIO | None = None
        self._size = 0
        if self.path is not None:
            self._open()

    def add(self, stream: str, line: str) -> str:
        """Record one line the server printed on ``stream``; the line as recorded."""
        if self.redact:
            line = self.redact(line)
        self._keep(line)
        level = logging.DEBUG if self.ready else logging.INFO
        if logger.isEnabledFor(level):
            logger.log(level, "[rank %d %s] %s", self.rank, stream, line)
        return line

    def note(self, message: str) -> None:
        """Record an event of servescope's own (start attempt, teardown) beside the lines."""
        if self.redact:
            message = self.redact(message)
        self._keep(f"[servescope] {message}")
        self.flush()
        events.info("[rank %d] %s", self.rank, message)

    def _keep(self, line: str) -> None:
        self._tail.append(line)
        if self._file is None:
            return
        data = line.encode("utf-8", "replace") + b"\n"
        try:
            if self._size + len(data) > self.max_bytes and self._size > 0:
                self._rotate()
            self._file.write(data)
        except OSError as exc:
            self._give_up(exc)
            return
        self._size += len(data)

    def flush(self) -> None:
        """Push buffered lines to the file (called once per chunk read, not per line)."""
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as exc:
                self._give_up(exc)

    def tail(self) -> list[str]:
        """The most recent lines, oldest first."""
        return list(self._tail)

    def close(self) -> None:
        """Close the log file."""
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass  # buffered lines lost to a failing disk: nothing more to do

    def _open(self) -> None:
        assert self.path is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
            self._size = self._file.tell()
        except OSError as exc:
            self._give_up(exc)

    def _rotate(self) -> None:
        """The current file becomes ``.1`` (replacing the previous one); a new one starts."""
        assert self._file is not None and self.path is not None
        self._file.close()
        self._file = None
        self.path.replace(self.path.with_name(self.path.name + ".1"))
        self._file = self.path.open("ab")
        self._size = 0

    def _give_up(self, exc: OSError) -> None:
        """Stop writing the file: the server goes on, its lines in the ring and logger."""
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass
        message = f"log file {self.path} given up ({exc}); lines go on to the logger only"
        self._tail.append(f"[servescope] {message}")
        events.warning("[rank %d] %s", self.rank, message)
