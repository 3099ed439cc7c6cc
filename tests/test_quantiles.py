"""The sliding-window quantiles (doproxy.core.quantiles): DDSketch's buckets, summed per window."""

from __future__ import annotations

import math
import random

import pytest

from doproxy.core.quantiles import WindowedQuantile
from doproxy.core.stats import percentile


def test_within_one_percent_of_the_exact_quantile() -> None:
    rng = random.Random(11)
    samples = [rng.lognormvariate(-4, 1.5) for _ in range(5000)]
    w = WindowedQuantile(1)
    w.add_tick(samples)
    for q in (0.5, 0.95, 0.99):
        assert w.quantile(q) == pytest.approx(percentile(samples, q), rel=0.0101)


def test_zero_negative_and_infinite_samples_are_counted_not_fatal() -> None:
    w = WindowedQuantile(2)
    w.add_tick([0.0, -1.0, 0.0, 0.010, math.inf, math.nan])
    assert w.count == 6
    assert w.quantile(0.0) == 0.0  # zeros and the negative read as 0, as DDSketch's did
    assert w.quantile(0.5) == 0.0
    assert w.quantile(1.0) > 1e300  # inf lands in the highest bucket


def test_the_window_slides_and_weighted_ticks_leave_no_residue() -> None:
    w = WindowedQuantile(3)
    w.add_tick([1.0] * 10, weight=0.1 + 0.2)  # a weight that is no exact binary fraction
    assert w.quantile(0.5) == pytest.approx(1.0, rel=0.01)
    for _ in range(3):
        w.add_tick([0.01, 0.02], weight=1.7)
    assert w.count == pytest.approx(3 * 2 * 1.7)
    assert w.quantile(0.99) == pytest.approx(0.02, rel=0.01)  # the 1 s tick has left
    for _ in range(3):
        w.add_tick([])
    assert w.count == 0.0 and w.quantile(0.95) == 0.0


def test_a_merged_tick_is_the_sum_of_its_parts() -> None:
    a, b, pool = WindowedQuantile(5), WindowedQuantile(5), WindowedQuantile(5)
    pool.add_merged([a.add_tick([0.010] * 96), b.add_tick([0.800] * 2, weight=2.0)])
    assert pool.count == 100
    assert pool.quantile(0.95) == pytest.approx(0.010, rel=0.01)
    assert pool.quantile(0.99) == pytest.approx(0.800, rel=0.01)
