"""Turning a server's output into lines and lines into events — pure code, no I/O.

A server's stdout and stderr arrive as arbitrary byte chunks. ``LineSplitter``
cuts them into text lines with bounded memory: invalid UTF-8 is replaced, a line
longer than ``max_line_bytes`` is truncated (the rest of it is counted and
dropped), and a carriage return keeps only what a terminal would show (progress
bars redraw one line with ``\\r``).

``PatternTable.classify`` maps one line to a ``LineEvent``: the server says it is
ready, it hit a fatal error, or it failed in a way a fresh start on another port
can fix (its port was taken).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["LineEvent", "LineKind", "LineSplitter", "PatternTable", "compile_patterns"]

DEFAULT_MAX_LINE_BYTES = 64 * 1024


class LineKind(enum.Enum):
    """What a log line tells about the server."""

    READY = "ready"
    FATAL = "fatal"
    RETRY = "retry"


@dataclass(frozen=True)
class LineEvent:
    """A line that matched one of the backend's patterns.

    ``rank`` is the pattern's place in its list: backends list the specific causes
    (``CUDA out of memory``) before the generic consequences (``EngineCore failed to
    start``), so of several fatal lines the lowest rank says best what happened.
    """

    kind: LineKind
    pattern: str
    line: str
    rank: int = 0


def compile_patterns(patterns: Iterable[str]) -> tuple[re.Pattern[str], ...]:
    """Compile regular expressions, raising ``re.error`` naming the bad one."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise re.error(f"invalid pattern {pattern!r}: {exc}") from None
    return tuple(compiled)


@dataclass(frozen=True)
class PatternTable:
    """A backend's ready, fatal and retryable line patterns (regular expressions).

    A line is checked for a retryable failure first (``Address already in use`` is
    also an error, but one a new port fixes), then for a fatal one, then for readiness.
    """

    ready: tuple[re.Pattern[str], ...] = ()
    fatal: tuple[re.Pattern[str], ...] = ()
    retry: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def build(
        cls,
        *,
        ready: Sequence[str] = (),
        fatal: Sequence[str] = (),
        retry: Sequence[str] = (),
    ) -> PatternTable:
        """Compile a table from pattern strings."""
        return cls(compile_patterns(ready), compile_patterns(fatal), compile_patterns(retry))

    def extended(self, *, ready: Sequence[str] = (), fatal: Sequence[str] = ()) -> PatternTable:
        """This table plus a user's own ready and fatal patterns."""
        return PatternTable(
            self.ready + compile_patterns(ready), self.fatal + compile_patterns(fatal), self.retry
        )

    def classify(self, line: str) -> LineEvent | None:
        """The event this line signals, or ``None`` for an ordinary line."""
        for kind, patterns in (
            (LineKind.RETRY, self.retry),
            (LineKind.FATAL, self.fatal),
            (LineKind.READY, self.ready),
        ):
            for rank, pattern in enumerate(patterns):
                if pattern.search(line):
                    return LineEvent(kind, pattern.pattern, line, rank)
        return None


@dataclass
class LineSplitter:
    """Split a byte stream into decoded lines, holding at most ``max_line_bytes``.

    Feed it chunks as they arrive; call ``finish`` at end of stream for the last,
    unterminated line.
    """

    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    _buffer: bytearray = field(default_factory=bytearray, repr=False)
    _dropped: int = 0

    def feed(self, chunk: bytes) -> list[str]:
        """Lines completed by this chunk, in order."""
        lines: list[str] = []
        start = 0
        while (newline := chunk.find(b"\n", start)) != -1:
            self._take(chunk[start:newline])
            lines.append(self._emit())
            start = newline + 1
        self._take(chunk[start:])
        return lines

    def finish(self) -> list[str]:
        """The last line if the stream ended without a newline."""
        if not self._buffer and not self._dropped:
            return []
        return [self._emit()]

    def _take(self, data: bytes) -> None:
        # Keep the head of an overlong line; count (and drop) the rest until "\n".
        room = self.max_line_bytes - len(self._buffer)
        if room <= 0 or self._dropped:
            self._dropped += len(data)
            return
        self._buffer += data[:room]
        self._dropped += max(0, len(data) - room)

    def _emit(self) -> str:
        text = self._buffer.decode("utf-8", errors="replace").rstrip("\r")
        text = text.rpartition("\r")[2]
        if self._dropped:
            text += f" [... {self._dropped} more bytes of this line dropped]"
        self._buffer.clear()
        self._dropped = 0
        return text
