"""The pool's control signals (pause, resume, drain, stop) as a pure state machine.

Megatron's ``DataParallelInferenceCoordinator`` has the same kind of machine, but an
invalid signal there is logged and ignored, and nobody is told: a caller that sent
STOP while running believes the pool stopped. Here ``control`` raises
``ControlError`` naming the state, the signal and what that state allows::

    RUNNING ──PAUSE──► PAUSED ──STOP──► STOPPED
    RUNNING ◄──RESUME── PAUSED
    RUNNING, PAUSED ──DRAIN──► DRAINING ──STOP──► STOPPED

As in Megatron, STOP is refused while running (pause or drain first), so that a
stop never cuts requests off by surprise. Only RUNNING dispatches new requests;
in PAUSED and DRAINING, requests in flight finish.
"""

from __future__ import annotations

import enum

from ._errors import ControlError

__all__ = ["DISPATCHES", "PoolState", "Signal", "control"]


class PoolState(enum.Enum):
    """Where the pool is, as its control signals left it."""

    RUNNING = "running"
    PAUSED = "paused"
    DRAINING = "draining"
    STOPPED = "stopped"


class Signal(enum.Enum):
    """A control signal sent to the whole pool."""

    PAUSE = "pause"
    RESUME = "resume"
    DRAIN = "drain"
    STOP = "stop"


#: The states in which new requests are dispatched to replicas.
DISPATCHES = frozenset({PoolState.RUNNING})

_TABLE: dict[PoolState, dict[Signal, PoolState]] = {
    PoolState.RUNNING: {Signal.PAUSE: PoolState.PAUSED, Signal.DRAIN: PoolState.DRAINING},
    PoolState.PAUSED: {
        Signal.RESUME: PoolState.RUNNING,
        Signal.DRAIN: PoolState.DRAINING,
        Signal.STOP: PoolState.STOPPED,
    },
    PoolState.DRAINING: {Signal.STOP: PoolState.STOPPED},
    PoolState.STOPPED: {},
}

#: A hint for the refusals a caller is most likely to meet.
_HINTS: dict[tuple[PoolState, Signal], str] = {
    (PoolState.RUNNING, Signal.STOP): "pause or drain first",
    (PoolState.RUNNING, Signal.RESUME): "it is not paused",
}


def control(state: PoolState, signal: Signal) -> PoolState:
    """The pool state ``signal`` leads to from ``state``; ``ControlError`` if refused."""
    try:
        return _TABLE[state][signal]
    except KeyError:
        raise ControlError(_refusal(state, signal)) from None


def _refusal(state: PoolState, signal: Signal) -> str:
    """Why ``signal`` is refused in ``state``, and what that state allows."""
    allowed = ", ".join(s.name for s in _TABLE[state]) or "nothing, the pool has stopped"
    hint = _HINTS.get((state, signal))
    why = f": {hint}" if hint else ""
    return f"cannot {signal.name} a pool in state {state.name}{why} (allowed there: {allowed})"
