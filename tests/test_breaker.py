"""The per-replica circuit breaker, with injected times: scenarios, and a reference model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from servescope._breaker import BreakerState, CircuitBreaker
from servescope._errors import ConfigError

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def small() -> CircuitBreaker:
    """3 failures in 10 s open it for 5 s; 2 successes half-open close it."""
    return CircuitBreaker(failures_to_open=3, window=10.0, cooldown=5.0, successes_to_close=2)


def test_defaults() -> None:
    breaker = CircuitBreaker()
    assert (breaker.failures_to_open, breaker.window) == (5, 60.0)
    assert (breaker.cooldown, breaker.successes_to_close) == (30.0, 2)
    assert breaker.opened_until is None
    assert breaker.state(0.0) is CLOSED
    assert breaker.allows(0.0)


# Each step: (operation, time, seconds for cool), then the state and opened_until after it.
Step = tuple[str, float, float]
SCENARIOS: dict[str, tuple[list[Step], float, BreakerState, float | None]] = {
    "two failures stay closed": ([("failure", 0, 0), ("failure", 1, 0)], 2, CLOSED, None),
    "three in the window open": (
        [("failure", 0, 0), ("failure", 1, 0), ("failure", 2, 0)],
        2,
        OPEN,
        7.0,
    ),
    "open until the deadline": (
        [("failure", 0, 0), ("failure", 1, 0), ("failure", 2, 0)],
        6.999,
        OPEN,
        7.0,
    ),
    "half-open at the deadline": (
        [("failure", 0, 0), ("failure", 1, 0), ("failure", 2, 0)],
        7.0,
        HALF_OPEN,
        7.0,
    ),
    "a failure leaves the window": (
        [("failure", 0, 0), ("failure", 5, 0), ("failure", 10, 0)],
        10,
        CLOSED,
        None,
    ),
    "just inside the window": (
        [("failure", 0, 0), ("failure", 5, 0), ("failure", 9.5, 0)],
        9.5,
        OPEN,
        14.5,
    ),
    "a success clears the history": (
        [("failure", 0, 0), ("failure", 1, 0), ("success", 2, 0), ("failure", 3, 0)],
        3,
        CLOSED,
        None,
    ),
    "one half-open success is not enough": (
        [("cool", 0, 5), ("success", 5, 0)],
        5,
        HALF_OPEN,
        5.0,
    ),
    "two half-open successes close it": (
        [("cool", 0, 5), ("success", 5, 0), ("success", 6, 0)],
        6,
        CLOSED,
        None,
    ),
    "a half-open failure opens it again, fresh cooldown": (
        [("cool", 0, 5), ("success", 5, 0), ("failure", 6, 0)],
        6,
        OPEN,
        11.0,
    ),
    "a success while open is ignored": (
        [("cool", 0, 5), ("success", 1, 0), ("success", 2, 0)],
        5,
        HALF_OPEN,
        5.0,
    ),
    "a failure while open does not push the deadline": (
        [("cool", 0, 5), ("failure", 4, 0)],
        4,
        OPEN,
        5.0,
    ),
    "a 429 opens at once": ([("cool", 3, 20)], 3, OPEN, 23.0),
    "a longer second cooldown wins": ([("cool", 0, 5), ("cool", 1, 20)], 2, OPEN, 21.0),
    "a shorter second cooldown does not shorten": (
        [("cool", 0, 20), ("cool", 1, 5)],
        10,
        OPEN,
        20.0,
    ),
    "a cool past a failure-opened deadline wins": (
        [("failure", 0, 0), ("failure", 0, 0), ("failure", 0, 0), ("cool", 1, 30)],
        10,
        OPEN,
        31.0,
    ),
    "a cool half-open opens again": (
        [("cool", 0, 5), ("success", 5, 0), ("cool", 6, 1), ("success", 7, 0)],
        7,
        HALF_OPEN,
        7.0,
    ),
    "cool for zero seconds is half-open": ([("cool", 4, 0)], 4, HALF_OPEN, 4.0),
    "closed again counts failures afresh": (
        [
            ("failure", 0, 0),
            ("failure", 0, 0),
            ("failure", 0, 0),
            ("success", 5, 0),
            ("success", 5, 0),
            ("failure", 6, 0),
            ("failure", 6, 0),
        ],
        6,
        CLOSED,
        None,
    ),
}


def apply(breaker: CircuitBreaker, step: Step) -> None:
    op, now, seconds = step
    if op == "cool":
        breaker.cool(now, seconds)
    else:
        getattr(breaker, op)(now)


@pytest.mark.parametrize(("steps", "now", "state", "until"), SCENARIOS.values(), ids=SCENARIOS)
def test_scenario(steps: list[Step], now: float, state: BreakerState, until: float | None) -> None:
    breaker = small()
    for step in steps:
        apply(breaker, step)
    assert breaker.state(now) is state
    assert breaker.allows(now) is (state is not OPEN)
    assert breaker.opened_until == until


def test_litellm_second_cooldown_keeps_the_later_deadline() -> None:
    """LiteLLM's users' bug: a second cooldown kept the earlier, shorter deadline."""
    breaker = CircuitBreaker()
    breaker.cool(0.0, 5.0)
    breaker.cool(1.0, 60.0)
    assert not breaker.allows(30.0)
    assert breaker.allows(61.0)


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("failures_to_open", 0),
        ("successes_to_close", 0),
        ("window", 0.0),
        ("window", -1.0),
        ("window", math.nan),
        ("cooldown", -1.0),
        ("cooldown", math.inf),
        ("cooldown", math.nan),
    ],
)
def test_bad_settings_are_config_errors(field_name: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field_name):
        CircuitBreaker(**{field_name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("seconds", [-1.0, math.nan, math.inf])
def test_cool_takes_a_finite_duration(seconds: float) -> None:
    with pytest.raises(ValueError, match="seconds"):
        CircuitBreaker().cool(0.0, seconds)


# A reference model: the whole history, no bounds, the rules in their plainest form.


@dataclass
class Model:
    failures_to_open: int
    window: float
    cooldown: float
    successes_to_close: int
    failures: list[float] = field(default_factory=list)
    successes: int = 0
    until: float | None = None

    def state(self, now: float) -> BreakerState:
        if self.until is None:
            return CLOSED
        return OPEN if now < self.until else HALF_OPEN

    def open(self, until: float) -> None:
        self.until = until if self.until is None else max(self.until, until)
        self.failures, self.successes = [], 0

    def step(self, op: str, now: float, seconds: float) -> None:
        state = self.state(now)
        if op == "cool":
            self.open(now + seconds)
        elif op == "success" and state is CLOSED:
            self.failures = []
        elif op == "success" and state is HALF_OPEN:
            self.successes += 1
            if self.successes >= self.successes_to_close:
                self.until, self.successes = None, 0
        elif op == "failure" and state is HALF_OPEN:
            self.open(now + self.cooldown)
        elif op == "failure" and state is CLOSED:
            self.failures.append(now)
            recent = [t for t in self.failures if now - t < self.window]
            if len(recent) >= self.failures_to_open:
                self.open(now + self.cooldown)


settings_st = st.tuples(
    st.integers(1, 5), st.integers(1, 12), st.integers(0, 20), st.integers(1, 3)
)
# Failures most often, so that the window, the opening and the half-open rules all play.
ops_st = st.lists(
    st.tuples(
        st.sampled_from(["failure"] * 4 + ["success", "success", "cool", "allows"]),
        st.integers(0, 6),  # time since the previous step (times never go back)
        st.integers(0, 20),  # cool's seconds
    ),
    min_size=4,
    max_size=60,
)


@given(settings_st, ops_st)
def test_matches_the_reference_model(
    settings: tuple[int, int, int, int], ops: list[tuple[str, int, int]]
) -> None:
    breaker = CircuitBreaker(*settings)
    model = Model(*settings)
    now = 0.0
    for op, delta, seconds in ops:
        now += delta
        if op != "allows":
            apply(breaker, (op, now, seconds))
            model.step(op, now, seconds)
        assert breaker.opened_until == model.until
        assert breaker.state(now) is model.state(now)
        assert breaker.allows(now) is (model.state(now) is not OPEN)


@given(settings_st, ops_st)
def test_never_allows_before_the_deadline_and_memory_is_bounded(
    settings: tuple[int, int, int, int], ops: list[tuple[str, int, int]]
) -> None:
    breaker = CircuitBreaker(*settings)
    now = 0.0
    for op, delta, seconds in ops:
        now += delta
        before = breaker.opened_until if breaker.state(now) is OPEN else None
        if op != "allows":
            apply(breaker, (op, now, seconds))
        until = breaker.opened_until
        if before is not None:  # nothing shortens an open breaker's deadline
            assert until is not None
            assert until >= before
        if until is not None and now < until:
            assert not breaker.allows(now)
            assert breaker.state(now) is OPEN
        assert len(breaker._failures) <= breaker.failures_to_open


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 100)), min_size=1, max_size=20))
def test_the_latest_of_overlapping_cooldowns_holds(cools: list[tuple[int, int]]) -> None:
    breaker = CircuitBreaker()
    now, deadline = 0.0, 0.0
    for delta, seconds in cools:
        now += delta
        breaker.cool(now, seconds)
        deadline = max(deadline, now + seconds)
        assert breaker.opened_until == deadline
    assert not breaker.allows(math.nextafter(deadline, -math.inf)) or deadline == now
    assert breaker.allows(deadline)


@given(st.integers(2, 10), st.integers(1, 20), st.lists(st.integers(0, 50), max_size=50))
def test_failures_outside_the_window_do_not_count(
    failures_to_open: int, unit: int, gaps: list[int]
) -> None:
    """Failures ``unit`` or more apart, with a window of ``failures_to_open - 1`` units:
    no ``failures_to_open`` of them ever fall in one window, so it stays closed."""
    window = float((failures_to_open - 1) * unit)
    breaker = CircuitBreaker(failures_to_open=failures_to_open, window=window)
    now = 0.0
    for gap in gaps:
        now += unit + gap
        breaker.failure(now)
        assert breaker.state(now) is CLOSED
    # ... and that many failures at one moment do open it.
    for _ in range(failures_to_open):
        breaker.failure(now)
    assert breaker.state(now) is OPEN
