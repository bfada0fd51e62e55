"""The ``servescope`` command: ``generate`` (JSONL in, JSONL out) and ``serve``.

Both open the configured server (``--config FILE`` in TOML or JSON, flags on top, the
built-in dummy backend by default) under servescope's supervision. Ctrl-C (SIGINT) or
SIGTERM stops them cleanly: requests in flight are cancelled, the server's process tree
is torn down, and ``generate`` exits with 130 / 143 with everything finished on disk.

Before any server starts, ``generate`` checks what it can: the input exists, the output
and the errors file can be written, and no other job is writing the same output (it holds
a lock on the output file for the whole job).

Exit codes: 0 done; 1 the server failed (start, crash); 2 bad usage, config or input
(another job writing the same output included); 3 the input file shrank while the job
ran, so some of its lines were never read (everything finished is on disk: rerun to
finish); 130 / 143 stopped by SIGINT / SIGTERM.

No message the command prints carries a secret: every error, and every log line, passes
through a ``Redactor`` of the config's secrets and ``SERVESCOPE_API_KEY``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.table import Table

from . import __version__
from ._config import ServerConfig
from ._errors import ConfigError, ServeError, ServerError
from ._generate import Counts, Job, Progress, prepare, run_job
from ._loadconfig import BACKENDS, load_pool_config, read_config_file
from ._pool import Pool, open_pool
from ._poolconfig import POOL_KEYS, PoolConfig
from ._redact import Redactor, looks_secret
from ._server import Server, open_server

__all__ = ["main"]

logger = logging.getLogger("servescope")

#: Flags that set a config field, and the field they set.
CONFIG_FLAGS = {
    "backend": "backend",
    "model": "model",
    "tp": "tp",
    "dp": "dp",
    "pp": "pp",
    "max_model_len": "max_model_len",
    "context_length": "context_length",
    "url": "url",
    "script": "script",
    "concurrency": "max_concurrency",
    "startup_timeout": "startup_timeout",
    "log_dir": "log_dir",
    "replicas": "replicas",
}
#: ``generate``'s requests in flight unless set; ``serve`` keeps the config's default.
GENERATE_CONCURRENCY = 64
#: The input shrank under the job: some lines were never read.
EXIT_INPUT_SHRANK = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="servescope", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"servescope {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser(
        "generate",
        help="send every line of a JSONL file through the server; write JSONL results",
        description="Each input line: {'id': ..., 'messages': [...]} or {'id': ..., "
        "'prompt': '...'}, plus optional request params (max_tokens, temperature, ...). "
        "Rerun with the same output file to resume: ids already written are skipped.",
    )
    generate.add_argument("input", type=Path)
    generate.add_argument("-o", "--output", type=Path, required=True)
    generate.add_argument("--errors", type=Path, help="malformed input lines (OUTPUT.errors)")
    generate.add_argument("--max-tokens", type=int, help="default max_tokens per request")
    generate.add_argument("--temperature", type=float, help="default temperature")
    generate.add_argument(
        "--progress",
        choices=["auto", "bar", "log", "none"],
        default="auto",
        help="a progress bar on a terminal, else a log line every --progress-interval s",
    )
    generate.add_argument("--progress-interval", type=float, default=10.0)
    serve = commands.add_parser("serve", help="start the server, print its URL, keep it up")
    concurrency = {
        generate: GENERATE_CONCURRENCY,
        serve: ServerConfig.model_fields["max_concurrency"].default,
    }
    for command in (generate, serve):
        group = command.add_argument_group("server (flags override --config)")
        group.add_argument("--config", type=Path, help="a .toml or .json config file")
        group.add_argument("--backend", choices=sorted(BACKENDS))
        group.add_argument("--model")
        group.add_argument("--tp", type=int, help="tensor parallel size (vllm, sglang)")
        group.add_argument("--dp", type=int, help="data parallel size (vllm, sglang)")
        group.add_argument("--pp", type=int, help="pipeline parallel size (vllm, sglang)")
        group.add_argument("--max-model-len", type=int, help="vllm")
        group.add_argument("--context-length", type=int, help="sglang")
        group.add_argument("--url", help="endpoint: the server's URL")
        group.add_argument("--script", type=Path, help="custom: the server script")
        group.add_argument(
            "--concurrency",
            type=int,
            help=f"requests in flight (default {concurrency[command]})",
        )
        group.add_argument(
            "--replicas",
            type=int,
            help="run a pool of N replicas (routing, restarts: --set routing=prefix, ...)",
        )
        group.add_argument("--startup-timeout", type=float)
        group.add_argument("--log-dir", type=Path, help="where the server's log file goes")
        group.add_argument(
            "--set",
            dest="settings",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="any config field (VALUE as JSON, else a string); e.g. --set latency=0.1",
        )
        group.add_argument("--log-level", default="WARNING", help="servescope's log level")
    return parser


def build_config(args: argparse.Namespace) -> ServerConfig:
    """The config file's values, the flags on top, the API key from the environment."""
    return load_pool_config(_config_values(args))[0]


@asynccontextmanager
async def _serving(config: ServerConfig, pool: PoolConfig | None) -> AsyncIterator[Server | Pool]:
    """One supervised server, or a pool of replicas of it."""
    if pool is None:
        async with open_server(config) as server:
            yield server
    else:
        async with open_pool(config, **dict(pool)) as replicas:
            yield replicas


def _config_values(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = read_config_file(args.config) if args.config else {}
    for flag, key in CONFIG_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            values[key] = str(value) if isinstance(value, Path) else value
    for setting in args.settings:
        key, sep, text = setting.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set needs KEY=VALUE, got {setting!r}")
        try:
            values[key.strip()] = json.loads(text)
        except ValueError:
            values[key.strip()] = text
    if "max_concurrency" not in values and getattr(args, "command", "") == "generate":
        values["max_concurrency"] = GENERATE_CONCURRENCY
    api_key = os.environ.get("SERVESCOPE_API_KEY")
    if api_key and "api_key" not in values and values.get("backend") in ("endpoint", "vllm"):
        values["api_key"] = api_key
    return values


class _Bar:
    """A rich progress bar: done / total, requests/s, tokens/s, errors, ETA."""

    def __init__(self, console: Console) -> None:
        self.bar = RichProgress(
            TextColumn("[bold]generate"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[errors]}"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task: TaskID | None = None
        self.bar.start()

    def update(self, counts: Counts) -> None:
        if self.task is None:
            self.task = self.bar.add_task("generate", total=counts.total, rate="", errors="")
        rate = f"{counts.requests_per_s:.1f} req/s {counts.tokens_per_s:.0f} tok/s"
        errors = f"errors {counts.errors}"
        self.bar.update(self.task, completed=counts.done, rate=rate, errors=errors)

    def close(self, counts: Counts) -> None:
        self.update(counts)
        self.bar.stop()


class _LogLines:
    """A plain line every ``interval`` seconds (not a terminal: a log file, a batch job)."""

    def __init__(self, console: Console, interval: float) -> None:
        self.console = console
        self.interval = interval
        self.last = time.monotonic()

    def update(self, counts: Counts) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.console.print(_progress_line(counts), markup=False, highlight=False)

    def close(self, counts: Counts) -> None:
        return None


class _Silent:
    def update(self, counts: Counts) -> None:
        return None

    def close(self, counts: Counts) -> None:
        return None


def _progress_line(counts: Counts) -> str:
    rate = counts.requests_per_s
    eta = f"{(counts.total - counts.done) / rate:.0f} s" if rate > 0 else "?"
    return (
        f"servescope generate: {counts.done}/{counts.total} done, {rate:.1f} req/s, "
        f"{counts.tokens_per_s:.0f} tok/s, errors {counts.errors}, ETA {eta}"
    )


def _summary(console: Console, counts: Counts, server: Server | Pool) -> None:
    table = Table(title="servescope generate", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    rows: list[tuple[str, object]] = [
        ("input lines", counts.total),
        ("written ok", counts.succeeded),
        ("written with an error", counts.failed),
        ("malformed (errors file)", counts.malformed),
        ("already done (skipped)", counts.skipped),
        ("prompt tokens", counts.prompt_tokens),
        ("completion tokens", counts.completion_tokens),
        ("wall time", f"{counts.elapsed:.1f} s"),
        ("requests/s", f"{counts.requests_per_s:.1f}"),
    ]
    metrics = server.metrics
    percentiles = (metrics.latency_p50, metrics.latency_p90, metrics.latency_p99)
    for name, seconds in zip(("p50", "p90", "p99"), percentiles, strict=True):
        shown = "-" if seconds is None else f"{seconds * 1000:.0f} ms"
        rows.append((f"latency {name}", shown))
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)


async def _until_signal(scope: anyio.CancelScope, caught: list[int]) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            caught.append(signum)
            scope.cancel()
            return


def _job(
    args: argparse.Namespace, config: ServerConfig, pool: PoolConfig | None, redact: Redactor
) -> Job:
    params = {
        key: value
        for key, value in (("max_tokens", args.max_tokens), ("temperature", args.temperature))
        if value is not None
    }
    return Job(
        input=args.input,
        output=args.output,
        errors=args.errors or args.output.with_name(args.output.name + ".errors"),
        # --concurrency is per server: a pool of N keeps N times as many in flight.
        concurrency=config.max_concurrency * (pool.replicas if pool is not None else 1),
        params=params,
        redact=redact,
    )


def _progress(args: argparse.Namespace, console: Console) -> Progress:
    mode = args.progress
    if mode == "auto":
        mode = "bar" if console.is_terminal else "log"
    if mode == "bar":
        return _Bar(console)
    if mode == "log":
        return _LogLines(console, args.progress_interval)
    return _Silent()


async def _generate(
    args: argparse.Namespace,
    config: ServerConfig,
    pool: PoolConfig | None,
    console: Console,
    redact: Redactor,
) -> int:
    job = _job(args, config, pool, redact)
    caught: list[int] = []
    with prepare(job) as prepared:  # checks and locks before the server starts
        counts = Counts(total=prepared.total)
        progress = _progress(args, console)
        server: Server | Pool | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_until_signal, tg.cancel_scope, caught)
                async with _serving(config, pool) as server:
                    await run_job(server, job, prepared, progress, counts)
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _single(group) from None
        finally:
            progress.close(counts)
            if server is not None:
                _summary(console, counts, server)
    if caught:
        name = signal.Signals(caught[0]).name
        console.print(f"stopped by {name}; rerun the same command to resume", style="yellow")
        return 128 + caught[0]
    if counts.input_shrank:
        _error(
            console,
            f"servescope: the input {str(job.input)!r} shrank while the job ran: read "
            f"{counts.read} of the {counts.total} lines it had at the start; everything "
            f"finished is in {str(job.output)!r}: rerun with the whole input to finish",
        )
        return EXIT_INPUT_SHRANK
    return 0


async def _serve(
    args: argparse.Namespace,
    config: ServerConfig,
    pool: PoolConfig | None,
    console: Console,
    redact: Redactor,
) -> int:
    caught: list[int] = []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_until_signal, tg.cancel_scope, caught)
            async with _serving(config, pool) as serving:
                await serving.wait_ready()
                if isinstance(serving, Pool):
                    for replica in serving.replicas:
                        line = f"{replica.base_url}/v1 model={config.model} replica={replica.index}"
                        print(redact(line), flush=True)
                else:
                    print(redact(f"{serving.base_url}/v1 model={config.model}"), flush=True)
                await anyio.sleep_forever()
    except BaseExceptionGroup as group:
        raise _single(group) from None
    return 0


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one real error in a task group's exception group (the others are its echoes)."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        elif not isinstance(exc, anyio.get_cancelled_exc_class()):
            leaves.append(exc)
    for kind in (KeyboardInterrupt, SystemExit, ServeError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0] if leaves else group


def _error(console: Console, message: str) -> None:
    """An error message as written: not wrapped, not highlighted, not parsed as markup."""
    console.print(message, style="red", markup=False, highlight=False, soft_wrap=True)


def _redactor(values: dict[str, Any], config: ServerConfig | None = None) -> Redactor:
    """The secrets known so far: ``SERVESCOPE_API_KEY``, the values (and ``env``
    entries) named like secrets that the config is built from, the config's own."""
    env = values.get("env")
    named = [*values.items(), *(env.items() if isinstance(env, dict) else ())]
    secrets = [v for k, v in named if isinstance(v, str) and looks_secret(str(k))]
    secrets.append(os.environ.get("SERVESCOPE_API_KEY", ""))
    return Redactor([*secrets, *(config.secrets() if config is not None else ())])


class _RedactLogs(logging.Filter):
    """Blanks secrets out of every log line the command prints, whoever logged it."""

    def __init__(self) -> None:
        super().__init__()
        self.redact = Redactor()

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.redact:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format: the handler reports it (its arguments unshown)
            record.args = None
            return True
        record.msg, record.args = self.redact(message), None
        if record.exc_info:  # the traceback too: formatted here, then redacted
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def main(argv: Sequence[str] | None = None) -> None:
    """The ``servescope`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(name)s: %(message)s")
    logs = _RedactLogs()
    for handler in logging.getLogger().handlers:
        handler.addFilter(logs)
    console = Console(stderr=True)
    redact = logs.redact = _redactor({})
    try:
        values = _config_values(args)
        redact = logs.redact = _redactor(values)
        config, settings = load_pool_config(values)
        # Any pool key (--replicas, routing, ...) asks for a pool; else one server.
        pool = settings if POOL_KEYS.intersection(values) else None
        redact = logs.redact = _redactor(values, config)
        run = _generate if args.command == "generate" else _serve
        code = anyio.run(run, args, config, pool, console, redact)
    except (ServeError, OSError) as exc:
        # Bad usage, config or input files: 2; the server failed: 1.
        code = 2 if isinstance(exc, ConfigError | OSError) else 1
        prefix = "server failed: " if isinstance(exc, ServerError) else ""
        _error(console, redact(f"servescope: {prefix}{exc}"))
    except Exception:  # a bug: its traceback for the report, with no secret in it
        code = 1
        _error(console, redact(f"servescope: internal error\n{traceback.format_exc()}"))
    sys.exit(code)


if __name__ == "__main__":
    main()
