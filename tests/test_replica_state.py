"""A replica's life as a pure transition table: every state and event, and event sequences."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from servescope._replica_state import (
    TAKES_REQUESTS,
    InvalidTransition,
    ReplicaEvent,
    ReplicaState,
    transition,
)

S, E = ReplicaState, ReplicaEvent

#: The whole table, written out once more by hand: every pair not here must raise.
ALLOWED: dict[tuple[ReplicaState, ReplicaEvent], ReplicaState] = {
    (S.STARTING, E.READY): S.READY,
    (S.STARTING, E.FAIL): S.FAILED,
    (S.STARTING, E.DRAIN): S.DRAINING,
    (S.STARTING, E.STOP): S.STOPPED,
    (S.READY, E.DEMOTE): S.UNHEALTHY,
    (S.READY, E.FAIL): S.FAILED,
    (S.READY, E.DRAIN): S.DRAINING,
    (S.READY, E.STOP): S.STOPPED,
    (S.UNHEALTHY, E.PROMOTE): S.READY,
    (S.UNHEALTHY, E.FAIL): S.FAILED,
    (S.UNHEALTHY, E.DRAIN): S.DRAINING,
    (S.UNHEALTHY, E.STOP): S.STOPPED,
    (S.FAILED, E.RESTART): S.RESTARTING,
    (S.FAILED, E.STOP): S.STOPPED,
    (S.RESTARTING, E.RELAUNCH): S.STARTING,
    (S.RESTARTING, E.FAIL): S.FAILED,
    (S.RESTARTING, E.STOP): S.STOPPED,
    (S.DRAINING, E.STOP): S.STOPPED,
    (S.DRAINING, E.FAIL): S.STOPPED,
}

EVERY_PAIR = list(itertools.product(ReplicaState, ReplicaEvent))


def test_enums_are_the_agreed_ones() -> None:
    assert [s.name for s in ReplicaState] == [
        "STARTING",
        "READY",
        "UNHEALTHY",
        "FAILED",
        "RESTARTING",
        "DRAINING",
        "STOPPED",
    ]
    assert [e.name for e in ReplicaEvent] == [
        "READY",
        "DEMOTE",
        "PROMOTE",
        "FAIL",
        "RESTART",
        "RELAUNCH",
        "DRAIN",
        "STOP",
    ]


@pytest.mark.parametrize(("state", "event"), EVERY_PAIR, ids=lambda x: str(x.name))
def test_every_state_and_event(state: ReplicaState, event: ReplicaEvent) -> None:
    if (state, event) in ALLOWED:
        assert transition(state, event) is ALLOWED[state, event]
        return
    with pytest.raises(InvalidTransition) as caught:
        transition(state, event)
    assert state.name in str(caught.value)
    assert event.name in str(caught.value)
    assert (caught.value.state, caught.value.event) == (state, event)


def test_invalid_transition_is_a_value_error() -> None:
    assert issubclass(InvalidTransition, ValueError)


def test_stopped_takes_no_event() -> None:
    for event in ReplicaEvent:
        with pytest.raises(InvalidTransition):
            transition(S.STOPPED, event)


def test_only_ready_takes_requests() -> None:
    assert frozenset({S.READY}) == TAKES_REQUESTS


def test_a_failed_replica_can_rejoin() -> None:
    """SGLang's users' bug: a worker marked Failed was never probed again and never rejoined."""
    state = S.FAILED
    for event in (E.RESTART, E.RELAUNCH, E.READY):
        state = transition(state, event)
    assert state in TAKES_REQUESTS


@given(st.sampled_from(ReplicaState), st.lists(st.sampled_from(ReplicaEvent), max_size=40))
def test_any_sequence_follows_the_table_or_raises(
    start: ReplicaState, events: list[ReplicaEvent]
) -> None:
    state, stopped = start, start is S.STOPPED
    for event in events:
        expected = ALLOWED.get((state, event))
        if expected is None:
            with pytest.raises(InvalidTransition):
                transition(state, event)
            continue  # a refused event leaves the state as it was
        assert not stopped, "STOPPED let an event through"
        state = transition(state, event)
        assert state is expected
        stopped = state is S.STOPPED
    assert stopped == (state is S.STOPPED)
