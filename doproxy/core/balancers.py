"""Load-balancing algorithms. Pure: they see only the eligible backends and their counters.

Theory of operation
-------------------
A balancer is asked `pick(backends, request_key)` once per request, with the backends that may
take traffic right now (healthy, not draining). It returns one of them, or None when the list is
empty, so the proxy answers 503. Randomness and time come in through the constructor (an rng, a
clock function), so tests are deterministic.

The cost of a pick does not grow with the pool. An autoscaled pool can hold hundreds of
backends, and the eligible list changes only when membership does (health, state, ejections,
the slow-start ramp moving a step), so every structure a pick needs is built then, in
`update(backends, ramp)`, and a pick is O(1) (O(log n) for `hash`, a C bisect):

- roundrobin and weighted walk a precomputed *schedule*: each backend appears in proportion to
  its effective weight, interleaved (the k-th turn of backend i is due at (k + 1/2) / w_i, the
  earliest-deadline-first order Envoy uses, which spreads each backend's turns evenly over the
  cycle). With equal weights and nobody ramping the schedule is the list itself.
- leastconn, random2 and leastlatency take the better of two candidates (the power of two
  choices, as Envoy, Linkerd and Finagle do), drawn uniformly, or from the schedule while a
  backend ramps up. With two backends the two candidates are both backends, so the choice is
  exact; above that it is the less loaded of two random ones, which keeps within a small
  constant of the least loaded of all and keeps a herd from piling onto one backend between
  updates.
- hash looks the key up on a consistent-hash ring (ketama: POINTS points per backend, from the
  backend's key): one hash of the request key and a bisect, instead of one hash per backend.
  The ring grows (a merge) when a backend it has never seen arrives; who is eligible is a
  per-backend limit the lookup skips over. A backend that leaves has its points skipped and
  only its keys move, each to the next point on the ring; one that joins takes only keys from
  others.

The Pool calls `update` when its eligible list changes and passes that same list object to
`pick`. A caller that never calls `update` (a test, a simple user) still works: a list the
balancer has not seen is taken as a membership change and prepared on the spot. Once updated by
a Pool, a different list is a retry's narrowed one (the eligible backends not tried yet): it is
served by a plain fallback over that list (a turn, two choices, or the next backend on the ring)
without disturbing the prepared state.

Slow start
----------
A backend that just became eligible (health up, added, enabled, back from an ejection) gets a
ramp: its weight is multiplied by min(1, elapsed / slow-start), in steps of 1 / RAMP_STEPS with
a floor of one step, so it gets a little traffic at once and its full share at the end. The
control plane records when each backend became eligible and passes the steps in (`ramp_step`
computes them from `now`; the core reads no clock). Every balancer honours it: the schedule of
roundrobin/weighted, the candidate draw of the two-choice balancers (a ramping backend is drawn
in proportion to its ramp; its load score is not scaled as well, which would count the ramp
twice), and the ring of hash, where a ramping backend holds only the first part of its points:
keys move onto it gradually and never back and forth.

A rollout's canary (doproxy.rollout) rides on the same multipliers: `canary_shares` computes
what makes the canaries' share of the traffic their canary-weight percent, and the Pool passes
the product of ramp and share, so every balancer honours a canary as it honours a ramp.
"""

from __future__ import annotations

import hashlib
import heapq
import random
import struct
from bisect import bisect_right
from collections.abc import Callable, Sequence
from math import exp, gcd
from typing import Any, Protocol, TypeVar

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

# Slow start moves in this many steps (HAProxy recomputes a warming server's weight about 20
# times over its slowstart too); the first step is the floor, 1/20 of the full weight.
RAMP_STEPS = 20
# A schedule longer than this is scaled down (each weight kept >= 1): building it costs
# O(length * log n), and it is rebuilt on every membership change and ramp step.
MAX_SCHEDULE = 1 << 16


def ramp_step(elapsed: float, slow_start: float) -> int:
    """How far along its slow start a backend is, in 1..RAMP_STEPS (RAMP_STEPS = full weight),
    `elapsed` seconds after it became eligible."""
    if slow_start <= 0 or elapsed >= slow_start:
        return RAMP_STEPS
    return max(1, min(RAMP_STEPS, int(elapsed * RAMP_STEPS / slow_start)))


# A rollout's canary shares are multipliers in 1..SHARE_SCALE.
SHARE_SCALE = 1000


def canary_shares(canary: Sequence[float]) -> list[int] | None:
    """Weight multipliers (1..SHARE_SCALE) that give the canaries of a rollout their percent of
    the traffic together: canary[i] is eligible backend i's canary-weight (0 for the others).
    None when there is nothing to split (no canary, or only canaries).

    With k canaries at share c each and n others at o each, k*c / (k*c + n*o) = p, so
    c / o = p*n / (k*(1 - p)); the larger of the two is SHARE_SCALE, the other is rounded (to
    at least one). `hash` gives the larger side its full points and the other a prefix.
    """
    k = sum(1 for c in canary if c > 0)
    n = len(canary) - k
    if not k or not n:
        return None
    p = max(canary) / 100.0
    ratio = p * n / (k * (1.0 - p))
    if ratio <= 1.0:
        c, o = max(1, round(SHARE_SCALE * ratio)), SHARE_SCALE
    else:
        c, o = SHARE_SCALE, max(1, round(SHARE_SCALE / ratio))
    return [c if w > 0 else o for w in canary]


def combined(ramp: Sequence[int] | None, shares: Sequence[int] | None) -> list[int] | None:
    """A slow-start ramp and canary shares applied together: their product."""
    if shares is None:
        return None if ramp is None else list(ramp)
    if ramp is None:
        return [s * RAMP_STEPS for s in shares]
    return [r * s for r, s in zip(ramp, shares, strict=True)]


def schedule(weights: Sequence[int]) -> list[int]:
    """One cycle of indices into `weights`, each index i appearing weights[i] times, interleaved.

    The k-th turn of i is due at (k + 1/2) / weights[i]; turns are taken in order of their due
    time, ties by index (earliest deadline first with a half-step offset, so weights 5,1,1
    give a,a,a,b,c,a,a: the light backends land in the middle, not at the end). Weights are
    divided by their common divisor, and scaled down when the cycle would exceed MAX_SCHEDULE.
    """
    ws = [w if w > 0 else 0 for w in weights]
    g = 0
    for w in ws:
        g = gcd(g, w)
    if g == 0:
        return []
    ws = [w // g for w in ws]
    total = sum(ws)
    if total > MAX_SCHEDULE:
        ws = [max(1, w * MAX_SCHEDULE // total) if w else 0 for w in ws]
    # (due, index, turn): due computed from the turn each time, not summed, so equal due
    # times compare equal and ties fall to the lower index.
    heap = [(1.0 / (2 * w), i, 0) for i, w in enumerate(ws) if w]
    heapq.heapify(heap)
    out: list[int] = []
    left = sum(ws)
    while left:
        _, i, k = heap[0]
        out.append(i)
        k += 1
        heapq.heapreplace(heap, ((2 * k + 1) / (2 * ws[i]), i, k))
        left -= 1
    return out


def _effective(base: Sequence[int], ramp: Sequence[int] | None) -> list[int]:
    """Weights in RAMP_STEPS units: base weight times the ramp step (RAMP_STEPS when none)."""
    if ramp is None:
        return list(base)
    return [w * r for w, r in zip(base, ramp, strict=True)]


def _uniform(weights: Sequence[int]) -> bool:
    first = weights[0] if weights else 0
    return first > 0 and all(w == first for w in weights)


class RoundRobin:
    """Each backend in turn. Skipping ineligible ones is free: they are not in the list.

    The Go version walked the full list looking for a healthy backend and could spin forever
    when all were down; here an empty list answers None at once. Weights are ignored (that is
    `weighted`), but a backend in slow start takes fewer turns until its ramp is over.
    """

    name = "roundrobin"

    def __init__(self, use_weights: bool = False) -> None:
        self.use_weights = use_weights
        self._next = 0
        self._members: Sequence[Any] | None = None
        self._table: Sequence[Any] = ()  # one cycle of turns
        self._updated = False  # by a Pool: a list other than _members is a retry's
        self._retry = 0

    def update(self, backends: Sequence[B], ramp: Sequence[int] | None = None) -> None:
        """The eligible list changed (or a ramp moved a step): rebuild the schedule."""
        self._updated = True
        self._prepare(backends, ramp)

    def _prepare(self, backends: Sequence[B], ramp: Sequence[int] | None) -> None:
        self._members = backends
        base = [b.weight if self.use_weights else 1 for b in backends]
        weights = _effective(base, ramp)
        if (not self.use_weights and ramp is None) or _uniform(weights):
            self._table = backends
        else:
            self._table = [backends[i] for i in schedule(weights)]
        if self._next >= len(self._table):
            self._next = 0

    def pick(self, backends: Sequence[B], request_key: object = None) -> B | None:
        if backends is not self._members:
            if self._updated:
                return self._pick_other(backends)
            self._prepare(backends, None)
        table = self._table
        i = self._next
        if i >= len(table):
            if not table:
                return None
            i = 0
        self._next = i + 1
        chosen: B = table[i]
        return chosen

    def _pick_other(self, backends: Sequence[B]) -> B | None:
        """A retry's list: plain turns over it (weight 0 still excluded for `weighted`)."""
        usable = [b for b in backends if b.weight > 0] if self.use_weights else backends
        if not usable:
            return None
        self._retry += 1
        return usable[self._retry % len(usable)]


class Weighted(RoundRobin):
    """Weighted round robin on the inventory's `weight`, interleaved: weights 5,1,1 give
    a,a,a,b,c,a,a rather than a*5 then b, c. A weight of 0 never gets traffic.

    A precomputed schedule (see `schedule`), walked one step per pick, instead of nginx's smooth
    weighted round robin, which scores every backend on every pick.
    """

    name = "weighted"

    def __init__(self) -> None:
        super().__init__(use_weights=True)


class _TwoChoices:
    """The power of two choices: the better of two candidates, O(1) whatever the pool size.

    Candidates are two distinct backends drawn uniformly (in random order, so a tie that goes
    to the first is a fair coin), or, while some backend ramps up, two
    draws from a schedule in which each backend appears in proportion to its ramp.
    """

    name = "random2"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._members: Sequence[Any] | None = None
        self._table: Sequence[Any] | None = None  # None: draw uniformly from the members
        self._updated = False

    def update(self, backends: Sequence[B], ramp: Sequence[int] | None = None) -> None:
        self._updated = True
        self._prepare(backends, ramp)

    def _prepare(self, backends: Sequence[B], ramp: Sequence[int] | None) -> None:
        self._members = backends
        weights = _effective([1] * len(backends), ramp)
        if ramp is None or _uniform(weights):
            self._table = None
        else:
            self._table = [backends[i] for i in schedule(weights)]

    def better(self, a: B, b: B) -> bool:
        """Is `a` the better choice? Ties go to `a`."""
        return a.in_flight <= b.in_flight

    def pick(self, backends: Sequence[B], request_key: object = None) -> B | None:
        if backends is not self._members:
            if not self._updated:
                self._prepare(backends, None)
            table = None  # a retry's list: uniform draws from it
        else:
            table = self._table
        rnd = self._rng.random
        if table is not None:
            size = len(table)
            a: B = table[int(rnd() * size)]
            b: B = table[int(rnd() * size)]
            if a is b:  # one more draw, so a ramping backend is rarely its own rival
                b = table[int(rnd() * size)]
            return a if self.better(a, b) else b
        n = len(backends)
        if n <= 1:
            return backends[0] if n else None
        i = int(rnd() * n)
        j = int(rnd() * (n - 1))
        if j >= i:
            j += 1
        return self._choose(backends[i], backends[j])

    def _choose(self, a: B, b: B) -> B:
        return a if self.better(a, b) else b


class Random2(_TwoChoices):
    """The less loaded (in flight) of two random backends."""

    name = "random2"


class LeastConn(_TwoChoices):
    """Fewest in-flight requests, by two choices; ties take turns.

    Before issue 12 this scanned every backend for the least loaded one. It now compares two: both
    of them in a pool of two (so it is exact there, and ties alternate strictly), two random
    ones in a larger pool. Scanning cost O(n) per request; two choices cost the same at 2 and at
    200 backends and, unlike the global minimum, do not send a burst of requests that arrive
    between two completions all to the same backend.
    """

    name = "leastconn"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._last_tie: object = None  # who won the last tie

    def _choose(self, a: B, b: B) -> B:
        if a.in_flight == b.in_flight:
            # Not the one that won the last tie: with two backends, ties strictly alternate.
            chosen = b if a is self._last_tie else a
            self._last_tie = chosen
            return chosen
        return a if a.in_flight < b.in_flight else b


class LeastLatency(_TwoChoices):
    """Fastest expected answer: peak-EWMA latency * (in flight + 1), by two random choices.

    This completes the Go version's `lowestLatency` TODO. Two random choices rather than the
    global minimum keep a herd from piling onto one backend between updates. A backend's
    failure rate multiplies its score (fast errors must not attract traffic), and an idle
    backend's latency decays toward the pool's mean, not toward zero. That mean is recomputed
    at most every MEAN_EVERY seconds (it moves slowly, and recomputing it on every pick made a
    pick O(n)).
    """

    name = "leastlatency"
    FAILURE_PENALTY = 10.0  # score * (1 + penalty * failure rate)
    MEAN_EVERY = 0.25  # seconds

    def __init__(self, clock: Callable[[], float], rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._clock = clock
        self._mean = 0.0
        self._mean_at = float("-inf")
        self._mean_of: Sequence[Any] | None = None
        self._now = 0.0

    def score(self, b: Candidate, mean: float, now: float) -> float:
        cost = b.latency.decayed_toward(mean, now)
        return cost * (b.in_flight + 1) * (1.0 + self.FAILURE_PENALTY * b.failure_rate)

    def _score(self, b: Candidate) -> float:
        """score() with PeakEwma.decayed_toward inlined: two per request, on the hot path."""
        lat = b.latency
        stamp = lat.stamp
        if stamp is None:
            cost = self._mean
        else:
            elapsed = self._now - stamp
            tau = lat.tau
            # stats._weight: exp(-elapsed / tau), no growth for a stamp in the future.
            w = (exp(-elapsed / tau) if elapsed > 0 else 1.0) if tau > 0 else 0.0
            cost = lat.cost * w + self._mean * (1.0 - w)
        fr = b.failure_rate
        if fr:
            cost *= 1.0 + self.FAILURE_PENALTY * fr
        return cost * (b.in_flight + 1)

    def better(self, a: B, b: B) -> bool:
        return self._score(a) <= self._score(b)

    def _choose(self, a: B, b: B) -> B:
        return a if self._score(a) <= self._score(b) else b

    def pick(self, backends: Sequence[B], request_key: object = None) -> B | None:
        now = self._clock()
        self._now = now
        if now - self._mean_at >= self.MEAN_EVERY or backends is not self._mean_of:
            members = self._members if self._updated and self._members is not None else backends
            seen = [b.latency.cost for b in members if b.latency.stamp is not None]
            self._mean = sum(seen) / len(seen) if seen else 0.0
            self._mean_at = now
            self._mean_of = backends
        return super().pick(backends, request_key)


POINTS = 160  # ring points per backend (ketama's number): about ±10 % spread in key share
_PER_DIGEST = 8  # points from one 64-byte digest
# A ring entry is one int: the point's position in its high bits, then the point's rank among
# its backend's points (RANK_BITS), then its backend's slot (SLOT_BITS), so the ring is a plain
# sorted list of ints (sorting ints is several times faster than sorting pairs).
SLOT_BITS = 20
SLOTS = 1 << SLOT_BITS  # backends a ring can tell apart
SLOT_MASK = SLOTS - 1
RANK_BITS = 8  # POINTS <= 256
RANK_MASK = (1 << RANK_BITS) - 1
_HIGH = ((1 << 64) - 1) ^ ((1 << (SLOT_BITS + RANK_BITS)) - 1)
_RANKS = [rank << SLOT_BITS for rank in range(POINTS)]
_EIGHT = struct.Struct(">8Q")  # a 64-byte digest as eight 64-bit points


def ring_points(backend_key: str) -> list[int]:
    """A backend's POINTS positions on the ring, fixed by its key, in the order they are made
    (a ramping backend holds a prefix of them): 64-bit integers with the low bits that hold
    the rank and the slot left zero."""
    out: list[int] = []
    raw = backend_key.encode() + b"#"
    for d in range(POINTS // _PER_DIGEST):
        digest = hashlib.blake2b(raw + str(d).encode(), digest_size=64).digest()
        out.extend(_EIGHT.unpack(digest))
    return [p & _HIGH for p in out]


def key_point(key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


class Hash:
    """Consistent hashing on a ketama ring: the same key goes to the same backend, and adding or
    removing one of N backends moves only about 1/N of the keys. No key: round robin.

    The ring holds the points of every backend seen (each backend's points are computed once),
    and is re-sorted only when a backend it has never seen arrives. Eligibility and the
    slow-start ramp are a per-backend limit instead: a pick takes the first point at or after
    the key whose rank is under its backend's limit (0 for a backend that is not eligible,
    POINTS for a full one). Skipping a backend's points maps its keys exactly as removing them
    from the ring would, so a health flap at 2,000 backends costs O(n), not a ring rebuild.

    Before issue 12 this was rendezvous hashing, one hash per backend per request: after that
    upgrade, keys map to other backends than before, once.
    """

    name = "hash"

    def __init__(self) -> None:
        self._fallback = RoundRobin()
        self._members: Sequence[Any] | None = None
        self._updated = False
        self._ring: list[int] = []  # sorted entries: position | rank | slot
        self._slots: dict[str, int] = {}  # backend key -> slot
        self._by_slot: list[Any] = []  # slot -> the backend (its latest object)
        self._limit: list[int] = []  # slot -> how many of its points are live
        # The last key and its point: a keep-alive connection sends request after request
        # with the same key (its client address), and hashing is most of a pick's cost.
        self._last_key = b""
        self._last_point = 0

    def update(self, backends: Sequence[B], ramp: Sequence[int] | None = None) -> None:
        self._updated = True
        self._fallback.update(backends, ramp)
        self._prepare(backends, ramp)

    def _prepare(self, backends: Sequence[B], ramp: Sequence[int] | None) -> None:
        self._members = backends
        slots = self._slots
        if len(slots) > 2 * len(backends) + 16 or len(slots) + len(backends) > SLOTS:
            # Forget backends that left long ago: start the ring over from these.
            slots = self._slots = {}
            self._ring = []
            self._by_slot = []
        fresh: list[int] = []
        for b in backends:
            k = b.key
            if k not in slots:
                slot = slots[k] = len(slots)
                self._by_slot.append(b)
                fresh.extend([p | r | slot for p, r in zip(ring_points(k), _RANKS, strict=True)])
        if fresh:
            fresh.sort()
            ring = self._ring + fresh
            ring.sort()  # two sorted runs: a merge
            self._ring = ring
        by_slot = self._by_slot
        limit = [0] * len(by_slot)
        # A ramp is a multiplier: a slow start's steps (RAMP_STEPS is full weight), times a
        # canary's share when a rollout runs (doproxy.core.balancers.combined). Each backend
        # holds its multiplier's fraction of the full one's points (RAMP_STEPS, or the largest
        # when a share multiplied them all).
        full = max(RAMP_STEPS, max(ramp)) if ramp else RAMP_STEPS
        for i, b in enumerate(backends):
            slot = slots[b.key]
            by_slot[slot] = b
            step = ramp[i] if ramp is not None else full
            # A ramping backend holds a prefix of its points: keys only ever move onto it.
            limit[slot] = POINTS if step >= full else max(1, POINTS * step // full)
        self._limit = limit

    def pick(self, backends: Sequence[B], request_key: object = None) -> B | None:
        if not backends:
            return None
        other = backends is not self._members
        if other and not self._updated:
            self._prepare(backends, None)
            other = False
        if not isinstance(request_key, bytes | str) or not request_key:
            return self._fallback.pick(backends)
        key = request_key.encode() if isinstance(request_key, str) else request_key
        if key == self._last_key:
            point = self._last_point
        else:
            point = key_point(key)
            self._last_key = key
            self._last_point = point
        ring = self._ring
        size = len(ring)
        at = bisect_right(ring, point)
        limit = self._limit
        by_slot = self._by_slot
        # A retry's list: as if the backends not in it had left.
        allowed = {id(b) for b in backends} if other else None
        for _ in range(size):
            if at >= size:
                at = 0
            entry = ring[at]
            slot = entry & SLOT_MASK
            if (entry >> SLOT_BITS) & RANK_MASK < limit[slot]:
                chosen: B = by_slot[slot]
                if allowed is None or id(chosen) in allowed:
                    return chosen
            at += 1
        return backends[0]  # a retry's list of backends the ring does not know


Balancer = RoundRobin | LeastConn | Weighted | Random2 | LeastLatency | Hash
BALANCERS = ("roundrobin", "leastconn", "weighted", "random2", "leastlatency", "hash")


def make_balancer(
    kind: str, clock: Callable[[], float] | None = None, rng: random.Random | None = None
) -> Balancer:
    if kind == "leastconn":
        return LeastConn(rng)
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
