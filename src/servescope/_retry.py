"""When to retry and how long to wait — pure functions.

Backoff is exponential with *full jitter* (a uniform draw between 0 and the capped
exponential): many clients failing at once spread out instead of retrying in
lockstep. A server's ``Retry-After`` (seconds or an HTTP date) is a floor on the
wait, itself capped so that a server that lies cannot park a request for hours.
"""

from __future__ import annotations

import email.utils
import random
from datetime import datetime, timezone

__all__ = ["backoff_delay", "parse_retry_after", "retry_delay"]


def backoff_delay(retry: int, *, base: float, cap: float, rng: random.Random) -> float:
    """The wait before retry number ``retry`` (0-based): uniform in [0, min(cap, base·2^retry)]."""
    return rng.uniform(0.0, min(cap, base * 2.0 ** min(retry, 62)))


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header, or ``None`` if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        seconds = float(value)  # not in the RFC, but servers send "0.5"
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())


def retry_delay(
    retry: int,
    retry_after: float | None,
    *,
    base: float,
    cap: float,
    retry_after_cap: float,
    rng: random.Random,
) -> float:
    """The wait before a retry: jittered backoff, at least ``Retry-After`` (capped)."""
    delay = backoff_delay(retry, base=base, cap=cap, rng=rng)
    if retry_after is not None:
        delay = max(delay, min(retry_after, retry_after_cap))
    return delay
