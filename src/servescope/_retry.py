"""When to retry and how long to wait — pure functions.

Backoff is exponential with *full jitter* (a uniform draw between 0 and the capped
exponential): many clients failing at once spread out instead of retrying in
lockstep. A server's ``Retry-After`` (seconds or an HTTP date) is a floor on the
wait, itself capped so that a server that lies cannot park a request for hours.
"""

from __future__ import annotations

import email.utils
import math
import random
import re
from datetime import datetime, timezone

__all__ = ["backoff_delay", "parse_retry_after", "retry_delay"]

_SECONDS = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", re.ASCII)


def backoff_delay(retry: int, *, base: float, cap: float, rng: random.Random) -> float:
    """The wait before retry number ``retry`` (0-based): uniform in [0, min(cap, base·2^retry)]."""
    return rng.uniform(0.0, min(cap, base * 2.0 ** min(retry, 62)))


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header, or ``None`` if absent or unreadable.

    Never raises: the value is foreign. Only ASCII digits count (``str.isdigit`` and
    ``float`` also take "²", "٣", "1_000", "inf"), and a wait that is not a finite
    number of seconds is unreadable.
    """
    if value is None:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        seconds = float(value)  # "0.5" is not in the RFC, but servers send it
        return seconds if math.isfinite(seconds) else None
    return _seconds_until(value, now)


def _seconds_until(value: str, now: datetime | None) -> float | None:
    """Seconds from ``now`` until the HTTP date ``value`` (0 if past), or ``None``."""
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, seconds)


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
