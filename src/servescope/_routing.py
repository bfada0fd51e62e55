"""Which replica takes a request — routing policies as pure code.

The pool asks a policy to choose among the replicas that can take a request now; the
policy sees only their indices and in-flight counts, so every choice is a plain function
of its inputs and of the policy's own small state (a rotation counter, a seeded
``random.Random``), testable without processes, sockets or an event loop.

Lessons from the routers users would otherwise pick (``shared/POOL.md``):

- ``least_loaded`` rotates among equally loaded replicas: LiteLLM's least-busy sent every
  tie to the first deployment, and Megatron's coordinator sends ties to the lowest rank.
- ``round_robin`` rotates over replica *indices*, not positions in the candidate list, so
  a replica leaving or coming back does not reshuffle the order for the others.
- ``prefix`` and ``sticky`` use rendezvous (highest random weight) hashing with
  ``blake2b``: the same key lands on the same replica in every process (Python's
  ``hash()`` of a str is salted per process), and a replica leaving moves only the keys
  it held. ``prefix`` gives up affinity for the least loaded replica when load is
  imbalanced, with SGLang's ``cache_aware`` thresholds (``max - min > 64`` and
  ``max > 1.5 * min``).
- A seed makes every choice reproducible (Megatron's deterministic mode).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "PREFIX_CHARS",
    "Candidate",
    "Policy",
    "RouteKey",
    "make_policy",
    "prefix_of",
]

#: Characters of a request's text that decide its prefix affinity.
PREFIX_CHARS = 256

#: Every policy name ``make_policy`` knows.
POLICIES: tuple[str, ...] = ("least_loaded", "round_robin", "power_of_two", "prefix", "sticky")

#: The policy a pool uses unless told otherwise.
DEFAULT_POLICY = "least_loaded"


@dataclass(frozen=True)
class Candidate:
    """A replica that can take a request now: its stable pool index and its load."""

    index: int
    in_flight: int


@dataclass(frozen=True)
class RouteKey:
    """What a request offers for affinity: its text's head (``prefix_of``) and a caller's key."""

    prefix: str = ""
    sticky: str | None = None


class Policy(Protocol):
    """Chooses one of the candidates for a request; may keep state between calls."""

    name: str

    def choose(self, candidates: Sequence[Candidate], key: RouteKey) -> Candidate:
        """One of ``candidates`` (non-empty; ``ValueError`` if empty) for a request with ``key``."""
        ...


def make_policy(
    name: str,
    *,
    seed: int | None = None,
    balance_abs: int = 64,
    balance_rel: float = 1.5,
) -> Policy:
    """A fresh policy called ``name`` (one of ``POLICIES``).

    ``seed`` fixes the random draws (only ``power_of_two`` draws): the same sequence of
    calls then gives the same choices; ``None`` seeds from the OS. ``balance_abs`` and
    ``balance_rel`` are ``prefix``'s imbalance thresholds. Raises ``ValueError`` for an
    unknown name or thresholds that are not ``balance_abs >= 0`` and ``balance_rel >= 1``.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}")
    _check_balance(balance_abs, balance_rel)
    if name == "least_loaded":
        return _LeastLoaded()
    if name == "round_robin":
        return _RoundRobin()
    if name == "power_of_two":
        return _PowerOfTwo(random.Random(seed))
    if name == "prefix":
        return _Prefix(balance_abs, balance_rel)
    return _Sticky()


def _check_balance(balance_abs: int, balance_rel: float) -> None:
    """Reject thresholds that cannot mean anything (``nan`` compares false to everything)."""
    if balance_abs < 0:
        raise ValueError(f"balance_abs must be >= 0, not {balance_abs!r}")
    if not balance_rel >= 1.0:
        raise ValueError(f"balance_rel must be >= 1, not {balance_rel!r}")


def _nonempty(candidates: Sequence[Candidate]) -> Sequence[Candidate]:
    """``candidates``, or a ``ValueError`` that says what went wrong instead of an IndexError."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    return candidates


class _Rotation:
    """Cycles over replica indices: the first index at or after the counter, wrapping.

    Keyed by index rather than list position, so the order survives candidates leaving
    and joining; the candidates need not be sorted.
    """

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        """The candidate whose turn it is; the turn then passes to the indices after it."""
        ahead = [c for c in candidates if c.index >= self._next]
        choice = min(ahead or candidates, key=_by_index)
        self._next = choice.index + 1
        return choice


def _by_index(candidate: Candidate) -> int:
    return candidate.index


class _RoundRobin:
    """Each replica in turn, by index, whatever its load."""

    name = "round_robin"

    def __init__(self) -> None:
        self._rotation = _Rotation()

    def choose(self, candidates: Sequence[Candidate], key: RouteKey) -> Candidate:
        """The next replica by index after the last one chosen."""
        return self._rotation.pick(_nonempty(candidates))


class _LeastLoaded:
    """A replica with the fewest requests in flight; equals take turns."""

    name = "least_loaded"

    def __init__(self) -> None:
        self._rotation = _Rotation()

    def choose(self, candidates: Sequence[Candidate], key: RouteKey) -> Candidate:
        """The least loaded replica, rotating among ties (never always the first)."""
        lowest = min(c.in_flight for c in _nonempty(candidates))
        return self._rotation.pick([c for c in candidates if c.in_flight == lowest])


class _PowerOfTwo:
    """The less loaded of two replicas drawn at random (Ray Serve's default)."""

    name = "power_of_two"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, candidates: Sequence[Candidate], key: RouteKey) -> Candidate:
        """Draw two distinct replicas; the lower in-flight count wins, a tie is drawn."""
        if len(_nonempty(candidates)) == 1:
            return candidates[0]
        first, second = self._rng.sample(list(candidates), 2)
        if first.in_flight != second.in_flight:
            return first if first.in_flight < second.in_flight else second
        return first if self._rng.random() < 0.5 else second


class _Prefix:
    """The replica a request's leading text hashes to, unless load is imbalanced."""

    name = "prefix"

    def __init__(self, balance_abs: int, balance_rel: float) -> None:
        self._balance_abs = balance_abs
        self._balance_rel = balance_rel
        self._fallback = _LeastLoaded()

    def choose(self, candidates: Sequence[Candidate], key: RouteKey) -> Candidate:
        """Rendezvous on ``key.prefix``; least loaded for no prefix or imbalanced load."""
        if not key.prefix or self._imbalanced(_nonempty(candidates)):
            return self._fallback.choose(candidates, key)
        return _rendezvous(candidates, key.prefix)

    def _imbalanced(self, candidates: Sequence[Candidate]) -> bool:
        """SGLang's test: ``max - min > balance_abs`` and ``max > balance_rel * min``."""
        loads = [c.in_flight for c in candidates]
        most, least = max(loads), min(loads)
        return most - least > self._balance_abs and most > self._balance_rel * least


class _Sticky:
    """The replica a caller's routing key hashes to, whatever its load."""

    name = "sticky"

    def __init__(self) -> None:
        self._fallback = _LeastLoaded()

    def choose(self, candidates: Sequence[Candidate], key: RouteKey) -> Candidate:
        """Rendezvous on ``key.sticky``; least loaded when it is ``None`` or empty."""
        if not key.sticky:
            return self._fallback.choose(_nonempty(candidates), key)
        return _rendezvous(_nonempty(candidates), key.sticky)


def _rendezvous(candidates: Sequence[Candidate], text: str) -> Candidate:
    """The candidate with the highest weight for ``text`` (ties, at 2**-64: the higher index)."""
    digest = _digest(text.encode("utf-8", "surrogatepass"))
    return max(candidates, key=lambda c: (_weight(digest, c.index), c.index))


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def _weight(digest: bytes, index: int) -> int:
    """A stable pseudo-random weight of (key, replica): the same in every process."""
    mixed = hashlib.blake2b(b"%d" % index, digest_size=8, key=digest).digest()
    return int.from_bytes(mixed, "big")


def prefix_of(payload: Mapping[str, Any]) -> str:
    """The first ``PREFIX_CHARS`` characters of an OpenAI payload's text, for prefix affinity.

    The text is the prompt (a str, or the first str of a list prompt), else the
    messages' contents in order, joined by newlines (a str content, or the ``text`` parts
    of a list content). ``""`` when there is none. Never raises: the payload is the
    caller's, and routing must not be the thing that fails a request.
    """
    if not isinstance(payload, Mapping):
        return ""
    head = _prompt_text(payload.get("prompt"))
    if head is None:
        head = _joined_head(_message_texts(payload.get("messages")))
    return head[:PREFIX_CHARS]


def _prompt_text(prompt: object) -> str | None:
    """A completion prompt's text: itself if a str, else a list's first str, else ``None``."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return next((item for item in prompt if isinstance(item, str)), None)
    return None


def _message_texts(messages: object) -> Iterator[str]:
    """Each non-empty text of a chat payload's messages, lazily and in order."""
    if not isinstance(messages, list):
        return
    for message in messages:
        if isinstance(message, Mapping):
            yield from _content_texts(message.get("content"))


def _content_texts(content: object) -> Iterator[str]:
    """A message content's texts: a non-empty str, or the non-empty ``text`` parts of a list."""
    if isinstance(content, str):
        if content:
            yield content
        return
    if isinstance(content, list):
        for part in content:
            text = _part_text(part)
            if text:
                yield text


def _part_text(part: object) -> str | None:
    """The text of an OpenAI content part of type ``text`` (or of no type), else ``None``."""
    if not isinstance(part, Mapping) or part.get("type", "text") != "text":
        return None
    text = part.get("text")
    return text if isinstance(text, str) else None


def _joined_head(texts: Iterator[str], sep: str = "\n") -> str:
    """``sep.join(texts)``, stopping once ``PREFIX_CHARS`` characters are in hand."""
    pieces: list[str] = []
    size = 0
    for text in texts:
        pieces.append(text[: PREFIX_CHARS - size])
        size += len(pieces[-1]) + len(sep)
        if size >= PREFIX_CHARS:
            break
    return sep.join(pieces)
