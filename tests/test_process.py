"""Launched servers: failures, teardown and retries, through a real process tree.

The server is ``servescope.dummy`` run as a custom-backend script, scripted to
print, hang, crash, ignore SIGTERM and spawn children.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import anyio
import psutil
import pytest

import servescope
from servescope import ServerCrashed, ServerStartError, _supervisor, open_server
from servescope._ports import pick_port as real_pick
from servescope._serverlog import log_file_name
from servescope._supervisor import CRASH_GRACE

from .conftest import dummy_process

pytestmark = pytest.mark.anyio

OOM_LINE = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"


def read_pids(pid_file: Path) -> list[int]:
    pids = json.loads(pid_file.read_text())
    return [pids["server"], *pids["children"]]


def assert_all_gone(pids: list[int]) -> None:
    alive = [
        pid
        for pid in pids
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    assert not alive, f"still running: {alive}"


async def test_ready_and_serving() -> None:
    with anyio.fail_after(20):
        async with open_server(dummy_process("--ready-after", "0.3")) as server:
            assert server.pid is not None and not server.ready
            await server.wait_ready()
            out = await server.chat([{"role": "user", "content": "hi"}])
            assert out.usage.completion_tokens == 100
            assert any("Application startup complete" in line for line in server.log_tail())


async def test_fatal_line_while_running_fails_within_a_second() -> None:
    config = dummy_process("--never-ready", "--print", f"0.2:stderr:{{time}} {OOM_LINE}")
    with anyio.fail_after(20), pytest.raises(ServerStartError) as info:
        async with open_server(config) as server:
            await server.wait_ready()
    latency = time.time() - float(info.value.matched_line.split()[0])  # type: ignore[union-attr]
    assert latency < 1.0
    assert "CUDA out of memory" in info.value.reason
    assert info.value.exit_code is None
    assert info.value.log_tail[-1].endswith(OOM_LINE)


async def test_exit_before_ready_reports_code_and_last_lines() -> None:
    config = dummy_process(
        "--never-ready",
        "--print",
        "0:stdout:loading weights",
        "--print",
        "0.1:stderr:oh no",
        "--exit-after",
        "0.3",
        "--exit-code",
        "3",
    )
    with anyio.fail_after(20), pytest.raises(ServerStartError) as info:
        async with open_server(config):
            await anyio.sleep(30)
    assert info.value.exit_code == 3
    assert "exited with code 3 before it was ready" in str(info.value)
    assert "loading weights" in info.value.log_tail and "oh no" in info.value.log_tail
    assert "oh no" in str(info.value)


async def test_exit_after_ready_cancels_the_body() -> None:
    config = dummy_process("--exit-after", "1.5", "--exit-code", "0")
    body_cancelled = False
    with anyio.fail_after(20), pytest.raises(ServerCrashed) as info:
        async with open_server(config) as server:
            await server.wait_ready()
            try:
                await anyio.sleep(30)
            except anyio.get_cancelled_exc_class():
                body_cancelled = True
                raise
    assert body_cancelled
    assert info.value.exit_code == 0
    assert "after it was ready" in info.value.reason


def traceback_lines(at: float, last_line: str) -> list[str]:
    """``--print`` options for a Python traceback ending with ``last_line``, in order."""
    lines = [
        "Traceback (most recent call last):",
        '  File "/srv/model_server.py", line 88, in generate',
        "    out = model.generate(**batch)",
        last_line,
    ]
    return [
        arg for n, line in enumerate(lines) for arg in ("--print", f"{at + n / 50}:stderr:{line}")
    ]


async def test_fatal_traceback_after_ready_is_a_crash() -> None:
    config = dummy_process(*traceback_lines(1.5, OOM_LINE))
    with anyio.fail_after(20), pytest.raises(ServerCrashed, match="CUDA out of memory"):
        async with open_server(config) as server:
            await server.wait_ready()
            await anyio.sleep(30)


async def test_fatal_text_outside_a_traceback_after_ready_is_not_a_crash() -> None:
    """A custom server that logs what it was asked (a prompt quoting an error) lives on;
    before readiness the same line is fatal (test above)."""
    quoted = [
        f"INFO: prompt=please explain {OOM_LINE}",
        OOM_LINE,  # a prompt printed on lines of its own, outside any traceback
        "ImportError: cannot import name 'x' (quoted by a user)",
        "OSError: [Errno 98] Address already in use",
        "WARNING: side component: address already in use, using another port",
    ]
    prints = [arg for n, line in enumerate(quoted) for arg in ("--print", f"0.8:stderr:{line}")]
    with anyio.fail_after(20):
        async with open_server(dummy_process("--ready-after", "0.3", *prints)) as server:
            await server.wait_ready()
            await anyio.sleep(1.2)
            assert any(line == OOM_LINE for line in server.log_tail())
            out = await server.chat([{"role": "user", "content": OOM_LINE}])
            assert out.text


async def test_body_exception_tears_down_tree(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids.json"
    config = dummy_process("--child", "plain", "--pid-file", str(pid_file))
    with anyio.fail_after(20), pytest.raises(KeyError, match="from the body"):
        async with open_server(config) as server:
            await server.wait_ready()
            raise KeyError("from the body")
    assert_all_gone(read_pids(pid_file))


async def test_sigterm_ignoring_and_escaped_descendants_are_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids.json"
    config = dummy_process(
        "--ignore-sigterm",
        "--child",
        "ignore-sigterm",
        "--child",
        "new-group",
        "--child",
        "orphan",
        "--pid-file",
        str(pid_file),
        shutdown_grace=0.5,
    )
    with anyio.fail_after(20):
        async with open_server(config) as server:
            await server.wait_ready()
            pids = read_pids(pid_file)
            assert len(pids) == 4 and all(psutil.pid_exists(pid) for pid in pids)
            # server + ignoring child share a group; the other two escaped it
            assert len({os.getpgid(pid) for pid in pids}) == 3
        assert_all_gone(pids)


async def test_cancel_from_outside_is_bounded_by_grace(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids.json"
    config = dummy_process(
        "--ignore-sigterm",
        "--child",
        "ignore-sigterm",
        "--pid-file",
        str(pid_file),
        shutdown_grace=1.0,
    )
    with anyio.fail_after(20):
        with anyio.move_on_after(30) as outer:
            async with open_server(config) as server:
                await server.wait_ready()
                outer.cancel()
                started = anyio.current_time()
                await anyio.sleep(30)
        teardown = anyio.current_time() - started
    assert outer.cancelled_caught
    assert 0.9 < teardown < 1.0 + 3.0  # SIGKILL comes right after the grace period
    assert_all_gone(read_pids(pid_file))


async def test_startup_timeout() -> None:
    config = dummy_process("--never-ready", startup_timeout=0.5)
    with anyio.fail_after(20), pytest.raises(ServerStartError, match="not ready within"):
        async with open_server(config) as server:
            await server.wait_ready()


async def test_port_taken_is_retried_on_another_port(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy_port = taken.getsockname()[1]
    calls: list[int] = []

    def pick(rank: int, *, avoid: set[int]) -> int:
        port = busy_port if not calls else real_pick(rank, avoid=avoid)
        calls.append(port)
        return port

    monkeypatch.setattr(_supervisor, "pick_port", pick)
    try:
        with anyio.fail_after(20):
            async with open_server(dummy_process()) as server:
                await server.wait_ready()
                assert server.base_url != f"http://127.0.0.1:{busy_port}"
                assert len(calls) == 2
                assert any("Address already in use" in line for line in server.log_tail())
    finally:
        taken.close()


async def test_port_taken_on_every_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(_supervisor, "pick_port", lambda *a, **k: taken.getsockname()[1])
        with anyio.fail_after(20), pytest.raises(ServerStartError, match="after 2 attempts"):
            async with open_server(dummy_process()) as server:
                await server.wait_ready()


async def test_invalid_utf8_and_giant_line(tmp_path: Path) -> None:
    config = dummy_process(
        "--print",
        "0:stdout:before \\xff\\xfe after",
        "--flood",
        "0:stderr:10000000",
        "--print",
        "0.1:stderr:still scanning",
        log_dir=tmp_path,
    )
    with anyio.fail_after(30):
        async with open_server(config) as server:
            await server.wait_ready()
            while "still scanning" not in server.log_tail():  # noqa: ASYNC110 - stderr lags
                await anyio.sleep(0.05)
            tail = server.log_tail()
    assert "before \ufffd\ufffd after" in tail
    assert "still scanning" in tail
    (giant,) = [line for line in tail if line.startswith("xxxx")]
    assert len(giant) < 70 * 1024 and "more bytes of this line dropped" in giant
    log_text = (tmp_path / log_file_name(0, 0)).read_text()
    assert "still scanning" in log_text and "ready at http://127.0.0.1" in log_text


async def test_missing_executable() -> None:
    config = dummy_process(python="/nonexistent/python3")
    with anyio.fail_after(20), pytest.raises(ServerStartError, match="cannot start '/nonexistent"):
        async with open_server(config):
            pass


async def test_user_fatal_pattern() -> None:
    config = dummy_process(
        "--never-ready", "--print", "0.1:stdout:engine 2 died", fatal_patterns=(r"engine \d died",)
    )
    with anyio.fail_after(20), pytest.raises(ServerStartError, match="engine 2 died"):
        async with open_server(config) as server:
            await server.wait_ready()


def test_server_outlives_the_thread_that_started_it() -> None:
    """Event loops may fork from worker threads (trio's exit after 10 s idle): a thread's
    exit must not tear the server down (the reaper must not use PR_SET_PDEATHSIG)."""
    import subprocess
    import sys
    import threading

    from servescope._process import REAPER

    ours, theirs = socket.socketpair()
    started: list[subprocess.Popen[bytes]] = []
    reports: list[str] = []

    def start() -> None:  # the thread lives until the server runs, then exits
        command = [sys.executable, str(REAPER), str(os.getpid()), "1", "--", "sleep", "30"]
        started.append(subprocess.Popen(command, stdin=theirs.fileno(), start_new_session=True))
        reports.append(ours.recv(100).decode())

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    theirs.close()
    reaper, report = started[0], reports[0]
    with ours:
        assert report.startswith("spawned "), report
        server_pid = int(report.split()[1])
        time.sleep(0.5)
        try:
            assert psutil.pid_exists(server_pid), "the server died with the thread that forked"
        finally:
            ours.sendall(b"stop\n")
            reaper.wait(timeout=10)
    assert_all_gone([server_pid])


async def test_ready_line_before_the_socket_listens() -> None:
    """uvicorn prints its ready line before it listens (vLLM): the probe that line triggers
    is refused, and the next ones must come briskly, not after the grown backoff."""
    config = dummy_process(
        "--ready-after", "3.0", "--ready-line", "",
        "--print", "2.9:stderr:INFO:     Application startup complete.",
    )  # fmt: skip
    with anyio.fail_after(20):
        async with open_server(config) as server:
            await server.wait_ready()
            ready_at = time.time()
            serving = [line for line in server.log_tail() if "serving at" in line]
    serving_at = float(serving[0].rsplit(" ", 1)[1])
    assert ready_at - serving_at < 0.3, f"ready {ready_at - serving_at:.2f} s after listening"


async def test_crashed_server_is_torn_down_with_a_short_grace(tmp_path: Path) -> None:
    """After a crash nothing is left to finish: a SIGTERM-ignoring child is SIGKILLed after
    ``CRASH_GRACE`` (0.5 s), not after ``shutdown_grace`` (here 8 s), and the error comes then."""
    pid_file = tmp_path / "pids.json"
    config = dummy_process(
        "--exit-after", "1.5", "--child", "ignore-sigterm", "--pid-file", str(pid_file),
        shutdown_grace=8.0,
    )  # fmt: skip
    with anyio.fail_after(20), pytest.raises(ServerCrashed, match="exited with code 1"):
        async with open_server(config) as server:
            await server.wait_ready()
            ready = anyio.current_time()
            await anyio.sleep(30)
    raised = anyio.current_time() - ready
    assert raised < 1.5 + 0.25 + CRASH_GRACE + 1.5, f"{raised:.2f} s"  # exit, drain, grace, slack
    assert_all_gone(read_pids(pid_file))


# -- nothing outlives the scope, on every path -------------------------------------------


async def test_cancelled_at_any_moment_of_the_start_leaves_nothing_running() -> None:
    """Cancelled while the reaper and the server are being spawned (and at random moments
    after): not one process of the tree is alive the moment ``open_server`` returns."""
    from .conftest import leftover_processes

    since = time.time()
    for step in range(40):
        with anyio.move_on_after(step * 0.008):
            async with open_server(dummy_process("--ready-after", "0.1")) as server:
                await server.wait_ready()
                await anyio.sleep(5)
        left = [(proc.pid, proc.cmdline()) for proc in leftover_processes(since)]
        assert not left, f"cancelled after {step * 8} ms, still running: {left}"


async def test_reaper_sigkilled_its_tree_is_killed_by_the_driver(tmp_path: Path) -> None:
    """The OOM killer takes the reaper: the server dies with it (PDEATHSIG), and its
    descendants — re-parented to init — are found by their token and killed."""
    pid_file = tmp_path / "pids.json"
    config = dummy_process(
        *("--child", "ignore-sigterm", "--child", "new-group", "--child", "orphan"),
        *("--pid-file", str(pid_file)),
    )
    with anyio.fail_after(20), pytest.raises(ServerCrashed, match="reaper") as caught:
        async with open_server(config) as server:
            await server.wait_ready()
            pids = read_pids(pid_file)
            assert server.pid is not None
            reaper = psutil.Process(server.pid).parent()
            assert reaper is not None and "_reaper.py" in " ".join(reaper.cmdline())
            reaper.kill()
            await anyio.sleep(10)
    assert "SIGKILL" in caught.value.reason
    assert_all_gone(pids)


@pytest.mark.parametrize(
    ("dummy_args", "expected"),
    [
        (("--never-ready", "--exit-after", "0.5"), ServerStartError),  # fails before ready
        (("--ready-after", "5"), servescope.ServerClosed),  # the body ends before ready
    ],
)
async def test_waiters_outside_the_scope_are_woken_when_it_ends(
    dummy_args: tuple[str, ...], expected: type[Exception]
) -> None:
    """Requests from a task of the caller's own task group, waiting for readiness when the
    scope ends, get the scope's error (or ServerClosed) instead of waiting forever."""
    outcomes: list[BaseException] = []

    async def outside(server: servescope.Server, call: str) -> None:
        try:
            if call == "chat":
                await server.chat([{"role": "user", "content": "hi"}])
            else:
                await server.wait_ready()
        except servescope.ServeError as exc:
            outcomes.append(exc)

    with anyio.fail_after(15):
        async with anyio.create_task_group() as callers:
            try:
                async with open_server(dummy_process(*dummy_args)) as server:
                    callers.start_soon(outside, server, "chat")
                    callers.start_soon(outside, server, "wait_ready")
                    await anyio.sleep(0.2)
                    if expected is ServerStartError:
                        await anyio.sleep(30)
            except ServerStartError:
                assert expected is ServerStartError
    assert [type(exc) for exc in outcomes] == [expected, expected]
    assert outcomes[0] is not outcomes[1]  # each its own copy: no shared traceback


async def test_no_file_descriptors_left_is_a_start_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def exhausted() -> tuple[socket.socket, socket.socket]:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr("servescope._process.socket.socketpair", exhausted)
    with anyio.fail_after(10), pytest.raises(ServerStartError, match="Too many open files"):
        async with open_server(dummy_process()):
            pass


# -- the log file never fails a server ----------------------------------------------------


async def test_unusable_log_dir_does_not_stop_the_server(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "logs"
    not_a_dir.write_text("a file where the log directory should be")
    with anyio.fail_after(20):
        async with open_server(dummy_process(log_dir=not_a_dir)) as server:
            out = await server.chat([{"role": "user", "content": "hi"}])
            assert out.text
            assert any("log file" in line and "given up" in line for line in server.log_tail())


async def test_full_log_disk_does_not_kill_a_healthy_server(tmp_path: Path) -> None:
    """Writes to the log file fail with ENOSPC (it is /dev/full): the server serves on."""
    (tmp_path / log_file_name(0, 0)).symlink_to("/dev/full")
    config = dummy_process("--print", "0.6:stdout:a line after ready", log_dir=tmp_path)
    with anyio.fail_after(20):
        async with open_server(config) as server:
            await server.wait_ready()
            await anyio.sleep(1.0)
            out = await server.chat([{"role": "user", "content": "hi"}])
            assert out.text
            tail = server.log_tail()
            assert any("No space left on device" in line for line in tail), tail
            assert "a line after ready" in tail


async def test_log_file_is_rotated_at_log_max_bytes(tmp_path: Path) -> None:
    """A flood of 4 MB of lines: the file stays under log_max_bytes, one rotation kept."""
    script = tmp_path / "chatty.py"
    script.write_text(
        "import sys\n"
        "for n in range(40_000):\n"
        "    print(f'{n:08d} ' + 'x' * 92)\n"
        "from servescope.dummy import main\n"
        "main(sys.argv[1:])\n"
    )
    config = servescope.CustomConfig(script=script, log_dir=tmp_path, log_max_bytes=1 << 20)
    with anyio.fail_after(30):
        async with open_server(config) as server:
            await server.wait_ready()
    current = tmp_path / log_file_name(0, 0)
    rotated = current.with_name(current.name + ".1")
    assert current.stat().st_size <= 1 << 20
    assert 0 < rotated.stat().st_size <= 1 << 20
    assert "Application startup complete" in current.read_text()  # the newest lines kept
    assert "00039999" in (rotated.read_text() + current.read_text())


async def test_secrets_the_server_prints_are_blanked(tmp_path: Path) -> None:
    """A server that prints its token: not in the log file, the tail or the error."""
    secret = "hf_Secret0123456789"
    script = tmp_path / "leaky.py"
    script.write_text(
        "import os\nprint('token is', os.environ['HF_TOKEN'], flush=True)\nraise SystemExit(3)\n"
    )
    config = servescope.CustomConfig(script=script, env={"HF_TOKEN": secret}, log_dir=tmp_path)
    with anyio.fail_after(20), pytest.raises(ServerStartError) as caught:
        async with open_server(config):
            await anyio.sleep(30)
    assert secret not in str(caught.value)
    assert "token is **********" in caught.value.log_tail
    assert secret not in (tmp_path / log_file_name(0, 0)).read_text()
