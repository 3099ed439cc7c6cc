"""Micro-benchmark of the balancers' pick() at 2, 20 and 200 backends (issue 12, part 6).

`python -m bench.balancers` (from the repository root; `DOPROXY_PURE_PYTHON=1` to time the
source rather than the compiled modules). Prints, for every balancer, the cost of one pick
relative to roundrobin's at 2 backends, and each balancer's cost at 20 and 200 relative to its
own at 2. Ratios, because the absolute times depend on the machine and its other load; each
number is the minimum over `--repeat` timeit runs (the least disturbed one).

A pick is timed as the proxy makes it: the pool's eligible list prepared once (update(), what
the Pool does when membership changes; skipped for balancers that have no update()), then
pick(that list, a client address) over and over, a different address each time. Backends have
no load and no latency history, so the costs are the algorithms' own, not their reaction to
load.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import timeit
from collections.abc import Callable

from doproxy.core.balancers import BALANCERS, make_balancer
from doproxy.core.stats import PeakEwma

SIZES = (2, 20, 200)


class FakeBackend:
    __slots__ = ("failure_rate", "in_flight", "key", "latency", "weight")

    def __init__(self, i: int) -> None:
        self.key = f"10.0.{i // 256}.{i % 256}:8080"
        self.in_flight = 0
        self.weight = 1 + i % 3  # unequal, so `weighted` really weighs
        self.latency = PeakEwma(tau=10.0)
        self.latency.observe(0.005 + (i % 7) / 1000, 0.0)
        self.failure_rate = 0.0


def pick_cost(kind: str, n: int, number: int, repeat: int) -> float:
    """Seconds per pick, the best of `repeat` runs of `number` picks."""
    backends = [FakeBackend(i) for i in range(n)]
    clock_now = [1.0]
    bal = make_balancer(kind, clock=lambda: clock_now[0], rng=random.Random(1))
    update: Callable[..., None] | None = getattr(bal, "update", None)
    if update is not None:
        update(backends)
    pick = bal.pick
    # A different client address on every pick: hash's worst case (it remembers the last key).
    keys = itertools.cycle([f"192.0.2.{i}".encode() for i in range(251)])
    pick(backends, next(keys))  # warm: caches, the first mean
    best = min(timeit.repeat(lambda: pick(backends, next(keys)), number=number, repeat=repeat))
    return best / number


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.balancers", description=__doc__)
    p.add_argument("--number", type=int, default=20000, help="picks per timeit run (20000)")
    p.add_argument("--repeat", type=int, default=7, help="timeit runs; the best counts (7)")
    args = p.parse_args(argv)
    costs = {
        (kind, n): pick_cost(kind, n, args.number, args.repeat) for kind in BALANCERS for n in SIZES
    }
    ref = costs[("roundrobin", 2)]
    print(f"pick() cost; reference: roundrobin at 2 backends = {ref * 1e9:.0f} ns on this machine")
    print()
    head = " | ".join(f"{n} ÷ rr@2" for n in SIZES)
    print(f"| balancer | {head} | 200 ÷ own 2 |")
    print("|---|" + "---|" * (len(SIZES) + 1))
    for kind in BALANCERS:
        cells = " | ".join(f"{costs[(kind, n)] / ref:.2f}" for n in SIZES)
        own = costs[(kind, SIZES[-1])] / costs[(kind, SIZES[0])]
        print(f"| {kind} | {cells} | {own:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
