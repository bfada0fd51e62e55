"""What leaves a scope: the one exception its caller sees, never an ``ExceptionGroup``.

A scope's task group may end with a group of exceptions — the failure that cancelled it,
the cancellations that followed, an exception of the body. The caller gets one: a
``KeyboardInterrupt`` or ``SystemExit`` as it is; else the scope's recorded failure;
else the one real exception (the body's, unchanged).
"""

from __future__ import annotations

import sys

import anyio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["one_exception", "one_exception_cause"]


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def one_exception(exc: BaseException, failure: BaseException | None) -> BaseException:
    """The one exception the caller should see for ``exc``, which left the task group."""
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


def one_exception_cause(exc: BaseException, failure: BaseException | None) -> BaseException | None:
    """The ``__cause__`` to raise ``one_exception(exc, failure)`` from."""
    chosen = one_exception(exc, failure)
    return chosen.__cause__ if chosen is not exc else exc.__cause__
