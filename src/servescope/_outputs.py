"""A ``generate`` job's results file: written so a kill at any moment loses only what
was in flight, and read back (the ids done) to resume.

A plain results file (``.jsonl``, any name but those below) gets each result as one
``write`` of one whole line, flushed at once: a kill leaves at most one torn last line,
cut off on the next run.

A compressed one (``.gz``: gzip, ``.zst``: zstd) is written **a chunk at a time, each
chunk an independent gzip member or zstd frame** of whole lines, appended with one
``write``: every ``FRAME_LINES`` results, when ``FRAME_SECONDS`` have passed since the
chunk's first result (checked as results come), and when the job ends (Ctrl-C, SIGTERM
and a crashed server included). Both formats read a series of members as one stream
(``zcat``, ``zstdcat``, Python's ``gzip``). A kill loses the
chunk being gathered (those requests are sent again: still exactly once on disk) and
leaves at most one member cut short at the end; resuming decompresses member by member
and cuts the file back to the end of the last whole one. The other way, mending a torn
tail inside one long compressed stream, cannot work in general: a compressor's state at
the tear is gone, so the job would have to rewrite the whole file to append to it.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Callable
from json.scanner import make_scanner
from pathlib import Path
from typing import IO, Any, cast

from ._errors import ConfigError
from ._inputs import BLOCK, Truncated, compression, frames
from ._scan import output_keys

__all__ = ["FRAME_LINES", "FRAME_SECONDS", "FrameWriter", "LineWriter", "scan_results"]

EXCERPT = 200
FRAME_LINES = 1000
FRAME_SECONDS = 5.0
#: A member's ids held until it is known whole, at most (a job's own hold 1,000).
MEMBER_KEYS = 100_000
_scan = make_scanner(cast(Any, json.JSONDecoder()))  # typeshed: "context" is a ducktype


def _line(record: dict[str, Any]) -> bytes:
    """``record`` as one line of UTF-8 JSON.

    Non-ASCII text is written as itself; a string holding a lone surrogate (from a
    ``"\\ud800"`` escape in an input id or a server's reply) has no UTF-8 form, so that
    record is written with ``\\u`` escapes instead, which read back as the same string.
    """
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:
        return (json.dumps(record) + "\n").encode()


def _load_result(raw: bytes) -> Any:
    """``json.loads(raw)`` for an output line: the same value or the same error, in a
    third of the time (the scanner straight, when the line is one value and whitespace;
    ``json.loads`` itself otherwise, to say what is wrong)."""
    if raw.startswith(b'{"'):  # what json.loads detects as UTF-8
        text = raw.decode("utf-8", "surrogatepass")
        try:
            value, end = _scan(text, 0)
        except StopIteration:
            return json.loads(raw)
        if end == len(text) or not text[end:].strip(" \t\n\r"):
            return value
    return json.loads(raw)


def raw_key(key: object) -> bytes | None:
    """An id's ``IdSet`` key: an integer's digits, a string's UTF-8 in double quotes (as
    the id's JSON reads when it has no escape): ``1``, ``"1"`` and ``true`` apart;
    ``None`` for an id no input line can hold (a bool, a float, a list: in an output)."""
    if isinstance(key, str):
        return b'"' + key.encode("utf-8", "surrogatepass") + b'"'
    if isinstance(key, int) and not isinstance(key, bool):
        return b"%d" % key
    return None


class LineWriter:
    """Whole lines, one write and one flush each: never a torn line but the very last.

    Either to ``file``, already open (the results, appended), or to ``path``, opened
    afresh at the first line (this run's malformed lines: no empty errors file).
    """

    def __init__(self, path: Path, file: IO[bytes] | None = None) -> None:
        self.path = path
        self.file = file
        self.owned = file is None

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            self.file = self.path.open("wb")
        self.file.write(_line(record))
        self.file.flush()

    def close(self) -> None:
        if self.owned and self.file is not None:
            self.file.close()


def compressor(kind: str) -> Callable[[bytes], bytes]:
    """Whole data to one whole gzip member or zstd frame."""
    if kind == "gzip":
        return lambda data: gzip.compress(data, compresslevel=6, mtime=0)
    import zstandard

    return zstandard.ZstdCompressor(level=3).compress


class FrameWriter:
    """Results gathered into chunks, each appended as one compressed member (frame)."""

    def __init__(self, file: IO[bytes], kind: str) -> None:
        self.file = file
        self.compress = compressor(kind)
        self.lines: list[bytes] = []
        self.since = 0.0

    def write(self, record: dict[str, Any]) -> None:
        if not self.lines:
            self.since = time.monotonic()
        self.lines.append(_line(record))
        if len(self.lines) >= FRAME_LINES or time.monotonic() - self.since >= FRAME_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.lines:
            self.file.write(self.compress(b"".join(self.lines)))
            self.file.flush()
            self.lines.clear()

    def close(self) -> None:
        self.flush()


def _slow_keys(
    path: Path, block: bytes, number: int, torn_ok: bool, keys: list[bytes]
) -> int | None:
    """The lines of ``block`` one by one, parsed in full: their keys added to ``keys``.
    A line that is not a result refuses the file, unless it is the last one and
    ``torn_ok``: then the bytes of the block before it are returned (``None``: all good).
    """
    at = 0
    for offset, raw in enumerate(block.splitlines(keepends=True)):
        try:
            record = _load_result(raw) if raw.endswith(b"\n") else None
        except (ValueError, RecursionError):  # ValueError: bad JSON, bad UTF-8
            record = None
        if not isinstance(record, dict) or "id" not in record:
            if torn_ok and at + len(raw) == len(block):
                return at
            raise ConfigError(
                f"{path}:{number + offset} is not a result line of servescope generate "
                f"({raw[:EXCERPT]!r}); refusing to append to this file"
            )
        key = raw_key(record["id"])
        if key is not None:
            keys.append(key)
        at += len(raw)
    return None


def scan_results(path: Path, done: Callable[[list[bytes]], None]) -> tuple[int, int]:
    """The keys of the ids in the results file ``path``, handed to ``done`` a block at a
    time; returns ``(good, size)``: the bytes up to the end of the last whole result
    line (plain) or member (compressed), and the file's size. ``good < size``: a torn
    tail. Anything else that is not a result refuses the file (``ConfigError``)."""
    kind = compression(path)
    with path.open("rb") as file:
        if kind is None:
            return _scan_plain(path, file, done)
        return _scan_frames(path, file, kind, done)


def _scan_plain(
    path: Path, file: IO[bytes], done: Callable[[list[bytes]], None]
) -> tuple[int, int]:
    good = 0
    number = 1
    rest = b""
    chunk = file.read(BLOCK)
    while chunk:
        ahead = file.read(BLOCK)
        data = rest + chunk if rest else chunk
        cut = data.rfind(b"\n") + 1
        block, rest = data[:cut], data[cut:]
        chunk = ahead
        last = not ahead and not rest  # the file's last line is the block's
        keys = output_keys(block)
        if keys is None:
            keys = []
            torn = _slow_keys(path, block, number, last, keys)
            if torn is not None:
                done(keys)
                return good + torn, good + len(block)
        done(keys)
        good += len(block)
        number += block.count(b"\n")
    return good, good + len(rest)  # rest: a last line without its newline, torn


def _scan_frames(
    path: Path, file: IO[bytes], kind: str, done: Callable[[list[bytes]], None]
) -> tuple[int, int]:
    good = 0
    number = 1
    rest = b""
    keys: list[bytes] = []  # the member's so far: handed on once it is whole
    handed = False  # some of the member's keys handed on before its end (a huge member)
    size = path.stat().st_size
    try:
        for offset, data, last in frames(file, path, kind):
            data = rest + data if rest else data
            cut = data.rfind(b"\n") + 1
            block, rest = data[:cut], data[cut:]
            if block:
                found = output_keys(block)
                if found is None:
                    _slow_keys(path, block, number, False, keys)
                else:
                    keys += found
                number += block.count(b"\n")
                if len(keys) >= MEMBER_KEYS:  # not a member of ours: memory before all
                    done(keys)
                    keys, handed = [], True
            if last:
                if rest:
                    raise ConfigError(
                        f"{path}: a compressed member ending at byte {offset} ends in the "
                        "middle of a line: not a results file of servescope generate"
                    )
                done(keys)
                keys, handed = [], False
                good = offset
    except Truncated as torn:
        if handed:
            raise ConfigError(
                f"{path} ends with a member cut short that holds more than {MEMBER_KEYS} "
                "results: not one servescope generate wrote, and too big to cut off safely"
            ) from None
        return torn.start, size
    return good, size
