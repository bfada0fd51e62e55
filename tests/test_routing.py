"""Routing policies: pure choices among candidates, table-driven and property-tested."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from servescope._routing import (
    DEFAULT_POLICY,
    POLICIES,
    PREFIX_CHARS,
    Candidate,
    Policy,
    RouteKey,
    make_policy,
    prefix_of,
)


def cands(*loads: int, indices: Sequence[int] | None = None) -> list[Candidate]:
    """Candidates with these loads, at indices 0.. or at ``indices``."""
    indices = range(len(loads)) if indices is None else indices
    return [Candidate(index=i, in_flight=load) for i, load in zip(indices, loads, strict=True)]


def chosen(policy: Policy, candidates: Sequence[Candidate], key: RouteKey, calls: int) -> list[int]:
    """The indices ``policy`` picks over ``calls`` calls with the same candidates and key."""
    return [policy.choose(candidates, key).index for _ in range(calls)]


candidate_lists = st.lists(
    st.tuples(st.integers(0, 40), st.integers(0, 300)),
    min_size=1,
    max_size=12,
    unique_by=lambda pair: pair[0],
).map(lambda pairs: [Candidate(index=i, in_flight=load) for i, load in sorted(pairs)])

keys = st.builds(RouteKey, prefix=st.text(max_size=40), sticky=st.none() | st.text(max_size=20))
policy_names = st.sampled_from(POLICIES)


# --- names and construction -------------------------------------------------------------


def test_names() -> None:
    assert POLICIES == ("least_loaded", "round_robin", "power_of_two", "prefix", "sticky")
    assert DEFAULT_POLICY == "least_loaded"
    for name in POLICIES:
        assert make_policy(name).name == name
        assert make_policy(name, seed=3).name == name


def test_unknown_policy_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="cache_aware") as info:
        make_policy("cache_aware")
    for name in POLICIES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("bogus", balance_abs=-1)  # the name is the first thing wrong


@pytest.mark.parametrize(
    "kwargs",
    [{"balance_abs": -1}, {"balance_rel": 0.5}, {"balance_rel": float("nan")}],
)
def test_bad_balance_thresholds(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="balance"):
        make_policy("prefix", **kwargs)


@pytest.mark.parametrize("name", POLICIES)
def test_no_candidates_is_a_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match="no candidates"):
        make_policy(name).choose([], RouteKey(prefix="p", sticky="s"))


# --- every policy -----------------------------------------------------------------------


@given(policy_names, st.integers(0, 2**32), st.lists(st.tuples(candidate_lists, keys), max_size=8))
def test_every_policy_returns_a_candidate(
    name: str, seed: int, calls: list[tuple[list[Candidate], RouteKey]]
) -> None:
    policy = make_policy(name, seed=seed)
    for candidates, key in calls:
        assert policy.choose(candidates, key) in candidates


@given(policy_names, st.integers(0, 2**32), st.lists(st.tuples(candidate_lists, keys), max_size=12))
def test_same_seed_same_choices(
    name: str, seed: int, calls: list[tuple[list[Candidate], RouteKey]]
) -> None:
    first, second = make_policy(name, seed=seed), make_policy(name, seed=seed)
    assert [first.choose(c, k) for c, k in calls] == [second.choose(c, k) for c, k in calls]


def test_power_of_two_seeds_matter() -> None:
    candidates = cands(*[0] * 16)
    runs = [chosen(make_policy("power_of_two", seed=s), candidates, RouteKey(), 64) for s in (1, 2)]
    assert runs[0] != runs[1]
    fresh = [chosen(make_policy("power_of_two"), candidates, RouteKey(), 64) for _ in range(2)]
    assert fresh[0] != fresh[1]  # no seed: a fresh one each time (chance of equal: 16**-64)


@pytest.mark.parametrize("name", POLICIES)
def test_candidates_need_not_be_sorted(name: str) -> None:
    candidates = [Candidate(2, 0), Candidate(0, 0), Candidate(1, 0)]
    for _ in range(6):
        assert make_policy(name, seed=0).choose(candidates, RouteKey("p", "s")) in candidates


# --- least_loaded -----------------------------------------------------------------------


@given(candidate_lists, st.lists(candidate_lists, max_size=6))
def test_least_loaded_picks_a_minimum(
    candidates: list[Candidate], before: list[list[Candidate]]
) -> None:
    policy = make_policy("least_loaded")
    for earlier in before:  # whatever state earlier calls left
        policy.choose(earlier, RouteKey())
    assert policy.choose(candidates, RouteKey()).in_flight == min(c.in_flight for c in candidates)


@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=10, unique=True).map(sorted),
    st.integers(0, 50),
    st.integers(1, 5),
)
def test_least_loaded_spreads_equal_loads_evenly(indices: list[int], load: int, k: int) -> None:
    candidates = cands(*[load] * len(indices), indices=indices)
    counts = Counter(chosen(make_policy("least_loaded"), candidates, RouteKey(), len(indices) * k))
    assert counts == dict.fromkeys(indices, k)


@pytest.mark.parametrize(
    ("loads", "calls", "expected"),
    [
        ((0, 0, 5), 4, [0, 1, 0, 1]),
        ((3, 1, 1, 1), 4, [1, 2, 3, 1]),
        ((7,), 3, [0, 0, 0]),
        ((2, 9, 2, 0), 2, [3, 3]),
    ],
)
def test_least_loaded_table(loads: tuple[int, ...], calls: int, expected: list[int]) -> None:
    assert chosen(make_policy("least_loaded"), cands(*loads), RouteKey(), calls) == expected


def test_least_loaded_ties_are_not_always_the_first() -> None:
    """LiteLLM's users: with equal loads every request went to the first deployment."""
    # Requests that finish before the next arrives: every choice is among equals.
    assert chosen(make_policy("least_loaded"), cands(0, 0, 0, 0), RouteKey(), 8) == [0, 1, 2, 3] * 2


def test_least_loaded_follows_rising_loads() -> None:
    policy = make_policy("least_loaded")
    loads = [0, 0, 0]
    for _ in range(9):  # requests that stay in flight
        loads[policy.choose(cands(*loads), RouteKey()).index] += 1
    assert loads == [3, 3, 3]


# --- round_robin ------------------------------------------------------------------------


@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=10, unique=True).map(sorted),
    st.lists(st.integers(0, 300), min_size=10, max_size=10),
    st.integers(0, 12),
)
def test_round_robin_visits_each_once_per_cycle(
    indices: list[int], loads: list[int], warmup: int
) -> None:
    candidates = cands(*loads[: len(indices)], indices=indices)
    policy = make_policy("round_robin")
    chosen(policy, candidates, RouteKey(), warmup)
    for _ in range(3):
        assert sorted(chosen(policy, candidates, RouteKey(), len(indices))) == indices


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # Each step: the candidate indices for one call.
        ([[0, 1, 2, 3]] * 6, [0, 1, 2, 3, 0, 1]),
        ([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 3], [0, 1, 3]], [0, 1, 3, 0]),  # 2 left
        ([[0, 1, 3], [0, 1, 3], [0, 1, 2, 3], [0, 1, 2, 3]], [0, 1, 2, 3]),  # 2 came back
        ([[0, 1, 2], [1, 2], [1, 2], [0, 1, 2]], [0, 1, 2, 0]),  # 0 left and came back
        ([[0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 2, 5]], [0, 1, 2, 5]),  # 5 joined
        ([[0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1]], [0, 1, 2, 0]),  # the next one left
        ([[4, 7], [4, 7], [4, 7]], [4, 7, 4]),
    ],
)
def test_round_robin_is_stable_when_the_set_changes(
    steps: list[list[int]], expected: list[int]
) -> None:
    policy = make_policy("round_robin")
    got = [policy.choose(cands(*[0] * len(s), indices=s), RouteKey()).index for s in steps]
    assert got == expected


@given(
    st.lists(st.integers(0, 40), min_size=2, max_size=10, unique=True).map(sorted),
    st.data(),
)
def test_round_robin_removal_skips_only_the_removed(
    indices: list[int], data: st.DataObject
) -> None:
    policy, reference = make_policy("round_robin"), make_policy("round_robin")
    warmup = data.draw(st.integers(0, 12))
    full = cands(*[0] * len(indices), indices=indices)
    chosen(policy, full, RouteKey(), warmup)
    chosen(reference, full, RouteKey(), warmup)
    gone = data.draw(st.sampled_from(indices))
    rest = [c for c in full if c.index != gone]
    expected = [i for i in chosen(reference, full, RouteKey(), len(indices) + 1) if i != gone]
    assert chosen(policy, rest, RouteKey(), len(expected)) == expected


# --- power_of_two -----------------------------------------------------------------------


@given(candidate_lists, st.integers(0, 2**32))
def test_power_of_two_never_picks_the_unique_maximum(
    candidates: list[Candidate], seed: int
) -> None:
    top = max(c.in_flight for c in candidates)
    at_top = [c for c in candidates if c.in_flight == top]
    policy = make_policy("power_of_two", seed=seed)
    for _ in range(10):
        pick = policy.choose(candidates, RouteKey())
        if len(candidates) >= 2 and len(at_top) == 1:
            assert pick != at_top[0]


def test_power_of_two_table() -> None:
    policy = make_policy("power_of_two", seed=0)
    assert chosen(policy, cands(5), RouteKey(), 3) == [0, 0, 0]
    assert chosen(policy, cands(5, 1), RouteKey(), 5) == [1] * 5
    counts = Counter(chosen(policy, cands(0, 0), RouteKey(), 400))
    assert min(counts.values()) > 120  # ties go to the rng, not to one side
    counts = Counter(chosen(policy, cands(0, 0, 0, 100), RouteKey(), 600))
    assert set(counts) == {0, 1, 2}


# --- prefix and sticky: rendezvous hashing ----------------------------------------------


def hashed(name: str, text: str) -> RouteKey:
    return RouteKey(prefix=text) if name == "prefix" else RouteKey(sticky=text)


affinity_names = st.sampled_from(["prefix", "sticky"])
balanced_lists = st.lists(st.integers(0, 40), min_size=1, max_size=12, unique=True).map(
    lambda indices: cands(*[0] * len(indices), indices=sorted(indices))
)


@given(affinity_names, balanced_lists, st.text(min_size=1), st.integers(0, 2**32))
def test_same_key_same_replica(
    name: str, candidates: list[Candidate], text: str, seed: int
) -> None:
    policy = make_policy(name, seed=seed)
    first = policy.choose(candidates, hashed(name, text))
    assert chosen(policy, candidates, hashed(name, text), 5) == [first.index] * 5
    assert make_policy(name).choose(candidates, hashed(name, text)) == first  # seed-free


@given(affinity_names, balanced_lists, st.text(min_size=1), st.data())
def test_removing_another_replica_keeps_the_choice(
    name: str, candidates: list[Candidate], text: str, data: st.DataObject
) -> None:
    policy = make_policy(name)
    first = policy.choose(candidates, hashed(name, text))
    others = [c for c in candidates if c != first]
    kept = data.draw(st.lists(st.sampled_from(others), unique=True)) if others else []
    rest = sorted([first, *kept], key=lambda c: c.index)
    assert policy.choose(rest, hashed(name, text)) == first


@given(affinity_names, balanced_lists, st.text(min_size=1), st.integers(41, 60))
def test_adding_a_replica_moves_a_key_only_to_it(
    name: str, candidates: list[Candidate], text: str, new: int
) -> None:
    policy = make_policy(name)
    before = policy.choose(candidates, hashed(name, text))
    after = policy.choose([*candidates, Candidate(new, 0)], hashed(name, text))
    assert after in (before, Candidate(new, 0))


@pytest.mark.parametrize("name", ["prefix", "sticky"])
def test_keys_spread_over_replicas(name: str) -> None:
    policy = make_policy(name)
    counts = Counter(
        policy.choose(cands(0, 0, 0, 0), hashed(name, f"user {n}")).index for n in range(4000)
    )
    assert all(850 < counts[i] < 1150 for i in range(4)), counts


@pytest.mark.parametrize("name", ["prefix", "sticky"])
def test_hash_is_stable_across_processes(name: str) -> None:
    """blake2b, not ``hash()``: a fixed key maps to a fixed replica in every process."""
    policy = make_policy(name)
    got = [policy.choose(cands(*[0] * 8), hashed(name, text)).index for text in GOLDEN_KEYS]
    assert got == GOLDEN[name]


GOLDEN_KEYS = ["a", "user 1", "You are a helpful assistant.", "日本語", "x" * 256, "b", "c"]
GOLDEN = {"prefix": [1, 4, 7, 5, 7, 0, 4], "sticky": [1, 4, 7, 5, 7, 0, 4]}


@pytest.mark.parametrize("name", ["prefix", "sticky"])
@pytest.mark.parametrize("text", ["\ud800 lone surrogate", "\x00", "é" * 300])
def test_odd_keys_hash(name: str, text: str) -> None:
    assert make_policy(name).choose(cands(0, 0, 0), hashed(name, text)) in cands(0, 0, 0)


def test_sticky_ignores_load() -> None:
    policy = make_policy("sticky")
    home = policy.choose(cands(0, 0, 0), RouteKey(sticky="session-1")).index
    loads = [0, 0, 0]
    loads[home] = 10_000
    assert policy.choose(cands(*loads), RouteKey(sticky="session-1")).index == home


@pytest.mark.parametrize(("name", "key"), [("sticky", RouteKey()), ("prefix", RouteKey())])
def test_no_key_is_least_loaded(name: str, key: RouteKey) -> None:
    policy = make_policy(name)
    assert chosen(policy, cands(4, 1, 1, 9), key, 4) == [1, 2, 1, 2]
    assert chosen(policy, cands(0, 0, 0), key, 6) == [0, 1, 2, 0, 1, 2]


def test_empty_sticky_key_is_no_key() -> None:
    assert chosen(make_policy("sticky"), cands(4, 1, 1), RouteKey(sticky=""), 3) == [1, 2, 1]


def test_sticky_uses_the_sticky_key_not_the_prefix() -> None:
    policy = make_policy("sticky")
    homes = {policy.choose(cands(*[0] * 8), RouteKey("same prefix", f"k{n}")) for n in range(40)}
    assert len(homes) > 1


def test_prefix_uses_the_prefix_not_the_sticky_key() -> None:
    policy = make_policy("prefix")
    homes = {policy.choose(cands(*[0] * 8), RouteKey(f"p{n}", "same key")) for n in range(40)}
    assert len(homes) > 1


@pytest.mark.parametrize(
    ("home_load", "other_load", "balance_abs", "balance_rel", "falls_back"),
    [
        # SGLang's cache_aware: imbalanced when max - min > abs AND max > rel * min.
        (64, 0, 64, 1.5, False),  # difference not over 64
        (65, 0, 64, 1.5, True),
        (300, 200, 64, 1.5, False),  # 300 is not over 1.5 * 200
        (301, 200, 64, 1.5, True),
        (1000, 700, 64, 1.5, False),  # far apart, but within the ratio
        (1051, 700, 64, 1.5, True),
        (0, 65, 64, 1.5, False),  # the home replica is the least loaded: it stays
        (3, 0, 2, 1.5, True),
        (3, 0, 3, 1.5, False),
        (11, 5, 5, 2.0, True),
        (10, 5, 5, 2.0, False),
        (65, 0, 64, float("inf"), False),  # an infinite ratio: never falls back
    ],
)
def test_prefix_falls_back_exactly_under_the_thresholds(
    home_load: int, other_load: int, balance_abs: int, balance_rel: float, falls_back: bool
) -> None:
    policy = make_policy("prefix", balance_abs=balance_abs, balance_rel=balance_rel)
    key = RouteKey(prefix="You are a helpful assistant.")
    home = policy.choose(cands(0, 0), key).index
    loads = [other_load, other_load]
    loads[home] = home_load
    expected = 1 - home if falls_back else home
    assert policy.choose(cands(*loads), key).index == expected


def test_prefix_fallback_considers_every_replica() -> None:
    policy = make_policy("prefix")
    key = RouteKey(prefix="shared system prompt")
    home = policy.choose(cands(0, 0, 0), key).index
    loads = [50, 50, 50]
    loads[home] = 200  # 200 - 50 > 64 and 200 > 75: imbalanced
    least = (home + 1) % 3
    loads[least] = 10
    assert policy.choose(cands(*loads), key).index == least


# --- prefix_of --------------------------------------------------------------------------

LONG = "abcdefghij" * 100


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"prompt": "Once upon a time"}, "Once upon a time"),
        ({"prompt": LONG}, LONG[:PREFIX_CHARS]),
        ({"prompt": ["first", "second"]}, "first"),
        ({"prompt": [[1, 2, 3], "text after tokens"]}, "text after tokens"),
        ({"prompt": [1, 2, 3]}, ""),
        ({"prompt": []}, ""),
        ({"prompt": None, "messages": [{"role": "user", "content": "hi"}]}, "hi"),
        ({"messages": [{"role": "user", "content": "hello"}]}, "hello"),
        (
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "What is 2+2?"},
                ]
            },
            "Be brief.\nWhat is 2+2?",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Describe"},
                            {"type": "image_url", "image_url": {"url": "data:..."}},
                            {"type": "text", "text": "this image"},
                        ],
                    }
                ]
            },
            "Describe\nthis image",
        ),
        (
            {
                "messages": [
                    {"role": "system", "content": LONG},
                    {"role": "user", "content": "never reached"},
                ]
            },
            LONG[:PREFIX_CHARS],
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "content": None, "tool_calls": []},
                    {"role": "tool", "content": ""},
                    {"role": "user", "content": "after a tool"},
                ]
            },
            "after a tool",
        ),
        ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "no type"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, ""),
        ({"messages": ["not a dict", 7, None, {"content": "ok"}]}, "ok"),
        ({"messages": "a string, not a list"}, ""),
        ({"messages": {"content": "a dict, not a list"}}, ""),
        ({"messages": []}, ""),
        ({"prompt": 42}, ""),
        ({"prompt": {"text": "dict prompt"}}, ""),
        ({}, ""),
        ({"model": "m", "max_tokens": 5}, ""),
    ],
)
def test_prefix_of(payload: dict[str, Any], expected: str) -> None:
    assert prefix_of(payload) == expected


@pytest.mark.parametrize("payload", [None, 5, "prompt", ["messages"], b"bytes"])
def test_prefix_of_a_non_mapping(payload: Any) -> None:
    assert prefix_of(payload) == ""


def test_prefix_of_huge_payloads_is_cut() -> None:
    huge = {"messages": [{"role": "user", "content": "x" * 10}] * 1_000_000}
    got = prefix_of(huge)
    assert len(got) == PREFIX_CHARS
    assert got.startswith("xxxxxxxxxx\nxxxxxxxxxx\n")
    assert prefix_of({"prompt": "y" * 10_000_000}) == "y" * PREFIX_CHARS


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=300),
    _containers,
    max_leaves=30,
)
odd_payloads = st.dictionaries(
    st.sampled_from(["prompt", "messages", "model", "content", "text"]), json_values
) | st.fixed_dictionaries(
    {
        "messages": st.lists(
            st.dictionaries(st.sampled_from(["role", "content", "type", "text"]), json_values)
            | json_values,
            max_size=5,
        )
    }
)


@given(odd_payloads)
def test_prefix_of_never_raises(payload: dict[str, Any]) -> None:
    got = prefix_of(payload)
    assert isinstance(got, str)
    assert len(got) <= PREFIX_CHARS


@given(st.text(max_size=600))
def test_prefix_of_a_prompt_is_its_head(text: str) -> None:
    assert prefix_of({"prompt": text}) == text[:PREFIX_CHARS]
    assert prefix_of({"messages": [{"role": "user", "content": text}]}) == text[:PREFIX_CHARS]
