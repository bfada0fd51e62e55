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
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import reprlib
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from ._client import CHAT_PATH, COMPLETIONS_PATH
from ._errors import ConfigError, RequestError
from ._metrics import MetricsSnapshot
from ._redact import Redactor
from ._responses import Completion

__all__ = [
    "Counts",
    "Job",
    "Prepared",
    "Progress",
    "Prompt",
    "count_lines",
    "prepare",
    "read_prompts",
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


def resume(output: Path) -> set[str]:
    """The ids already in ``output`` (as JSON text); a torn last line is cut off.

    Any other invalid line means the file is not ours (or two jobs wrote it): refuse.
    """
    if not output.exists():
        return set()
    done: set[str] = set()
    good_end = 0
    with output.open("rb") as file:
        for number, raw in enumerate(file, 1):
            try:
                record = json.loads(raw) if raw.endswith(b"\n") else None
            except (ValueError, RecursionError):  # ValueError: bad JSON, bad UTF-8
                record = None
            if not isinstance(record, dict) or "id" not in record:
                if file.read(1):  # not the last line: not a torn tail
                    raise ConfigError(
                        f"{output}:{number} is not a result line of servescope generate "
                        f"({raw[:EXCERPT]!r}); refusing to append to this file"
                    )
                break
            done.add(json.dumps(record["id"]))
            good_end += len(raw)
    if good_end != output.stat().st_size:
        with output.open("r+b") as file:
            file.truncate(good_end)
    return done


def _parse(line: int, text: str) -> Prompt:
    """One input line into a ``Prompt``; ``ValueError`` says what is wrong."""
    try:
        record = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    except RecursionError:
        raise ValueError("not JSON this parser can read: nested too deeply") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    params = dict(record)
    key = params.pop("id", None)
    messages = params.pop("messages", None)
    prompt = params.pop("prompt", None)
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
    return Prompt(line, line if key is None else key, messages, prompt, params, key is None)


def read_prompts(path: Path) -> Iterator[tuple[int, str, Prompt | ValueError]]:
    """Each non-blank input line: its number, its text, and the prompt or the problem.

    Lines and blanks are told apart on bytes, exactly as ``count_lines`` does, so that
    the lines read can be checked against the count taken at the start.
    """
    with path.open("rb") as file:
        for number, raw in enumerate(file, 1):
            if not raw.strip():
                continue
            text = raw.decode("utf-8", errors="replace")
            try:
                yield number, text, _parse(number, text)
            except ValueError as exc:
                yield number, text, exc


def count_lines(path: Path) -> int:
    """Non-blank lines in ``path`` (the progress total)."""
    with path.open("rb") as file:
        return sum(1 for raw in file if raw.strip())


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


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` found: the input's non-blank lines, the ids already done, and
    the output file, open for appending and locked."""

    total: int
    done: set[str]
    output: IO[bytes]


@contextmanager
def prepare(job: Job) -> Iterator[Prepared]:
    """Before any server starts: check the input and the errors file's place, lock the
    output, read what it already holds. ``ConfigError`` says what is wrong.

    The output stays locked until the block ends: a second job on it is refused here.
    """
    if not job.input.is_file():
        raise ConfigError(f"input file {str(job.input)!r} does not exist")
    _check_writable(job.output, "output")
    _check_writable(job.errors, "errors file")
    with _locked_output(job.output) as output:
        done = resume(job.output)
        yield Prepared(count_lines(job.input), done, output)


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


async def run_job(
    server: Serving, job: Job, prepared: Prepared, progress: Progress, counts: Counts
) -> None:
    """Send every input line whose id is not in ``prepared.done`` through ``server``;
    write the results to ``prepared.output``. ``counts`` is updated as lines finish (the
    caller reports it, even if the job is interrupted); once the job is through,
    ``counts.input_shrank`` says whether the input was cut short under it.
    """
    done = prepared.done
    send, receive = anyio.create_memory_object_stream[Prompt](job.concurrency)
    writer, error_writer = _Writer(job.output, prepared.output), _Writer(job.errors)
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(job.concurrency):
                tg.start_soon(_worker, server, job, receive.clone(), writer, counts, progress)
            receive.close()
            async with send:
                seen: set[str] = set()
                for number, text, parsed in read_prompts(job.input):
                    counts.read += 1
                    if isinstance(parsed, ValueError):
                        logger.warning("%s:%d: %s (skipped)", job.input, number, parsed)
                        counts.malformed += 1
                        error_writer.write(
                            {"line": number, "error": str(parsed), "text": text[:EXCERPT]}
                        )
                        progress.update(counts)
                        continue
                    key = json.dumps(parsed.id)
                    if key in done:
                        counts.skipped += 1
                        progress.update(counts)
                        continue
                    if key in seen:
                        counts.malformed += 1
                        message = f"duplicate id {parsed.id!r} (already on an earlier line)"
                        logger.warning("%s:%d: %s (skipped)", job.input, number, message)
                        error_writer.write({"line": number, "error": message})
                        progress.update(counts)
                        continue
                    seen.add(key)
                    await send.send(parsed)
    finally:
        writer.close()
        error_writer.close()


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
