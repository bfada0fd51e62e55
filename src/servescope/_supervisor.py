"""One server's life, supervised: launch, readiness, health, failure — as a value.

::

    Supervisor.run(state)                 inside the task group its owner gives it
     ├─ the in-process dummy               hypercorn serving the dummy app
     ├─ an endpoint                        checked once, then watched
     └─ a process, per start attempt       each on a fresh port
         ├─ stdout scanner ┐               lines → log file, logger, ring; classified:
         ├─ stderr scanner ┘               ready → probe now, fatal → fail, retry → next attempt
         ├─ readiness, then health         ``_readiness``: probe until 200, then watch
         └─ exit watcher                   the reaper reports the server's exit at once

What it finds out goes into a ``ServerState`` — the address, the process, readiness,
health, the one failure — which is what an owner holds: ``open_server`` one (a failure
cancels the scope, body included), a pool many (a failure ends that replica's group and
is a value the pool acts on). On a failure the supervisor records one ``ServerError``,
cancels the requests on the server at once, and cancels the group it was given; the
process tree is torn down (``_process``) on every way out.
"""

from __future__ import annotations

import collections
import copy
import shlex
import signal
from collections.abc import Callable
from typing import Any

import anyio
import httpx
from anyio.abc import ByteReceiveStream, TaskGroup, TaskStatus

from ._asgi import listen_socket, serve_asgi
from ._client import Wire
from ._compile_lock import CompileLock
from ._config import ServerConfig
from ._dummy_app import DummyApp
from ._errors import (
    ConfigError,
    ServeError,
    ServerClosed,
    ServerCrashed,
    ServerError,
    ServerStartError,
)
from ._health import Demotion, HealthWatch
from ._http import connect_problem, fetch_excerpt, probe_status
from ._logscan import LineClassifier, LineEvent, LineKind, LineSplitter, PatternTable
from ._multinode import NodeCoordinator, NodePlan, plan_nodes
from ._ports import pick_port
from ._process import ServerProcess, spawn_server
from ._readiness import PROBE_TIMEOUT, HealthProbe, ReadySignal, wait_until_ready, watch_health
from ._redact import Redactor
from ._responses import excerpt
from ._serverlog import ServerLog
from .backends._base import EngineConfig, ProcessConfig, ProcessSpec
from .backends.dummy import DummyConfig
from .backends.endpoint import EndpointConfig

__all__ = ["ServerState", "Supervisor"]

#: After the server exits, how long its last output may take to arrive.
EXIT_DRAIN = 0.25
#: SIGTERM-to-SIGKILL grace for the tree of a server that already failed (crashed, fatal
#: line, not ready in time): it has nothing left to finish cleanly.
CRASH_GRACE = 0.5
#: How long after a fatal line its explanation (traceback, root cause) is still read.
FATAL_SETTLE = 0.25
#: After readiness, cause lines (``CUDA out of memory``) this long before a death line
#: explain it.
CAUSE_WINDOW = 5.0
DUMMY_GRACE = 0.2
DEFAULT_DEMOTION = Demotion()


class ServerState:
    """What is known of one server, as its supervisor finds it out.

    Its owner reads it (address, readiness, failure) and sends requests through it;
    ``attempts`` are the requests on the wire to it, cancelled the moment it fails so
    they can be sent elsewhere or fail with its error, instead of waiting for a timeout.
    ``on_change`` (a pool's hook) is called when it becomes ready, healthy or unhealthy,
    or fails.
    """

    def __init__(
        self,
        config: ServerConfig,
        wire: Wire,
        *,
        rank: int,
        node: int,
        log: ServerLog,
        demotion: Demotion = DEFAULT_DEMOTION,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.rank = rank
        self.node = node
        self.log = log
        self.demotion = demotion
        self.env = env or {}  # added to a launched process's (a pool's GPU slice)
        self.pid: int | None = None
        self.address: str | None = None
        self.ready_event = anyio.Event()
        #: Set once the server is ready or has ended: waiters outside the owner's scope
        #: (a worker task in the caller's own task group) are never left waiting.
        self.settled = anyio.Event()
        self.ended = anyio.Event()
        self.failure: ServerError | None = None
        self.closed = False
        self.healthy = True
        self.attempts: set[anyio.CancelScope] = set()
        self.wire = wire  # how requests reach it
        self.on_change: Callable[[ServerState], None] | None = None
        self.dummy_app: DummyApp | None = None  # the in-process dummy, for tests
        #: One node of a multi-node server: its plan (set by the owner or resolved at
        #: start) and its part, once the supervisor runs it.
        self.nodes: NodePlan | None = None
        self.node_part: NodeCoordinator | None = None
        #: A pool's replica: it must be a multi-node group's head, never a worker node.
        self.head_only = False

    @classmethod
    def create(
        cls,
        config: ServerConfig,
        wire: Wire,
        *,
        rank: int = 0,
        node: int = 0,
        demotion: Demotion = DEFAULT_DEMOTION,
        env: dict[str, str] | None = None,
    ) -> ServerState:
        """A state with its log (file per rank, ring, logger), secrets blanked in it."""
        log = ServerLog(
            rank=rank,
            node=node,
            log_dir=config.log_dir,
            tail_lines=config.log_tail_lines,
            max_bytes=config.log_max_bytes,
            redact=Redactor(config.secrets()),
        )
        return cls(config, wire, rank=rank, node=node, log=log, demotion=demotion, env=env)

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the server (it may change if a start is retried)."""
        if self.address is None:
            raise ServeError("the server has no address yet")
        return self.address

    @property
    def ready(self) -> bool:
        """Whether the server has answered its readiness probe."""
        return self.ready_event.is_set()

    @property
    def lost(self) -> bool:
        """Whether the server failed, ended or stopped answering its health probe: a
        request on it will get no answer."""
        return self.failure is not None or self.closed or not self.healthy

    async def wait_ready(self) -> None:
        """Wait until it is ready; its error (or ``ServerClosed``) if it ends first."""
        self.check_open()
        await self.settled.wait()
        self.check_open()

    def check_open(self) -> None:
        """Raise the server's error, or ``ServerClosed``, if it can take no request."""
        if self.failure is not None:
            # A copy for each caller: many waiters re-raising one object would chain all
            # their tracebacks onto it.
            raise copy.copy(self.failure)
        if self.closed:
            raise ServerClosed(f"the scope of {self.name} has ended; it takes no more requests")

    @property
    def name(self) -> str:
        """The server, in words: its backend, rank and address."""
        return f"{type(self.config).__name__} rank={self.rank} {self.address or '(no address)'}"

    async def backoff(self, seconds: float) -> None:
        """A retry's backoff: ``seconds``, or less if the server ends meanwhile."""
        with anyio.move_on_after(seconds):
            await self.ended.wait()

    def fail(self, error: ServerError) -> bool:
        """Record its failure (the first one wins); ``True`` if this was the first."""
        if self.failure is not None:
            return False
        self.failure = error
        self.log.note(f"failed: {error.reason}")
        self.cancel_attempts()
        self._changed()
        return True

    def set_ready(self) -> None:
        """It answered its readiness probe."""
        self.log.ready = True
        self.ready_event.set()
        self.settled.set()
        self._changed()

    def set_healthy(self, healthy: bool) -> None:
        """Its health probes say it is (or is no longer) answering."""
        self.healthy = healthy
        self.log.note("answering its health probe again" if healthy else "not answering")
        self._changed()

    def end(self) -> None:
        """Its owner's scope is over: wake every waiter, cancel what is still on the wire."""
        self.closed = True
        self.settled.set()
        self.ended.set()
        self.cancel_attempts()

    def cancel_attempts(self) -> None:
        """Cancel the requests on the wire to it: they are sent elsewhere, or fail with
        its error, at once instead of at their timeout."""
        for scope in list(self.attempts):
            scope.cancel()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)


class _Attempt:
    """State of one start attempt: its task group, each stream's classifier and end, the
    readiness signal, and the fatal line (with the causes seen just before it)."""

    def __init__(self, tg: TaskGroup, patterns: PatternTable) -> None:
        self.tg = tg
        self.classifiers = {name: LineClassifier(patterns) for name in ("stdout", "stderr")}
        self.retry_line: str | None = None
        self.fatal: LineEvent | None = None
        self.causes: collections.deque[tuple[float, LineEvent]] = collections.deque(maxlen=16)
        self.signal = ReadySignal()
        self.eof = {"stdout": anyio.Event(), "stderr": anyio.Event()}

    def retry(self, line: str) -> None:
        self.retry_line = line
        self.tg.cancel_scope.cancel()


class Supervisor:
    """Runs one server's start attempts and turns what it sees into one outcome.

    ``tg`` is the group a failure cancels (after ``state.fail``); ``client`` probes.
    ``stop()`` ends it without a failure (a normal teardown): failures seen while it
    tears down are not failures.
    """

    def __init__(self, state: ServerState, tg: TaskGroup, client: httpx.AsyncClient) -> None:
        self.state = state
        self.config = state.config
        self.log = state.log
        self.tg = tg
        self.client = client
        self.closing = False
        self.started_at = anyio.current_time()
        self.deadline = self.started_at + self.config.startup_timeout
        self.compile_lock: CompileLock | None = None
        self.part_ended = False
        self._attempt: _Attempt | None = None

    def fail(self, error: ServerError) -> None:
        """Record the server's failure (the first one wins) and cancel its group."""
        if not self.closing and self.state.fail(error):
            self.tg.cancel_scope.cancel()

    def stop(self) -> None:
        """End it without a failure: its group is cancelled, its tree torn down."""
        self.closing = True
        self.tg.cancel_scope.cancel()

    def part_done(self) -> None:
        """A worker node's part is over (the head ended normally): its process is torn
        down at once, without a failure; the scope stays until its body ends."""
        self.part_ended = True
        if self._attempt is not None:
            self._attempt.tg.cancel_scope.cancel()

    def error(self, reason: str, **details: Any) -> ServerError:
        kind = ServerCrashed if self.state.ready else ServerStartError
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
        self.state.set_ready()
        address = self.state.address
        self.log.note(f"ready at {address or '(no HTTP server)'} after {elapsed:.2f} s")
        if self.state.node_part is not None and address is not None:
            self.state.node_part.ready(address)

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Start the server, report once it exists, watch it until the group ends.

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
                raise TypeError(f"cannot run a {type(self.config).__name__}")
        except OSError as exc:
            raise self.error(f"cannot start the server: {exc}") from exc

    # -- the in-process dummy -------------------------------------------------------------

    async def _run_dummy(self, config: DummyConfig, task_status: TaskStatus[None]) -> None:
        backlog = min(65535, max(1024, 2 * config.max_concurrency))
        sock = listen_socket(backlog=backlog)
        self.state.address = f"http://127.0.0.1:{sock.getsockname()[1]}"
        app = DummyApp(config.settings(), faults=config.fault_schedule())
        self.state.dummy_app = app
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
            attempt.signal.wake.set()
            probe_only = ProcessSpec([], PatternTable(), health_path="/v1/models")
            tg.start_soon(self._ready_then_healthy, probe_only, attempt)

    # -- an external endpoint -------------------------------------------------------------

    async def _check_endpoint(self, config: EndpointConfig, task_status: TaskStatus[None]) -> None:
        """Entering waits for this check: there is no process to prepare work beside."""
        self.state.address = config.root_url()
        problem = await self._endpoint_problem(config, self.state.base_url + "/v1/models")
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
            return f"{url} answered {status}: {excerpt(body, 200, self.log.redact)!r}"
        return None

    # -- launched processes ---------------------------------------------------------------

    async def _run_process(self, config: ProcessConfig, task_status: TaskStatus[None]) -> None:
        try:
            if isinstance(config, EngineConfig) and config.nodes is not None:
                if self.state.nodes is None:
                    self.state.nodes = await plan_nodes(config.nodes)
                plan = self.state.nodes
                if plan is not None and self.state.head_only and not plan.is_head:
                    raise ConfigError(
                        f"a pool runs the head (node 0) of a multi-node replica, but this is "
                        f"{plan.role.describe()}: run the other nodes with `servescope serve`"
                    )
                if self.state.nodes is not None:
                    part = self.state.node_part = NodeCoordinator(self.state.nodes, self)
                    task_status.started()  # the other nodes may take minutes to come
                    task_status = anyio.TASK_STATUS_IGNORED
                    if not await self._before_engine(config, part):
                        return
            await self._run_attempts(config, task_status)
        finally:
            if self.compile_lock is not None:
                self.compile_lock.release()
                self.compile_lock = None

    async def _before_engine(self, config: EngineConfig, part: NodeCoordinator) -> bool:
        """Start this node's liveness channel (and Ray) within the start-up deadline;
        ``False`` (the failure recorded) if the engine must not start."""
        with anyio.move_on_after(max(0.0, self.deadline - anyio.current_time())):
            await part.before_engine(config)
            return True
        self.fail(self.error(self._not_ready_reason()))
        return False

    def _not_ready_reason(self) -> str:
        part = self.state.node_part
        missing = part.missing() if part is not None else ""
        return f"server not ready within startup_timeout={self.config.startup_timeout:g} s{missing}"

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
            port = pick_port(self.state.rank, avoid=tried)
            tried.add(port)
            part = self.state.node_part
            if part is not None:
                assert isinstance(config, EngineConfig)
                spec = part.process_spec(config, port)
            else:
                spec = config.process_spec(port)
            if number == 1 and spec.compile_key is not None:
                await self._take_compile_lock(spec.compile_key)
            self.log.note(f"start {number}/{config.start_attempts}: {shlex.join(spec.argv)}")
            env = {**spec.env, **self.state.env}
            try:
                grace = config.shutdown_grace
                if spec.max_grace is not None:
                    grace = min(grace, spec.max_grace)
                process = await spawn_server(spec.argv, env=env, grace=grace)
            except ServerStartError as exc:
                if number == 1:
                    raise
                self.fail(self.error(exc.reason))
                return
            host = spec.connect_host
            if spec.health_path is not None:
                self.state.address = f"http://{f'[{host}]' if ':' in host else host}:{port}"
            self.state.pid = process.pid
            if part is not None and not spec.ready_line_required:
                part.part_up()
            if number == 1:
                task_status.started()
            retry_line = None
            try:
                retry_line = await self._watch(process, spec)
            finally:
                # A server that failed has nothing left to finish: a short grace, so the
                # error (and the freed GPUs) come at once, not after a slow worker's exit.
                failed = self.state.failure is not None or retry_line is not None
                failed = failed or self.part_ended
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
        """Run one attempt until the group ends; the retryable line if it should be retried."""
        async with anyio.create_task_group() as tg:
            attempt = self._attempt = _Attempt(tg, spec.patterns)
            if self.part_ended:
                tg.cancel_scope.cancel()
            tg.start_soon(self._scan, process.stdout, "stdout", attempt)
            tg.start_soon(self._scan, process.stderr, "stderr", attempt)
            tg.start_soon(self._ready_then_healthy, spec, attempt)
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
        event = attempt.classifiers[stream].classify(line, ready=self.state.ready)
        if event is None:
            return
        if event.kind is LineKind.READY:
            attempt.signal.ready_line()
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
        when = "after it was ready" if self.state.ready else "before it was ready"
        if process.reaper_died:
            reason = (
                f"servescope's reaper process (pid {process.reaper_pid}) ended "
                f"({_describe_exit(code)}) {when}; the server's tree is killed with it"
            )
            self.fail(self.error(reason, exit_code=code))
            return
        self.fail(self.error(f"server exited {_describe_exit(code)} {when}", exit_code=code))

    async def _ready_then_healthy(self, spec: ProcessSpec, attempt: _Attempt) -> None:
        """Probe until ready (``_readiness``), then watch its health until the group ends."""
        if spec.health_path is None:
            await self._part_up(spec, attempt)
            return
        ready = await wait_until_ready(
            self._probe(spec.health_path),
            attempt.signal,
            line_required=spec.ready_line_required,
            deadline=self.deadline,
        )
        if not ready:
            self.fail(self.error(self._not_ready_reason()))
            return
        self.set_ready()
        await self._watch_health(spec.health_path, spec.dead_status, attempt)

    async def _part_up(self, spec: ProcessSpec, attempt: _Attempt) -> None:
        """A process without HTTP: up on its ready line (if it prints one); a worker node
        is ready once the head says it serves. Within the start-up deadline."""
        part = self.state.node_part
        with anyio.move_on_after(max(0.0, self.deadline - anyio.current_time())):
            while spec.ready_line_required and not attempt.signal.line_seen:
                await attempt.signal.wake.wait()
                attempt.signal.wake = anyio.Event()
            if part is None:
                self.set_ready()
                return
            part.part_up()
            await self.state.ready_event.wait()
            return
        self.fail(self.error(self._not_ready_reason()))

    async def _watch_health(
        self, path: str, dead_status: int | None, attempt: _Attempt | None = None
    ) -> None:
        """After readiness, until the group ends: fail once the engine says it died, or
        has not answered for ``unhealthy_after`` s (``_health``). A fatal line already
        seen says better what happened, and fails the server by itself."""
        config = self.config
        if config.health_interval is None:
            return
        watch = HealthWatch(
            config.unhealthy_after,
            config.health_timeout,
            dead_status,
            anyio.current_time(),
            demotion=self.state.demotion,
        )
        reason = await watch_health(
            self._probe(path),
            watch,
            path=path,
            interval=config.health_interval,
            on_health=self.state.set_healthy,
        )
        if attempt is None or attempt.fatal is None:
            self.fail(self.error(reason))

    def _probe(self, path: str) -> HealthProbe:
        """GET ``path`` on the server within a time limit: its status, or ``None``."""

        async def probe(limit: float) -> int | None:
            return await probe_status(self.client, self.state.base_url + path, limit)

        return probe


def _describe_exit(code: int) -> str:
    if code >= 0:
        return f"with code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"
