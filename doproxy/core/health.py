"""Health of one backend from a stream of check results: the rise/fall state machine.

Theory of operation
-------------------
A backend is either UP or DOWN. Each check result moves a counter:

    UP   --fail--> (consecutive failures += 1) --reaches `fall`--> DOWN
    DOWN --pass--> (consecutive passes += 1)   --reaches `rise`--> UP

A result in the other direction resets the opposite counter, so flapping checks never flip the
state. A new backend starts in the state the caller chooses (a freshly added backend is checked
at once; a backend with checks disabled is simply never fed results and stays UP).

`record()` returns the transition, if any, so the caller logs it once rather than on every probe.
The number of consecutive failures is kept too, and, when the caller passes the time of each
check, when the current run of failures began (`down_since`): the autoscaler replaces a backend
that has failed every check for `max-health-failures` seconds (the Go version checked once a
second, so 180 meant 3 minutes; it still does, whatever the check interval). Pure: no clock, no
I/O: the time comes in as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class State(Enum):
    UP = "up"
    DOWN = "down"


@dataclass
class Health:
    rise: int = 2
    fall: int = 5
    state: State = State.UP
    passes: int = 0  # consecutive passing checks
    failures: int = 0  # consecutive failing checks
    down_since: float | None = None  # time of the first of the current run of failed checks
    problem: str = ""  # what the last failed check found, for people (log, events)

    def record(self, ok: bool, now: float | None = None) -> State | None:
        """Fold in one check result (made at `now`, when known); return the new state if it
        changed, else None."""
        if ok:
            self.failures = 0
            self.down_since = None
            self.passes += 1
            if self.state is State.DOWN and self.passes >= self.rise:
                self.state = State.UP
                return State.UP
        else:
            self.passes = 0
            self.failures += 1
            if self.failures == 1 or self.down_since is None:
                self.down_since = now
            if self.state is State.UP and self.failures >= self.fall:
                self.state = State.DOWN
                return State.DOWN
        return None

    def failing_for(self, now: float) -> float:
        """Seconds this backend has failed every health check, up to `now` (0 when passing)."""
        return 0.0 if self.down_since is None else max(now - self.down_since, 0.0)

    @property
    def up(self) -> bool:
        return self.state is State.UP


def may_eject(ejected: int, pool_size: int, max_percent: float) -> bool:
    """Passive health never ejects more than `max_percent` of the pool (at least one backend
    may always be ejected from a pool of two or more, none from a pool of one)."""
    if pool_size <= 1:
        return False
    limit = max(int(pool_size * max_percent / 100.0), 1)
    return ejected < limit


def ejection_duration(base: float, previous_ejections: int, longest: float) -> float:
    """Each repeat ejection lasts twice as long as the one before, up to `longest`."""
    return float(min(base * (2 ** min(previous_ejections, 30)), longest))
