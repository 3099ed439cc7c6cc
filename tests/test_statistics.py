"""Backend statistics: the once-a-second aggregation, with a fake clock and real traffic."""

from __future__ import annotations

import random
import time

import pytest

from doproxy.app import build_pool
from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Settings
from doproxy.core.stats import percentile
from doproxy.proxy.backend import Pool
from doproxy.statistics import SAMPLES_PER_TICK, StatsCollector
from tests.conftest import StartProxy, port_of
from tests.support import Client, RawBackend, get


def make_pool(n: int) -> Pool:
    entries = [InventoryEntry(id=i + 1, server_host=f"127.0.0.1:{i + 1}") for i in range(n)]
    return build_pool(Settings(), entries, clock=lambda: 0.0)


def test_latency_is_positive_and_idle_seconds_do_not_pull_it_to_zero() -> None:
    pool = make_pool(1)
    b = pool.backends[0]
    st = StatsCollector(lambda: pool, average_seconds=30)
    st.tick(0.0)  # first sight: baseline only
    b.requests, b.latency_sum = 10, 10 * 0.200
    b.samples = [0.2] * 10
    st.tick(1.0)
    assert st.stats[b].latency.value == pytest.approx(0.200)
    assert st.signal.latency.value == pytest.approx(0.200)
    assert st.signal.requests_per_second == 10
    for t in range(2, 30):
        st.tick(float(t))  # idle: no requests at all
    assert st.stats[b].latency.value == pytest.approx(0.200)
    assert st.signal.latency.value == pytest.approx(0.200)
    assert st.signal.requests_per_second == 0


def test_latency_average_decays_with_latency_average_seconds() -> None:
    pool = make_pool(1)
    b = pool.backends[0]
    st = StatsCollector(lambda: pool, average_seconds=30)
    st.tick(0.0)
    b.requests, b.latency_sum = 1, 1.0
    st.tick(1.0)
    b.requests, b.latency_sum = 2, 1.0  # one request of 0 s, 30 s later
    st.tick(31.0)
    assert st.stats[b].latency.value == pytest.approx(0.36788, rel=1e-3)


def test_failure_rate_and_pool_signal_are_request_weighted() -> None:
    pool = make_pool(2)
    a, b = pool.backends
    st = StatsCollector(lambda: pool, average_seconds=10)
    st.tick(0.0)
    a.requests, a.latency_sum = 90, 90 * 0.1
    b.requests, b.latency_sum, b.failures = 10, 10 * 1.0, 10
    st.tick(1.0)
    # 90 requests at 100 ms and 10 at 1 s: 190 ms, not the 550 ms mean of the two backends.
    assert st.signal.latency.value == pytest.approx(0.19)
    assert a.failure_rate == 0.0
    assert b.failure_rate == pytest.approx(0.5)  # 10 failed of 20 attempts


def test_p95_over_a_sliding_window() -> None:
    pool = make_pool(1)
    st = StatsCollector(lambda: pool, 30, window_seconds=3, rng=random.Random(1))
    pool.backends[0].samples = [0.01] * 95 + [1.0] * 5
    st.tick(1.0)
    assert st.signal.p95 == pytest.approx(0.01, rel=0.01)
    pool.backends[0].samples = [1.0] * 100
    st.tick(2.0)
    assert st.signal.p95 == pytest.approx(1.0, rel=0.01)
    for t in (3.0, 4.0, 5.0):
        pool.backends[0].samples = [0.02] * 100
        st.tick(t)
    # The slow second has left the 3 s window.
    assert st.signal.p95 == pytest.approx(0.02, rel=0.01)


def test_p95_is_within_one_percent_of_the_exact_one() -> None:
    rng = random.Random(7)
    pool = make_pool(1)
    st = StatsCollector(lambda: pool, 30, window_seconds=60, rng=random.Random(1))
    seen: list[float] = []
    for t in range(60):
        pool.backends[0].samples = [rng.lognormvariate(-3, 1) * (1 + t / 30) for _ in range(500)]
        seen += pool.backends[0].samples
        st.tick(float(t))
    assert st.signal.p95 == pytest.approx(percentile(seen, 0.95), rel=0.01)
    assert st.signal.window.count == 60 * 500


def _tick_cpu(st: StatsCollector, pool: Pool, samples: list[float]) -> float:
    best = float("inf")
    for _ in range(5):
        pool.backends[0].samples = list(samples)
        start = time.process_time()
        st.tick(0.0)
        best = min(best, time.process_time() - start)
    return best


def test_a_full_window_costs_a_tick_no_more_than_an_empty_one_does_much() -> None:
    """The p95 is no sort of the whole window (120k samples at 2,000 req/s took 36 ms of the
    event loop every second): a tick's cost barely depends on what the window holds."""
    rng = random.Random(3)
    samples = [rng.lognormvariate(-3, 1) for _ in range(SAMPLES_PER_TICK)]
    pool = make_pool(1)
    empty = StatsCollector(lambda: pool, 30, window_seconds=1)
    first = _tick_cpu(empty, pool, samples)
    full = StatsCollector(lambda: pool, 30, window_seconds=60)
    for t in range(60):
        pool.backends[0].samples = [rng.lognormvariate(-3, 1) for _ in range(SAMPLES_PER_TICK)]
        full.tick(float(t))
    busy = _tick_cpu(full, pool, samples)
    # Sorting made it ~60x; merging 60 sketches is ~2-3x.
    assert busy < 10 * first, (busy, first)


def test_per_backend_p95_and_requests_per_second() -> None:
    """Each backend has its own p95 window and rate; the pool's p95 is over all of them."""
    pool = make_pool(2)
    fast, slow = pool.backends
    st = StatsCollector(lambda: pool, 30, window_seconds=5, rng=random.Random(1))
    st.tick(0.0)  # first sight: baseline
    for t in range(1, 4):
        fast.requests += 96
        fast.latency_sum += 96 * 0.010
        fast.samples = [0.010] * 96
        slow.requests += 4
        slow.latency_sum += 4 * 0.800
        slow.samples = [0.800] * 4
        st.tick(float(t))
    assert st.stats[fast].requests_per_second == 96
    assert st.stats[slow].requests_per_second == 4
    assert st.stats[fast].p95 == pytest.approx(0.010, rel=0.01)
    assert st.stats[slow].p95 == pytest.approx(0.800, rel=0.01)
    # 4 % of the pool's requests are slow: its p95 is a fast one's.
    assert st.signal.p95 == pytest.approx(0.010, rel=0.01)
    assert st.signal.requests_per_second == 100
    # An idle second: no rate, and the p95 stays that of the window.
    st.tick(4.0)
    assert st.stats[fast].requests_per_second == 0
    assert st.stats[fast].p95 == pytest.approx(0.010, rel=0.01)
    # The slow backend's seconds leave its 5 s window, and its p95 with them.
    for t in range(5, 10):
        st.tick(float(t))
    assert st.stats[slow].p95 == 0.0
    assert fast.samples == [] and slow.samples == []


def test_subsampled_ticks_stay_request_weighted() -> None:
    """Above SAMPLES_PER_TICK every backend keeps the same share of its samples, each kept one
    weighing for the rest: a busy fast backend is not outvoted by a quiet slow one."""
    pool = make_pool(2)
    busy, quiet = pool.backends
    st = StatsCollector(lambda: pool, 30, rng=random.Random(2))
    busy.samples = [0.010] * (39 * SAMPLES_PER_TICK)
    quiet.samples = [1.0] * SAMPLES_PER_TICK  # 2.5 % of the requests
    st.tick(0.0)
    assert st.signal.window.count == pytest.approx(40 * SAMPLES_PER_TICK)
    assert st.signal.p95 == pytest.approx(0.010, rel=0.01)
    assert st.stats[quiet].p95 == pytest.approx(1.0, rel=0.01)
    assert st.stats[quiet].window.count == pytest.approx(SAMPLES_PER_TICK)


def test_removed_backends_are_forgotten() -> None:
    pool = make_pool(2)
    st = StatsCollector(lambda: pool, 30)
    st.tick(0.0)
    gone = pool.backends.pop()
    st.tick(1.0)
    assert gone not in st.stats


async def test_statistics_of_real_traffic(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])
    st = StatsCollector(lambda: proxy.pool, 30)
    st.tick(proxy.clock())
    c = await Client.connect(port_of(proxy))
    for _ in range(20):
        await c.send(get())
        await c.response()
    await c.close()
    st.tick(proxy.clock())
    b = proxy.pool.backends[0]
    assert st.stats[b].requests == 20
    assert st.stats[b].requests_per_second == 20  # in one tick
    assert 0 < st.stats[b].latency.value < 1.0
    assert 0 < st.stats[b].p95 < 1.0
    assert 0 < st.signal.p95 < 1.0
