"""Turning a server's output into lines and lines into events — pure code, no I/O.

A server's stdout and stderr arrive as arbitrary byte chunks. ``LineSplitter``
cuts them into text lines with bounded memory: invalid UTF-8 is replaced, a line
longer than ``max_line_bytes`` is truncated (the rest of it is counted and
dropped), and a carriage return keeps only what a terminal would show (progress
bars redraw one line with ``\\r``).

``LineClassifier`` maps one line to a ``LineEvent``: the server says it is ready, it
hit a fatal error, or it failed in a way a fresh start on another port can fix (its
port was taken). What counts as fatal changes at readiness: before it any line that
matches; after it only the engine's own error records and tracebacks, so that a
prompt quoting ``CUDA out of memory`` cannot kill a healthy server (``PatternTable``).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "LineClassifier",
    "LineEvent",
    "LineKind",
    "LineSplitter",
    "LogFormat",
    "PatternTable",
    "compile_patterns",
]

DEFAULT_MAX_LINE_BYTES = 64 * 1024


class LineKind(enum.Enum):
    """What a log line tells about the server."""

    READY = "ready"
    FATAL = "fatal"
    RETRY = "retry"
    CAUSE = "cause"  # after readiness: explains a death, is not one by itself


@dataclass(frozen=True)
class LineEvent:
    """A line that matched one of the backend's patterns.

    ``rank`` orders fatal events from most to least specific: backends list the causes
    (``CUDA out of memory``) before the consequences (``EngineCore failed to start``),
    a user's patterns come after those, an engine's death announcements last. Of several
    fatal lines the lowest rank says best what happened.
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


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: vLLM's (and Ray's) per-process decoration: ``(APIServer pid=4101) ``,
#: ``(RayWorkerWrapper pid=77, ip=10.0.0.2) ``. Bounded and without nested repetition:
#: it runs on every line, and a hostile line must not make it backtrack for seconds.
_DECORATION = re.compile(r"\(([^()]{1,200})\)\s+")
ERROR_LEVELS = frozenset({"ERROR", "CRITICAL", "FATAL"})


@dataclass(frozen=True)
class LogFormat:
    """How an engine's own log records look, so that after readiness only its own error
    records count: a user's prompt or a model's answer echoed by request logging sits
    in an INFO record (or in the middle of a line) and can announce nothing.

    ``record`` matches one record line (after colour codes and the process decoration
    are removed), with a ``message`` group and, where the format has one, ``level``.
    """

    record: re.Pattern[str] | None = None

    @classmethod
    def build(cls, record: str | None) -> LogFormat:
        """A format from its record regular expression (``None``: records unknown)."""
        return cls(re.compile(record) if record is not None else None)

    def split(self, line: str) -> tuple[bool, str]:
        """``(is_error_record, text)``: whether ``line`` is an error-level record of the
        engine's own logger, and its message (or the bare line if it is no record)."""
        text = _ANSI.sub("", line)
        decoration = _DECORATION.match(text)
        if decoration is not None and "pid=" in decoration.group(1):
            text = text[decoration.end() :]
        match = self.record.match(text) if self.record is not None else None
        if match is None:
            return False, text
        level = match.groupdict().get("level")
        return level is None or level.upper() in ERROR_LEVELS, match.group("message")


_TRACEBACK_HEADER = "Traceback (most recent call last):"
#: The line that ends a traceback: ``torch.OutOfMemoryError: CUDA out of memory...``
#: (an exception class, not any ``Word: text`` such as SGLang's ``Receive: obj=...``).
_EXCEPTION_LINE = re.compile(
    r"(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Exit|Interrupt|Warning)(?::.*)?"
)


@dataclass(frozen=True)
class PatternTable:
    """A backend's ready, fatal, retryable and death line patterns (regular expressions).

    Before readiness every line counts: a line is checked for a retryable failure first
    (``Address already in use`` is also an error, but one a new port fixes), then for a
    fatal one (the backend's, then the user's), then for readiness.

    After readiness the server is serving other people's text, which its request
    logging may echo, so only the user's own ``fatal_patterns`` still match anywhere. The
    backend's patterns count only in an *error message*: an error-level record of the
    engine's own ``format``, or the exception line that ends a Python traceback. There a
    ``death`` pattern (the engine announcing its own end: ``EngineCore encountered a
    fatal error``) fails the server, and a ``fatal`` pattern opening the message (or in
    an exception's text) is a cause that explains it. A backend without ``death``
    patterns treats its ``fatal`` ones as deaths then.
    """

    ready: tuple[re.Pattern[str], ...] = ()
    fatal: tuple[re.Pattern[str], ...] = ()
    retry: tuple[re.Pattern[str], ...] = ()
    death: tuple[re.Pattern[str], ...] = ()
    user_fatal: tuple[re.Pattern[str], ...] = ()
    format: LogFormat = field(default_factory=LogFormat)

    @classmethod
    def build(
        cls,
        *,
        ready: Sequence[str] = (),
        fatal: Sequence[str] = (),
        retry: Sequence[str] = (),
        death: Sequence[str] = (),
        record: str | None = None,
    ) -> PatternTable:
        """Compile a table from pattern strings (``record``: see ``LogFormat``)."""
        return cls(
            compile_patterns(ready),
            compile_patterns(fatal),
            compile_patterns(retry),
            compile_patterns(death),
            format=LogFormat.build(record),
        )

    def extended(self, *, ready: Sequence[str] = (), fatal: Sequence[str] = ()) -> PatternTable:
        """This table plus a user's own ready and fatal patterns."""
        return dataclasses.replace(
            self,
            ready=self.ready + compile_patterns(ready),
            user_fatal=self.user_fatal + compile_patterns(fatal),
        )

    def classify(self, line: str) -> LineEvent | None:
        """The event this line signals before readiness, or ``None`` for an ordinary line."""
        fatal = self.fatal + self.user_fatal
        for kind, patterns in (
            (LineKind.RETRY, self.retry),
            (LineKind.FATAL, fatal),
            (LineKind.READY, self.ready),
        ):
            for rank, pattern in enumerate(patterns):
                if pattern.search(line):
                    return LineEvent(kind, pattern.pattern, line, rank)
        return None

    def classify_ready(self, line: str, message: str | None) -> LineEvent | None:
        """The event a line signals after readiness; ``message`` is its error message
        (error record or exception line, see the class docstring), if it has one."""
        causes, user = len(self.fatal), len(self.user_fatal)
        for rank, pattern in enumerate(self.user_fatal, causes):
            if pattern.search(line):
                return LineEvent(LineKind.FATAL, pattern.pattern, line, rank)
        if message is None:
            return None
        death = self.death or self.fatal
        for rank, pattern in enumerate(death, causes + user):
            if pattern.search(message):
                return LineEvent(LineKind.FATAL, pattern.pattern, line, rank)
        # A cause opens the message ("No available memory for ..."), or is an exception's
        # text ("torch.OutOfMemoryError: CUDA out of memory"), never a quote inside it
        # ("Error in preprocessing prompt inputs: '... CUDA out of memory ...'").
        exception = _EXCEPTION_LINE.fullmatch(message) is not None
        for rank, pattern in enumerate(self.fatal):
            if (pattern.search if exception else pattern.match)(message):
                return LineEvent(LineKind.CAUSE, pattern.pattern, line, rank)
        return None


@dataclass
class LineClassifier:
    """Classifies one output stream's lines in order: a traceback spans several lines,
    and whether its last line is an error message depends on the lines before it."""

    table: PatternTable
    _in_traceback: bool = False

    def classify(self, line: str, *, ready: bool) -> LineEvent | None:
        """The event ``line`` signals, before or after the server became ready."""
        is_error, text = self.table.format.split(line)
        exception_line = self._exception_line(text)
        if not ready:
            return self.table.classify(line)
        message = text if is_error else exception_line
        return self.table.classify_ready(line, message)

    def _exception_line(self, text: str) -> str | None:
        """``text`` if it ends a traceback (``SomeError: ...`` after the frames)."""
        if text.rstrip().endswith(_TRACEBACK_HEADER):
            self._in_traceback = True
            return None
        if not self._in_traceback or not text.strip() or text[0] in " \t":
            return None  # frames, code and carets are indented
        self._in_traceback = False
        return text if _EXCEPTION_LINE.fullmatch(text) else None


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
