"""Balancers, latency statistics and the health state machine: pure, no event loop."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from doproxy.core.balancers import (
    BALANCERS,
    MAX_SCHEDULE,
    RAMP_STEPS,
    Hash,
    LeastConn,
    LeastLatency,
    Random2,
    RoundRobin,
    Weighted,
    make_balancer,
    ramp_step,
    schedule,
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
    # The light backends land in the middle of the cycle, not after five a's.
    assert seq == ["a", "a", "a", "b", "c", "a", "a"]
    assert Counter(w.pick(bs).key for _ in range(700)) == {"a": 500, "b": 100, "c": 100}  # type: ignore[union-attr]


def test_schedule_interleaves_in_proportion() -> None:
    assert schedule([1, 1]) == [0, 1]
    assert schedule([2, 2, 0]) == [0, 1]  # the common divisor goes; weight 0 never appears
    assert schedule([0, 0]) == []
    seq = schedule([3, 1])
    assert seq == [0, 1, 0, 0] or seq == [0, 0, 1, 0]
    big = schedule([100, 1, 7])
    assert Counter(big) == {0: 100, 1: 1, 2: 7}
    # Evenly spread: in every window of 16 turns, backend 2 (7 of 108) has one or two.
    assert all(1 <= big[k : k + 16].count(2) <= 2 for k in range(len(big) - 16))
    # Weights too large for one cycle are scaled down, keeping every backend in it.
    huge = schedule([10**6, 1])
    assert len(huge) <= MAX_SCHEDULE + 1 and 1 in huge


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
    # ...must not attract traffic (0.9 scored exactly as `fast`: a coin flip, not a test)
    failing.failure_rate = 0.95
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
    lc = LeastConn(random.Random(2))
    bs = pool(3)
    picks = Counter(lc.pick(bs).key for _ in range(3000))  # type: ignore[union-attr]
    assert all(900 < picks[k] < 1100 for k in ("b0", "b1", "b2"))
    # Two backends: both are compared on every pick, so ties strictly take turns.
    two = pool(2)
    assert [lc.pick(two).key for _ in range(6)] in (  # type: ignore[union-attr]
        ["b0", "b1"] * 3,
        ["b1", "b0"] * 3,
    )


@pytest.mark.parametrize("kind", ["leastconn", "random2"])
def test_two_choices_with_two_backends_is_exact(kind: str) -> None:
    bal = make_balancer(kind, rng=random.Random(4))
    bs = pool(2)
    bs[1].in_flight = 1
    assert {bal.pick(bs).key for _ in range(200)} == {"b0"}  # type: ignore[union-attr]


def test_least_conn_at_scale_avoids_the_loaded_half() -> None:
    lc = LeastConn(random.Random(9))
    bs = pool(200)
    for b in bs[:100]:
        b.in_flight = 5
    picks = Counter(lc.pick(bs).key for _ in range(4000))  # type: ignore[union-attr]
    loaded = sum(picks[b.key] for b in bs[:100])
    # A loaded backend wins only against another loaded one: 1/4 of the pairs.
    assert 0.2 < loaded / 4000 < 0.3


@pytest.mark.parametrize("kind", BALANCERS)
def test_a_retry_list_is_served_without_disturbing_the_prepared_one(kind: str) -> None:
    """After update(), a different list (the eligible backends a retry has not tried) is
    served from that list alone; the prepared list keeps its state."""
    bal = make_balancer(kind, clock=lambda: 0.0, rng=random.Random(3))
    bs = pool(4)
    bal.update(bs)
    first = [bal.pick(bs, b"k") for _ in range(3)]
    narrowed = [b for b in bs if b is not first[-1]]
    for _ in range(50):
        assert bal.pick(narrowed, b"k") in narrowed
    assert bal.pick(bs, b"k") in bs
    if kind == "roundrobin":
        assert [b.key for b in first] == ["b0", "b1", "b2"]
        assert bal.pick(bs).key == "b0"  # type: ignore[union-attr]  # the turn went on from b2 (b3 above)
    if kind == "hash":
        # The retry goes to the next backend on the ring, the one the key would move to if
        # its backend left.
        gone = bal.pick(bs, b"k")
        assert gone is not None
        rest = [b for b in bs if b is not gone]
        assert bal.pick(rest, b"k") is make_balancer("hash").pick(rest, b"k")


def test_ramp_step() -> None:
    assert ramp_step(0.0, 30.0) == 1  # the floor: a little traffic at once
    assert ramp_step(15.0, 30.0) == RAMP_STEPS // 2
    assert ramp_step(29.99, 30.0) == RAMP_STEPS - 1
    assert ramp_step(30.0, 30.0) == RAMP_STEPS
    assert ramp_step(5.0, 0.0) == RAMP_STEPS  # slow start off


def _share(kind: str, ramp_of_new: int, picks: int = 4000) -> float:
    """The share of picks that go to one backend (of 4) whose ramp is at `ramp_of_new`."""
    bal = make_balancer(kind, clock=lambda: 0.0, rng=random.Random(11))
    bs = pool(4)
    bal.update(bs, [RAMP_STEPS, RAMP_STEPS, RAMP_STEPS, ramp_of_new])
    keys = [f"10.1.{i // 256}.{i % 256}".encode() for i in range(picks)]
    return sum(bal.pick(bs, k) is bs[3] for k in keys) / picks


@pytest.mark.parametrize("kind", BALANCERS)
def test_slow_start_ramps_every_balancer(kind: str) -> None:
    fair = 0.25
    shares = [_share(kind, step) for step in (1, RAMP_STEPS // 2, RAMP_STEPS)]
    assert shares[0] < fair / 4  # at the floor: a little
    assert shares[0] > 0 if kind != "hash" else True  # (hash: only keys near its few points)
    assert shares[0] < shares[1] < shares[2]
    assert shares[2] > fair * 0.8  # ramp over: its full share


def test_slow_start_on_the_ring_only_moves_keys_onto_the_ramping_backend() -> None:
    bs = pool(5)
    keys = [f"c{i}".encode() for i in range(3000)]
    owners = []
    for step in range(1, RAMP_STEPS + 1):
        h = Hash()
        h.update(bs, [RAMP_STEPS] * 4 + [step])
        owners.append({k: h.pick(bs, k).key for k in keys})  # type: ignore[union-attr]
    for before, after in itertools.pairwise(owners):
        assert all(after[k] == "b4" for k in keys if before[k] != after[k])


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
