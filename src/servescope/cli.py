"""The ``servescope`` command: ``generate`` (JSONL in, JSONL out), ``merge`` (a sharded
``generate``'s results put together and checked), ``serve`` and ``route``.

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
import importlib.util
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
from pydantic import SecretStr

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
from ._front import open_front
from ._frontconfig import FRONT_KEYS, FrontConfig
from ._generate import Counts, Job, Prepared, Progress, prepare, run_job
from ._inputs import Fields
from ._loadconfig import BACKENDS, load_pool_config, read_config_file
from ._multinode import plan_nodes
from ._pool import Pool, open_pool
from ._poolconfig import POOL_KEYS, PoolConfig
from ._redact import Redactor, looks_secret
from ._register import keep_registered
from ._server import Server, WorkerNode, open_server
from ._shards import Shard, parse_shard, shard_path
from .backends._base import EngineConfig
from .backends.endpoint import url_problem

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
    data = generate.add_argument_group("input and shards")
    _field_flags(data)
    data.add_argument(
        "--shard",
        metavar="K/N",
        help="run shard K of N (0 <= K < N): the input lines whose id hashes to K, into "
        "OUTPUT with .shard-K-of-N before its extensions; 'auto': K and N from "
        "SLURM_ARRAY_TASK_ID (minus SLURM_ARRAY_TASK_MIN) and SLURM_ARRAY_TASK_COUNT",
    )
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
        group.add_argument(
            "--nodes",
            action="store_true",
            help="one model across nodes, run on every node: roles from torchrun, SLURM or "
            "datatrove's environment, unless the config's [nodes] table sets them",
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
    register = serve.add_argument_group("register with a front on another node")
    register.add_argument(
        "--register-with",
        metavar="URL",
        help="a `servescope route` front: join it once ready, keep a lease, leave on stop",
    )
    register.add_argument(
        "--token", help="the front's admin token (default: SERVESCOPE_ADMIN_TOKEN)"
    )
    register.add_argument(
        "--advertise-url",
        metavar="URL",
        help="the address the front reaches this server at (default: the server's own)",
    )
    _route_parser(commands)
    merge = commands.add_parser(
        "merge",
        help="put a sharded generate job's results together, checking they cover the input",
        description="Check that the shards' results files (OUTPUT with .shard-K-of-N before "
        "its extensions) hold exactly one result for every valid input line and nothing "
        "else, then write them to OUTPUT (and their errors files to OUTPUT.errors).",
    )
    merge.add_argument("input", type=Path, help="the input the shards were run on")
    merge.add_argument("-o", "--output", type=Path, required=True, help="as given to generate")
    merge.add_argument(
        "--shards", type=int, metavar="N", help="the shard count (default: from the files)"
    )
    _field_flags(merge)
    merge.add_argument("--log-level", default="WARNING", help="servescope's log level")
    return parser


def _field_flags(parser: Any) -> None:
    parser.add_argument(
        "--prompt-field",
        default="prompt",
        metavar="NAME",
        help="the field (or Parquet column) holding a prompt string (default: prompt)",
    )
    parser.add_argument(
        "--messages-field",
        default="messages",
        metavar="NAME",
        help="the field (or Parquet column) holding chat messages (default: messages)",
    )


def _route_parser(commands: Any) -> None:
    route = commands.add_parser(
        "route",
        help="one OpenAI endpoint for many clients, in front of replicas",
        description="Serve the OpenAI API at --host:--port and route each request to a "
        "replica: those launched from --config (with its pool keys), those given with "
        "--worker-url, and those that register themselves (serve --register-with).",
    )
    route.add_argument("--config", type=Path, help="replicas to launch (server + pool keys)")
    route.add_argument(
        "--worker-url",
        action="append",
        default=[],
        metavar="URL",
        help="a replica someone else runs (repeatable)",
    )
    route.add_argument("--model", help="the model served (default: the config's or a worker's)")
    route.add_argument(
        "--routing", help="least_loaded (default), round_robin, power_of_two, prefix, sticky"
    )
    route.add_argument("--min-ready", type=int, help="replicas ready for GET /readiness")
    route.add_argument("--host", help="where to listen (default 127.0.0.1)")
    route.add_argument("--port", type=int, help="default 8000; 0: any free port")
    route.add_argument(
        "--admin-token", help="bearer token of the admin API (default: SERVESCOPE_ADMIN_TOKEN)"
    )
    route.add_argument("--max-concurrency", type=int, help="requests worked on at once")
    route.add_argument("--queue-size", type=int, help="requests that may wait; beyond: 429")
    route.add_argument("--queue-timeout", type=float, help="longest wait; beyond: 503")
    route.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any server, pool or front setting (VALUE as JSON, else a string)",
    )
    route.add_argument("--log-level", default="WARNING", help="servescope's log level")


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
    values.update(_set_flags(args.settings))
    if getattr(args, "nodes", False) and values.get("nodes") is None:
        values["nodes"] = {}  # every role from the environment
    if "max_concurrency" not in values and getattr(args, "command", "") == "generate":
        values["max_concurrency"] = GENERATE_CONCURRENCY
    api_key = os.environ.get("SERVESCOPE_API_KEY")
    if api_key and "api_key" not in values and values.get("backend") in ("endpoint", "vllm"):
        values["api_key"] = api_key
    return values


def _set_flags(settings: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` flags as values: VALUE as JSON, else as a string."""
    values: dict[str, Any] = {}
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set needs KEY=VALUE, got {setting!r}")
        try:
            values[key.strip()] = json.loads(text)
        except ValueError:
            values[key.strip()] = text
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


def _summary(
    console: Console, counts: Counts, server: Server | Pool, shard: Shard | None = None
) -> None:
    table = Table(title="servescope generate", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    rows: list[tuple[str, object]] = [
        ("input lines", counts.total if shard is None else f"{counts.total} of {counts.lines}"),
        *([("shard", str(shard))] if shard is not None else []),
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
    shard = parse_shard(args.shard) if args.shard is not None else None
    output = args.output if shard is None else shard_path(args.output, shard)
    errors = args.errors or output.with_name(output.name + ".errors")
    if shard is not None and args.errors:
        errors = shard_path(errors, shard)
    return Job(
        input=args.input,
        output=output,
        errors=errors,
        # --concurrency is per server: a pool of N keeps N times as many in flight.
        concurrency=config.max_concurrency * (pool.replicas if pool is not None else 1),
        params=params,
        redact=redact,
        fields=Fields(args.prompt_field, args.messages_field),
        shard=shard,
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


#: What a stopped or interrupted generate tells its user.
_RERUN = "rerun the same command to resume"


class _PlanStopped(BaseException):
    """SIGINT or SIGTERM came while generate planned its run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _planned(job: Job) -> Iterator[Prepared]:
    """``prepare(job)``, stopped at once by SIGINT or SIGTERM (``_PlanStopped``): the plan
    is synchronous (no await for a cancel to reach) and takes seconds at millions of lines.
    The event loop's own handlers are back once it is done; an ignored signal stays
    ignored (a job started with ``nohup``)."""

    def stop(signum: int, frame: object) -> None:
        raise _PlanStopped(signum)

    with ExitStack() as stack:
        handlers: dict[int, Any] = {}
        try:
            if threading.current_thread() is threading.main_thread():
                for signum in (signal.SIGINT, signal.SIGTERM):
                    if signal.getsignal(signum) is not signal.SIG_IGN:
                        handlers[signum] = signal.signal(signum, stop)
            prepared = stack.enter_context(prepare(job))
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)
        yield prepared


async def _is_worker_node(config: ServerConfig) -> bool:
    if not isinstance(config, EngineConfig) or config.nodes is None:
        return False
    plan = await plan_nodes(config.nodes)
    return plan is not None and not plan.is_head


async def _generate(
    args: argparse.Namespace,
    config: ServerConfig,
    pool: PoolConfig | None,
    console: Console,
    redact: Redactor,
) -> int:
    job = _job(args, config, pool, redact)
    caught: list[int] = []
    if await _is_worker_node(config):
        # The head reads the input and writes the output; this node lends its engine.
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_until_signal, tg.cancel_scope, caught)
                async with _serving(config, pool) as node:
                    await node.wait_ready()
                    assert isinstance(node, WorkerNode)
                    await _worker_node(node, console)
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _single(group) from None
        return 128 + caught[0] if caught else 0
    with _planned(job) as prepared:  # checks, locks and plans before the server starts
        counts = prepared.counts()
        if prepared.left == 0:  # nothing to send: no server to start
            of = f" (shard {job.shard})" if job.shard is not None else ""
            console.print(
                f"servescope generate: nothing left to do in {str(job.input)!r}{of} (0 left "
                f"of {counts.total} lines: {counts.skipped} done, {counts.malformed} "
                f"malformed; read and planned in {prepared.seconds:.1f} s); no server started",
                soft_wrap=True,
            )
            from ._generate import NoServer  # (cli.py's imports are shared)

            idle: Any = NoServer()  # the summary's latency rows: "-"
            _summary(console, counts, idle, job.shard)
            return 0
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
                _summary(console, counts, server, job.shard)
    if caught:
        name = signal.Signals(caught[0]).name
        console.print(f"stopped by {name}; {_RERUN}", style="yellow")
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
    token = args.token or os.environ.get("SERVESCOPE_ADMIN_TOKEN") or None
    redact.add([token] if token else [])
    for flag, url in (
        ("--register-with", args.register_with),
        ("--advertise-url", args.advertise_url),
    ):
        problem = url_problem(url) if url is not None else None
        if problem is not None:
            raise ConfigError(f"{flag} {problem}")
    if args.advertise_url and not args.register_with:
        raise ConfigError("--advertise-url is the address given to --register-with's front")
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_until_signal, tg.cancel_scope, caught)
            async with _serving(config, pool) as serving, anyio.create_task_group() as joins:
                await serving.wait_ready()
                if isinstance(serving, WorkerNode):
                    await _worker_node(serving, console)
                    tg.cancel_scope.cancel()
                    return 0
                if isinstance(serving, Pool):
                    urls = [replica.base_url or "" for replica in serving.replicas]
                    for index, url in enumerate(urls):
                        line = f"{url}/v1 model={config.model} replica={index}"
                        print(redact(line), flush=True)
                else:
                    urls = [serving.base_url]
                    print(redact(f"{serving.base_url}/v1 model={config.model}"), flush=True)
                # Registered last, deregistered first: the front stops sending before
                # the server stops.
                for url in [args.advertise_url] if args.advertise_url else urls:
                    if args.register_with:
                        join = partial(keep_registered, args.register_with, url, token=token)
                        await joins.start(partial(join, api_key=_api_key(config)))
                await anyio.sleep_forever()
    except BaseExceptionGroup as group:
        raise _single(group) from None
    return 0


async def _worker_node(node: WorkerNode, console: Console) -> None:
    """A worker node of a multi-node server: its part runs until the head's scope ends."""
    role = node.node_role
    assert role is not None
    console.print(
        f"worker node {role.rank} of {role.nnodes}: the head serves at {node.head_url}/v1; "
        "this node runs until the head ends",
        markup=False,
        highlight=False,
    )
    await node.wait_head_exit()
    console.print(f"worker node {role.rank}: the head ended; done", markup=False, highlight=False)


def _api_key(config: ServerConfig) -> str | None:
    """The key requests to this server need (a front registering it needs it too)."""
    key = getattr(config, "api_key", None)
    return key.get_secret_value() if isinstance(key, SecretStr) else None


def _route_values(
    args: argparse.Namespace,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The route command's server, pool and front settings: config file, flags, ``--set``."""
    server: dict[str, Any] = read_config_file(args.config) if args.config else {}
    server.update(_set_flags(args.settings))
    if args.model:
        server["model"] = args.model
    pool = {key: server.pop(key) for key in sorted(POOL_KEYS.intersection(server))}
    # A key a server (or the pool) also has is theirs: the front's own via its flags.
    own = FRONT_KEYS - POOL_KEYS - ServerConfig.model_fields.keys()
    front = {key: server.pop(key) for key in sorted(own.intersection(server))}
    flags = {
        "routing": ("pool", args.routing),
        "min_ready": ("front", args.min_ready),
        "host": ("front", args.host),
        "port": ("front", args.port),
        "max_concurrency": ("front", args.max_concurrency),
        "queue_size": ("front", args.queue_size),
        "queue_timeout": ("front", args.queue_timeout),
    }
    for key, (where, value) in flags.items():
        if value is not None:
            (pool if where == "pool" else front)[key] = value
    token = args.admin_token or os.environ.get("SERVESCOPE_ADMIN_TOKEN")
    if token:
        front["admin_token"] = token
    if os.environ.get("SERVESCOPE_FRONT_API_KEY"):
        front["api_key"] = os.environ["SERVESCOPE_FRONT_API_KEY"]
    return server, pool, front


async def _route(args: argparse.Namespace, console: Console, redact: Redactor) -> int:
    server, pool_values, front_values = _route_values(args)
    front_config = FrontConfig.build(front_values)
    redact.add(front_config.secrets())
    launched = bool(args.config)
    if not launched:
        server.setdefault("backend", "endpoint")
        server.setdefault("url", args.worker_url[0] if args.worker_url else UNUSED_URL)
        if "model" not in server:
            server["model"] = await _served_model(args.worker_url)
        pool_values.setdefault("replicas", 0)
    config, pool_config = load_pool_config({**server, **pool_values})
    redact.add(config.secrets())
    caught: list[int] = []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_until_signal, tg.cancel_scope, caught)
            settings = dict(pool_config)
            async with open_pool(config, open_membership=True, **settings) as pool:
                for url in args.worker_url:
                    pool.add_endpoint(url)
                async with open_front(pool, front_config) as front:
                    print(redact(f"{front.url}/v1 model={config.model}"), flush=True)
                    await anyio.sleep_forever()
    except BaseExceptionGroup as group:
        raise _single(group) from None
    return 0


#: The template of replicas that join a front with no launched replicas: never contacted.
UNUSED_URL = "http://127.0.0.1:9"


async def _served_model(urls: list[str]) -> str:
    """The model the first worker serves (``GET /v1/models``), for a front told none."""
    if not urls:
        raise ConfigError("route needs --model (or --config, or a --worker-url to ask)")
    url = urls[0].rstrip("/").removesuffix("/v1") + "/v1/models"
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(url)
            response.raise_for_status()
            model = response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, LookupError, TypeError) as exc:
        raise ConfigError(
            f"route needs --model: the first worker did not say which model it serves ({exc})"
        ) from None
    if not isinstance(model, str):
        raise ConfigError("route needs --model: the first worker's model id is not a string")
    return model


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


#: The front moves bytes between sockets all day: on uvloop where it is installed (as
#: vLLM's and SGLang's API servers do), about twice the requests per CPU second.
_FAST_LOOP = {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


def _merge(args: argparse.Namespace, console: Console) -> int:
    from ._merge import find_shards, merge  # (only this command needs it)

    count = args.shards if args.shards is not None else find_shards(args.output)
    if count < 1:
        raise ConfigError(f"--shards must be at least 1, got {count}")
    fields = Fields(args.prompt_field, args.messages_field)
    merged = merge(args.input, args.output, count, fields)
    written = " and ".join(repr(str(path)) for path in merged.files)
    console.print(
        f"servescope merge: {count} shards cover {str(args.input)!r} exactly once: "
        f"{merged.results} results ({merged.malformed} malformed input lines) written to "
        f"{written}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return 0


def _main_route(args: argparse.Namespace, console: Console, logs: _RedactLogs) -> int:
    logs.redact.add([os.environ.get("SERVESCOPE_ADMIN_TOKEN") or "", args.admin_token or ""])
    logs.redact.add([os.environ.get("SERVESCOPE_FRONT_API_KEY") or ""])
    return int(anyio.run(_route, args, console, logs.redact, backend_options=_FAST_LOOP))


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
        if args.command == "route":
            code = _main_route(args, console, logs)
        elif args.command == "merge":
            code = _merge(args, console)
        else:
            values = _config_values(args)
            redact = logs.redact = _redactor(values)
            config, settings = load_pool_config(values)
            # Any pool key (--replicas, routing, ...) asks for a pool; else one server.
            pool = settings if POOL_KEYS.intersection(values) else None
            if pool is not None and pool.replicas == 0:
                raise ConfigError("replicas must be at least 1 for generate and serve")
            redact = logs.redact = _redactor(values, config)
            run = _generate if args.command == "generate" else _serve
            code = anyio.run(run, args, config, pool, console, redact)
    except _PlanStopped as stopped:
        code = 128 + stopped.signum
        name = signal.Signals(stopped.signum).name
        _error(console, f"servescope: stopped by {name} while planning the run; {_RERUN}")
    except KeyboardInterrupt:  # before the plan's or the run's own handlers are up
        code = 128 + signal.SIGINT
        _error(console, f"servescope: interrupted; {_RERUN}")
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
