"""The autoscaler's decision: a pure function of (observation, policy, state).

Theory of operation
-------------------
Every `interval` the autoscaler task (doproxy/autoscaler.py) measures the pool and calls
`decide(observation, policy, state)`. The answer is one `Decision` (do nothing, scale up, scale
down, or replace failing backends) and the next `ScalerState`, which remembers only what the
policy needs between calls: the latency observed since the last scale action (for the
windows), the sizes wanted lately (for the stabilisation window), when the pool was last scaled
up and down, and the last reason (so a change of reason is recorded once, not every five
seconds). No clock, no I/O: `now` arrives inside the observation, so the same inputs always give
the same decision, and the tests run without an event loop.

The pool size is `serving + provisioning - replacing`: every machine that takes part in the
pool (up or down) plus every machine being created, a replacement and the machine it replaces
counted once. Draining victims no longer count. Because booting machines count, a scale-up is
never repeated while the first one boots, and no decision ever takes the size above
`max-backends` or (by a scale-down) below `min-backends`.

The windows (the 2015 config's meaning of upscale-time and downscale-time): each observation
covers the time since the previous one, and the signal is the time-weighted mean latency over
the last `upscale-time` (for scaling up) and the last `downscale-time` (for scaling down). A
window acts only once it holds that much observed time; a scale action and an idle interval
under `idle = "hold"` empty both, so the next action needs a whole window of the new pool. An
unbroken run of slow intervals is not needed: 80 % slow intervals with a mean of 690 ms scale up
after upscale-time, where the old "streak" rule waited hours.

The decision, in order of precedence:

1. size < min-backends: scale up to min-backends at once (no window, no cooldown). It counts
   as a scale-up for the cooldowns after it.
2. size > max-backends (the limit was lowered, or a machine came back): scale down to
   max-backends, once downscale-every has passed since the last scale-up (a repair included):
   repairs respect the cooldowns, so a repair and a returning machine cannot flap.
3. failing backends (failing every health check for `max-health-failures` seconds; the task
   decides which): replace them, at most `max-step` replacements in flight. The task creates
   the new machine first and destroys the old one once the new one serves.
4. idle pool (no request completed, or fewer than `min-requests` per second): `idle = "hold"`
   keeps the size and empties the windows; `idle = "scale-down"` counts the interval as one
   where nobody waited (latency 0).
5. the mode's signal:
   - threshold: slow when the upscale window's mean > upscale-latency, fast when the downscale
     window's mean < downscale-latency;
   - target: desired = ceil(n * mean / target-latency) with n the working backends (serving
     minus failing), or the current size while mean / target-latency is within `tolerance`
     of 1 (Kubernetes' HPA band, 0.1); slow when desired > size, fast when desired < size.
   Scale up when the upscale window is full, upscale-every has passed since the last
   scale-up, and (threshold mode) no new machine is still booting. Scale down when the
   downscale window is full, the stabilisation window allows it, downscale-every has passed
   since the last scale-down *and since the last scale-up*, and nothing is booting.
   Step: threshold mode adds or removes `max-step` machines; target mode moves toward desired
   by at most `max-step`. Both stop at min-backends and max-backends.
   A scale-up also stops where the pool would cost more than `max-cost-per-hour` (0: no cap):
   the observation carries the pool's cost per hour now (every machine billed, those being
   created included) and a new machine's price; a step is cut to what the cap allows, and
   none allowed is "at-max-cost", notable like at-max. The cap holds back scale-ups only:
   the repair to min-backends and replacements are not capped, and a pool above the cap is
   not shrunk for it. With the new machine's price unknown the cap cannot be checked, and the
   scale-up's reason says so.

The stabilisation window (`downscale-stabilization`, default downscale-time), from Kubernetes'
HPA: every decision whose windows are full records the size it wants (the higher of what the
upscale window and the downscale window ask for), and a scale-down goes only to the highest
size wanted within the window. A pool that wanted more a few minutes ago, or whose recent
latency disagrees with the long average, keeps its size.

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
from dataclasses import dataclass, replace
from typing import Literal

from doproxy.core.cost import money
from doproxy.core.settings import Provisioning

Action = Literal["none", "up", "down", "replace"]

# Reasons ("kinds") of a no-op decision that are worth one history entry when they begin: the
# scaler would act but something stops it. Streaks building up, the steady state, sitting at
# min-backends with a fast pool and waiting for a boot are routine and stay out of the history.
NOTABLE_KINDS = frozenset(
    {"at-max", "at-max-cost", "cooldown-up", "cooldown-down", "idle", "asleep"}
)


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
    # Keys of our backends that have failed every health check for max-health-failures seconds
    # and are not being replaced already.
    failing: tuple[str, ...] = ()
    # Of the `provisioning` machines, those that replace a failing one still in `serving`: the
    # pair counts once.
    replacing: int = 0
    # Scale to zero: requests held (or asking) for a backend of a sleeping pool, the seconds
    # since the last real request (None: not known), and whether a wake ended with no backend
    # healthy within wake-timeout.
    waiting: int = 0
    quiet_for: float | None = None
    wake_failed: bool = False
    # What the pool costs per hour now (doproxy.core.cost: every machine billed, those being
    # created included), and what one more machine would cost; None when not known.
    cost: float | None = None
    price: float | None = None

    @property
    def size(self) -> int:
        """The pool size the policy bounds: serving + provisioning, each replacement once."""
        return max(self.serving + self.provisioning - min(self.replacing, self.provisioning), 0)


@dataclass(frozen=True)
class ScalerState:
    """What the decision remembers between calls. Start with `ScalerState()`."""

    last_up: float | None = None  # time of the last latency scale-up
    last_down: float | None = None  # time of the last latency scale-down
    last_kind: str = ""  # kind of the previous decision: a change is notable
    # Keys this scaler ordered replaced that are still reported failing: a safety net, so a key
    # is not replaced twice even if the task keeps reporting it while its replacement boots.
    replaced: tuple[str, ...] = ()
    # The latency observed since the last scale action or idle interval, oldest first, as
    # (end, latency, seconds covered): the windows' averages are taken over these. Only what
    # the longer of upscale-time and downscale-time still needs is kept.
    samples: tuple[tuple[float, float, float], ...] = ()
    # The sizes the signal asked for over the downscale-stabilization window, as (time, size):
    # a sliding-window maximum, so only entries that can still be the maximum are kept (sizes
    # strictly decreasing from oldest to newest); a handful at most.
    wanted: tuple[tuple[float, int], ...] = ()
    seen: float | None = None  # time of the previous observation: what the next one covers


@dataclass(frozen=True)
class Decision:
    action: Action
    count: int  # machines to add (up) or remove (down); replacements for "replace"
    replace: tuple[str, ...]  # keys of failing backends to replace (create new, destroy old)
    size_before: int
    size_after: int
    # e.g. "scale up 2→3: mean latency 612 ms > 500 ms over 3m; last scale-up 41 min ago"
    reason: str
    # Worth recording in the history: every action, and every change to a reason that stops
    # an action (at max-backends, a cooldown, idle).
    notable: bool
    # A stable name for the reason: scale-up, scale-down, below-min, above-max, replace,
    # steady, slow, fast, stabilizing, booting, at-max, at-max-cost, at-min, cooldown-up,
    # cooldown-down, idle.
    kind: str = ""
    now: float = 0.0
    latency: float | None = None  # this interval's latency, as observed
    desired: int | None = None  # target mode: the size the latency asks for
    # The pool's cost per hour before and after (after: estimated at a new machine's price per
    # machine added or removed); None when not known.
    cost_before: float | None = None
    cost_after: float | None = None


@dataclass(frozen=True)
class _Window:
    """The time-weighted mean latency over one window, and how much of it was observed."""

    length: float
    mean: float | None
    covered: float

    @property
    def full(self) -> bool:
        return self.mean is not None and self.covered >= self.length - 1e-6

    def words(self) -> str:
        """ "over 3m", or "over 1m05s of 3m" while the window fills."""
        if self.full:
            return f"over {span(self.length)}"
        return f"over {span(self.covered)} of {span(self.length)}"


def _window(samples: Sequence[tuple[float, float, float]], now: float, length: float) -> _Window:
    """Time-weighted mean of the samples over (now - length, now]: each sample's latency
    weighs the seconds of its interval that fall inside the window."""
    start = now - length
    total = covered = 0.0
    for end, latency, seconds in reversed(samples):
        if end <= start:
            break
        part = min(end, now) - max(end - seconds, start)
        if part > 0:
            total += latency * part
            covered += part
    return _Window(length, total / covered if covered > 0 else None, covered)


def decide(
    obs: Observation, policy: Provisioning, state: ScalerState
) -> tuple[Decision, ScalerState]:
    """One decision for one observation. Pure: same inputs, same outputs."""
    now = obs.now
    size = obs.size
    lo, hi = policy.min_backends, policy.max_backends
    # The safety net for replacements: forget a key once it stops failing (it was retired or
    # it recovered) or once nothing is being created any more (its replacement failed, so it
    # may be ordered again).
    replaced = tuple(k for k in state.replaced if k in obs.failing and obs.provisioning > 0)
    in_flight = min(max(obs.replacing, len(replaced)), obs.provisioning)
    booting = obs.provisioning - in_flight  # new machines (scale-ups), not replacements

    # This interval covers the time since the previous observation.
    covers = max(now - state.seen, 0.0) if state.seen is not None else policy.interval
    idle, idle_words = _idle(obs, policy)
    if idle and policy.idle == "hold":
        samples: tuple[tuple[float, float, float], ...] = ()  # the windows start over
    else:
        # idle = "scale-down": an idle interval counts as one where nobody waited.
        value = 0.0 if idle or obs.latency is None else obs.latency
        keep = now - max(policy.upscale_time, policy.downscale_time)
        samples = (*tuple(s for s in state.samples if s[0] > keep), (now, value, covers))
    up = _window(samples, now, policy.upscale_time)
    down = _window(samples, now, policy.downscale_time)

    # Backends that serve nothing: failing ones, and those whose replacement boots (reported
    # in `failing` or not, they are counted once).
    broken = len(set(obs.failing) - set(replaced)) + in_flight
    working = max(obs.serving - broken, 1)
    signal, want, desired, what = _signal(obs, policy, size, working, up, down)
    if idle and policy.idle == "hold":
        signal, want, desired, what = "idle", None, None, ""
    elif idle:
        what = f'{what} ({idle_words}; idle = "scale-down")'

    # The stabilisation window: a sliding maximum of the sizes wanted.
    stab = policy.stabilization
    wanted = tuple(w for w in state.wanted if w[0] > now - stab)
    if want is not None:
        wanted = (*tuple(w for w in wanted if w[1] > want), (now, want))
    highest = max((w[1] for w in wanted), default=size)  # the oldest entry

    nxt = replace(state, replaced=replaced, samples=samples, wanted=wanted, seen=now)

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
        cost_after = obs.cost
        if delta and obs.cost is not None:
            cost_after = None if obs.price is None else max(obs.cost + delta * obs.price, 0.0)
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
            cost_before=obs.cost,
            cost_after=cost_after,
        )
        return d, replace(st, last_kind=kind)

    # 0: scale to zero. Asleep (nothing in the pool), it wakes with exactly one machine when a
    # request waits, whatever the cooldowns: a user is waiting. Awake, it sleeps once no real
    # request came for idle-after, or when a wake failed (the machine never became healthy:
    # it is not kept running for nobody). Otherwise a pool that serves keeps at least one.
    if policy.scale_to_zero:
        if size == 0:
            if obs.waiting > 0:
                after = replace(nxt, last_up=now, samples=())
                return out(
                    "wake",
                    f"wake up 0→1: {obs.waiting} request(s) waiting for the sleeping pool",
                    "up",
                    1,
                    after=after,
                )
            return out("asleep", "asleep: no backend until a request arrives (scale-to-zero)")
        if obs.wake_failed and obs.provisioning == 0:
            after = replace(nxt, last_down=now, samples=())
            return out(
                "wake-failed",
                f"scale down {size}→0: no backend became healthy within wake-timeout "
                f"({span(policy.wake_timeout)})",
                "down",
                obs.serving,
                after=after,
            )
        quiet = obs.quiet_for
        asleep_ok = obs.provisioning == 0 and obs.waiting == 0  # nobody waits for it
        if quiet is not None and quiet >= policy.idle_after and asleep_ok:
            after = replace(nxt, last_down=now, samples=())
            return out(
                "sleep",
                f"scale down {size}→0: no request for {span(quiet)} (idle-after "
                f"{span(policy.idle_after)}); the next request wakes it",
                "down",
                obs.serving,
                after=after,
            )
        lo = max(lo, 1)

    # 1 and 2: the bounds are repairs: no window, no max-step. A repair counts as a scale
    # action for the cooldowns that follow it, and a repair downward respects downscale-every
    # since the last scale-up, so a machine that comes back from a manual action right after a
    # repair created its stand-in never has the newest destroyed at once (issue 10, item 11).
    if size < lo:
        n = lo - size
        after = replace(nxt, last_up=now, samples=())
        return out(
            "below-min", f"scale up {size}→{lo}: below min-backends {lo}", "up", n, after=after
        )
    if size > hi:
        n = size - hi
        if state.last_up is not None and now - state.last_up < policy.downscale_every:
            wait = policy.downscale_every - (now - state.last_up)
            return out(
                "cooldown-down",
                f"above max-backends {hi}; cooldown: scale down {size}→{hi} in {span(wait)} "
                f"(downscale-every {span(policy.downscale_every)} since the last scale-up)",
            )
        after = replace(nxt, last_down=now, samples=())
        reason = f"scale down {size}→{hi}: above max-backends {hi}"
        return out("above-max", reason, "down", n, after=after)

    # 3: replace failing backends, the new machine first.
    fresh = tuple(sorted(k for k in set(obs.failing) if k not in replaced))
    slots = policy.max_step - in_flight
    if fresh and slots > 0:
        keys = fresh[:slots]
        reason = (
            f"replace {', '.join(keys)}: failing health checks for "
            f"{span(policy.max_health_failures)}; pool stays at {size}"
        )
        return out(
            "replace", reason, "replace", len(keys), keys, replace(nxt, replaced=replaced + keys)
        )

    # 4: idle.
    if signal == "idle":
        return out("idle", f'idle: {idle_words}; holding at {size} (idle = "hold")')

    # 5: the mode's signal. After a scale action both windows start over (`samples` empty):
    # the next action needs a whole window of observations of the new pool.
    if signal == "slow":
        if not up.full:
            return out("slow", f"{what}; scale up after {span(policy.upscale_time)}")
        if size >= hi:
            return out("at-max", f"{what}, but at max-backends {hi}")
        afford, cost_words = _affordable(obs, policy)
        if afford == 0:
            return out("at-max-cost", f"{what}, but {cost_words}")
        if state.last_up is not None and now - state.last_up < policy.upscale_every:
            wait = policy.upscale_every - (now - state.last_up)
            return out(
                "cooldown-up",
                f"{what}; cooldown: next scale-up in {span(wait)} "
                f"(upscale-every {span(policy.upscale_every)})",
            )
        if policy.mode == "threshold" and booting > 0:
            return out("booting", f"{what}; waiting for {booting} new backend(s) to boot")
        n = max(min((want or size) - size, hi - size), 1)
        note = ""
        if afford is None and cost_words:
            note = f" ({cost_words})"  # the cap could not be checked
        elif afford is not None and n > afford:
            n, note = afford, f" ({cost_words})"  # limited by max-cost-per-hour
        reason = (
            f"scale up {size}→{size + n}: {what}; {_last('scale-up', state.last_up, now)}{note}"
        )
        after = replace(nxt, last_up=now, samples=())
        return out("scale-up", reason, "up", n, after=after)

    if signal == "fast":
        if not down.full:
            return out("fast", f"{what}; scale down after {span(policy.downscale_time)}")
        if size <= lo:
            return out("at-min", f"{what}, at min-backends {lo}")
        if highest >= size:
            return out(
                "stabilizing",
                f"{what}; but {highest} wanted within the last {span(stab)} "
                f"(downscale-stabilization)",
            )
        # downscale-every counts from the last change of size in either direction.
        last = max((t for t in (state.last_down, state.last_up) if t is not None), default=None)
        if last is not None and now - last < policy.downscale_every:
            wait = policy.downscale_every - (now - last)
            since = "scale-down" if last == state.last_down else "scale-up"
            return out(
                "cooldown-down",
                f"{what}; cooldown: next scale-down in {span(wait)} "
                f"(downscale-every {span(policy.downscale_every)} since the last {since})",
            )
        if booting > 0:
            return out("booting", f"{what}; waiting for {booting} new backend(s) to boot")
        n = max(min(size - highest, policy.max_step, size - lo), 1)
        reason = (
            f"scale down {size}→{size - n}: {what}; {_last('scale-down', state.last_down, now)}"
        )
        after = replace(nxt, last_down=now, samples=())
        return out("scale-down", reason, "down", n, after=after)

    return out("steady", f"{what}; {size} backend(s)")


def _affordable(obs: Observation, policy: Provisioning) -> tuple[int | None, str]:
    """How many more machines max-cost-per-hour allows (None: no limit), and in words why
    (also when the cap cannot be checked). The cap bounds what the pool would cost with them:
    its machines' cost now (every machine billed) plus a new machine's price per machine."""
    cap = policy.max_cost_per_hour
    if cap <= 0:
        return None, ""
    if obs.price is None or obs.cost is None:
        return (
            None,
            f"max-cost-per-hour {money(cap)}/h not checked: a new backend's price is unknown",
        )
    if obs.price <= 0:
        return None, ""  # free machines: the cap never binds
    room = cap - obs.cost
    n = max(math.floor(room / obs.price + 1e-9), 0)
    words = (
        f"at max-cost-per-hour {money(cap)}/h: the pool costs {money(obs.cost)}/h, "
        f"a backend {money(obs.price)}/h"
    )
    if n > 0:
        words = f"max-cost-per-hour {money(cap)}/h allows {n} more at {money(obs.price)}/h"
    return n, words


def _idle(obs: Observation, policy: Provisioning) -> tuple[bool, str]:
    """Whether the interval is idle, and why in words."""
    if obs.latency is None:
        return True, "no request completed"
    if obs.requests_per_second < policy.min_requests:
        rate = f"{obs.requests_per_second:.2g} req/s < min-requests {policy.min_requests:g}/s"
        return True, rate
    return False, ""


def _signal(
    obs: Observation,
    policy: Provisioning,
    size: int,
    working: int,
    up: _Window,
    down: _Window,
) -> tuple[str, int | None, int | None, str]:
    """The windows' verdict: "slow", "fast" or "ok"; the size they ask for (within max-step,
    before the bounds and the stabilisation window); target mode's desired size; and the words
    (with the numbers) that explain it. A window that is not full yet gives its verdict so far
    but asks for nothing (None when neither is full).

    The size asked for is the higher of the two windows' answers: the upscale window is the
    recent one, and a scale-down is wanted only while the recent latency agrees with the
    downscale window's."""
    step = policy.max_step
    lo_ask, hi_ask = size - step, size + step
    if policy.mode == "threshold":
        u, dn = policy.upscale_latency, policy.downscale_latency
        up_ask = down_ask = None
        if up.full and up.mean is not None:
            up_ask = hi_ask if up.mean > u else lo_ask if up.mean < dn else size
        if down.full and down.mean is not None:
            down_ask = lo_ask if down.mean < dn else size
        want = _higher(up_ask, down_ask)
        if up.mean is not None and up.mean > u:
            return "slow", want, None, f"mean latency {_ms(up.mean)} > {_ms(u)} {up.words()}"
        if down.mean is not None and down.mean < dn:
            return "fast", want, None, f"mean latency {_ms(down.mean)} < {_ms(dn)} {down.words()}"
        mean = up.mean if up.mean is not None else 0.0
        return (
            "ok",
            want,
            None,
            f"mean latency {_ms(mean)} {up.words()} between {_ms(dn)} and {_ms(u)}",
        )
    # Target tracking: the working backends (not the failing ones, not the booting ones)
    # produced this latency; the pool needs `desired` of them to bring it to the target.
    target = policy.target_latency

    def desire(w: _Window, margin: float) -> tuple[int, str]:
        """The size that brings the window's mean to the target (up) or keeps it `margin`
        below the target (down); the current size while the mean is within the band."""
        assert w.mean is not None
        ratio = w.mean / target
        within = abs(ratio - 1.0) <= policy.tolerance + 1e-9
        # Within the tolerance band the pool is right as it is (Kubernetes' HPA: 0.1).
        # A hair above an integer is that integer: no extra machine for rounding noise. Not
        # clamped to min/max here, so "wants 6, but at max-backends 4" can be said.
        d = size if within else max(math.ceil(working * ratio / (1.0 - margin) - 1e-9), 0)
        if margin and d >= size:
            d = size  # the smaller pool would not keep the margin: stay
        band = f", within {policy.tolerance:g} of it" if within else ""
        keep = f" keeping {margin:g} below it" if margin and not within else ""
        words = (
            f"mean latency {_ms(w.mean)} {w.words()} on {working} vs target {_ms(target)}"
            f"{band}: wants {d}{keep}"
        )
        return d, words

    if up.mean is None:
        return "ok", None, None, "no latency observed yet"
    d_up, up_what = desire(up, 0.0)
    up_ask = min(max(d_up, lo_ask), hi_ask) if up.full else None
    if down.mean is not None:
        d_down, down_what = desire(down, policy.downscale_tolerance)
    else:
        d_down, down_what = size, ""
    down_ask = min(max(d_down, lo_ask), size) if down.full else None
    want = _higher(up_ask, down_ask)
    if d_up > size:
        return "slow", want, d_up, up_what
    if d_down < size:
        return "fast", want, d_down, down_what
    return "ok", want, d_up, up_what


def _higher(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else max(a, b)


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
