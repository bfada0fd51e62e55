"""The compile lock: exclusion within and across processes, the marker, and waiting well.

Waits are short polls (``POLL``) under ``fail_after`` bounds; ordering is checked with
events and a shared log rather than with sleeps.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from filelock import Timeout, UnixFileLock

from servescope._compile_lock import CompileLock, compile_key, hold_compile_lock, lock_dir

pytestmark = pytest.mark.anyio

POLL = 0.02


def lock_is_free(directory: Path, key: str) -> bool:
    """Whether the kernel lock on ``<key>.lock`` is free (one attempt by a fresh lock)."""
    probe = UnixFileLock(directory / f"{key}.lock", thread_local=False)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return False
    probe.release()
    return True


def files_in(directory: Path) -> list[str]:
    return [path.name for path in directory.iterdir()]


class WaitRecorder:
    """An ``on_wait`` hook that counts its calls and sets an event on the first."""

    def __init__(self) -> None:
        self.calls = 0
        self.event = anyio.Event()

    def __call__(self) -> None:
        self.calls += 1
        self.event.set()


async def test_second_holder_waits_for_the_first(tmp_path: Path) -> None:
    first = CompileLock("k", tmp_path, poll=POLL)
    second = CompileLock("k", tmp_path, poll=POLL)
    log: list[str] = []
    waiting = WaitRecorder()

    async def take_second() -> None:
        assert await second.acquire(on_wait=waiting)
        log.append("second acquired")

    with anyio.fail_after(5):
        assert await first.acquire()
        async with anyio.create_task_group() as tg:
            tg.start_soon(take_second)
            await waiting.event.wait()
            await anyio.sleep(5 * POLL)  # several polls: the second must still be waiting
            log.append("first releases")
            first.release()
    second.release()
    assert log == ["first releases", "second acquired"]
    assert waiting.calls == 1
    assert lock_is_free(tmp_path, "k")


async def test_different_keys_do_not_block_each_other(tmp_path: Path) -> None:
    one = CompileLock("one", tmp_path, poll=POLL)
    two = CompileLock("two", tmp_path, poll=POLL)
    waiting = WaitRecorder()
    with anyio.fail_after(1):
        assert await one.acquire()
        assert await two.acquire(on_wait=waiting)
    assert waiting.calls == 0
    one.release()
    two.release()


async def test_marker_makes_acquire_return_false_at_once(tmp_path: Path) -> None:
    holder = CompileLock("k", tmp_path, poll=POLL)
    with anyio.fail_after(1):
        assert await holder.acquire()
    assert not holder.done
    holder.mark_done()
    assert holder.done and (tmp_path / "k.done").is_file()
    assert lock_is_free(tmp_path, "k")
    assert sorted(files_in(tmp_path)) == ["k.done", "k.lock"]  # no temporary left over

    # A raw holder of the lock would make any real attempt wait; the marker skips it.
    blocker = UnixFileLock(tmp_path / "k.lock", thread_local=False)
    blocker.acquire(timeout=0)
    try:
        later = CompileLock("k", tmp_path, poll=POLL)
        waiting = WaitRecorder()
        with anyio.fail_after(1):
            assert await later.acquire(on_wait=waiting) is False
        assert waiting.calls == 0
        later.release()  # a no-op: never acquired
    finally:
        blocker.release()


async def test_waiter_returns_false_when_the_holder_marks_done(tmp_path: Path) -> None:
    holder = CompileLock("k", tmp_path, poll=POLL)
    waiter = CompileLock("k", tmp_path, poll=POLL)
    waiting = WaitRecorder()
    results: list[bool] = []

    async def wait_for_it() -> None:
        results.append(await waiter.acquire(on_wait=waiting))

    with anyio.fail_after(5):
        assert await holder.acquire()
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for_it)
            await waiting.event.wait()
            holder.mark_done()
    assert results == [False]
    assert waiting.calls == 1
    assert lock_is_free(tmp_path, "k")  # the waiter gave the lock back


async def test_holder_killed_by_sigkill_frees_the_lock(tmp_path: Path) -> None:
    lock_path = tmp_path / "k.lock"
    holder_code = (
        "import sys, time\n"
        "from filelock import UnixFileLock\n"
        f"lock = UnixFileLock({str(lock_path)!r})\n"
        "lock.acquire(timeout=5)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    process = await anyio.open_process(
        [sys.executable, "-c", holder_code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert process.stdout is not None
        with anyio.fail_after(10):
            line = await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 100)
        assert line == b"held"
        assert not lock_is_free(tmp_path, "k")
        process.kill()  # SIGKILL: no cleanup of any kind in the holder
        with anyio.fail_after(5):
            await process.wait()
        lock = CompileLock("k", tmp_path, poll=POLL)
        start = time.monotonic()
        with anyio.fail_after(2):
            assert await lock.acquire()
        assert time.monotonic() - start < 2
        lock.release()
    finally:
        if process.returncode is None:
            process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()
        await process.aclose()


async def test_waiting_does_not_block_the_event_loop(tmp_path: Path) -> None:
    holder = CompileLock("k", tmp_path, poll=POLL)
    waiter = CompileLock("k", tmp_path, poll=POLL)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1

    with anyio.fail_after(5):
        assert await holder.acquire()
        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            with anyio.move_on_after(0.5) as scope:
                await waiter.acquire()
            tg.cancel_scope.cancel()
    holder.release()
    waiter.release()
    assert scope.cancelled_caught
    assert ticks >= 15  # about 50 when the loop runs freely


async def test_cancelled_waiter_leaves_nothing_held(tmp_path: Path) -> None:
    holder = CompileLock("k", tmp_path, poll=POLL)
    waiter = CompileLock("k", tmp_path, poll=POLL)
    with anyio.fail_after(5):
        assert await holder.acquire()
        with anyio.move_on_after(0.1) as scope:
            await waiter.acquire()
        assert scope.cancelled_caught
        holder.release()
        assert lock_is_free(tmp_path, "k")
        third = CompileLock("k", tmp_path, poll=POLL)
        waiting = WaitRecorder()
        assert await third.acquire(on_wait=waiting)
        assert waiting.calls == 0
        third.release()
    waiter.release()  # safe though cancelled before it held anything


async def test_hold_compile_lock_releases_on_exception(tmp_path: Path) -> None:
    with anyio.fail_after(5):
        with pytest.raises(RuntimeError, match="compile failed"):
            async with hold_compile_lock("k", directory=tmp_path) as lock:
                assert not lock.done
                assert not lock_is_free(tmp_path, "k")
                raise RuntimeError("compile failed")
    assert lock_is_free(tmp_path, "k")
    assert not (tmp_path / "k.done").exists()


async def test_hold_compile_lock_releases_on_cancellation(tmp_path: Path) -> None:
    with anyio.fail_after(5):
        with anyio.move_on_after(0.1) as scope:
            async with hold_compile_lock("k", directory=tmp_path):
                await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert lock_is_free(tmp_path, "k")


async def test_hold_compile_lock_after_marker(tmp_path: Path) -> None:
    with anyio.fail_after(5):
        async with hold_compile_lock("k", directory=tmp_path) as lock:
            assert not lock.done
            lock.mark_done()
        async with hold_compile_lock("k", directory=tmp_path) as lock:
            assert lock.done
    assert lock_is_free(tmp_path, "k")


def test_compile_key_is_stable_and_distinguishing() -> None:
    parts = {"model": "org/model", "tp": 2, "flags": ["--x"], "path": Path("/a")}
    reordered = {"path": Path("/a"), "flags": ["--x"], "tp": 2, "model": "org/model"}
    key = compile_key(parts)
    assert key == compile_key(reordered)
    assert len(key) == 24 and all(c in "0123456789abcdef" for c in key)
    assert key != compile_key({**parts, "tp": 4})
    assert key != compile_key({**parts, "path": Path("/b")})


def test_lock_dir_honours_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "nested" / "locks"
    monkeypatch.setenv("SERVESCOPE_COMPILE_LOCK_DIR", str(target))
    assert lock_dir() == target
    assert target.is_dir()
    assert CompileLock("k").lock_path == target / "k.lock"


def test_lock_dir_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERVESCOPE_COMPILE_LOCK_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert lock_dir() == tmp_path / ".cache" / "servescope" / "compile-locks"
    assert lock_dir().is_dir()


@pytest.mark.parametrize("key", ["", "a/b", "..", ".hidden"])
def test_bad_keys_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="not a plain file name"):
        CompileLock(key, tmp_path)


async def test_filesystem_without_flock_runs_unserialised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_flock(self: UnixFileLock, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    lock = CompileLock("k", tmp_path, poll=POLL)
    monkeypatch.setattr(UnixFileLock, "acquire", no_flock)
    with anyio.fail_after(1):
        assert await lock.acquire() is False
    assert "compiling without the compile lock" in caplog.text
    lock.mark_done()  # the job that compiled unserialised still leaves the marker
    assert lock.done


async def test_other_lock_errors_propagate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(self: UnixFileLock, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    lock = CompileLock("k", tmp_path, poll=POLL)
    monkeypatch.setattr(UnixFileLock, "acquire", denied)
    with anyio.fail_after(1), pytest.raises(PermissionError):
        await lock.acquire()
