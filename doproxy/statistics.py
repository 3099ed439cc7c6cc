"""Backend statistics, aggregated once a second from the data plane's plain counters.

The data plane only adds to integers and floats on each request (requests, latency_sum,
failures, and one latency sample per request in the pool's sample list); this collector turns
them into what the balancers, the autoscaler and the status page read:

- per backend: a latency EWMA whose decay is `[backend] latency-average-seconds` (the 2015
  doproxy's "round-trip timing"), a failure-rate EWMA, in flight and totals;
- for the pool: a request-weighted latency EWMA, and p95 over a sliding window (one quantile
  sketch per second, see doproxy.core.stats.WindowedQuantile: no sample list is kept or sorted,
  so a tick costs the same few milliseconds whatever the window holds).

A second without requests leaves every average where it was (the Go version pulled it toward
zero). The statistics belong to the Backend objects, so they survive a reload of the config.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

from doproxy.core.quantiles import WindowedQuantile
from doproxy.core.stats import Ewma
from doproxy.proxy.backend import Backend, Pool

TICK = 1.0  # seconds between aggregations
SAMPLES_PER_TICK = 2000  # latency samples kept per second for the p95 window


@dataclass
class BackendStats:
    latency: Ewma
    failure_rate: Ewma
    requests: int = 0  # totals seen so far
    failures: int = 0
    _last_requests: int = 0
    _last_failures: int = 0
    _last_latency_sum: float = 0.0


@dataclass
class PoolSignal:
    """What the autoscaler reads: the pool's latency as users see it."""

    latency: Ewma  # request-weighted over all backends
    window: WindowedQuantile  # latency samples of the last window-seconds
    p95: float = 0.0  # over the sliding window
    requests_per_second: float = 0.0


class StatsCollector:
    def __init__(
        self,
        pool: Callable[[], Pool],
        average_seconds: float,
        window_seconds: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self._pool = pool
        self.tau = average_seconds
        self.stats: dict[Backend, BackendStats] = {}
        self.signal = PoolSignal(
            latency=Ewma(tau=average_seconds),
            window=WindowedQuantile(max(int(window_seconds / TICK), 1)),
        )
        self._rng = rng or random.Random()

    def tick(self, now: float) -> None:
        """Fold the counters accumulated since the last tick into the averages."""
        pool = self._pool()
        total_requests = 0
        total_latency = 0.0
        for b in pool.backends:
            st = self.stats.get(b)
            if st is None:
                st = self.stats[b] = BackendStats(Ewma(self.tau), Ewma(self.tau))
                st._last_requests, st._last_failures = b.requests, b.failures
                st._last_latency_sum = b.latency_sum
                continue
            n = b.requests - st._last_requests
            failed = b.failures - st._last_failures
            lat = b.latency_sum - st._last_latency_sum
            st._last_requests, st._last_failures, st._last_latency_sum = (
                b.requests,
                b.failures,
                b.latency_sum,
            )
            st.requests, st.failures = b.requests, b.failures
            if n > 0:
                st.latency.add(lat / n, now)
                total_requests += n
                total_latency += lat
            attempts = n + failed
            if attempts > 0:
                b.failure_rate = st.failure_rate.add(failed / attempts, now)
        for gone in [b for b in self.stats if b not in pool.backends]:
            del self.stats[gone]
        sig = self.signal
        sig.requests_per_second = total_requests / TICK
        if total_requests:
            sig.latency.add(total_latency / total_requests, now)
        samples = pool.samples
        pool.samples = []
        if len(samples) > SAMPLES_PER_TICK:
            samples = self._rng.sample(samples, SAMPLES_PER_TICK)
        sig.window.add_tick(samples)
        sig.p95 = sig.window.quantile(0.95)

    async def run(self, clock: Callable[[], float]) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.tick(clock())
