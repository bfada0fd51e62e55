"""The ``generate`` job: JSONL prompts in, one JSONL result per prompt out, resumable.

Crash safety comes from how the output is written: each finished request is one
``write`` of one whole line, flushed at once, so a job killed at any moment (SIGKILL
included) leaves every finished line on disk and at most one torn last line. On the next
run that torn tail is cut off, the ids already written are skipped, and nothing is ever
written twice. Requests in flight when the job died are simply sent again.

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

Memory does not hold the ids themselves. ``prepare`` reads the output (the ids done),
then the input, once each, before any server starts, and plans the run: an ``IdSet``
remembers each id as a 136-bit BLAKE2b digest and a state byte (done, to send, sent), 16
bytes, in slots of one ``bytearray`` sized from the files' line counts; and a bitmap of
input line numbers (a bit a line) marks the lines to send. The run parses only those
lines; a done line is skipped on its bit alone, and a job with nothing left to send
starts no server at all. That is about 18 bytes per distinct id with the slots' slack,
and a bit per line: peak memory 228 MiB for a job of 10 million prompts, all told, where
a ``set`` of the ids' JSON text took ~100 bytes an id (~1 GiB).

Digests are not confirmed against the ids: two different ids could in principle collide,
and the second be taken for the first (skipped as done, or reported as a duplicate).
With 136 bits, the chance that any two of n ids collide is below n² / 2¹³⁷: about 10⁻²⁷
for n = 10⁷, far below the chance of a memory error flipping the same bit. Ids are
digested in a form that keeps ``1``, ``"1"`` and ``true`` apart, as their JSON text did.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import reprlib
import time
from array import array
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from hashlib import blake2b
from json.scanner import make_scanner
from pathlib import Path
from typing import IO, Any, Protocol, cast

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from ._client import CHAT_PATH, COMPLETIONS_PATH
from ._errors import ConfigError, RequestError
from ._metrics import Metrics, MetricsSnapshot
from ._redact import Redactor
from ._responses import Completion

__all__ = [
    "Counts",
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

    ``total`` is the number of non-blank input lines when the job started; ``read`` the
    number it has read. Fewer read than there were once the job is through means the
    input shrank under it (``input_shrank``).
    """

    total: int = 0
    read: int = 0
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
        return self.read < self.total

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


#: An id's state in an ``IdSet``: in the output already, to be sent by this run, sent.
DONE, PENDING, SENT = 1, 2, 3
BUCKETS = 1 << 16
#: A digest's bytes: 2 pick the bucket, the other 15 are kept, with the state's byte.
DIGEST, RECORD = 17, 16
_scan = make_scanner(cast(Any, json.JSONDecoder()))  # typeshed: "context" is a ducktype


class IdSet:
    """Ids, each with a state (``DONE``, ``PENDING``, ``SENT``), in 16 bytes apiece.

    An id is kept as its 17-byte BLAKE2b digest: 2 bytes pick one of 65,536 buckets,
    which holds the other 15 and a byte for the state: 136 bits compared in all (see the
    module's docstring for what a collision would mean, and how unlikely it is). A
    bucket is searched with ``bytearray.find`` (C: a few hundred nanoseconds for the
    ~2.5 KiB a bucket holds at 10 million ids).

    The buckets are slots of one ``bytearray``, sized at the start for ``expected`` ids
    (a tenth more and a bit, as buckets fill unevenly): a bytearray a bucket, grown as
    it fills, cost 27 bytes an id in memory (its slack, and the holes its moves left).
    A bucket that outgrows its slot goes on in a ``bytearray`` of its own.
    """

    def __init__(self, expected: int = 0) -> None:
        mean = expected / BUCKETS
        self._width = RECORD * math.ceil(mean + 1.3 * math.sqrt(mean) + 2)
        self._slab = bytearray(self._width * BUCKETS)
        self._fill = array("I", [0]) * BUCKETS  # bytes used in each bucket's slot
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
        if isinstance(key, str):
            raw = b"s" + key.encode("utf-8", "surrogatepass")
        elif isinstance(key, int) and not isinstance(key, bool):
            raw = b"i%d" % key
        else:
            return None
        digest = blake2b(raw, digest_size=DIGEST).digest()
        bucket = digest[0] | digest[1] << 8
        needle = digest[2:]
        start = bucket * self._width
        end = start + self._fill[bucket]
        full = end == start + self._width
        found, at = self._slab, self._slab.find(needle, start, end)
        while at >= 0 and (at - start) % RECORD:  # a match across two records: not one
            at = found.find(needle, at + 1, end)
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
            self._slab[end : end + RECORD - 1] = needle
            self._slab[end + RECORD - 1] = state
            self._fill[bucket] += RECORD
        else:
            spill = self._overflow.setdefault(bucket, bytearray())
            spill += needle
            spill.append(state)
        self._len += 1
        return None


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


def resume(output: Path, ids: IdSet | None = None) -> IdSet:
    """The ids already in ``output``, put in ``ids`` as ``DONE``; a torn last line is
    cut off.

    Any other invalid line means the file is not ours (or two jobs wrote it): refuse.
    """
    ids = IdSet() if ids is None else ids
    if not output.exists():
        return ids
    good_end = 0
    with output.open("rb") as file:
        for number, raw in enumerate(file, 1):
            try:
                record = _load_result(raw) if raw.endswith(b"\n") else None
            except (ValueError, RecursionError):  # ValueError: bad JSON, bad UTF-8
                record = None
            if not isinstance(record, dict) or "id" not in record:
                if file.read(1):  # not the last line: not a torn tail
                    raise ConfigError(
                        f"{output}:{number} is not a result line of servescope generate "
                        f"({raw[:EXCERPT]!r}); refusing to append to this file"
                    )
                break
            ids.put(record["id"], DONE, replace=False)
            good_end += len(raw)
    if good_end != output.stat().st_size:
        with output.open("r+b") as file:
            file.truncate(good_end)
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


def _check(record: dict[str, Any]) -> str | int | None:
    """The record's id (``None``: none given) if it is a valid prompt, else ``ValueError``."""
    key = record.get("id")
    messages = record.get("messages")
    prompt = record.get("prompt")
    if key is not None and (not isinstance(key, str | int) or isinstance(key, bool)):
        raise ValueError(f"'id' must be a string or an integer, got {reprlib.repr(key)}")
    if (messages is None) == (prompt is None):
        raise ValueError("needs exactly one of 'messages' (a list) or 'prompt' (a string)")
    if messages is not None and (
        not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages)
    ):
        raise ValueError("'messages' must be a list of objects")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError("'prompt' must be a string")
    return key


def _parse(line: int, text: str) -> Prompt:
    """One input line into a ``Prompt``; ``ValueError`` says what is wrong."""
    record = _record(text)
    key = _check(record)
    params = dict(record)
    for name in ("id", "messages", "prompt"):
        params.pop(name, None)
    return Prompt(
        line,
        line if key is None else key,
        record.get("messages"),
        record.get("prompt"),
        params,
        key is None,
    )


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


class _Writer:
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


@dataclass
class Prepared:
    """What ``prepare`` found and planned, before any server starts.

    ``total``: the input's non-blank lines; ``ids``: the ids done (in the output) and to
    send; ``send``: a bitmap of the input line numbers to send (``left`` of them);
    ``skipped`` and ``malformed``: the lines already done, and those that are not valid
    prompts or repeat an id (in the errors file already). ``output`` is open for
    appending and locked; ``errors`` writes the errors file.
    """

    total: int
    ids: IdSet
    output: IO[bytes]
    errors: _Writer
    send: bytearray = field(default_factory=bytearray)
    left: int = 0
    skipped: int = 0
    malformed: int = 0

    def counts(self) -> Counts:
        """The job's counts as planned: every line read, the done ones skipped."""
        return Counts(
            total=self.total, read=self.total, skipped=self.skipped, malformed=self.malformed
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
    with _locked_output(job.output) as output:
        errors = _Writer(job.errors)
        try:
            expected = max(_newlines(job.input), _newlines(job.output))  # the ids, about
            prepared = Prepared(0, resume(job.output, IdSet(expected)), output, errors)
            _plan(job, prepared)
            yield prepared
        finally:
            errors.close()


def _newlines(path: Path) -> int:
    """The lines in ``path``, counted fast (a second for 2 GB)."""
    with path.open("rb") as file:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))


def _malformed(job: Job, errors: _Writer, number: int, message: str, text: str | None) -> None:
    logger.warning("%s:%d: %s (skipped)", job.input, number, message)
    record: dict[str, Any] = {"line": number, "error": message}
    if text is not None:
        record["text"] = text[:EXCERPT]
    errors.write(record)


def _plan(job: Job, prepared: Prepared) -> None:
    """Read the input once: count its lines, report the bad ones, mark the ones to send
    (an id neither done nor on an earlier line) and put their ids in as ``PENDING``."""
    ids = prepared.ids
    with job.input.open("rb") as file:
        for number, raw in enumerate(file, 1):
            if not raw.strip():
                continue
            prepared.total += 1
            text = raw.decode("utf-8", errors="replace")
            try:
                key = _check(_record(text))
            except ValueError as exc:
                prepared.malformed += 1
                _malformed(job, prepared.errors, number, str(exc), text)
                continue
            key = number if key is None else key
            state = ids.put(key, PENDING, replace=False)
            if state is None:
                prepared.left += 1
                prepared.mark(number)
            elif state == DONE:
                prepared.skipped += 1
            else:
                prepared.malformed += 1
                message = f"duplicate id {key!r} (already on an earlier line)"
                _malformed(job, prepared.errors, number, message, None)


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
    writer = _Writer(job.output, prepared.output)
    counts.read = 0
    progress.update(counts)
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(job.concurrency):
                tg.start_soon(_worker, server, job, receive.clone(), writer, counts, progress)
            receive.close()
            async with send:
                with job.input.open("rb") as file:
                    for number, raw in enumerate(file, 1):
                        if not raw.strip():
                            continue
                        counts.read += 1
                        if not prepared.to_send(number):
                            continue
                        text = raw.decode("utf-8", errors="replace")
                        try:
                            parsed = _parse(number, text)
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
    writer: _Writer,
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
