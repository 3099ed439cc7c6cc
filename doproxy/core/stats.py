"""Latency statistics: time-decayed averages. Pure: every function takes `now` as an argument.

The 2015 doproxy's "round-trip timing" had three bugs that these avoid:
- its latency had the wrong sign (it subtracted the end from the start);
- idle ticks pulled the average towards zero, so a quiet backend looked fast: here an interval
  with no requests leaves the average where it was;
- it reset on every reload: these objects belong to the backend and survive a reload.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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
