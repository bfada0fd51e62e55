"""The ``generate`` job: JSONL prompts in, one JSONL result per prompt out, resumable.

Crash safety comes from how the output is written (``_outputs``): each finished request
is one ``write`` of one whole line, flushed at once (a compressed output: a chunk of
lines as one whole gzip member or zstd frame), so a job killed at any moment (SIGKILL
included) leaves every finished line on disk but those being gathered, and at most one
torn last line (member). On the next run that torn tail is cut off, the ids already
written are skipped, and nothing is ever written twice. Requests in flight when the job
died are simply sent again.

One job writes an output at a time: ``prepare`` takes an exclusive ``flock`` on the
output file itself before it reads it, and holds it until the job ends, so a second job
on the same file (a job array resubmitted while the first still runs) is refused before
its server starts. The lock dies with the process (SIGKILL included); no stale lock file
is left to clear. Everything that can be checked without a server is checked there too:
the input exists, the output and the errors file can be written.

Input lines are hostile until parsed: anything wrong with one (not JSON, nested past the
parser's recursion limit, a missing prompt) makes it a malformed line, reported and
skipped. A lone surrogate (``"\\ud800"``) is a valid JSON string but not valid UTF-8: a
record holding one is written with ``\\u`` escapes, which read back as the same string.
The input may be gzip, zstd or Parquet (``_inputs``), the prompt under another name
(``Fields``), and the job one shard of several (``_shards``).

Memory does not hold the ids themselves. ``prepare`` reads the output (the ids done),
then the input, once each, before any server starts, and plans the run: an ``IdSet``
remembers each id as a 96-bit digest and a state byte (done, to send, sent), 11 bytes,
in slots of one ``bytearray`` sized from the input's lines; and a bitmap of input line
numbers (a bit a line) marks the lines to send. The run parses only those lines; a done
line is skipped on its bit alone, and a job with nothing left to send starts no server
at all. That is about 13 bytes per distinct id with the slots' slack, and a bit per
line, where a ``set`` of the ids' JSON text took ~100 bytes an id (~1 GiB at 10 million).

Both files are read a block of lines at a time (``_scan``): the ids are read from the
lines' starts by one regular expression per block, a line whose id is done is skipped on
that id alone, and only the others are checked in full: a resume gets through ~320,000
lines a second (1 million done lines, output and input, in 3.1 s, start-up included).

Digests are not confirmed against the ids: two different ids could in principle collide,
and the second be taken for the first (skipped as done, or reported as a duplicate).
With 96 bits (a keyed 64-bit SipHash and a CRC-32), the chance that any two of n ids
collide is below n² / 2⁹⁷: about 10⁻¹⁵ for n = 10⁷, far below the chance of a memory
error flipping the same bit. Ids are digested in a form that keeps ``1``, ``"1"`` and
``true`` apart, as their JSON text did.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import reprlib
import struct
import time
import zlib
from array import array
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from json.scanner import make_scanner
from pathlib import Path
from typing import IO, Any, Protocol, cast

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from ._client import CHAT_PATH, COMPLETIONS_PATH
from ._errors import ConfigError, RequestError
from ._inputs import Fields, blocks, compression, count_lines, is_parquet, parquet_rows
from ._metrics import Metrics, MetricsSnapshot
from ._outputs import FrameWriter, LineWriter, raw_key, scan_results
from ._outputs import _line as _line  # (re-exported: the tests read lines as it writes)
from ._outputs import _load_result as _load_result
from ._redact import Redactor
from ._responses import Completion
from ._scan import InputShape, input_keys, line_key
from ._shards import Shard

__all__ = [
    "Counts",
    "Fields",
    "IdSet",
    "Job",
    "NoServer",
    "Prepared",
    "Progress",
    "Prompt",
    "prepare",
    "resume",
    "run_job",
]

EXCERPT = 200
#: ``flock`` errors that mean "this filesystem does not lock" (NFS without lockd, ...).
NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL})
logger = logging.getLogger("servescope")


@dataclass(frozen=True)
class Prompt:
    """One valid input line."""

    line: int
    id: str | int
    messages: list[dict[str, Any]] | None
    prompt: str | None
    params: dict[str, Any]
    id_from_line: bool


@dataclass
class Counts:
    """What the job did, for progress and the summary.

    ``lines`` is the number of non-blank input lines when the job started, ``total``
    those this job owns (all of them, or its shard's); ``read`` the number of lines it
    has read. Fewer read than there were once the job is through means the input shrank
    under it (``input_shrank``).
    """

    total: int = 0
    read: int = 0
    lines: int = 0
    skipped: int = 0
    malformed: int = 0
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.skipped + self.malformed + self.succeeded + self.failed

    @property
    def input_shrank(self) -> bool:
        """Fewer lines read than the input had at the start (valid once all are read)."""
        return self.read < max(self.lines, self.total)

    @property
    def errors(self) -> int:
        return self.failed + self.malformed

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    @property
    def requests_per_s(self) -> float:
        """Requests answered (a result or an error) per second so far."""
        return (self.succeeded + self.failed) / self.elapsed

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed


class Progress(Protocol):
    """Told after every line; ``close`` at the end."""

    def update(self, counts: Counts) -> None: ...

    def close(self, counts: Counts) -> None: ...


@dataclass(frozen=True)
class Job:
    """A ``generate`` run's files and settings.

    ``redact`` blanks the config's secrets out of the error messages written to the
    output: a server may quote the request's ``Authorization`` header in its answer.
    """

    input: Path
    output: Path
    errors: Path
    concurrency: int = 64
    params: dict[str, Any] = field(default_factory=dict)
    redact: Redactor = field(default_factory=Redactor)
    fields: Fields = field(default_factory=Fields)
    shard: Shard | None = None


#: An id's state in an ``IdSet``: in the output already, to be sent by this run, sent.
DONE, PENDING, SENT = 1, 2, 3
#: Buckets: 65,536, or more as needed to hold no more than ``MEAN`` ids each on average.
BUCKETS, MEAN = 1 << 16, 64
#: A digest's 12 bytes: 2 pick the bucket, the other 10 are kept, with the state's byte.
RECORD = 11
#: The digest: ``_hash(key)`` (64 bits) and ``_crc(key)`` (32); the tests put others here.
_hash = hash
_crc = zlib.crc32
_PACK = struct.Struct("<qI").pack
_scan = make_scanner(cast(Any, json.JSONDecoder()))  # typeshed: "context" is a ducktype
FIELDS = Fields()
#: The run reads the input this many bytes at a time (the plan: 4 MiB).
RUN_READ = 1 << 16
#: The bytes read at each end of a plain input to estimate its lines.
SAMPLE = 1 << 22


class IdSet:
    """Ids, each with a state (``DONE``, ``PENDING``, ``SENT``), in 11 bytes apiece.

    An id's key (``raw_key``: its digits, or its string's UTF-8 in quotes) is kept as a
    96-bit digest: its 64-bit SipHash (Python's own ``hash``, under the interpreter's
    random key: no input can be made to collide with another on purpose; the set lives
    in one process, so that key changing from run to run costs nothing) and its CRC-32.
    The low bits pick one of 65,536 buckets (more for more than 4 million ids: 64 ids a
    bucket at most, on average), which holds the other 80 bits (and the bucket's bits
    past the 16th again) and a byte for the state (see the module's docstring for what a
    collision would mean, and how unlikely it is). A bucket is searched with
    ``bytearray.find`` (C: some 100 nanoseconds for the ≤ 0.7 KiB a bucket holds on
    average). Two hashes in C and no digest object: ~0.2 µs an id, where BLAKE2b took
    0.35.

    The buckets are slots of one ``bytearray``, sized at the start for ``expected`` ids
    (a tenth more and a bit, as buckets fill unevenly): a bytearray a bucket, grown as
    it fills, cost 27 bytes an id in memory (its slack, and the holes its moves left).
    A bucket that outgrows its slot goes on in a ``bytearray`` of its own.
    """

    def __init__(self, expected: int = 0) -> None:
        buckets = BUCKETS
        while expected / buckets > MEAN:  # a bucket searched in one go stays short
            buckets *= 2
        self._mask = buckets - 1
        mean = expected / buckets
        self._width = RECORD * math.ceil(mean + 1.3 * math.sqrt(mean) + 2)
        self._slab = bytearray(self._width * buckets)
        self._fill = array("I", [0]) * buckets  # bytes used in each bucket's slot
        self._overflow: dict[int, bytearray] = {}
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __contains__(self, key: object) -> bool:
        return self.put(key, None) is not None

    def get(self, key: object) -> int | None:
        """``key``'s state, or ``None`` if it is not here."""
        return self.put(key, None)

    def add(self, key: object, state: int) -> int | None:
        """Add ``key`` with ``state`` unless it is here; its state before, if any."""
        return self.put(key, state, replace=False)

    def put(self, key: object, state: int | None, *, replace: bool = True) -> int | None:
        """Give ``key`` the ``state``, adding it if new (only look with ``None``; keep the
        state it has with ``replace=False``); return its state before, if any.

        An id no input line can hold (a ``true``, a float, a list: in an output only) is
        not kept: it could never match. ``1``, ``"1"`` and ``true`` stay apart.
        """
        raw = raw_key(key)
        if raw is None:
            return None
        return self.put_many([raw], state, replace=replace)[0]

    def put_many(
        self, keys: list[bytes], state: int | None, *, replace: bool = True
    ) -> list[int | None]:
        """``put`` for each id's key (``raw_key``), in order: their states before.

        The loop is written for speed (a resume puts millions): an id found where it
        belongs costs two hashes, a ``find`` and a few operations."""
        slab, fill, width, mask = self._slab, self._fill, self._width, self._mask
        hasher, crc, pack = _hash, _crc, _PACK
        befores: list[int | None] = []
        answer = befores.append
        change = state is not None and replace
        last = RECORD - 1
        added = 0
        for key in keys:
            first = hasher(key)
            needle = pack(first, crc(key))[2:]
            bucket = first & mask
            start = bucket * width
            used = fill[bucket]
            at = slab.find(needle, start, start + used)
            if at >= 0 and not (at - start) % RECORD:
                answer(slab[at + last])
                if change:
                    slab[at + last] = cast(int, state)
            elif at < 0 and used != width:  # not here, and its slot has room
                answer(None)
                if state is not None:
                    end = start + used
                    slab[end : end + last] = needle
                    slab[end + last] = state
                    fill[bucket] = used + RECORD
                    added += 1
            else:
                answer(self._rest(bucket, needle, state, replace))
        self._len += added
        return befores

    def append(self, keys: list[bytes], state: int) -> None:
        """Add each key with ``state`` without looking for it first: for the ids of an
        output, read before anything else is added, and never given another state for
        good (the run sets a done id back to ``DONE`` at once). A key written twice is
        then kept twice, both ``DONE``: harmless, and it saves a search an id."""
        slab, fill, width, mask = self._slab, self._fill, self._width, self._mask
        hasher, crc, pack = _hash, _crc, _PACK
        last = RECORD - 1
        added = 0
        for key in keys:
            first = hasher(key)
            needle = pack(first, crc(key))[2:]
            bucket = first & mask
            used = fill[bucket]
            if used != width:
                end = bucket * width + used
                slab[end : end + last] = needle
                slab[end + last] = state
                fill[bucket] = used + RECORD
                added += 1
            else:
                self._rest(bucket, needle, state, False)
        self._len += added

    def _rest(self, bucket: int, needle: bytes, state: int | None, replace: bool) -> int | None:
        """``put_many`` for an id not found at once in its bucket's slot."""
        slab, width, fill = self._slab, self._width, self._fill
        start = bucket * width
        end = start + fill[bucket]
        full = end == start + width
        found, at = slab, slab.find(needle, start, end)
        while at >= 0 and (at - start) % RECORD:  # a match across two records: not one
            at = slab.find(needle, at + 1, end)
        if at < 0 and full and bucket in self._overflow:
            found = self._overflow[bucket]
            at = found.find(needle)
            while at >= 0 and at % RECORD:
                at = found.find(needle, at + 1)
        if at >= 0:
            before: int = found[at + RECORD - 1]
            if state is not None and replace:
                found[at + RECORD - 1] = state
            return before
        if state is None:
            return None
        if not full:
            slab[end : end + RECORD - 1] = needle
            slab[end + RECORD - 1] = state
            fill[bucket] += RECORD
        else:
            spill = self._overflow.setdefault(bucket, bytearray())
            spill += needle
            spill.append(state)
        self._len += 1
        return None


def resume(output: Path, ids: IdSet | None = None) -> IdSet:
    """The ids already in ``output``, put in ``ids`` as ``DONE``; a torn tail (a last
    line, or a compressed output's last member, cut short) is cut off.

    Any other invalid line means the file is not ours (or two jobs wrote it): refuse.
    """
    ids = IdSet() if ids is None else ids
    if not output.exists():
        return ids

    def done(keys: list[bytes]) -> None:
        ids.append(keys, DONE)

    good, size = scan_results(output, done)
    if good != size:
        with output.open("r+b") as file:
            file.truncate(good)
    return ids


def _record(text: str) -> dict[str, Any]:
    """An input line's JSON object; ``ValueError`` says what is wrong."""
    try:
        try:
            record, end = _scan(text, 0)  # _loads, inlined: it runs once per input line
        except StopIteration:  # no value at 0: json.loads says what is wrong, if anything
            record, end = json.loads(text), len(text)
        if end != len(text) and text[end:].strip(" \t\n\r"):  # json's whitespace
            record = json.loads(text)  # raises "Extra data"
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    except RecursionError:
        raise ValueError("not JSON this parser can read: nested too deeply") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    return record


def _check(record: dict[str, Any], fields: Fields = FIELDS) -> str | int | None:
    """The record's id (``None``: none given) if it is a valid prompt, else ``ValueError``."""
    key = record.get("id")
    messages = record.get(fields.messages)
    prompt = record.get(fields.prompt)
    if key is not None and (not isinstance(key, str | int) or isinstance(key, bool)):
        raise ValueError(f"'id' must be a string or an integer, got {reprlib.repr(key)}")
    if (messages is None) == (prompt is None):
        raise ValueError(
            f"needs exactly one of {fields.messages!r} (a list) or {fields.prompt!r} (a string)"
        )
    if messages is not None and (
        not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages)
    ):
        raise ValueError(f"{fields.messages!r} must be a list of objects")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"{fields.prompt!r} must be a string")
    return key


def _parse(line: int, text: str, fields: Fields = FIELDS) -> Prompt:
    """One input line into a ``Prompt``; ``ValueError`` says what is wrong."""
    return _prompt(line, _record(text), fields)


def _prompt(line: int, record: dict[str, Any], fields: Fields = FIELDS) -> Prompt:
    """One input record (a line's object, a Parquet row) into a ``Prompt``."""
    key = _check(record, fields)
    params = dict(record)
    for name in ("id", fields.messages, fields.prompt):
        params.pop(name, None)
    return Prompt(
        line,
        line if key is None else key,
        record.get(fields.messages),
        record.get(fields.prompt),
        params,
        key is None,
    )


@dataclass
class Prepared:
    """What ``prepare`` found and planned, before any server starts.

    ``lines``: the input's non-blank lines; ``total``: those this job (its shard) owns;
    ``ids``: the ids done (in the output) and to send; ``send``: a bitmap of the input
    line numbers to send (``left`` of them); ``skipped`` and ``malformed``: the lines
    already done, and those that are not valid prompts or repeat an id (in the errors
    file already). ``output`` is open for appending and locked; ``errors`` writes the
    errors file.
    """

    total: int
    ids: IdSet
    output: IO[bytes]
    errors: LineWriter
    send: bytearray = field(default_factory=bytearray)
    left: int = 0
    skipped: int = 0
    malformed: int = 0
    lines: int = 0
    seconds: float = 0.0  # the output read and the input planned in

    def counts(self) -> Counts:
        """The job's counts as planned: every line read, the done ones skipped."""
        return Counts(
            total=self.total,
            read=self.lines,
            skipped=self.skipped,
            malformed=self.malformed,
            lines=self.lines,
        )

    def to_send(self, line: int) -> bool:
        index = line >> 3
        return index < len(self.send) and bool(self.send[index] >> (line & 7) & 1)

    def mark(self, line: int) -> None:
        index = line >> 3
        if index >= len(self.send):
            self.send.extend(bytes(index + 1 - len(self.send) + 4096))
        self.send[index] |= 1 << (line & 7)


@contextmanager
def prepare(job: Job) -> Iterator[Prepared]:
    """Before any server starts: check the input and the errors file's place, lock the
    output, read what it already holds, and plan the run (the malformed and repeated
    lines are reported here). ``ConfigError`` says what is wrong.

    The output stays locked until the block ends: a second job on it is refused here.
    """
    if not job.input.is_file():
        raise ConfigError(f"input file {str(job.input)!r} does not exist")
    _check_writable(job.output, "output")
    _check_writable(job.errors, "errors file")
    existed = job.output.exists()
    with _locked_output(job.output) as output:
        errors = LineWriter(job.errors)
        try:
            try:
                started = time.perf_counter()
                expected = _expected(job)
                prepared = Prepared(0, resume(job.output, IdSet(expected)), output, errors)
                _plan(job, prepared)
                prepared.seconds = time.perf_counter() - started
            except BaseException:  # a bad input (or Ctrl-C): no empty output left behind
                if not existed and job.output.stat().st_size == 0:
                    job.output.unlink()
                raise
            yield prepared
        finally:
            errors.close()


def _expected(job: Job) -> int:
    """About how many ids the job keeps: its input's lines (its shard's share). A plain
    input's are estimated from its size and its first and last 4 MiB (a count would read
    it all once more); an estimate short of the truth costs a little speed, not ids."""
    if compression(job.input) is not None or is_parquet(job.input):
        lines = count_lines(job.input)
    else:
        size = job.input.stat().st_size
        with job.input.open("rb") as file:
            sample = file.read(SAMPLE)
            if size > 2 * SAMPLE:
                file.seek(size - SAMPLE)
                sample += file.read(SAMPLE)
        lines = sample.count(b"\n")
        if len(sample) < size:
            lines = size * lines // max(len(sample), 1)
    if job.shard is not None:
        share = lines / job.shard.count
        lines = int(share + 4 * math.sqrt(share) + 16)
    return lines


def _newlines(path: Path) -> int:
    """The lines in ``path``, counted fast (a second for 2 GB)."""
    with path.open("rb") as file:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))


def _malformed(job: Job, errors: LineWriter, number: int, message: str, text: str | None) -> None:
    logger.warning("%s:%d: %s (skipped)", job.input, number, message)
    record: dict[str, Any] = {"line": number, "error": message}
    if text is not None:
        record["text"] = text[:EXCERPT]
    errors.write(record)


def _key_object(raw: bytes) -> str | int:
    """An ``IdSet`` key back as the id (for a message)."""
    if raw[:1] == b'"':
        return raw[1:-1].decode("utf-8", "surrogatepass")
    return int(raw)


#: A line (or row) to check before it counts, or ``None``: checked already.
Item = bytes | None


class _Planner:
    """Takes the input's lines as numbered ids, a batch at a time: the done ones are
    skipped on their id, the others checked, then marked to send or reported."""

    def __init__(
        self,
        job: Job,
        prepared: Prepared,
        report: Callable[[int, str, str | None], None] | None = None,
    ) -> None:
        self.job = job
        self.prepared = prepared
        self.report = report or partial(_malformed, job, prepared.errors)
        self.shape = InputShape(job.fields.prompt, job.fields.messages)
        self.numbers: list[int] = []
        self.keys: list[bytes] = []
        self.items: list[Item] = []

    def malformed(self, number: int, message: str, text: str | None) -> None:
        """A line with no id to go by: reported by one shard, by its line number."""
        self.flush()  # the lines before it first: the errors file in line order
        self.prepared.lines += 1
        shard = self.job.shard
        if shard is None or shard.owns_line(number):
            self.prepared.total += 1
            self.prepared.malformed += 1
            self.report(number, message, text)

    def add(self, number: int, key: bytes, item: Item) -> None:
        self.numbers.append(number)
        self.keys.append(key)
        self.items.append(item)
        if len(self.keys) >= 8192:
            self.flush()

    def flush(self) -> None:
        if self.keys:
            items = self.items
            self.take(self.numbers, self.keys, items.__getitem__)
            self.numbers, self.keys, self.items = [], [], []

    def problem(self, item: Item) -> tuple[str, str] | None:
        """What is wrong with a line, and its text; ``None``: a valid prompt."""
        if item is None or self.shape.valid(item):
            return None
        text = item.decode("utf-8", errors="replace")
        try:
            _check(_record(text), self.job.fields)
        except ValueError as exc:
            return str(exc), text
        return None

    def take(self, numbers: Sequence[int], keys: list[bytes], item: Callable[[int], Item]) -> None:
        """Lines ``numbers`` hold the ids ``keys`` (``item(i)``: the i-th line, to check):
        skip those done, mark those to send (an id neither done nor on an earlier line,
        put in as ``PENDING``), report the others."""
        prepared = self.prepared
        prepared.lines += len(keys)
        shard = self.job.shard
        places: Sequence[int] = range(len(keys))
        mine = keys
        if shard is not None:
            places = [i for i, key in enumerate(keys) if shard.owns(key)]
            mine = [keys[i] for i in places]
        prepared.total += len(places)
        states = prepared.ids.put_many(mine, None)
        done = states.count(DONE)
        prepared.skipped += done
        if done == len(states):  # the usual case of a resumed job
            return
        valid: list[int] = []
        reports: list[tuple[int, str, str | None]] = []
        for place, state in zip(places, states, strict=True):
            if state == DONE:
                continue
            problem = self.problem(item(place))
            if problem is None:
                valid.append(place)
            else:
                reports.append((numbers[place], *problem))
        states = prepared.ids.put_many([keys[i] for i in valid], PENDING, replace=False)
        for place, state in zip(valid, states, strict=True):
            if state is None:
                prepared.left += 1
                prepared.mark(numbers[place])
            else:
                message = f"duplicate id {_key_object(keys[place])!r} (already on an earlier line)"
                reports.append((numbers[place], message, None))
        prepared.malformed += len(reports)
        for number, message, text in sorted(reports, key=lambda report: report[0]):
            self.report(number, message, text)


def _plan(
    job: Job,
    prepared: Prepared,
    report: Callable[[int, str, str | None], None] | None = None,
) -> None:
    """Read the input once: count its lines, report the bad ones, mark the ones to send
    (an id neither done nor on an earlier line) and put their ids in as ``PENDING``.

    A block of lines whose ids ``_scan`` reads is taken in one go; the lines of any other
    block one by one (parsed in full if their id cannot be read from their start).
    """
    planner = _Planner(job, prepared, report)
    if is_parquet(job.input):
        for number, row in parquet_rows(job.input, job.fields):
            try:
                key = _check(row, job.fields)
            except ValueError as exc:
                planner.malformed(number, str(exc), reprlib.repr(row))
                continue
            raw = raw_key(number if key is None else key)
            assert raw is not None
            planner.add(number, raw, None)
        planner.flush()
        return
    for first, block in blocks(job.input):
        keys = input_keys(block, first)
        if keys is not None:
            planner.flush()
            rows: list[bytes] = []

            def line(i: int, block: bytes = block, rows: list[bytes] = rows) -> Item:
                if not rows:
                    rows += block.split(b"\n")
                return rows[i]

            planner.take(range(first, first + len(keys)), keys, line)
            continue
        for number, raw in enumerate(block.split(b"\n")[:-1], first):
            if not raw.strip():
                continue
            found = line_key(raw, number)
            if found is not None:
                planner.add(number, found, raw)
                continue
            text = raw.decode("utf-8", errors="replace")
            try:
                key = _check(_record(text), job.fields)
            except ValueError as exc:
                planner.malformed(number, str(exc), text)
                continue
            raw_id = raw_key(number if key is None else key)
            assert raw_id is not None
            planner.add(number, raw_id, None)
    planner.flush()


def _check_writable(path: Path, what: str) -> None:
    """``path`` can be written, checked without making it: no empty errors file (it is
    made at the first malformed line), no output file left by a job refused here."""
    problem = None
    if path.is_dir():
        problem = "it is a directory"
    elif what == "output" and path.exists() and not path.is_file():
        problem = "it is not a regular file"
    elif path.exists():
        if not os.access(path, os.W_OK):
            problem = "permission denied"
    elif not path.parent.exists():
        problem = f"directory {str(path.parent)!r} does not exist"
    elif not path.parent.is_dir():
        problem = f"{str(path.parent)!r} is not a directory"
    elif not os.access(path.parent, os.W_OK | os.X_OK):
        problem = f"cannot create files in {str(path.parent)!r}"
    if problem is not None:
        raise ConfigError(f"cannot write the {what} {str(path)!r}: {problem}")


@contextmanager
def _locked_output(path: Path) -> Iterator[IO[bytes]]:
    """``path`` opened for appending (made if missing) under an exclusive ``flock``.

    Opening it is the final check that it can be written. A filesystem that cannot
    lock costs only the protection: the job goes on, with a warning.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    except OSError as exc:
        raise ConfigError(f"cannot write the output {str(path)!r}: {exc.strerror}") from None
    with os.fdopen(fd, "ab") as file:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{path} is being written by another servescope generate job (it holds "
                "the file's lock); wait for that job to end, or write to another file"
            ) from None
        except OSError as exc:
            if exc.errno not in NO_LOCKS:
                raise ConfigError(f"cannot lock the output {str(path)!r}: {exc}") from None
            logger.warning(
                "cannot lock %s (%s): going on unlocked; make sure no other job writes it",
                path,
                exc.strerror,
            )
        yield file


class Serving(Protocol):
    """What a job sends requests through: a ``Server`` or a ``Pool``."""

    def request(
        self, payload: dict[str, Any], *, path: str | None = None
    ) -> Coroutine[Any, Any, dict[str, Any]]: ...

    def parse_completion(self, response: dict[str, Any]) -> Completion: ...

    @property
    def metrics(self) -> MetricsSnapshot: ...


class NoServer:
    """Stands for the server in the summary of a job that had nothing to send."""

    @property
    def metrics(self) -> MetricsSnapshot:
        return Metrics().snapshot(0)


def _records(job: Job) -> Iterator[tuple[int, bytes | dict[str, Any]]]:
    """The input's non-blank lines (rows) with their numbers, as read."""
    if is_parquet(job.input):
        yield from parquet_rows(job.input, job.fields)
        return
    for first, block in blocks(job.input, RUN_READ):
        for number, raw in enumerate(block.split(b"\n")[:-1], first):
            if raw.strip():
                yield number, raw


async def run_job(
    server: Serving, job: Job, prepared: Prepared, progress: Progress, counts: Counts
) -> None:
    """Send every input line ``prepared`` marked through ``server``; write the results
    to ``prepared.output``. ``counts`` (from ``prepared.counts()``) is updated as lines
    finish (the caller reports it, even if the job is interrupted); once the job is
    through, ``counts.input_shrank`` says whether the input was cut short under it.

    A marked line is checked again as it is sent: if the input changed since the plan,
    an id done or sent already is still never sent twice.
    """
    ids = prepared.ids
    send, receive = anyio.create_memory_object_stream[Prompt](job.concurrency)
    kind = compression(job.output)
    writer: LineWriter | FrameWriter = (
        LineWriter(job.output, prepared.output)
        if kind is None
        else FrameWriter(prepared.output, kind)
    )
    counts.read = 0
    progress.update(counts)
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(job.concurrency):
                tg.start_soon(_worker, server, job, receive.clone(), writer, counts, progress)
            receive.close()
            async with send:
                for number, item in _records(job):
                    counts.read += 1
                    if not prepared.to_send(number):
                        continue
                    text = (
                        item.decode("utf-8", errors="replace") if isinstance(item, bytes) else None
                    )
                    try:
                        if text is not None:
                            parsed = _parse(number, text, job.fields)
                        else:
                            assert isinstance(item, dict)
                            parsed = _prompt(number, item, job.fields)
                    except ValueError as exc:
                        counts.malformed += 1
                        _malformed(job, prepared.errors, number, str(exc), text)
                        progress.update(counts)
                        continue
                    state = ids.put(parsed.id, SENT)
                    if state == DONE:
                        ids.put(parsed.id, DONE)
                        counts.skipped += 1
                        progress.update(counts)
                        continue
                    if state == SENT:
                        counts.malformed += 1
                        message = f"duplicate id {parsed.id!r} (already on an earlier line)"
                        _malformed(job, prepared.errors, number, message, None)
                        progress.update(counts)
                        continue
                    await send.send(parsed)
    finally:
        writer.close()


async def _worker(
    server: Serving,
    job: Job,
    prompts: MemoryObjectReceiveStream[Prompt],
    writer: LineWriter | FrameWriter,
    counts: Counts,
    progress: Progress,
) -> None:
    async with prompts:
        async for prompt in prompts:
            record: dict[str, Any] = {"id": prompt.id}
            if prompt.id_from_line:
                record["id_from_line_number"] = True
            payload, path = _payload(job, prompt)
            try:
                out = server.parse_completion(await server.request(payload, path=path))
            except RequestError as exc:  # failed for good; a dead server raises ServerError
                record["error"] = {"type": type(exc).__name__, "message": job.redact(str(exc))}
                counts.failed += 1
            else:
                record.update(text=out.text, finish_reason=out.finish_reason)
                record["usage"] = {
                    "prompt_tokens": out.usage.prompt_tokens,
                    "completion_tokens": out.usage.completion_tokens,
                }
                if out.reasoning is not None:
                    record["reasoning"] = out.reasoning
                counts.succeeded += 1
                counts.prompt_tokens += out.usage.prompt_tokens
                counts.completion_tokens += out.usage.completion_tokens
            writer.write(record)
            progress.update(counts)


def _payload(job: Job, prompt: Prompt) -> tuple[dict[str, Any], str]:
    """The request for ``prompt``, and its path. A payload, not keyword arguments: an
    input line's parameters may have any name (``self`` included)."""
    payload = {**job.params, **prompt.params}
    if prompt.messages is not None:
        return {**payload, "messages": prompt.messages}, CHAT_PATH
    return {**payload, "prompt": prompt.prompt}, COMPLETIONS_PATH
