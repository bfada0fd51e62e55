"""The pool's control signals: the full state and signal table, and signal sequences."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from servescope._control import DISPATCHES, PoolState, Signal, control
from servescope._errors import ControlError, ServeError

P, G = PoolState, Signal

ALLOWED: dict[tuple[PoolState, Signal], PoolState] = {
    (P.RUNNING, G.PAUSE): P.PAUSED,
    (P.RUNNING, G.DRAIN): P.DRAINING,
    (P.PAUSED, G.RESUME): P.RUNNING,
    (P.PAUSED, G.DRAIN): P.DRAINING,
    (P.PAUSED, G.STOP): P.STOPPED,
    (P.DRAINING, G.STOP): P.STOPPED,
}

#: What the error must say is allowed from each state.
ALLOWED_WORDS = {
    P.RUNNING: ("PAUSE", "DRAIN"),
    P.PAUSED: ("RESUME", "DRAIN", "STOP"),
    P.DRAINING: ("STOP",),
    P.STOPPED: ("nothing",),
}


def test_enums_are_the_agreed_ones() -> None:
    assert [s.name for s in PoolState] == ["RUNNING", "PAUSED", "DRAINING", "STOPPED"]
    assert [s.name for s in Signal] == ["PAUSE", "RESUME", "DRAIN", "STOP"]


@pytest.mark.parametrize(
    ("state", "signal"),
    list(itertools.product(PoolState, Signal)),
    ids=lambda x: str(x.name),
)
def test_every_state_and_signal(state: PoolState, signal: Signal) -> None:
    if (state, signal) in ALLOWED:
        assert control(state, signal) is ALLOWED[state, signal]
        return
    with pytest.raises(ControlError) as caught:
        control(state, signal)
    message = str(caught.value)
    assert state.name in message
    assert signal.name in message
    for word in ALLOWED_WORDS[state]:
        assert word in message


def test_stop_while_running_says_pause_or_drain_first() -> None:
    """Megatron allows STOP only from paused; here the refusal says what to do instead."""
    with pytest.raises(ControlError, match="pause or drain first"):
        control(P.RUNNING, G.STOP)


def test_control_error_is_a_serve_error() -> None:
    assert issubclass(ControlError, ServeError)


def test_only_running_dispatches() -> None:
    assert frozenset({P.RUNNING}) == DISPATCHES


@given(st.lists(st.sampled_from(Signal), max_size=30))
def test_any_sequence_follows_the_table_or_raises(signals: list[Signal]) -> None:
    """Megatron logs an invalid signal and ignores it; here each one raises, state unchanged."""
    state = P.RUNNING
    for signal in signals:
        expected = ALLOWED.get((state, signal))
        if expected is None:
            with pytest.raises(ControlError):
                control(state, signal)
            continue
        assert state is not P.STOPPED
        state = control(state, signal)
        assert state is expected
