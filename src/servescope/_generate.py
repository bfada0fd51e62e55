"""The ``generate`` job: JSONL prompts in, one JSONL result per prompt out, resumable.

Crash safety comes from how the output is written: each finished request is one
``write`` of one whole line, flushed at once, so a job killed at any moment (SIGKILL
included) leaves every finished line on disk and at most one torn last line. On the next
run that torn tail is cut off, the ids already written are skipped, and nothing is ever
written twice. Requests in flight when the job died are simply sent again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from ._errors import ConfigError, RequestError
from ._server import Server

__all__ = [
    "Counts",
    "Job",
    "Progress",
    "Prompt",
    "check_input",
    "read_prompts",
    "resume",
    "run_job",
]

EXCERPT = 200
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
    """What the job did, for progress and the summary."""

    total: int = 0
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
    """A ``generate`` run's files and settings."""

    input: Path
    output: Path
    errors: Path
    concurrency: int = 64
    params: dict[str, Any] = field(default_factory=dict)


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
            except ValueError:
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
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    params = dict(record)
    key = params.pop("id", None)
    messages = params.pop("messages", None)
    prompt = params.pop("prompt", None)
    if key is not None and (not isinstance(key, str | int) or isinstance(key, bool)):
        raise ValueError(f"'id' must be a string or an integer, got {key!r}")
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
    """Each non-blank input line: its number, its text, and the prompt or the problem."""
    with path.open(encoding="utf-8", errors="replace") as file:
        for number, text in enumerate(file, 1):
            if not text.strip():
                continue
            try:
                yield number, text, _parse(number, text)
            except ValueError as exc:
                yield number, text, exc


def count_lines(path: Path) -> int:
    """Non-blank lines in ``path`` (the progress total)."""
    with path.open("rb") as file:
        return sum(1 for raw in file if raw.strip())


class _Writer:
    """Whole lines, one write and one flush each: never a torn line but the very last.

    The file is opened at the first line (no empty errors file): ``mode`` ``"a"`` to
    append (results), ``"w"`` to start afresh (this run's malformed lines).
    """

    def __init__(self, path: Path, mode: str = "a") -> None:
        self.path = path
        self.mode = mode
        self.file: IO[str] | None = None

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            self.file = self.path.open(self.mode, encoding="utf-8")
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def check_input(job: Job) -> tuple[int, set[str]]:
    """Before any server starts: the number of input lines and the ids already done
    (``ConfigError`` for a missing input or an output file that is not ours)."""
    if not job.input.is_file():
        raise ConfigError(f"input file {str(job.input)!r} does not exist")
    if job.output.exists() and not job.output.is_file():
        raise ConfigError(f"output {str(job.output)!r} is not a file")
    return count_lines(job.input), resume(job.output)


async def run_job(
    server: Server, job: Job, done: set[str], progress: Progress, counts: Counts
) -> None:
    """Send every input line whose id is not in ``done`` through ``server``; write the
    results. ``counts`` is updated as lines finish (the caller reports it, even if the job
    is interrupted).
    """
    send, receive = anyio.create_memory_object_stream[Prompt](job.concurrency)
    writer, error_writer = _Writer(job.output), _Writer(job.errors, "w")
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(job.concurrency):
                tg.start_soon(_worker, server, job, receive.clone(), writer, counts, progress)
            receive.close()
            async with send:
                seen: set[str] = set()
                for number, text, parsed in read_prompts(job.input):
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
    server: Server,
    job: Job,
    prompts: MemoryObjectReceiveStream[Prompt],
    writer: _Writer,
    counts: Counts,
    progress: Progress,
) -> None:
    async with prompts:
        async for prompt in prompts:
            params = {**job.params, **prompt.params}
            record: dict[str, Any] = {"id": prompt.id}
            if prompt.id_from_line:
                record["id_from_line_number"] = True
            try:
                if prompt.messages is not None:
                    out = await server.chat(prompt.messages, **params)
                else:
                    assert prompt.prompt is not None
                    out = await server.complete(prompt.prompt, **params)
            except RequestError as exc:  # failed for good; a dead server raises ServerError
                record["error"] = {"type": type(exc).__name__, "message": str(exc)}
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
