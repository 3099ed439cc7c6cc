"""Quantiles over a sliding window of ticks, from log-bucketed counts instead of sorted samples.
Pure.

Its own module, apart from doproxy/core/stats.py, because the compiled data plane imports
stats.py (PeakEwma) and should not depend on what only the control plane uses.
"""

from __future__ import annotations

import math
import sys
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from itertools import repeat
from operator import mul

# One tick's samples: the bucket keys, their (weighted) counts, and the weight of the samples
# too small to log. Flat tuples of numbers rather than an object holding a dict: a window
# keeps one per tick (60 per backend, 120,000 at 2,000 backends), and the garbage collector
# stops tracking a tuple of numbers, so a full collection no longer walks all of them.
Tick = tuple[tuple[int, ...], tuple[float, ...], float]


def _tick(counts: dict[int, float], zeros: float) -> Tick:
    return tuple(counts), tuple(counts.values()), zeros


class WindowedQuantile:
    """Quantiles of the samples of the last `size` ticks, without keeping or sorting samples.

    The buckets are DDSketch's (Masson, Rim & Lee, VLDB 2019; its logarithmic mapping): a
    sample v > 0 falls in bucket ceil(log_gamma(v)) with gamma = (1 + a) / (1 - a), and a
    bucket reads as the value within `relative_accuracy` (a) of all of its samples (1 %: a p95
    of 200 ms reads 198-202 ms), whatever the distribution. Samples of 1 ms to 60 s use
    about 550 buckets.

    Why not the ddsketch package, which this replaced: it adds a sample in Python (about 1 µs
    each, the statistics tick's largest cost, and one that grows with the request rate), and
    a window quantile merged its 60 sketches every tick. Here a tick's samples are bucketed
    by C-level iteration (map over math.log, counted by Counter's C helper: a few hundred
    instructions a sample), and the window keeps the sum of its ticks' counts, adding the
    newest tick's buckets and subtracting the oldest's: a tick costs what its own samples
    and buckets cost, not what the window holds, and a quantile walks the window's few
    hundred buckets at most.
    """

    def __init__(self, size: int, relative_accuracy: float = 0.01) -> None:
        self.relative_accuracy = relative_accuracy
        mantissa = 2 * relative_accuracy / (1 - relative_accuracy)
        self._gamma = 1 + mantissa
        self._multiplier = 1 / math.log1p(mantissa)  # log_gamma(v) = log(v) * multiplier
        # A sample at or below the smallest is a zero, as in DDSketch (and 0 has no log).
        self._smallest = sys.float_info.min * self._gamma
        self._largest = sys.float_info.max / self._gamma
        self._zero_key = math.ceil(math.log(self._smallest) * self._multiplier)
        self.size = max(size, 1)
        self.ticks: deque[Tick] = deque()
        self._counts: dict[int, float] = {}  # the sum of self.ticks' counts
        self._zeros = 0.0

    def tick_of(self, samples: Sequence[float], weight: float = 1.0) -> Tick:
        """Bucket one tick's samples, each standing for `weight` requests (a subsample's)."""
        m = self._multiplier
        try:
            keys = Counter(map(math.ceil, map(mul, map(math.log, samples), repeat(m))))
            zeros = 0
        except (ValueError, OverflowError):  # a sample log or ceil refuses (<= 0, inf, nan)
            low, high = self._smallest, self._largest
            clamped = [low if not s > low else s if s < high else high for s in samples]
            keys = Counter(map(math.ceil, map(mul, map(math.log, clamped), repeat(m))))
            zeros = keys.pop(self._zero_key, 0)
        if weight == 1.0:
            return tuple(keys), tuple(keys.values()), float(zeros)
        return tuple(keys), tuple(n * weight for n in keys.values()), zeros * weight

    def add_tick(self, samples: Sequence[float], weight: float = 1.0) -> Tick:
        """The samples of one tick (possibly none: an idle tick still slides the window), and
        the tick they made."""
        tick = self.tick_of(samples, weight)
        self._push(tick)
        return tick

    def add_merged(self, ticks: Iterable[Tick]) -> None:
        """One tick made of other windows' ticks (the pool's, of its backends'): adding
        counts is exact, so no sample is bucketed twice."""
        counts: dict[int, float] = {}
        zeros = 0.0
        get = counts.get
        for keys, values, t_zeros in ticks:
            zeros += t_zeros
            for k, n in zip(keys, values, strict=True):
                counts[k] = get(k, 0.0) + n
        self._push(_tick(counts, zeros))

    def _push(self, tick: Tick) -> None:
        window = self._counts
        get = window.get
        keys, values, zeros = tick
        for k, n in zip(keys, values, strict=True):
            window[k] = get(k, 0.0) + n
        self._zeros += zeros
        self.ticks.append(tick)
        if len(self.ticks) > self.size:
            old = self.ticks.popleft()
            for k, n in zip(old[0], old[1], strict=True):
                left = window[k] - n
                # Every count is at least one sample's weight (>= 1): less is float residue.
                if left < 0.5:
                    del window[k]
                else:
                    window[k] = left
            zeros = self._zeros - old[2]
            self._zeros = zeros if zeros >= 0.5 else 0.0

    @property
    def count(self) -> float:
        """Samples in the window."""
        return float(sum(self._counts.values())) + self._zeros

    def quantile(self, q: float) -> float:
        """The q-quantile (0..1) of the window's samples; 0.0 for none. As DDSketch reads
        it: the bucket holding the sample of rank q * (count - 1)."""
        count = self.count
        if not count:
            return 0.0
        rank = q * (count - 1)
        running = self._zeros
        if rank < running:
            return 0.0
        items = sorted(self._counts.items())
        key = items[-1][0]  # a rank past every bucket (float rounding) reads the highest
        for k, n in items:
            running += n
            if running > rank:
                key = k
                break
        return self._gamma**key * (2.0 / (1 + self._gamma))
