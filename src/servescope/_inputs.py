"""A ``generate`` job's files as users have them: JSONL plain, gzip or zstd, and Parquet.

The format is told by the name: ``.gz`` is gzip, ``.zst`` (or ``.zstd``) is zstd,
``.parquet`` (or ``.pq``) is Parquet; anything else is plain JSONL. Compressed data is
read through a decompressor object fed by hand, never a library's file reader: a stream
cut short or corrupt is then always an error (``ConfigError``, naming the file and the
byte where it broke), where zstandard's stream reader ends a truncated frame silently.
A gzip file of several members and a zstd file of several frames read as one stream (as
``zcat`` reads them): the job's own compressed output is written that way.

Parquet needs ``pyarrow`` (``pip install 'servescope[parquet]'``; without it a clear
error). Only the id, prompt and messages columns are read; a row is numbered from 1 as a
line is.
"""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from ._errors import ConfigError

__all__ = [
    "Fields",
    "blocks",
    "compression",
    "count_lines",
    "frames",
    "is_parquet",
    "parquet_rows",
]

#: Compressed bytes read at a time, and fed to a decompressor at a time (what comes out
#: is at most its compression ratio times more: 64 KiB of JSONL at 100:1 is 6.4 MB).
READ, FEED = 1 << 20, 1 << 16
#: Decompressed bytes handed on at a time, about (whole lines: up to the last newline).
BLOCK = 1 << 22
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True)
class Fields:
    """Where an input record holds its prompt: ``--prompt-field``, ``--messages-field``."""

    prompt: str = "prompt"
    messages: str = "messages"

    def __post_init__(self) -> None:
        for flag, name in (("--prompt-field", self.prompt), ("--messages-field", self.messages)):
            if not name or name == "id":
                raise ConfigError(f"{flag} must name a field other than 'id', got {name!r}")
        if self.prompt == self.messages:
            raise ConfigError(f"--prompt-field and --messages-field both name {self.prompt!r}")


def compression(path: Path) -> str | None:
    """``"gzip"``, ``"zstd"`` or ``None`` (plain), from the file's name."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return "gzip"
    if suffix in (".zst", ".zstd"):
        return "zstd"
    return None


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes) -> bytes: ...


def _decompressor(kind: str) -> _Decompressor:
    if kind == "gzip":
        return zlib.decompressobj(wbits=31)
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj()


def _corrupt_errors(kind: str) -> tuple[type[Exception], ...]:
    if kind == "gzip":
        return (zlib.error,)
    import zstandard

    return (zstandard.ZstdError,)


def frames(
    file: IO[bytes], path: Path, kind: str, size: int = READ
) -> Iterator[tuple[int, bytes, bool]]:
    """The decompressed data of a gzip or zstd file, member by member (frame by frame):
    ``(offset, data, last)`` where ``offset`` is the compressed offset of the end of the
    member the data belongs to once ``last`` is true (the member ended there), else of
    the data read so far.

    A member cut short at the end of the file raises ``Truncated`` (``offset``: where
    that member starts), after its data so far; corrupt data raises ``ConfigError``.
    """
    errors = _corrupt_errors(kind)
    name = "gzip" if kind == "gzip" else "zstd"
    unit = "member" if kind == "gzip" else "frame"
    magic = GZIP_MAGIC if kind == "gzip" else ZSTD_MAGIC
    offset = 0  # compressed bytes consumed by the members ended so far
    start = 0
    decoder: _Decompressor | None = None
    pending = b""
    while True:
        if not pending:
            pending = file.read(size)
            if not pending:
                if decoder is not None:
                    raise Truncated(path, name, unit, start)
                return
        feed, pending = pending[:FEED], pending[FEED:]  # its output bounded by its size
        if decoder is None:
            if not magic.startswith(feed[: len(magic)]):
                where = "" if offset == 0 else f" at byte {offset}, after its last whole {unit}"
                raise ConfigError(
                    f"{path} is not {name} data{where} (its name says {name}; it does not "
                    f"start with {name}'s magic bytes)"
                )
            decoder = _decompressor(kind)
            start = offset
        fed = feed
        try:
            data = decoder.decompress(fed)
        except errors as exc:
            raise ConfigError(
                f"{path} is corrupt: its {name} data is broken in the {unit} starting at "
                f"byte {start} ({exc})"
            ) from None
        if decoder.eof:
            unused = decoder.unused_data
            offset += len(fed) - len(unused)
            pending = unused + pending
            decoder = None
            yield offset, data, True
        else:
            offset += len(fed)
            if data:
                yield offset, data, False


class Truncated(ConfigError):
    """A compressed file ends in the middle of a member (frame): ``start`` is where it
    began, so a torn tail can be cut there."""

    def __init__(self, path: Path, name: str, unit: str, start: int) -> None:
        super().__init__(
            f"{path} is truncated: its {name} data ends in the middle of the {unit} starting "
            f"at byte {start} (the file was cut short)"
        )
        self.start = start


def _chunks(path: Path, size: int) -> Iterator[bytes]:
    """The bytes of a JSONL input, decompressed, read ``size`` bytes at a time."""
    kind = compression(path)
    with path.open("rb") as file:
        if kind is None:
            yield from iter(lambda: file.read(size), b"")
            return
        for _, data, _ in frames(file, path, kind, size):
            yield data


def blocks(path: Path, size: int = BLOCK) -> Iterator[tuple[int, bytes]]:
    """A JSONL input in blocks of whole lines: ``(number of the first line, bytes)``,
    each block ending with a newline (the last line of the file is given one); the file
    is read ``size`` bytes at a time (a change to the file is seen that much later)."""
    number = 1
    rest = b""
    for chunk in _chunks(path, size):
        data = rest + chunk if rest else chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            rest = data
            continue
        block, rest = data[:cut], data[cut:]
        yield number, block
        number += block.count(b"\n")
    if rest:
        yield number, rest + b"\n"


def count_lines(path: Path) -> int:
    """The lines of a JSONL input (decompressed), or the rows of a Parquet one."""
    if is_parquet(path):
        return _parquet_file(path).metadata.num_rows  # type: ignore[no-any-return]
    return sum(block.count(b"\n") for _, block in blocks(path))


def _pyarrow() -> Any:
    try:
        pyarrow = importlib.import_module("pyarrow")
        importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise ConfigError(
            "reading Parquet input needs pyarrow: pip install 'servescope[parquet]'"
        ) from None
    return pyarrow


def _parquet_file(path: Path) -> Any:
    pyarrow = _pyarrow()
    try:
        return pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a Parquet file pyarrow can read: {exc}") from None


def parquet_rows(path: Path, fields: Fields) -> Iterator[tuple[int, dict[str, Any]]]:
    """A Parquet input's rows as records: ``(row number from 1, {column: value})`` with
    the id, prompt and messages columns only (``None`` for a null)."""
    pyarrow = _pyarrow()
    table = _parquet_file(path)
    names = list(table.schema_arrow.names)
    if fields.prompt not in names and fields.messages not in names:
        shown = ", ".join(repr(name) for name in names[:20]) + (", ..." if len(names) > 20 else "")
        raise ConfigError(
            f"{path} has no column {fields.prompt!r} or {fields.messages!r} to read prompts "
            f"from (its columns: {shown}); name one with --prompt-field or --messages-field"
        )
    columns = [name for name in ("id", fields.prompt, fields.messages) if name in names]
    number = 1
    try:
        for batch in table.iter_batches(batch_size=8192, columns=columns):
            for row in batch.to_pylist():
                yield number, row
                number += 1
    except (pyarrow.ArrowException, OSError, ValueError) as exc:  # ValueError: bad UTF-8
        raise ConfigError(f"{path}: cannot read row {number} of this Parquet file: {exc}") from None
