"""Progressive rollouts, the pure part: what a window of traffic says about the new machines,
and how many machines the next step makes and retires. doproxy.rollout acts on it.

A rollout moves a pool of `target` machines from the old spec to a new one:

    canary        one new machine gets canary-weight % of the traffic for canary-time
    steps         `rollout-step` new machines join, are watched for rollout-step-time, then as
                  many old ones are drained and destroyed; again until no old one is left
    rolling-back  machines of the old spec are made until the old ones are `target` again,
                  then every new one is drained and destroyed

Each window ends in a verdict (`judge`): the new machines pass while their error rate is at most
`max-error-rate-increase` percentage points above the old ones' and their mean latency at most
`max-latency-ratio` times theirs. The counts of each step are computed from what the inventory
holds (`to_create`, `to_retire`), not from a counter of steps done, so a rollout resumed after a
crash picks up from whatever the pool looks like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Phase = Literal["canary", "steps", "rolling-back", "done", "rolled-back"]
ACTIVE_PHASES: tuple[Phase, ...] = ("canary", "steps", "rolling-back")

# Mean latencies below this count as this: a backend answering in 0.2 ms against one at 0.4 ms
# is noise, not a slower release (a ratio of two tiny numbers says nothing).
LATENCY_FLOOR = 0.005


@dataclass(frozen=True)
class Traffic:
    """What a group of backends did in a window: exchanges (answered or failed), errors among
    them (5xx answers and exchanges that failed at the backend) and the answered ones' latency."""

    requests: int = 0
    errors: int = 0
    answered: int = 0
    latency_sum: float = 0.0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(
            self.requests + other.requests,
            self.errors + other.errors,
            self.answered + other.answered,
            self.latency_sum + other.latency_sum,
        )

    def __sub__(self, earlier: Traffic) -> Traffic:
        return Traffic(
            self.requests - earlier.requests,
            self.errors - earlier.errors,
            self.answered - earlier.answered,
            self.latency_sum - earlier.latency_sum,
        )

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def mean_latency(self) -> float | None:
        return self.latency_sum / self.answered if self.answered else None


@dataclass(frozen=True)
class Thresholds:
    max_error_rate_increase: float  # percentage points
    max_latency_ratio: float
    min_requests: int


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str
    # False when the new machines had too little traffic to compare and passed on their health
    # checks alone.
    compared: bool = True


def judge(new: Traffic, old: Traffic, t: Thresholds, unhealthy: tuple[str, ...] = ()) -> Verdict:
    """Are the new machines no worse than the old ones over the same window?

    `unhealthy` names the new machines that failed their health checks in it: a verdict on
    its own. With fewer than `min_requests` requests to the new machines there is nothing to
    compare, and they pass on their health checks; with too few to the old ones the new ones
    are held to an error rate of at most the increase, and latency is not compared.
    """
    if unhealthy:
        return Verdict(False, f"new machine(s) {', '.join(unhealthy)} failed health checks")
    if new.requests < t.min_requests:
        return Verdict(
            True,
            f"too little traffic to compare ({new.requests} requests to the new machines, "
            f"rollout-min-requests is {t.min_requests}); passed on health checks",
            compared=False,
        )
    baseline = old.requests >= t.min_requests
    old_rate = old.error_rate if baseline else 0.0
    increase = (new.error_rate - old_rate) * 100.0
    said = (
        f"errors {new.error_rate * 100:.2f}% vs {old_rate * 100:.2f}%"
        if baseline
        else f"errors {new.error_rate * 100:.2f}% (too little traffic to the old machines)"
    )
    if increase > t.max_error_rate_increase:
        return Verdict(
            False,
            f"{said}: +{increase:.2f} points, above max-error-rate-increase "
            f"({t.max_error_rate_increase:g})",
        )
    new_lat, old_lat = new.mean_latency, old.mean_latency
    if baseline and new_lat is not None and old_lat is not None:
        ratio = max(new_lat, LATENCY_FLOOR) / max(old_lat, LATENCY_FLOOR)
        lat = f"mean latency {new_lat * 1000:.1f} ms vs {old_lat * 1000:.1f} ms ({ratio:.2f}x)"
        if ratio > t.max_latency_ratio:
            return Verdict(
                False, f"{said}; {lat}, above max-latency-ratio ({t.max_latency_ratio:g})"
            )
        said = f"{said}; {lat}"
    return Verdict(True, f"{said} ({new.requests} requests to the new machines)")


def to_create(phase: Phase, target: int, old: int, new: int, step: int) -> int:
    """How many machines (of the new spec, or of the old one when rolling back) to make before
    the next window. `old` and `new` count the pool's machines of each spec, created or being
    created, not retiring."""
    if phase == "canary":
        return max(0, 1 - new)
    if phase == "steps":
        s = min(step, old)
        return max(0, target - old + s - new)
    if phase == "rolling-back":
        return max(0, target - old)
    return 0


def to_retire(phase: Phase, target: int, old: int, new: int) -> int:
    """How many old machines a passed window retires (a rollback retires every new one)."""
    if phase in ("canary", "steps"):
        return max(0, min(old, old + new - target))
    return 0
