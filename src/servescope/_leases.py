"""Leases of replicas that registered themselves with a front — pure bookkeeping.

A server on another node registers with the front (``servescope serve --register-with``)
and renews its lease every ``renew_every`` seconds; a lease not renewed for ``ttl``
seconds (three renewals missed, by default) has lapsed, and the front ejects that
replica, sending its requests elsewhere. A frozen process (SIGSTOP), a partitioned
node, a killed driver: they all look the same from here — no renewal — and are all
handled the same way. Time is passed in; nothing here sleeps or does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RENEW_EVERY", "TTL", "Leases"]

RENEW_EVERY = 2.0
"""How often a registered server renews its lease (seconds)."""
TTL = 3 * RENEW_EVERY
"""A lease not renewed for this long has lapsed: three renewals missed."""


@dataclass
class _Lease:
    url: str
    expires: float


class Leases:
    """Replica index → its lease (the URL it registered, when the lease lapses)."""

    def __init__(self, ttl: float = TTL) -> None:
        if not ttl > 0:
            raise ValueError(f"a lease's ttl must be positive, not {ttl!r}")
        self.ttl = ttl
        self._leases: dict[int, _Lease] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, index: object) -> bool:
        return index in self._leases

    def grant(self, index: int, url: str, now: float) -> None:
        """Replica ``index`` (registered at ``url``) holds a lease until ``now + ttl``."""
        self._leases[index] = _Lease(url, now + self.ttl)

    def renew(self, index: int, now: float) -> bool:
        """Extend the lease of ``index``; ``False`` if it holds none (lapsed, never
        granted, dropped): the server must register again."""
        lease = self._leases.get(index)
        if lease is None or lease.expires <= now:
            return False
        lease.expires = now + self.ttl
        return True

    def holder(self, url: str) -> int | None:
        """The replica holding a lease for ``url``, if any (a server registering again
        on the same address keeps its index)."""
        return next((index for index, lease in self._leases.items() if lease.url == url), None)

    def left(self, index: int, now: float) -> float | None:
        """Seconds until the lease of ``index`` lapses (``None``: it holds none)."""
        lease = self._leases.get(index)
        return None if lease is None else max(0.0, lease.expires - now)

    def drop(self, index: int) -> None:
        """Forget the lease of ``index`` (deregistered, removed)."""
        self._leases.pop(index, None)

    def lapsed(self, now: float) -> list[int]:
        """The replicas whose lease has lapsed at ``now`` (they are forgotten here)."""
        gone = [index for index, lease in self._leases.items() if lease.expires <= now]
        for index in gone:
            del self._leases[index]
        return gone

    def next_expiry(self) -> float | None:
        """When the next lease lapses, if any is held."""
        return min((lease.expires for lease in self._leases.values()), default=None)
