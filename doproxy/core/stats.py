"""Latency statistics: time-decayed averages. Pure: every function takes `now` as an argument.

The 2015 doproxy's "round-trip timing" had three bugs that these avoid:
- its latency had the wrong sign (it subtracted the end from the start);
- idle ticks pulled the average towards zero, so a quiet backend looked fast: here an interval
  with no requests leaves the average where it was;
- it reset on every reload: these objects belong to the backend and survive a reload.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from ddsketch import DDSketch


def _weight(elapsed: float, tau: float) -> float:
    """How much the old average still counts after `elapsed` seconds: exp(-elapsed / tau)."""
    return math.exp(-max(elapsed, 0.0) / tau) if tau > 0 else 0.0


@dataclass
class Ewma:
    """An exponentially weighted moving average whose decay is a time constant `tau` seconds.

    `add(value, now)` folds in one observation: the older the previous state, the less it weighs
    (w = exp(-dt / tau)). Time without observations changes nothing.
    """

    tau: float
    value: float = 0.0
    stamp: float | None = None  # time of the last observation; None before the first

    def add(self, sample: float, now: float) -> float:
        if self.stamp is None:
            self.value = sample
        else:
            w = _weight(now - self.stamp, self.tau)
            self.value = self.value * w + sample * (1.0 - w)
        self.stamp = now
        return self.value

    def add_mean(self, mean: float, count: int, now: float) -> float:
        """Fold in `count` observations whose mean is `mean`, seen over the time since the last
        update (how the once-a-second aggregation feeds it). No observations: no change."""
        if count <= 0:
            return self.value
        return self.add(mean, now)

    @property
    def seen(self) -> bool:
        return self.stamp is not None


@dataclass
class PeakEwma:
    """Finagle's peak-EWMA: jumps up to a slow observation at once, decays down slowly.

    Used by the leastlatency balancer, so a backend that just turned slow loses traffic at
    once, and earns it back gradually.
    """

    tau: float
    cost: float = 0.0
    stamp: float | None = None

    def observe(self, rtt: float, now: float) -> float:
        if self.stamp is None or rtt > self.cost:
            self.cost = rtt
        else:
            w = _weight(now - self.stamp, self.tau)
            self.cost = self.cost * w + rtt * (1.0 - w)
        self.stamp = now
        return self.cost

    def decayed_toward(self, target: float, now: float) -> float:
        """The cost an idle backend is scored with: decaying toward `target` (the pool mean),
        not toward zero, so a backend that was slow and then idle is not suddenly the fastest."""
        if self.stamp is None:
            return target
        w = _weight(now - self.stamp, self.tau)
        return self.cost * w + target * (1.0 - w)


def percentile(samples: list[float], q: float) -> float:
    """The q-quantile (0..1) of `samples` by nearest rank; 0.0 for no samples."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    rank = max(math.ceil(q * len(ordered)) - 1, 0)
    return ordered[min(rank, len(ordered) - 1)]


class WindowedQuantile:
    """Quantiles of the samples of the last `size` ticks, without keeping or sorting samples.

    Each tick's samples go into a DDSketch (Datadog's maintained implementation of
    Masson, Rim & Lee, VLDB 2019): a log-bucketed histogram whose quantiles are within
    `relative_accuracy` of the true value (1 %: a p95 of 200 ms reads 198-202 ms), whatever the
    distribution. A sketch of latencies between 1 ms and 60 s holds about 550 buckets (never
    more than 2048: it collapses its lowest ones), so a window of 60 one-second sketches is
    bounded in memory, and a quantile merges them in a few milliseconds where sorting the 120k
    samples of a busy window took 36 ms of the event loop every second. The window slides
    by whole ticks: the oldest tick's sketch is dropped (a sketch cannot subtract, which is
    why there is one per tick).
    """

    def __init__(self, size: int, relative_accuracy: float = 0.01) -> None:
        self.relative_accuracy = relative_accuracy
        self.ticks: deque[DDSketch] = deque(maxlen=max(size, 1))

    def add_tick(self, samples: Iterable[float]) -> None:
        """The samples of one tick (possibly none: an idle tick still slides the window)."""
        sketch = DDSketch(self.relative_accuracy)
        for s in samples:
            sketch.add(max(s, 0.0))
        self.ticks.append(sketch)

    @property
    def count(self) -> float:
        """Samples in the window."""
        return float(sum(t.count for t in self.ticks))

    def quantile(self, q: float) -> float:
        """The q-quantile (0..1) of the window's samples; 0.0 for none."""
        merged = DDSketch(self.relative_accuracy)
        for t in self.ticks:
            if t.count:
                merged.merge(t)
        if not merged.count:
            return 0.0
        value = merged.get_quantile_value(q)
        return 0.0 if value is None else value
