"""Fault directives for the dummy server — parsed here, applied by ``_dummy_app``.

A directive is a comma-separated list of ``key[=value]`` items, e.g.
``status=503,retry-after=0.2`` or ``delay=0.1,truncated``:

=================  ==========================================================
``ok``             answer normally (the default)
``delay=S``        wait S seconds before answering
``status=N``       answer status N with an OpenAI error body
``retry-after=V``  with ``status``: send ``Retry-After: V`` (seconds or HTTP date)
``drop``           send headers and part of the body, then cut the connection
``malformed``      answer 200 with a body that is not JSON
``no-choices``     answer 200 with JSON that has no ``choices``
``truncated``      answer 200 with JSON cut in half (consistent Content-Length)
``slow-body=S``    send the headers, wait S seconds, then the body
=================  ==========================================================

Per request, the header ``x-servescope-fault`` holds directives separated by ``|``,
one per attempt: with ``x-servescope-fault-id`` set, the dummy counts attempts of that
id and applies the k-th directive to the k-th attempt (the last one repeats). Without
a header, a seeded ``FaultSchedule`` may pick a directive at random.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["BODY_FAULTS", "Fault", "FaultSchedule", "parse_fault"]

BODY_FAULTS = ("malformed", "no-choices", "truncated")


@dataclass(frozen=True)
class Fault:
    """What the dummy does to one response."""

    delay: float = 0.0
    status: int | None = None
    retry_after: str | None = None
    drop: bool = False
    body: str | None = None
    slow_body: float = 0.0


def parse_fault(text: str) -> Fault:
    """Parse one directive; ``ValueError`` names the bad item."""
    values: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key == "ok" and not value:
            continue
        if key in ("delay", "slow-body") and value:
            values[key.replace("-", "_")] = _seconds(item, value)
        elif key == "status" and value.isdigit() and 100 <= int(value) <= 599:
            values["status"] = int(value)
        elif key == "retry-after" and value:
            values["retry_after"] = value
        elif key == "drop" and not value:
            values["drop"] = True
        elif key in BODY_FAULTS and not value:
            values["body"] = key
        else:
            raise ValueError(f"unknown fault directive {item!r}")
    return Fault(**values)  # type: ignore[arg-type]


def _seconds(item: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"fault directive {item!r} needs a number of seconds") from None
    if not 0 <= seconds <= 3600:
        raise ValueError(f"fault directive {item!r} is out of range")
    return seconds


@dataclass
class FaultSchedule:
    """Seeded random faults: each request, with probability ``rate``, gets one of ``faults``."""

    faults: tuple[str, ...] = ()
    rate: float = 0.0
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)
    _parsed: tuple[Fault, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._parsed = tuple(parse_fault(text) for text in self.faults)

    def next(self) -> Fault:
        """The fault for the next request without a fault header."""
        if self._parsed and self._rng.random() < self.rate:
            return self._rng.choice(self._parsed)
        return Fault()
