"""The autoscaler's decision: a pure function of (observation, policy, state).

Theory of operation
-------------------
Every `interval` the autoscaler task (doproxy/autoscaler.py) measures the pool and calls
`decide(observation, policy, state)`. The answer is one `Decision` (do nothing, scale up, scale
down, or replace failing backends) and the next `ScalerState`, which remembers only what the
policy needs between calls: when the current "slow" or "fast" streak began, when the pool was
last scaled up and down, and the last reason (so a change of reason is recorded once, not
every five seconds). No clock, no I/O: `now` arrives inside the observation, so the same inputs
always give the same decision, and the tests run without an event loop.

The pool size is `serving + provisioning - replacing`: every machine that takes part in the
pool (up or down) plus every machine being created, a replacement and the machine it replaces
counted once. Draining victims no longer count. Because booting machines count, a scale-up is
never repeated while the first one boots, and no decision ever takes the size above
`max-backends` or (by a scale-down) below `min-backends`.

The decision, in order of precedence:

1. size < min-backends: scale up to min-backends at once (no waiting, no cooldown).
2. size > max-backends (the limit was lowered): scale down to max-backends at once.
3. failing backends (failed `max-health-failures` health checks in a row): replace them, at most
   `max-step` replacements in flight. The task creates the new machine first and destroys the
   old one once the new one serves.
4. idle pool (no request completed, or fewer than `min-requests` per second): `idle = "hold"`
   keeps the size and restarts both streaks; `idle = "scale-down"` counts as fast.
5. the mode's signal, each interval either "slow", "fast" or neither:
   - threshold: slow when latency > upscale-latency, fast when latency < downscale-latency;
   - target: desired = ceil(n * latency / target-latency) with n the working backends
     (serving minus failing); slow when desired > size, fast when desired < size.
   A streak starts at the first slow (fast) observation and ends at the first one that is not.
   Scale up when the slow streak has lasted upscale-time, upscale-every has passed since the
   last scale-up, and (threshold mode) no new machine is still booting. Scale down when the
   fast streak has lasted downscale-time, downscale-every has passed since the last scale-down
   *and since the last scale-up*, and nothing is booting. A scale action restarts both streaks.
   Step: threshold mode adds or removes `max-step` machines; target mode moves toward desired
   by at most `max-step`. Both stop at min-backends and max-backends.

Why downscale-every also counts from the last scale-up: latency is a poor measure of spare
capacity (it stays flat until a backend nears saturation), so a pool that was just scaled up
often looks "fast" at once. Waiting downscale-every after a scale-up bounds flapping to one
cycle per downscale-every. A scale-up never waits for a scale-down: users come first.

Victims (`pick_victims`): unhealthy first, then the fewest in-flight requests (the quickest
drain), then the newest (the oldest machines have proven themselves), then by key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from doproxy.core.settings import Provisioning

Action = Literal["none", "up", "down", "replace"]

# Reasons ("kinds") of a no-op decision that are worth one history entry when they begin: the
# scaler would act but something stops it. Streaks building up, the steady state, sitting at
# min-backends with a fast pool and waiting for a boot are routine and stay out of the history.
NOTABLE_KINDS = frozenset({"at-max", "cooldown-up", "cooldown-down", "idle"})


@dataclass(frozen=True)
class Observation:
    """What the task measured over the last interval."""

    now: float  # seconds, any monotonic origin
    # The pool's request-weighted mean latency over the interval (s); None when no request
    # completed.
    latency: float | None
    requests_per_second: float
    # Machines in the pool, not draining, up or down, provisioned by us or not: all count.
    serving: int
    # Machines being created (scale-ups and replacements): they count toward the pool.
    provisioning: int = 0
    # Victims being drained: they no longer count.
    draining: int = 0
    # Keys of our backends that failed >= max-health-failures consecutive checks and are not
    # being replaced already.
    failing: tuple[str, ...] = ()
    # Of the `provisioning` machines, those that replace a failing one still in `serving`: the
    # pair counts once.
    replacing: int = 0

    @property
    def size(self) -> int:
        """The pool size the policy bounds: serving + provisioning, each replacement once."""
        return max(self.serving + self.provisioning - min(self.replacing, self.provisioning), 0)


@dataclass(frozen=True)
class ScalerState:
    """What the decision remembers between calls. Start with `ScalerState()`."""

    high_since: float | None = None  # start of the current "slow" streak
    low_since: float | None = None  # start of the current "fast" streak
    last_up: float | None = None  # time of the last latency scale-up
    last_down: float | None = None  # time of the last latency scale-down
    last_kind: str = ""  # kind of the previous decision: a change is notable
    # Keys this scaler ordered replaced that are still reported failing: a safety net, so a key
    # is not replaced twice even if the task keeps reporting it while its replacement boots.
    replaced: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    action: Action
    count: int  # machines to add (up) or remove (down); replacements for "replace"
    replace: tuple[str, ...]  # keys of failing backends to replace (create new, destroy old)
    size_before: int
    size_after: int
    # e.g. "scale up 2→3: latency 612 ms > 500 ms for 3m05s; last scale-up 41 min ago"
    reason: str
    # Worth recording in the history: every action, and every change to a reason that stops
    # an action (at max-backends, a cooldown, idle).
    notable: bool
    # A stable name for the reason: scale-up, scale-down, below-min, above-max, replace,
    # steady, slow, fast, booting, at-max, at-min, cooldown-up, cooldown-down, idle.
    kind: str = ""
    now: float = 0.0
    latency: float | None = None
    desired: int | None = None  # target mode: the size the latency asks for


def decide(
    obs: Observation, policy: Provisioning, state: ScalerState
) -> tuple[Decision, ScalerState]:
    """One decision for one observation. Pure: same inputs, same outputs."""
    now = obs.now
    size = obs.size
    # The safety net for replacements: forget a key once it stops failing (it was retired or
    # it recovered) or once nothing is being created any more (its replacement failed, so it
    # may be ordered again).
    replaced = tuple(k for k in state.replaced if k in obs.failing and obs.provisioning > 0)
    in_flight = min(max(obs.replacing, len(replaced)), obs.provisioning)
    booting = obs.provisioning - in_flight  # new machines (scale-ups), not replacements

    # Backends that serve nothing: failing ones, and those whose replacement boots (reported
    # in `failing` or not, they are counted once).
    broken = len(set(obs.failing) - set(replaced)) + in_flight
    signal, desired, what = _signal(obs, policy, size, broken)
    high_since = (
        (state.high_since if state.high_since is not None else now) if signal == "slow" else None
    )
    low_since = (
        (state.low_since if state.low_since is not None else now) if signal == "fast" else None
    )
    nxt = ScalerState(
        high_since, low_since, state.last_up, state.last_down, state.last_kind, replaced
    )

    def out(
        kind: str,
        reason: str,
        action: Action = "none",
        count: int = 0,
        keys: tuple[str, ...] = (),
        after: ScalerState | None = None,
    ) -> tuple[Decision, ScalerState]:
        st = after or nxt
        delta = count if action == "up" else -count if action == "down" else 0
        notable = action != "none" or (kind != state.last_kind and kind in NOTABLE_KINDS)
        d = Decision(
            action=action,
            count=count,
            replace=keys,
            size_before=size,
            size_after=size + delta,
            reason=reason,
            notable=notable,
            kind=kind,
            now=now,
            latency=obs.latency,
            desired=desired,
        )
        return d, _with_kind(st, kind)

    lo, hi = policy.min_backends, policy.max_backends

    # 1 and 2: the bounds are repairs, not scaling: no streak, no cooldown, no max-step.
    if size < lo:
        n = lo - size
        return out("below-min", f"scale up {size}→{lo}: below min-backends {lo}", "up", n)
    if size > hi:
        n = size - hi
        return out("above-max", f"scale down {size}→{hi}: above max-backends {hi}", "down", n)

    # 3: replace failing backends, the new machine first.
    fresh = tuple(sorted(k for k in set(obs.failing) if k not in replaced))
    slots = policy.max_step - in_flight
    if fresh and slots > 0:
        keys = fresh[:slots]
        reason = (
            f"replace {', '.join(keys)}: failed {policy.max_health_failures} health checks "
            f"in a row; pool stays at {size}"
        )
        after = ScalerState(
            high_since, low_since, state.last_up, state.last_down, state.last_kind, replaced + keys
        )
        return out("replace", reason, "replace", len(keys), keys, after)

    # 4: idle.
    if signal == "idle":
        if obs.latency is None:
            why = "idle: no request completed"
        else:
            why = (
                f"idle: {obs.requests_per_second:.2g} req/s < min-requests "
                f"{policy.min_requests:g}/s"
            )
        return out("idle", f'{why}; holding at {size} (idle = "hold")')

    # 5: the mode's signal.
    if signal == "slow":
        assert high_since is not None
        streak = now - high_since
        what_for = f"{what} for {span(streak)}"
        if streak < policy.upscale_time:
            return out("slow", f"{what_for}; scale up after {span(policy.upscale_time)}")
        if size >= hi:
            return out("at-max", f"{what_for}, but at max-backends {hi}")
        if state.last_up is not None and now - state.last_up < policy.upscale_every:
            wait = policy.upscale_every - (now - state.last_up)
            return out(
                "cooldown-up",
                f"{what_for}; cooldown: next scale-up in {span(wait)} "
                f"(upscale-every {span(policy.upscale_every)})",
            )
        if policy.mode == "threshold" and booting > 0:
            return out("booting", f"{what_for}; waiting for {booting} new backend(s) to boot")
        step = policy.max_step if desired is None else desired - size
        n = max(min(step, policy.max_step, hi - size), 1)
        reason = f"scale up {size}→{size + n}: {what_for}; {_last('scale-up', state.last_up, now)}"
        after = ScalerState(None, None, now, state.last_down, state.last_kind, replaced)
        return out("scale-up", reason, "up", n, after=after)

    if signal == "fast":
        assert low_since is not None
        streak = now - low_since
        what_for = f"{what} for {span(streak)}"
        if streak < policy.downscale_time:
            return out("fast", f"{what_for}; scale down after {span(policy.downscale_time)}")
        if size <= lo:
            return out("at-min", f"{what_for}, at min-backends {lo}")
        # downscale-every counts from the last change of size in either direction.
        last = max((t for t in (state.last_down, state.last_up) if t is not None), default=None)
        if last is not None and now - last < policy.downscale_every:
            wait = policy.downscale_every - (now - last)
            since = "scale-down" if last == state.last_down else "scale-up"
            return out(
                "cooldown-down",
                f"{what_for}; cooldown: next scale-down in {span(wait)} "
                f"(downscale-every {span(policy.downscale_every)} since the last {since})",
            )
        if booting > 0:
            return out("booting", f"{what_for}; waiting for {booting} new backend(s) to boot")
        step = policy.max_step if desired is None else size - desired
        n = max(min(step, policy.max_step, size - lo), 1)
        reason = (
            f"scale down {size}→{size - n}: {what_for}; {_last('scale-down', state.last_down, now)}"
        )
        after = ScalerState(None, None, state.last_up, now, state.last_kind, replaced)
        return out("scale-down", reason, "down", n, after=after)

    return out("steady", f"{what}; {size} backend(s)")


def _signal(
    obs: Observation, policy: Provisioning, size: int, broken: int
) -> tuple[str, int | None, str]:
    """This interval's verdict: "slow", "fast", "idle" or "ok"; target mode's desired size; and
    the words (with the numbers) that explain it."""
    lat = obs.latency
    if lat is None or obs.requests_per_second < policy.min_requests:
        if policy.idle == "hold":
            return "idle", None, ""
        if lat is None:
            return "fast", None, 'idle (no request completed) and idle = "scale-down"'
        rate = f"{obs.requests_per_second:.2g} req/s < min-requests {policy.min_requests:g}/s"
        return "fast", None, f'idle ({rate}) and idle = "scale-down"'
    if policy.mode == "threshold":
        if lat > policy.upscale_latency:
            return "slow", None, f"latency {_ms(lat)} > {_ms(policy.upscale_latency)}"
        if lat < policy.downscale_latency:
            return "fast", None, f"latency {_ms(lat)} < {_ms(policy.downscale_latency)}"
        return (
            "ok",
            None,
            (
                f"latency {_ms(lat)} between {_ms(policy.downscale_latency)}"
                f" and {_ms(policy.upscale_latency)}"
            ),
        )
    # Target tracking: the working backends (not the failing ones, not the booting ones)
    # produced this latency; the pool needs `desired` of them to bring it to the target.
    working = max(obs.serving - broken, 1)
    target = policy.target_latency
    # A hair above an integer is that integer: no extra machine for rounding noise. Not
    # clamped to min/max here, so "wants 6, but at max-backends 4" can be said.
    desired = max(math.ceil(working * lat / target - 1e-9), 0)
    what = f"latency {_ms(lat)} on {working} vs target {_ms(target)}: wants {desired}"
    if desired > size:
        return "slow", desired, what
    if desired < size:
        return "fast", desired, what
    return "ok", desired, what


def _with_kind(state: ScalerState, kind: str) -> ScalerState:
    return ScalerState(
        state.high_since, state.low_since, state.last_up, state.last_down, kind, state.replaced
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def span(seconds: float) -> str:
    """45s, 3m05s, 15m, 1h02m: short and exact enough for a log line."""
    s = max(round(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s % 60 else f"{s // 60}m"
    m = (s % 3600) // 60
    return f"{s // 3600}h{m:02d}m" if m else f"{s // 3600}h"


def _last(what: str, at: float | None, now: float) -> str:
    if at is None:
        return f"first {what}"
    ago = now - at
    if ago < 60:
        return f"last {what} {int(ago)} s ago"
    if ago < 7200:
        return f"last {what} {int(ago // 60)} min ago"
    return f"last {what} {span(ago)} ago"


@dataclass(frozen=True)
class Candidate:
    """A backend that may be scaled down."""

    key: str
    healthy: bool
    in_flight: int
    started: float  # when it was created (any clock, the same for all candidates)


def pick_victims(candidates: Sequence[Candidate], count: int) -> list[str]:
    """The keys of the `count` backends to remove, best victim first.

    Unhealthy first (they serve nothing), then the fewest in-flight requests (the quickest
    drain, the fewest users touched), then the newest (the oldest have proven themselves and
    their caches are warm), then by key, so the choice is deterministic.
    """
    ranked = sorted(candidates, key=lambda c: (c.healthy, c.in_flight, -c.started, c.key))
    return [c.key for c in ranked[: max(count, 0)]]
