"""Backend statistics, aggregated once a second from the data plane's plain counters.

The data plane only adds to integers and floats on each request (requests, latency_sum,
failures, and one latency sample per request in its backend's sample list); this collector
turns them into what the balancers, the autoscaler and the status page read:

- per backend: a latency EWMA whose decay is `[backend] latency-average-seconds` (the 2015
  doproxy's "round-trip timing"), a failure-rate EWMA, requests per second over the last tick,
  p95 over a sliding window, in flight and totals;
- for the pool: a request-weighted latency EWMA, requests per second, and p95 over the same
  window (log-bucketed counts per second, see doproxy.core.quantiles.WindowedQuantile: no
  sample list is kept or sorted, and the window keeps the running sum of its seconds' counts).

Each backend's samples of a tick are bucketed once, into that backend's window; the pool's tick
is the sum of those buckets (exact). Above SAMPLES_PER_TICK samples in a tick, every backend
keeps the same share of its own, each kept sample weighing for those left out: the pool's p95
stays request-weighted and the tick's cost stays bounded however many backends there are. What
a tick costs is the data plane's too (one event loop): bucketing is a few hundred instructions
a sample, all at C level, and the rest is per bucket, not per sample (docs/benchmarks.md,
"Instructions per request"). A backend's p95 walks its window's buckets only when somebody
reads it, once per tick at most: the pool's is needed every tick, a backend's only while the
status page or the admin API looks.

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
    window: WindowedQuantile  # this backend's latency samples of the last window-seconds
    requests: int = 0  # totals seen so far
    failures: int = 0
    requests_per_second: float = 0.0  # over the last tick
    _last_requests: int = 0
    _last_failures: int = 0
    _last_latency_sum: float = 0.0
    _p95: float | None = None  # computed when first read after a tick

    @property
    def p95(self) -> float:
        """This backend's p95 latency over the sliding window (0.0 without samples)."""
        if self._p95 is None:
            self._p95 = self.window.quantile(0.95)
        return self._p95


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
        self.window_ticks = max(int(window_seconds / TICK), 1)
        self.stats: dict[Backend, BackendStats] = {}
        self.signal = PoolSignal(
            latency=Ewma(tau=average_seconds),
            window=WindowedQuantile(self.window_ticks),
        )
        self._rng = rng or random.Random()

    def tick(self, now: float) -> None:
        """Fold the counters accumulated since the last tick into the averages."""
        pool = self._pool()
        total_requests = 0
        total_latency = 0.0
        sampled = self._sample(pool.backends)
        ticks = []
        for b in pool.backends:
            st = self.stats.get(b)
            samples, weight = sampled[b]
            if st is None:
                st = self.stats[b] = BackendStats(
                    Ewma(self.tau), Ewma(self.tau), WindowedQuantile(self.window_ticks)
                )
                st._last_requests, st._last_failures = b.requests, b.failures
                st._last_latency_sum = b.latency_sum
                # First sight: its counters are only a baseline, but its samples are of
                # this tick's requests (the pool's p95 counted them before they moved here).
                ticks.append(st.window.add_tick(samples, weight))
                continue
            ticks.append(st.window.add_tick(samples, weight))
            st._p95 = None
            n = b.requests - st._last_requests
            failed = b.failures - st._last_failures
            lat = b.latency_sum - st._last_latency_sum
            st._last_requests, st._last_failures, st._last_latency_sum = (
                b.requests,
                b.failures,
                b.latency_sum,
            )
            st.requests, st.failures = b.requests, b.failures
            st.requests_per_second = n / TICK
            if n > 0:
                st.latency.add(lat / n, now)
                total_requests += n
                total_latency += lat
            attempts = n + failed
            if attempts > 0:
                b.failure_rate = st.failure_rate.add(failed / attempts, now)
        current = set(pool.backends)  # a set: `not in` the list was O(n²) at 2,000 backends
        for gone in [b for b in self.stats if b not in current]:
            del self.stats[gone]
        sig = self.signal
        sig.requests_per_second = total_requests / TICK
        if total_requests:
            sig.latency.add(total_latency / total_requests, now)
        sig.window.add_merged(ticks)
        sig.p95 = sig.window.quantile(0.95)

    def _sample(self, backends: list[Backend]) -> dict[Backend, tuple[list[float], float]]:
        """Take each backend's samples of this tick (emptying its list): all of them, or
        above SAMPLES_PER_TICK in all the same share of each (1 in `step`), with the weight
        each kept sample carries."""
        taken = {}
        for b in backends:
            taken[b] = b.samples
            b.samples = []
        total = sum(len(s) for s in taken.values())
        out: dict[Backend, tuple[list[float], float]] = {}
        # Every step-th sample from a random start: the same share of every backend, taken
        # by a C-level slice (random.sample cost more per kept sample, in Python, than
        # bucketing all of them does).
        step = -(-total // SAMPLES_PER_TICK)
        for b, samples in taken.items():
            if step <= 1 or not samples:
                out[b] = (samples, 1.0)
                continue
            kept = samples[self._rng.randrange(min(step, len(samples))) :: step]
            out[b] = (kept, len(samples) / len(kept))
        return out

    async def run(self, clock: Callable[[], float]) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.tick(clock())
