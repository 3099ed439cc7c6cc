"""Balancers, latency statistics and the health state machine: pure, no event loop."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from doproxy.core.balancers import (
    BALANCERS,
    Hash,
    LeastConn,
    LeastLatency,
    Random2,
    RoundRobin,
    Weighted,
    make_balancer,
)
from doproxy.core.health import Health, State
from doproxy.core.stats import Ewma, PeakEwma, percentile


@dataclass
class B:
    key: str
    in_flight: int = 0
    weight: int = 1
    latency: PeakEwma = field(default_factory=lambda: PeakEwma(tau=10.0))
    failure_rate: float = 0.0


def pool(n: int) -> list[B]:
    return [B(f"b{i}") for i in range(n)]


@pytest.mark.parametrize("kind", BALANCERS)
def test_every_balancer_handles_empty_and_single(kind: str) -> None:
    bal = make_balancer(kind, clock=lambda: 0.0, rng=random.Random(1))
    assert bal.pick([], b"k") is None
    one = pool(1)
    assert all(bal.pick(one, b"k") is one[0] for _ in range(5))


@pytest.mark.parametrize("kind", BALANCERS)
def test_every_balancer_spreads_over_equal_backends(kind: str) -> None:
    bal = make_balancer(kind, clock=lambda: 0.0, rng=random.Random(7))
    bs = pool(4)
    picks = Counter(bal.pick(bs, f"client-{i}".encode()).key for i in range(4000))  # type: ignore[union-attr]
    assert set(picks) == {"b0", "b1", "b2", "b3"}
    assert min(picks.values()) > 4000 / 4 * 0.7


def test_round_robin_skips_backends_that_left_without_spinning() -> None:
    rr = RoundRobin()
    bs = pool(3)
    assert [rr.pick(bs).key for _ in range(3)] == ["b0", "b1", "b2"]  # type: ignore[union-attr]
    # b1 went down: the eligible list no longer has it; the turn continues over the rest.
    assert {rr.pick([bs[0], bs[2]]).key for _ in range(4)} == {"b0", "b2"}  # type: ignore[union-attr]


def test_weighted_is_smooth() -> None:
    bs = [B("a", weight=5), B("b", weight=1), B("c", weight=1)]
    w = Weighted()
    seq = [w.pick(bs).key for _ in range(7)]  # type: ignore[union-attr]
    assert seq == ["a", "a", "b", "a", "c", "a", "a"]
    assert Counter(w.pick(bs).key for _ in range(700)) == {"a": 500, "b": 100, "c": 100}  # type: ignore[union-attr]


def test_weighted_zero_weight_gets_nothing() -> None:
    bs = [B("a", weight=0), B("b", weight=2)]
    w = Weighted()
    assert {w.pick(bs).key for _ in range(10)} == {"b"}  # type: ignore[union-attr]
    assert w.pick([B("z", weight=0)]) is None


def test_random2_prefers_the_less_loaded_and_is_deterministic_with_a_seed() -> None:
    bs = pool(3)
    bs[0].in_flight = 50
    picks = Counter(Random2(random.Random(3)).pick(bs).key for _ in range(3000))  # type: ignore[union-attr]
    # b0 loses every comparison it takes part in.
    assert picks["b0"] == 0
    again = Counter(Random2(random.Random(3)).pick(bs).key for _ in range(3000))  # type: ignore[union-attr]
    assert picks == again


def test_least_latency_avoids_slow_and_failing_backends() -> None:
    now = [100.0]
    bal = LeastLatency(clock=lambda: now[0], rng=random.Random(5))
    fast, slow, failing = B("fast"), B("slow"), B("failing")
    fast.latency.observe(0.010, 100.0)
    slow.latency.observe(0.200, 100.0)
    failing.latency.observe(0.001, 100.0)  # fast errors...
    failing.failure_rate = 0.9  # ...must not attract traffic
    picks = Counter(bal.pick([fast, slow, failing]).key for _ in range(3000))  # type: ignore[union-attr]
    assert picks["fast"] > picks["slow"] and picks["fast"] > picks["failing"]
    assert picks["slow"] < picks["fast"] / 5


def test_idle_backend_latency_decays_toward_the_pool_mean_not_zero() -> None:
    e = PeakEwma(tau=10.0)
    e.observe(1.0, 0.0)
    assert e.decayed_toward(0.2, 0.0) == pytest.approx(1.0)
    assert e.decayed_toward(0.2, 1000.0) == pytest.approx(0.2)
    assert 0.2 < e.decayed_toward(0.2, 10.0) < 1.0


def test_peak_ewma_jumps_up_and_decays_down() -> None:
    e = PeakEwma(tau=10.0)
    e.observe(0.1, 0.0)
    assert e.observe(0.5, 1.0) == 0.5  # a slow answer counts at once
    assert 0.1 < e.observe(0.1, 2.0) < 0.5  # fast answers bring it down gradually


def test_hash_is_sticky_and_remaps_about_one_nth() -> None:
    h = Hash()
    bs = pool(10)
    keys = [f"10.0.{i // 256}.{i % 256}".encode() for i in range(5000)]
    before = {k: h.pick(bs, k).key for k in keys}  # type: ignore[union-attr]
    assert before == {k: h.pick(bs, k).key for k in keys}  # type: ignore[union-attr]
    after = {k: h.pick(bs[:9], k).key for k in keys}  # type: ignore[union-attr]
    moved = sum(before[k] != after[k] for k in keys)
    # Only the keys of the removed backend move: about 1/10 of them.
    assert all(before[k] == "b9" for k in keys if before[k] != after[k])
    assert 0.05 < moved / len(keys) < 0.15
    grown = {k: h.pick([*bs, B("b10")], k).key for k in keys}  # type: ignore[union-attr]
    assert 0.05 < sum(before[k] != grown[k] for k in keys) / len(keys) < 0.15


def test_hash_without_key_falls_back_to_round_robin() -> None:
    h = Hash()
    bs = pool(2)
    assert [h.pick(bs, None).key for _ in range(4)] == ["b0", "b1", "b0", "b1"]  # type: ignore[union-attr]


def test_least_conn_is_fair_on_ties() -> None:
    lc = LeastConn()
    bs = pool(3)
    assert Counter(lc.pick(bs).key for _ in range(300)) == {"b0": 100, "b1": 100, "b2": 100}  # type: ignore[union-attr]


def test_ewma_decay_and_idle_ticks() -> None:
    e = Ewma(tau=30.0)
    assert not e.seen
    e.add(0.5, 0.0)
    assert e.value == 0.5
    e.add(0.1, 30.0)
    assert e.value == pytest.approx(0.1 + 0.4 * 0.36788, rel=1e-3)
    before = e.value
    # A second with no requests changes nothing (the Go version pulled it toward zero).
    assert e.add_mean(0.0, 0, 31.0) == before
    assert e.value == before


def test_percentile() -> None:
    assert percentile([], 0.95) == 0.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0
    assert percentile([3.0], 0.5) == 3.0


@pytest.mark.parametrize(
    ("results", "states", "transitions"),
    [
        # fall = 3: two failures are not enough, the third takes it down, once.
        ("fffff", "UUDDD", [None, None, State.DOWN, None, None]),
        # rise = 2 after going down; a failure in between resets the passes.
        ("fffpfpp", "UUDDDDU", [None, None, State.DOWN, None, None, None, State.UP]),
        # flapping never flips an UP backend
        ("fpfpfpfp", "UUUUUUUU", [None] * 8),
    ],
)
def test_health_rise_and_fall(results: str, states: str, transitions: list[State | None]) -> None:
    h = Health(rise=2, fall=3)
    got_states, got = [], []
    for r in results:
        got.append(h.record(r == "p"))
        got_states.append("U" if h.up else "D")
    assert "".join(got_states) == states
    assert got == transitions


def test_health_counts_consecutive_failures_for_replacement() -> None:
    h = Health(rise=2, fall=2)
    for _ in range(7):
        h.record(False)
    assert (h.state, h.failures) == (State.DOWN, 7)
    h.record(True)
    assert h.failures == 0
