"""Load-balancing algorithms. Pure: they see only the eligible backends and their counters.

A balancer is asked `pick(backends, request_key)` once per request, with the backends that may
take traffic right now (healthy, not draining). It returns one of them, or None when the list is
empty, so the proxy answers 503. None of them can loop: every pick is O(1) or O(n) bounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar


class Candidate(Protocol):
    """What a balancer may look at on a backend."""

    @property
    def in_flight(self) -> int: ...


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


def make_balancer(kind: str) -> RoundRobin | LeastConn:
    if kind == "leastconn":
        return LeastConn()
    return RoundRobin()
