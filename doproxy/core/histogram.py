"""Fixed-bucket histograms kept as plain counts, read by the metrics at scrape time. Pure.

A histogram here is a tuple of upper bounds and a list with one count per bucket (the last one
for everything above the highest bound, Prometheus' +Inf): an observation is one `bisect` and
one increment, and nothing else happens until somebody asks. The counts are per bucket, not
cumulative; `cumulative` turns them into Prometheus' `le` buckets when the metrics are read.

The data plane keeps its request-duration histogram this way inline (a list on the server,
indexed with REQUEST_BOUNDS), so the request path calls no method of a class it does not
compile; the control plane uses `Histogram`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Final

# Prometheus' default buckets (seconds): from a fast cache hit to a request that times out.
REQUEST_BOUNDS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)

# From asking a provider for a machine until it serves (seconds): a local process is up in
# well under a second, a droplet in one to three minutes, and boot-timeout defaults to 5 min.
PROVISION_BOUNDS: Final = (
    1.0,
    5.0,
    15.0,
    30.0,
    45.0,
    60.0,
    90.0,
    120.0,
    180.0,
    240.0,
    300.0,
    450.0,
    600.0,
    900.0,
)


def cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[float, int]]:
    """Prometheus' buckets: (upper bound, observations at or below it), +Inf last."""
    out = []
    running = 0
    for bound, n in zip((*bounds, float("inf")), counts, strict=True):
        running += n
        out.append((bound, running))
    return out


class Histogram:
    """Observations counted in fixed buckets, with their sum (no sample is kept)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le = "<=").
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        return cumulative(self.bounds, self.counts)
