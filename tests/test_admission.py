"""Admission control and leases at the front: pure decisions, tables, properties."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from servescope._admission import Admission, Decision, Rejected, decide
from servescope._leases import Leases


@pytest.mark.parametrize(
    ("running", "waiting", "expected"),
    [
        (0, 0, Decision.RUN),
        (1, 0, Decision.RUN),
        (2, 0, Decision.QUEUE),  # at capacity: wait
        (1, 1, Decision.QUEUE),  # a free slot, but someone waits first: no overtaking
        (2, 2, Decision.QUEUE),
        (2, 3, Decision.REJECT),  # queue full
    ],
)
def test_decide_table(running: int, waiting: int, expected: Decision) -> None:
    assert decide(running, waiting, max_concurrency=2, queue_size=3) is expected


@given(st.integers(0, 50), st.integers(0, 50), st.integers(1, 20), st.integers(0, 20))
def test_decide_never_exceeds_its_bounds(running: int, waiting: int, most: int, queue: int) -> None:
    decision = decide(running, waiting, most, queue)
    if decision is Decision.RUN:
        assert running < most and waiting == 0
    if decision is Decision.QUEUE:
        assert waiting < queue
    if decision is Decision.REJECT:
        assert waiting >= queue


@pytest.mark.anyio
async def test_admission_queues_in_order_then_rejects_when_full() -> None:
    admission = Admission(max_concurrency=1, queue_size=2, queue_timeout=5.0)
    order: list[int] = []
    release = anyio.Event()

    async def request(number: int) -> None:
        async with admission.slot():
            order.append(number)
            await release.wait()

    async with anyio.create_task_group() as tg:
        for number in range(3):
            tg.start_soon(request, number)
            await anyio.wait_all_tasks_blocked()
        assert (admission.running, admission.waiting) == (1, 2)
        with pytest.raises(Rejected) as full:
            async with admission.slot():
                pass
        assert full.value.status == 429 and full.value.retry_after >= 1
        release.set()
    assert order == [0, 1, 2]
    assert (admission.running, admission.waiting) == (0, 0)
    assert admission.rejected[429] == 1


@pytest.mark.anyio
async def test_admission_queue_timeout_is_a_503_and_frees_the_place() -> None:
    admission = Admission(max_concurrency=1, queue_size=5, queue_timeout=0.1)
    async with admission.slot():
        with pytest.raises(Rejected) as late:
            async with admission.slot():
                pass
        assert late.value.status == 503
        assert admission.waiting == 0
    assert admission.running == 0


@pytest.mark.anyio
async def test_admission_a_cancelled_waiter_handed_a_slot_passes_it_on() -> None:
    admission = Admission(max_concurrency=1, queue_size=5, queue_timeout=5.0)
    got: list[str] = []

    async def waiter(name: str, scope_out: list[anyio.CancelScope]) -> None:
        with anyio.CancelScope() as scope:
            scope_out.append(scope)
            async with admission.slot():
                got.append(name)

    async with anyio.create_task_group() as tg:
        scopes: list[anyio.CancelScope] = []
        async with admission.slot():
            tg.start_soon(waiter, "first", scopes)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(waiter, "second", scopes)
            await anyio.wait_all_tasks_blocked()
        # the slot was handed to "first"; cancel it before it runs. Whether the handover
        # or the cancellation wins depends on the loop; either way "second" runs after,
        # and no slot is lost or counted twice.
        scopes[0].cancel()
    assert got[-1] == "second"
    assert (admission.running, admission.waiting) == (0, 0)


def test_leases_grant_renew_lapse() -> None:
    leases = Leases(ttl=6.0)
    leases.grant(3, "http://a:1", now=100.0)
    assert leases.holder("http://a:1") == 3 and 3 in leases
    assert leases.left(3, 101.0) == 5.0
    assert leases.lapsed(105.9) == []
    assert leases.renew(3, now=105.9)
    assert leases.lapsed(111.8) == []
    assert leases.lapsed(111.9) == [3]  # 105.9 + 6
    assert 3 not in leases and leases.holder("http://a:1") is None
    assert not leases.renew(3, now=112.0)  # gone: register again


def test_a_lapsed_lease_cannot_be_renewed_even_before_it_is_collected() -> None:
    leases = Leases(ttl=1.0)
    leases.grant(0, "u", now=0.0)
    assert not leases.renew(0, now=1.0)
    assert leases.next_expiry() == 1.0
    leases.drop(0)
    assert leases.next_expiry() is None and leases.left(0, 0.0) is None


@given(st.lists(st.tuples(st.sampled_from("grn"), st.integers(0, 3), st.floats(0, 1))))
@example([("g", 0, 0.8990895419629206), ("g", 0, 0.1289366005367756),
          ("g", 0, 0.031882050858295104), ("g", 1, 1.0), ("g", 0, 1.0)])  # fmt: skip
def test_leases_lapse_exactly_when_not_renewed_for_ttl(steps: list[tuple[str, int, float]]) -> None:
    """A lease lapses once ``now`` reaches its last renewal + ttl, never before. (The
    deadline as a sum, as the lease keeps it: ``now - last`` may round to just under
    the ttl at the very moment ``now == last + ttl``.)"""
    leases, now = Leases(ttl=2.0), 0.0
    last: dict[int, float] = {}
    for action, index, step in steps:
        now += step
        for gone in leases.lapsed(now):
            assert now >= last.pop(gone) + 2.0
        if action == "g":
            leases.grant(index, f"u{index}", now)
            last[index] = now
        elif action == "r" and leases.renew(index, now):
            last[index] = now
    for when in last.values():
        assert now < when + 2.0


def test_lease_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Leases(ttl=0)
