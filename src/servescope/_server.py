"""``open_server``: one server's whole life inside one anyio task group.

::

    open_server(config)                  the body of ``async with`` runs in the host task
     └─ supervisor                       start attempts, each on a fresh port
         ├─ stdout scanner ┐             lines → log file, logger, ring; pattern table:
         ├─ stderr scanner ┘             ready → probe now, fatal → fail, retry → next attempt
         ├─ readiness poller             HTTP probe on a ready line or a short backoff
         └─ exit watcher                 the reaper reports the server's exit at once

A failure anywhere (``_Supervisor.fail``) records one ``ServerError`` and cancels the
whole task group, the body included; teardown runs shielded on every way out; the
caller gets that one exception, never an ``ExceptionGroup``.
"""

from __future__ import annotations

import collections
import copy
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Coroutine, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from anyio.abc import ByteReceiveStream, TaskGroup, TaskStatus

from ._asgi import listen_socket, serve_asgi
from ._compile_lock import CompileLock
from ._config import ServerConfig
from ._dummy_app import DummyApp
from ._errors import ServeError, ServerClosed, ServerCrashed, ServerError, ServerStartError
from ._health import HealthWatch, Probe
from ._http import connect_problem, fetch_excerpt, http_client, probe_status
from ._logscan import LineClassifier, LineEvent, LineKind, LineSplitter, PatternTable
from ._metrics import MetricsSnapshot
from ._pool import RequestPool
from ._ports import pick_port
from ._process import ServerProcess, spawn_server
from ._redact import Redactor
from ._responses import Completion, excerpt
from ._serverlog import ServerLog
from .backends._base import ProcessConfig, ProcessSpec
from .backends.dummy import DummyConfig
from .backends.endpoint import EndpointConfig

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["Server", "open_server"]

PROBE_FIRST_DELAY = 0.02
PROBE_MAX_DELAY = 2.0
PROBE_AFTER_LINE_MAX = 0.05
PROBE_TIMEOUT = 5.0
#: After the server exits, how long its last output may take to arrive.
EXIT_DRAIN = 0.25
#: SIGTERM-to-SIGKILL grace for the tree of a server that already failed (crashed, fatal
#: line, not ready in time): it has nothing left to finish cleanly.
CRASH_GRACE = 1.0
#: How long after a fatal line its explanation (traceback, root cause) is still read.
FATAL_SETTLE = 0.25
#: After readiness, cause lines (``CUDA out of memory``) this long before a death line
#: explain it.
CAUSE_WINDOW = 5.0
DUMMY_GRACE = 0.2


class Server:
    """A server started by ``open_server``: its address, readiness and requests.

    Valid inside the ``async with`` block that produced it.
    """

    def __init__(self, config: ServerConfig, *, rank: int, node: int, log: ServerLog) -> None:
        self.config = config
        self.rank = rank
        self.node = node
        self.pid: int | None = None
        self._log = log
        self._base_url: str | None = None
        self._ready = anyio.Event()
        #: Set once the server is ready or its scope has ended: waiters outside the scope
        #: (a worker task in the caller's own task group) are never left waiting.
        self._settled = anyio.Event()
        self._ended = anyio.Event()
        self._failure: ServerError | None = None
        self._closed = False
        self._pool: RequestPool | None = None
        self._dummy_app: DummyApp | None = None  # the in-process dummy, for tests

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the server (it may change if a start is retried)."""
        if self._base_url is None:
            raise ServeError("the server has no address yet")
        return self._base_url

    @property
    def ready(self) -> bool:
        """Whether the server has answered its readiness probe."""
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        """Wait until the server is ready.

        If it fails first, the scope is cancelled and a waiter outside it gets the
        server's error; if the scope ends first, ``ServerClosed``.
        """
        self._check_open()
        await self._settled.wait()
        self._check_open()

    def log_tail(self) -> list[str]:
        """The last lines the server printed."""
        return self._log.tail()

    def request(
        self,
        payload: Mapping[str, Any],
        *,
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Coroutine[Any, Any, dict[str, Any]]:
        """POST an OpenAI payload (model and ``default_params`` filled in); await the JSON reply.

        The endpoint is ``/v1/chat/completions`` if the config's ``use_chat`` is set,
        else ``/v1/completions``, unless ``path`` is given. Retryable failures are
        retried with backoff; see ``servescope._pool`` for the classification.
        """
        # Not itself a coroutine: one frame less per request held in flight.
        return self._requests().request(payload, path=path, headers=headers)

    @property
    def metrics(self) -> MetricsSnapshot:
        """Request counts, tokens, tokens per second, latency percentiles, in flight, waiting."""
        assert self._pool is not None
        return self._pool.metrics

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> Completion:
        """A chat completion (``max_tokens=...``, ``temperature=...`` as keyword arguments)."""
        return await self._requests().chat(messages, **params)

    async def complete(self, prompt: str, **params: Any) -> Completion:
        """A text completion of ``prompt``."""
        return await self._requests().complete(prompt, **params)

    def _requests(self) -> RequestPool:
        self._check_open()
        assert self._pool is not None
        return self._pool

    def _check_open(self) -> None:
        if self._failure is not None:
            # A copy for each caller: many waiters re-raising one object would chain all
            # their tracebacks onto it.
            raise copy.copy(self._failure)
        if self._closed:
            raise ServerClosed(f"the scope of {self!r} has ended; it takes no more requests")

    def _end(self) -> None:
        """The scope is over: wake every waiter."""
        self._closed = True
        self._settled.set()
        self._ended.set()

    async def _backoff(self, seconds: float) -> None:
        """A retry's backoff: ``seconds``, or less if the scope ends meanwhile."""
        with anyio.move_on_after(seconds):
            await self._ended.wait()

    def __repr__(self) -> str:
        state = "ready" if self.ready else "starting"
        return f"<Server {type(self.config).__name__} rank={self.rank} {self._base_url} {state}>"


@asynccontextmanager
async def open_server(
    config: ServerConfig, *, rank: int = 0, node: int = 0
) -> AsyncIterator[Server]:
    """Start the server ``config`` describes; yield it once its process exists.

    ``await server.wait_ready()`` waits for readiness (requests wait by themselves).
    If the server fails — it exits, prints a fatal line, or is not ready within
    ``startup_timeout`` — the body is cancelled and ``ServerStartError`` (before
    readiness) or ``ServerCrashed`` (after) is raised. On every way out the server's
    whole process tree is terminated (SIGTERM, ``shutdown_grace``, SIGKILL).
    """
    redact = Redactor(config.secrets())
    log = ServerLog(
        rank=rank,
        node=node,
        log_dir=config.log_dir,
        tail_lines=config.log_tail_lines,
        max_bytes=config.log_max_bytes,
        redact=redact,
    )
    server = Server(config, rank=rank, node=node, log=log)
    client, post, headers = http_client(config)
    try:
        async with client, anyio.create_task_group() as tg:
            server._pool = RequestPool(
                post,
                config,
                headers=headers,
                base_url=lambda: server.base_url,
                wait_ready=server.wait_ready,
                check_open=server._check_open,
                redact=redact,
                backoff=server._backoff,
            )
            supervisor = _Supervisor(server, tg, client)
            await tg.start(supervisor.run)
            try:
                yield server
            finally:
                supervisor.closing = True
                tg.cancel_scope.cancel()
    except BaseException as exc:
        raise _one_exception(exc, server._failure) from _cause(exc, server._failure)
    finally:
        server._end()
        log.close()
    if server._failure is not None:
        # Our own cancellation is still the "exception being handled" here: hide it.
        raise server._failure from server._failure.__cause__


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _one_exception(exc: BaseException, failure: ServerError | None) -> BaseException:
    """The one exception the caller should see for what left the task group."""
    cancelled = anyio.get_cancelled_exc_class()
    leaves = [leaf for leaf in _leaves(exc) if not isinstance(leaf, cancelled)]
    for leaf in leaves:
        if not isinstance(leaf, Exception):
            return leaf  # KeyboardInterrupt, SystemExit: never replaced
    if failure is not None:
        return failure
    if len(leaves) == 1:
        return leaves[0]
    return exc


def _cause(exc: BaseException, failure: ServerError | None) -> BaseException | None:
    chosen = _one_exception(exc, failure)
    return chosen.__cause__ if chosen is not exc else exc.__cause__


class _Attempt:
    """State of one start attempt: its task group, each stream's classifier and end, the
    probe wake-up, and the fatal line (with the causes seen just before it)."""

    def __init__(self, tg: TaskGroup, patterns: PatternTable) -> None:
        self.tg = tg
        self.classifiers = {name: LineClassifier(patterns) for name in ("stdout", "stderr")}
        self.retry_line: str | None = None
        self.fatal: LineEvent | None = None
        self.causes: collections.deque[tuple[float, LineEvent]] = collections.deque(maxlen=16)
        self.ready_line_seen = False
        self.wake = anyio.Event()
        self.eof = {"stdout": anyio.Event(), "stderr": anyio.Event()}

    def retry(self, line: str) -> None:
        self.retry_line = line
        self.tg.cancel_scope.cancel()


class _Supervisor:
    """Runs one server's start attempts and turns what it sees into one outcome."""

    def __init__(self, server: Server, tg: TaskGroup, client: httpx.AsyncClient) -> None:
        self.server = server
        self.config = server.config
        self.log = server._log
        self.tg = tg
        self.client = client
        self.closing = False
        self.started_at = anyio.current_time()
        self.deadline = self.started_at + self.config.startup_timeout
        self.compile_lock: CompileLock | None = None

    def fail(self, error: ServerError) -> None:
        """Record the scope's failure (the first one wins) and cancel everything."""
        if self.server._failure is None and not self.closing:
            self.server._failure = error
            self.log.note(f"failed: {error.reason}")
            self.tg.cancel_scope.cancel()

    def error(self, reason: str, **details: Any) -> ServerError:
        kind = ServerCrashed if self.server.ready else ServerStartError
        return kind(reason, log_tail=self.log.tail(), **details)

    def set_ready(self) -> None:
        elapsed = anyio.current_time() - self.started_at
        if self.compile_lock is not None:
            lock, self.compile_lock = self.compile_lock, None
            try:
                lock.mark_done()  # later jobs start from the warm compile cache
                self.log.note("compile lock released; configuration marked compiled")
            except OSError as exc:  # mark_done released the lock; the next job compiles
                self.log.note(f"compile lock released; marker not written: {exc}")
        self.log.ready = True
        self.server._ready.set()
        self.server._settled.set()
        self.log.note(f"ready at {self.server.base_url} after {elapsed:.2f} s")

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Start the server, report once it exists, watch it until the scope ends.

        The OS refusing what a start needs (no file descriptors left, no free port, a
        socket that cannot be bound) is a ``ServerStartError`` saying so.
        """
        try:
            if isinstance(self.config, DummyConfig):
                await self._run_dummy(self.config, task_status)
            elif isinstance(self.config, EndpointConfig):
                await self._check_endpoint(self.config, task_status)
            elif isinstance(self.config, ProcessConfig):
                await self._run_process(self.config, task_status)
            else:
                raise TypeError(f"open_server cannot run a {type(self.config).__name__}")
        except OSError as exc:
            raise self.error(f"cannot start the server: {exc}") from exc

    # -- the in-process dummy -------------------------------------------------------------

    async def _run_dummy(self, config: DummyConfig, task_status: TaskStatus[None]) -> None:
        backlog = min(65535, max(1024, 2 * config.max_concurrency))
        sock = listen_socket(backlog=backlog)
        self.server._base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        app = DummyApp(config.settings(), faults=config.fault_schedule())
        self.server._dummy_app = app
        # Its only clients are this scope's own requests, already cancelled at teardown:
        # nothing is worth draining, so the grace is short.
        grace = min(config.shutdown_grace, DUMMY_GRACE)
        async with anyio.create_task_group() as tg:
            await tg.start(
                lambda task_status: serve_asgi(
                    app, sock, backlog=backlog, shutdown_grace=grace, task_status=task_status
                )
            )
            task_status.started()
            attempt = _Attempt(tg, PatternTable())
            attempt.wake.set()
            probe_only = ProcessSpec([], PatternTable(), health_path="/v1/models")
            tg.start_soon(self._poll_ready, probe_only, attempt)

    # -- an external endpoint -------------------------------------------------------------

    async def _check_endpoint(self, config: EndpointConfig, task_status: TaskStatus[None]) -> None:
        """Entering waits for this check: there is no process to prepare work beside."""
        self.server._base_url = config.root_url()
        problem = await self._endpoint_problem(config, self.server.base_url + "/v1/models")
        if problem is not None:
            raise ServerStartError(problem)
        self.set_ready()
        task_status.started()
        await self._watch_health("/v1/models", dead_status=None)

    async def _endpoint_problem(self, config: EndpointConfig, url: str) -> str | None:
        try:
            status, body = await fetch_excerpt(
                self.client, url, PROBE_TIMEOUT + config.connect_timeout
            )
        except httpx.HTTPError as exc:
            return connect_problem(url, exc)
        if status in (401, 403):
            return f"{url} rejected the API key ({status})"
        if status == 404:
            return f"no OpenAI API at {config.url}: GET /v1/models answered 404"
        if status != 200:
            return f"{url} answered {status}: {excerpt(body, 200, self.server._log.redact)!r}"
        return None

    # -- launched processes ---------------------------------------------------------------

    async def _run_process(self, config: ProcessConfig, task_status: TaskStatus[None]) -> None:
        try:
            await self._run_attempts(config, task_status)
        finally:
            if self.compile_lock is not None:
                self.compile_lock.release()
                self.compile_lock = None

    async def _take_compile_lock(self, key: str) -> None:
        """Wait (cancellable) for this configuration's compile lock unless it is compiled.

        A lock directory that cannot be used only costs the serialisation, not the start.
        """
        try:
            lock = CompileLock(key)
        except OSError as exc:
            self.log.note(f"compile lock unavailable ({exc}); starting without it")
            return
        waited = anyio.current_time()

        def on_wait() -> None:
            self.log.note(f"waiting for the compile lock {lock.lock_path} (another job compiles)")

        if await lock.acquire(on_wait=on_wait):
            self.compile_lock = lock
            self.log.note(f"compile lock {lock.lock_path} taken: this job compiles first")
        # The wait was for someone else's start-up: it does not count against ours.
        self.deadline += anyio.current_time() - waited

    async def _run_attempts(self, config: ProcessConfig, task_status: TaskStatus[None]) -> None:
        tried: set[int] = set()
        for number in range(1, config.start_attempts + 1):
            port = pick_port(self.server.rank, avoid=tried)
            tried.add(port)
            spec = config.process_spec(port)
            if number == 1 and spec.compile_key is not None:
                await self._take_compile_lock(spec.compile_key)
            self.log.note(f"start {number}/{config.start_attempts}: {shlex.join(spec.argv)}")
            try:
                process = await spawn_server(spec.argv, env=spec.env, grace=config.shutdown_grace)
            except ServerStartError as exc:
                if number == 1:
                    raise
                self.fail(self.error(exc.reason))
                return
            host = spec.connect_host
            self.server._base_url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
            self.server.pid = process.pid
            if number == 1:
                task_status.started()
            retry_line = None
            try:
                retry_line = await self._watch(process, spec)
            finally:
                # A server that failed has nothing left to finish: a short grace, so the
                # error (and the freed GPUs) come at once, not after a slow worker's exit.
                failed = self.server._failure is not None or retry_line is not None
                await process.terminate(CRASH_GRACE if failed else None)
                self.log.note(f"server tree of pid {process.pid} terminated")
            if retry_line is None:
                return
            if number == config.start_attempts:
                reason = f"could not start after {number} attempts; last: {retry_line}"
                self.fail(self.error(reason, matched_line=retry_line))
                return
            self.log.note(f"start failed on port {port} ({retry_line}); trying another port")

    async def _watch(self, process: ServerProcess, spec: ProcessSpec) -> str | None:
        """Run one attempt until the scope ends; the retryable line if it should be retried."""
        async with anyio.create_task_group() as tg:
            attempt = _Attempt(tg, spec.patterns)
            tg.start_soon(self._scan, process.stdout, "stdout", attempt)
            tg.start_soon(self._scan, process.stderr, "stderr", attempt)
            tg.start_soon(self._poll_ready, spec, attempt)
            tg.start_soon(self._watch_exit, process, attempt)
        return attempt.retry_line

    async def _scan(self, stream: ByteReceiveStream, name: str, attempt: _Attempt) -> None:
        splitter = LineSplitter()
        try:
            async for chunk in stream:
                for line in splitter.feed(chunk):
                    self._on_line(name, line, attempt)
                self.log.flush()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        for line in splitter.finish():
            self._on_line(name, line, attempt)
        attempt.eof[name].set()

    def _on_line(self, stream: str, line: str, attempt: _Attempt) -> None:
        line = self.log.add(stream, line)
        event = attempt.classifiers[stream].classify(line, ready=self.server.ready)
        if event is None:
            return
        if event.kind is LineKind.READY:
            attempt.ready_line_seen = True
            attempt.wake.set()
        elif event.kind is LineKind.RETRY:
            attempt.retry(line)
        elif attempt.fatal is not None:
            if event.rank < attempt.fatal.rank:
                attempt.fatal = event  # a line that says better what went wrong
        elif event.kind is LineKind.CAUSE:
            attempt.causes.append((anyio.current_time(), event))
        else:
            since = anyio.current_time() - CAUSE_WINDOW
            recent = [cause for at, cause in attempt.causes if at >= since]
            attempt.fatal = min([event, *recent], key=lambda found: found.rank)
            attempt.tg.start_soon(self._fail_on_fatal, attempt)

    async def _fail_on_fatal(self, attempt: _Attempt) -> None:
        """Fail shortly after the first fatal line: the lines after it (a traceback, the
        root cause the engine prints after its own summary) belong in the error."""
        await anyio.sleep(FATAL_SETTLE)
        self.fail(self._fatal_error(attempt))

    def _fatal_error(self, attempt: _Attempt, exit_code: int | None = None) -> ServerError:
        assert attempt.fatal is not None
        event = attempt.fatal
        reason = f"fatal line in server log (pattern {event.pattern!r}): {event.line}"
        return self.error(reason, matched_line=event.line, exit_code=exit_code)

    async def _watch_exit(self, process: ServerProcess, attempt: _Attempt) -> None:
        code = await process.wait_exit()
        with anyio.move_on_after(EXIT_DRAIN):  # let the last lines in: they say why
            for eof in attempt.eof.values():
                await eof.wait()
        if attempt.fatal is not None:
            self.fail(self._fatal_error(attempt, exit_code=code))
            return
        when = "after it was ready" if self.server.ready else "before it was ready"
        if process.reaper_died:
            reason = (
                f"servescope's reaper process (pid {process.reaper_pid}) ended "
                f"({_describe_exit(code)}) {when}; the server's tree is killed with it"
            )
            self.fail(self.error(reason, exit_code=code))
            return
        self.fail(self.error(f"server exited {_describe_exit(code)} {when}", exit_code=code))

    async def _poll_ready(self, spec: ProcessSpec, attempt: _Attempt) -> None:
        """Probe the health path until it answers 200: at once on a ready line, else with
        backoff (and only after a ready line if the backend requires one). Then watch it."""
        path, delay = spec.health_path, PROBE_FIRST_DELAY
        while not (
            (attempt.ready_line_seen or not spec.ready_line_required) and await self._probe(path)
        ):
            remaining = self.deadline - anyio.current_time()
            if remaining <= 0:
                timeout = self.config.startup_timeout
                self.fail(self.error(f"server not ready within startup_timeout={timeout:g} s"))
                return
            with anyio.move_on_after(min(delay, remaining)):
                await attempt.wake.wait()
            if attempt.wake.is_set():  # a ready line: probe again at once, then briskly
                attempt.wake = anyio.Event()
                delay = PROBE_FIRST_DELAY
            # After a ready line the socket may lag it (uvicorn prints "Application startup
            # complete." before it listens): stay brisk instead of backing off to 2 s.
            ceiling = PROBE_AFTER_LINE_MAX if attempt.ready_line_seen else PROBE_MAX_DELAY
            delay = min(delay * 1.5, ceiling)
        self.set_ready()
        await self._watch_health(path, spec.dead_status, attempt)

    async def _watch_health(
        self, path: str, dead_status: int | None, attempt: _Attempt | None = None
    ) -> None:
        """After readiness, probe ``path`` every ``health_interval`` s until the scope ends:
        fail once the engine says it died, or once it has not answered for
        ``unhealthy_after`` s (see ``_health``). A fatal line already seen says better what
        happened, and fails the scope by itself."""
        config = self.config
        if config.health_interval is None:
            return
        watch = HealthWatch(
            config.unhealthy_after, config.health_timeout, dead_status, anyio.current_time()
        )
        while True:
            await anyio.sleep(config.health_interval)
            status = await self._probe_status(path, watch.probe_timeout(anyio.current_time()))
            outcome = watch.record(status, anyio.current_time())
            if attempt is not None and attempt.fatal is not None:
                return
            if outcome is Probe.DEAD:
                reason = f"GET {path} answered {status} after the server was ready: its engine died"
                self.fail(self.error(reason))
                return
            silent = watch.silent_for(anyio.current_time())
            if silent is not None:
                self.fail(self.error(watch.describe(path, silent)))
                return

    async def _probe(self, path: str) -> bool:
        return await self._probe_status(path, PROBE_TIMEOUT) == 200

    async def _probe_status(self, path: str, limit: float) -> int | None:
        """The status ``path`` answers, or None if it does not answer within ``limit`` s."""
        return await probe_status(self.client, self.server.base_url + path, limit)


def _describe_exit(code: int) -> str:
    if code >= 0:
        return f"with code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"
