"""The cluster signal's sum (doproxy.core.signal_sum): totals that never go back."""

from __future__ import annotations

import pytest

from doproxy.core.signal_sum import SignalSum

pytestmark = pytest.mark.timeout(10)


def test_sums_what_each_node_added() -> None:
    s = SignalSum()
    assert s.update({"a": (10, 1.0), "b": (5, 0.5)}) == (0, 0.0)  # first sight adds nothing
    assert s.update({"a": (15, 1.5), "b": (7, 0.7)}) == (7, pytest.approx(0.7))


def test_a_node_that_leaves_or_joins_never_takes_the_sum_back() -> None:
    s = SignalSum()
    s.update({"a": (10, 1.0), "b": (100, 10.0)})
    s.update({"a": (20, 2.0), "b": (110, 11.0)})  # +20
    assert s.update({"a": (25, 2.5)}) == (25, pytest.approx(2.5))  # b left: nothing lost
    assert s.update({"a": (26, 2.6), "c": (500, 50.0)}) == (26, pytest.approx(2.6))
    assert s.update({"a": (26, 2.6), "c": (510, 51.0)}) == (36, pytest.approx(3.6))


def test_a_restarted_node_counts_from_zero() -> None:
    s = SignalSum()
    s.update({"a": (100, 10.0)})
    assert s.update({"a": (3, 0.3)}) == (3, pytest.approx(0.3))
