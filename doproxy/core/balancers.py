"""Load-balancing algorithms. Pure: they see only the eligible backends and their counters.

A balancer is asked `pick(backends, request_key)` once per request, with the backends that may
take traffic right now (healthy, not draining). It returns one of them, or None when the list is
empty, so the proxy answers 503. None of them can loop: every pick is O(1) or O(n) bounded.
Randomness and time come in through the constructor (an rng, a clock function), so tests are
deterministic.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from doproxy.core.stats import PeakEwma


class Candidate(Protocol):
    """What a balancer may look at on a backend."""

    @property
    def in_flight(self) -> int: ...

    @property
    def key(self) -> str: ...

    @property
    def weight(self) -> int: ...

    @property
    def latency(self) -> PeakEwma: ...

    @property
    def failure_rate(self) -> float: ...


B = TypeVar("B", bound=Candidate)


class RoundRobin:
    """Each backend in turn. Skipping ineligible ones is free: they are not in the list.

    The Go version walked the full list looking for a healthy backend and could spin forever
    when all were down; here an empty list answers None at once.
    """

    name = "roundrobin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, backends: Sequence[B], request_key: object = None) -> B | None:
        n = len(backends)
        if n == 0:
            return None
        i = self._next
        if i >= n:
            i = 0
        self._next = i + 1
        return backends[i]


class LeastConn:
    """Fewest in-flight requests; ties take turns, so equal backends share the load fairly."""

    name = "leastconn"

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, backends: Sequence[B], request_key: object = None) -> B | None:
        if not backends:
            return None
        least = min(b.in_flight for b in backends)
        ties = [b for b in backends if b.in_flight == least]
        self._turn += 1
        return ties[self._turn % len(ties)]


class Weighted:
    """Smooth weighted round robin (nginx's): weights 5,1,1 give a,a,b,a,c,a,a, not a*5 then b, c.

    Each pick adds every backend's weight to its running score, takes the highest, and
    subtracts the total from the winner. A weight of 0 never gets traffic.
    """

    name = "weighted"

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def pick(self, backends: Sequence[B], request_key: object = None) -> B | None:
        best: B | None = None
        best_score = 0
        total = 0
        current = self._current
        for b in backends:
            w = b.weight
            if w <= 0:
                continue
            score = current.get(b.key, 0) + w
            current[b.key] = score
            total += w
            if best is None or score > best_score:
                best, best_score = b, score
        if best is None:
            return None
        current[best.key] = best_score - total
        if len(current) > 4 * len(backends) + 16:  # forget backends that left the pool
            keep = {b.key for b in backends}
            self._current = {k: v for k, v in current.items() if k in keep}
        return best


def two_choices(
    backends: Sequence[B], rng: random.Random, first_is_better: Callable[[B, B], bool]
) -> B | None:
    """The power of two random choices: the better of two distinct random backends."""
    n = len(backends)
    if n == 0:
        return None
    if n == 1:
        return backends[0]
    i, j = rng.sample(range(n), 2)
    a, b = backends[i], backends[j]
    return a if first_is_better(a, b) else b


class Random2:
    """The power of two random choices: the less loaded (in flight) of two random backends."""

    name = "random2"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, backends: Sequence[B], request_key: object = None) -> B | None:
        return two_choices(backends, self._rng, lambda a, b: a.in_flight <= b.in_flight)


class LeastLatency:
    """Fastest expected answer: peak-EWMA latency * (in flight + 1), by two random choices.

    This completes the Go version's `lowestLatency` TODO. Two random choices rather than the
    global minimum keep a herd from piling onto one backend between updates. A backend's
    failure rate multiplies its score (fast errors must not attract traffic), and an idle
    backend's latency decays toward the pool's mean, not toward zero.
    """

    name = "leastlatency"
    FAILURE_PENALTY = 10.0  # score * (1 + penalty * failure rate)

    def __init__(self, clock: Callable[[], float], rng: random.Random | None = None) -> None:
        self._clock = clock
        self._rng = rng or random.Random()

    def score(self, b: Candidate, mean: float, now: float) -> float:
        cost = b.latency.decayed_toward(mean, now)
        return cost * (b.in_flight + 1) * (1.0 + self.FAILURE_PENALTY * b.failure_rate)

    def pick(self, backends: Sequence[B], request_key: object = None) -> B | None:
        seen = [b.latency.cost for b in backends if b.latency.stamp is not None]
        mean = sum(seen) / len(seen) if seen else 0.0
        now = self._clock()
        return two_choices(
            backends,
            self._rng,
            lambda a, b: self.score(a, mean, now) <= self.score(b, mean, now),
        )


class Hash:
    """Consistent hashing (rendezvous): the same key goes to the same backend, and adding or
    removing one of N backends moves only about 1/N of the keys. No key: round robin."""

    name = "hash"

    def __init__(self) -> None:
        self._fallback = RoundRobin()

    @staticmethod
    def weight_of(key: bytes, backend_key: str) -> int:
        digest = hashlib.blake2b(key + b"\0" + backend_key.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")

    def pick(self, backends: Sequence[B], request_key: object = None) -> B | None:
        if not backends:
            return None
        if not isinstance(request_key, bytes | str) or not request_key:
            return self._fallback.pick(backends)
        key = request_key.encode() if isinstance(request_key, str) else request_key
        return max(backends, key=lambda b: self.weight_of(key, b.key))


Balancer = RoundRobin | LeastConn | Weighted | Random2 | LeastLatency | Hash
BALANCERS = ("roundrobin", "leastconn", "weighted", "random2", "leastlatency", "hash")


def make_balancer(
    kind: str, clock: Callable[[], float] | None = None, rng: random.Random | None = None
) -> Balancer:
    if kind == "leastconn":
        return LeastConn()
    if kind == "weighted":
        return Weighted()
    if kind == "random2":
        return Random2(rng)
    if kind == "leastlatency":
        if clock is None:
            raise ValueError("leastlatency needs a clock")
        return LeastLatency(clock, rng)
    if kind == "hash":
        return Hash()
    return RoundRobin()
