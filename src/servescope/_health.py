"""After readiness: what a health probe's answer means, and when a server has hung.

Pure code: the supervisor probes (``_http.probe_status``) and feeds each outcome here
with the time; ``HealthWatch`` says whether the server is answering, dead, or silent
for too long. A hung engine (a SIGSTOPped process, a server that accepts connections
and never answers) is the most expensive failure there is: every request would wait
for its own timeout, with every retry. So silence, not only a bad status, fails it.

=====================  ==============================================================
probe outcome          meaning
=====================  ==============================================================
``dead_status``        the engine said it died (vLLM's ``/health`` 503): dead at once
any other 5xx          a miss (SGLang's ``/health`` answers 503 when its engine hangs)
no answer in time,
refused, reset         a miss
anything else          answered: alive (a 401 or 404 still comes from a live server)
=====================  ==============================================================

Misses are counted in time, not in number: a server fails once no probe has been
answered for ``unhealthy_after`` seconds since the last answer (or readiness).

Before that, a pool takes a replica out of rotation (``healthy`` turns false) after a few
misses in a row or a few seconds of silence, and back in after a few answers in a row
(``Demotion``): a hung replica stops getting requests within seconds, and one late probe
does not flap it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

__all__ = ["Demotion", "HealthWatch", "Probe", "judge"]

#: The shortest time a probe is given, however close the deadline.
MIN_PROBE_TIMEOUT = 0.05


class Probe(enum.Enum):
    """One health probe's outcome."""

    ANSWERED = "answered"
    MISSED = "missed"
    DEAD = "dead"


def judge(status: int | None, dead_status: int | None) -> Probe:
    """What a probe's HTTP status (``None``: no answer) says about the server."""
    if status is None:
        return Probe.MISSED
    if status == dead_status:
        return Probe.DEAD
    return Probe.MISSED if status >= 500 else Probe.ANSWERED


@dataclass(frozen=True)
class Demotion:
    """When a ready server is taken out of a pool's rotation, and put back: after
    ``misses`` probes missed in a row or ``after`` seconds without an answer; back after
    ``promote`` probes answered in a row."""

    misses: int = 3
    after: float = math.inf
    promote: int = 2


@dataclass
class HealthWatch:
    """The health of one ready server, from its probes' outcomes over time.

    Attributes:
        unhealthy_after: seconds without an answered probe after which it has hung.
        timeout: the longest a single probe may take.
        dead_status: the status that means the engine died (``None``: none does).
        last_answer: when a probe was last answered (at first: when it became ready).
        demotion: when ``healthy`` turns false, and true again.
        misses / answers: probes missed / answered in a row; ``last_status``: the last seen.
    """

    unhealthy_after: float
    timeout: float
    dead_status: int | None
    last_answer: float
    demotion: Demotion = Demotion()
    misses: int = 0
    answers: int = 0
    healthy: bool = True
    last_status: int | None = None

    def record(self, status: int | None, now: float) -> Probe:
        """Take one probe's outcome; what it was (``healthy`` follows, with hysteresis)."""
        outcome = judge(status, self.dead_status)
        self.last_status = status
        if outcome is Probe.ANSWERED:
            self.last_answer, self.misses, self.answers = now, 0, self.answers + 1
            if not self.healthy and self.answers >= self.demotion.promote:
                self.healthy = True
        else:
            self.misses, self.answers = self.misses + 1, 0
            silent = now - self.last_answer
            if self.misses >= self.demotion.misses or silent >= self.demotion.after:
                self.healthy = False
        return outcome

    def silent_for(self, now: float) -> float | None:
        """How long the server has not answered, once that is ``unhealthy_after`` or more."""
        silent = now - self.last_answer
        return silent if silent >= self.unhealthy_after else None

    def probe_timeout(self, now: float) -> float:
        """The next probe's time limit: never past the moment the server counts as hung
        (nor, while it is healthy, past the moment it is demoted)."""
        until = self.unhealthy_after
        if self.healthy:
            until = min(until, self.demotion.after)
        left = self.last_answer + until - now
        return max(MIN_PROBE_TIMEOUT, min(self.timeout, left))

    def describe(self, path: str, silent: float) -> str:
        """The failure, in words."""
        last = "no answer" if self.last_status is None else f"last answer {self.last_status}"
        return (
            f"not answering GET {path} for {silent:.0f} s after it was ready "
            f"({self.misses} probes missed, {last}): it hangs"
        )
