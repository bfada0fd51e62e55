"""A pool replica's life, as a pure transition table.

The pool holds one ``ReplicaState`` per replica and moves it only through
``transition``, so every change is one the table allows and a wrong one is an
error at once, not a replica stuck in a state nothing leaves::

    STARTING ──READY──► READY ◄──PROMOTE── UNHEALTHY
       ▲                  └─────DEMOTE──────►┘
    RELAUNCH
       │
    RESTARTING ◄──RESTART── FAILED ◄──FAIL── STARTING, READY, UNHEALTHY, RESTARTING

    DRAIN: STARTING, READY, UNHEALTHY → DRAINING;  DRAINING: STOP or FAIL → STOPPED
    STOP: every state but STOPPED → STOPPED, which takes no event at all

FAILED is not terminal: a failed replica is restarted (``RESTART``, then
``RELAUNCH``) and rejoins once ready. SGLang's gateway marked a worker Failed and
never probed it again, so a worker restarted on the same address never rejoined;
here the only way out of the pool's care is ``STOP``. A replica draining that
fails has nothing left to finish, so ``FAIL`` there stops it.
"""

from __future__ import annotations

import enum

__all__ = [
    "TAKES_REQUESTS",
    "InvalidTransition",
    "ReplicaEvent",
    "ReplicaState",
    "transition",
]


class ReplicaState(enum.Enum):
    """Where a replica is in its life."""

    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    FAILED = "failed"
    RESTARTING = "restarting"
    DRAINING = "draining"
    STOPPED = "stopped"


class ReplicaEvent(enum.Enum):
    """What happened to a replica (or what the pool decided for it)."""

    READY = "ready"
    DEMOTE = "demote"
    PROMOTE = "promote"
    FAIL = "fail"
    RESTART = "restart"
    RELAUNCH = "relaunch"
    DRAIN = "drain"
    STOP = "stop"


class InvalidTransition(ValueError):
    """An event the replica's state does not allow; names both (``state``, ``event``)."""

    def __init__(self, state: ReplicaState, event: ReplicaEvent) -> None:
        self.state = state
        self.event = event
        allowed = ", ".join(e.name for e in _TABLE[state]) or "nothing, it is final"
        super().__init__(
            f"replica event {event.name} is not allowed in state {state.name} "
            f"(allowed there: {allowed})"
        )


#: The states in which a replica is sent new requests.
TAKES_REQUESTS = frozenset({ReplicaState.READY})

_S, _E = ReplicaState, ReplicaEvent

_TABLE: dict[ReplicaState, dict[ReplicaEvent, ReplicaState]] = {
    _S.STARTING: {
        _E.READY: _S.READY,
        _E.FAIL: _S.FAILED,
        _E.DRAIN: _S.DRAINING,
        _E.STOP: _S.STOPPED,
    },
    _S.READY: {
        _E.DEMOTE: _S.UNHEALTHY,
        _E.FAIL: _S.FAILED,
        _E.DRAIN: _S.DRAINING,
        _E.STOP: _S.STOPPED,
    },
    _S.UNHEALTHY: {
        _E.PROMOTE: _S.READY,
        _E.FAIL: _S.FAILED,
        _E.DRAIN: _S.DRAINING,
        _E.STOP: _S.STOPPED,
    },
    _S.FAILED: {_E.RESTART: _S.RESTARTING, _E.STOP: _S.STOPPED},
    _S.RESTARTING: {_E.RELAUNCH: _S.STARTING, _E.FAIL: _S.FAILED, _E.STOP: _S.STOPPED},
    _S.DRAINING: {_E.STOP: _S.STOPPED, _E.FAIL: _S.STOPPED},
    _S.STOPPED: {},
}


def transition(state: ReplicaState, event: ReplicaEvent) -> ReplicaState:
    """The state ``event`` leads to from ``state``; ``InvalidTransition`` if none."""
    try:
        return _TABLE[state][event]
    except KeyError:
        raise InvalidTransition(state, event) from None
