"""A cross-job lock that serialises vLLM's first ``torch.compile`` of one configuration.

When many jobs on a shared filesystem start the same model at once, each compiles it
and they thrash the compile cache. The first job to take ``<key>.lock`` compiles while
the others wait; when it is done it writes ``<key>.done``, and every later job skips
the lock altogether and starts straight from the warm cache.

The lock is ``flock(2)`` (filelock's ``UnixFileLock``): the kernel drops it when its
holder dies, even by SIGKILL, so a crashed job never leaves the next one waiting
forever. Waiting never blocks the event loop: we make non-blocking attempts and sleep
with ``anyio.sleep`` in between, so the wait is cancellable at every poll and other
tasks run meanwhile (unlike a blocking ``fcntl.flock`` in the event loop's thread).
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
from filelock import Timeout, UnixFileLock

__all__ = ["CompileLock", "compile_key", "hold_compile_lock", "lock_dir"]

logger = logging.getLogger("servescope")

#: Environment variable naming the directory for lock and marker files.
LOCK_DIR_ENV = "SERVESCOPE_COMPILE_LOCK_DIR"

_KEY_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def _lock_options() -> dict[str, Any]:
    """The filelock options we need, limited to those the installed version knows.

    - ``thread_local=False``: the lock belongs to the ``CompileLock``, not to the thread
      that took it, so it can be released from any thread.
    - ``is_singleton=False``: two ``CompileLock`` objects for one key must not share one
      reentrant lock, or two tasks of one process would both "hold" it.
    - ``fallback_to_soft=False``: on a filesystem without ``flock`` (filelock 4 would
      otherwise quietly switch to a lock *file*), a holder killed by SIGKILL would leave
      the file behind and every later job would wait for it forever.
    """
    wanted = {"thread_local": False, "is_singleton": False, "fallback_to_soft": False}
    known = inspect.signature(UnixFileLock.__init__).parameters
    return {name: value for name, value in wanted.items() if name in known}


_LOCK_OPTIONS = _lock_options()


def compile_key(parts: Mapping[str, Any]) -> str:
    """A short stable key for one compile configuration (model, vLLM version, flags, ...).

    The hex SHA-256 (first 24 characters) of ``parts`` as canonical JSON: key order does
    not matter, and values JSON cannot hold (paths, ...) count by their ``str``.
    """
    canonical = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]


def lock_dir() -> Path:
    """``$SERVESCOPE_COMPILE_LOCK_DIR`` if set, else ``~/.cache/servescope/compile-locks``.

    Created if missing. It must be on the filesystem the jobs share, for the lock to
    reach across them.
    """
    configured = os.environ.get(LOCK_DIR_ENV)
    if configured:
        directory = Path(configured).expanduser()
    else:
        directory = Path.home() / ".cache" / "servescope" / "compile-locks"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


class CompileLock:
    """The lock ``<key>.lock`` and the marker ``<key>.done`` in ``directory``.

    Typical use: ``if await lock.acquire(): compile; lock.mark_done()``, and ``release``
    on every exit path (``hold_compile_lock`` does that). Two ``CompileLock`` objects for
    one key exclude each other, in one process as across processes and hosts.
    """

    def __init__(self, key: str, directory: Path | None = None, poll: float = 0.25) -> None:
        if not _KEY_PATTERN.fullmatch(key):
            raise ValueError(f"compile lock key {key!r} is not a plain file name")
        if not poll > 0:
            raise ValueError(f"poll must be positive, not {poll!r}")
        if directory is None:
            directory = lock_dir()
        else:
            directory.mkdir(parents=True, exist_ok=True)
        self.key = key
        self.directory = directory
        self.poll = poll
        self.lock_path = directory / f"{key}.lock"
        self.marker_path = directory / f"{key}.done"
        self._lock = UnixFileLock(self.lock_path, **_LOCK_OPTIONS)
        self._lock_unsupported = False  # set once flock fails with ENOSYS

    @property
    def done(self) -> bool:
        """Whether some job has marked this configuration compiled (``<key>.done`` exists)."""
        return self.marker_path.exists()

    async def acquire(self, on_wait: Callable[[], None] | None = None) -> bool:
        """Take the lock; ``True`` once held, ``False`` if there is nothing to serialise.

        ``False`` at once if the marker exists. Otherwise waits for the lock, calling
        ``on_wait()`` once if another holder makes it wait (to log that it waits), and
        checks the marker again once it has the lock: if the previous holder finished
        the compile meanwhile, releases it and returns ``False``. Also ``False``, with a
        warning, if the filesystem cannot ``flock``: the jobs then run unserialised.
        """
        await anyio.lowlevel.checkpoint()
        if self.done:
            return False
        waited = False
        while not self._try_lock():
            if self._lock_unsupported:
                return False
            if not waited:
                waited = True
                logger.info("compile lock %s is held by another job; waiting", self.lock_path)
                if on_wait is not None:
                    on_wait()
            await anyio.sleep(self.poll)  # the only wait: cancellable, and never while held
        try:
            if self.done:
                logger.debug("compile of %s finished while we waited", self.key)
                self.release()
                return False
        except BaseException:
            self.release()
            raise
        logger.debug("holding compile lock %s", self.lock_path)
        return True

    def _try_lock(self) -> bool:
        """One non-blocking attempt; ``True`` if we hold the lock now."""
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return False
        except (OSError, NotImplementedError) as exc:
            # No flock on this filesystem: filelock 4 raises ENOSYS (as we turned its
            # soft-lock fallback off), filelock 3 NotImplementedError.
            if isinstance(exc, OSError) and exc.errno != errno.ENOSYS:
                raise
            logger.warning(
                "cannot lock %s (%s); compiling without the compile lock", self.lock_path, exc
            )
            self._lock_unsupported = True
            return False
        return True

    def mark_done(self) -> None:
        """Write the marker (atomically: a temporary file renamed over it), then release.

        Jobs waiting for the lock then see the marker and go ahead without compiling.
        """
        temporary = self.directory / f".{self.key}.done.{uuid.uuid4().hex}.tmp"
        try:
            record = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
            temporary.write_text(json.dumps(record) + "\n", encoding="utf-8")
            os.replace(temporary, self.marker_path)
        finally:
            temporary.unlink(missing_ok=True)
            self.release()
        logger.debug("marked compile %s done", self.key)

    def release(self) -> None:
        """Release the lock if held; a no-op otherwise, so safe on every exit path."""
        if self._lock.is_locked:
            self._lock.release(force=True)


@asynccontextmanager
async def hold_compile_lock(
    key: str,
    *,
    on_wait: Callable[[], None] | None = None,
    directory: Path | None = None,
) -> AsyncIterator[CompileLock]:
    """``CompileLock.acquire`` on entry, ``release`` on every exit (error, cancellation).

    The body gets the lock; ``lock.done`` tells it whether the compile already happened
    (``True``: just start) or is its own to do (``False``: it holds the lock, and should
    call ``lock.mark_done()`` once the server has compiled and started).
    """
    lock = CompileLock(key, directory)
    try:
        await lock.acquire(on_wait)
        yield lock
    finally:
        lock.release()
