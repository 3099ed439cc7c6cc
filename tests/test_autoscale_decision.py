"""Table tests of the pure autoscale decision: a fake clock (the `now` we pass), no event loop."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from doproxy.core.autoscale import (
    Candidate,
    Decision,
    Observation,
    ScalerState,
    decide,
    pick_victims,
    span,
)
from doproxy.core.settings import Provisioning

STEP = 5.0  # seconds between decisions, the default interval


def policy(**kw: Any) -> Provisioning:
    """The Go defaults (up 500 ms for 3m every 15m, down 150 ms for 15m every 1h), min 1, max 4."""
    base: dict[str, Any] = {"enable": True, "min-backends": 1, "max-backends": 4}
    base.update({k.replace("_", "-"): v for k, v in kw.items()})
    return Provisioning.model_validate(base)


def obs(now: float, latency: float | None = 0.3, serving: int = 2, **kw: Any) -> Observation:
    return Observation(
        now=now, latency=latency, requests_per_second=kw.pop("rps", 50.0), serving=serving, **kw
    )


@dataclass
class Pool:
    """A tiny world that obeys the decisions at once: ups serve at once, downs are gone."""

    serving: int
    decisions: list[Decision] = field(default_factory=list)
    state: ScalerState = field(default_factory=ScalerState)

    def run(
        self,
        p: Provisioning,
        latency: Callable[[float, int], float | None],
        until: float,
        start: float = 0.0,
    ) -> list[Decision]:
        t = start
        while t <= until:
            d, self.state = decide(obs(t, latency(t, self.serving), self.serving), p, self.state)
            self.decisions.append(d)
            if d.action == "up":
                self.serving += d.count
            elif d.action == "down":
                self.serving -= d.count
            t += STEP
        return self.actions()

    def actions(self) -> list[Decision]:
        return [d for d in self.decisions if d.action != "none"]


def feed(
    p: Provisioning, observations: Iterable[Observation], state: ScalerState | None = None
) -> tuple[list[Decision], ScalerState]:
    state = state or ScalerState()
    out = []
    for o in observations:
        d, state = decide(o, p, state)
        out.append(d)
    return out, state


# --- threshold mode -------------------------------------------------------------------------


def test_step_up_after_upscale_time_with_the_numbers_in_the_reason() -> None:
    p = policy()
    ds, _ = feed(p, (obs(t * STEP, 0.612) for t in range(40)))
    ups = [d for d in ds if d.action == "up"]
    # Each observation covers its 5 s interval: 36 of them (0 .. 175 s) fill upscale-time.
    assert all(d.action == "none" for d in ds[:35])
    assert ds[35].action == "up" and ds[35].now == 175.0
    assert len(ups) == 1
    d = ups[0]
    assert (d.count, d.size_before, d.size_after, d.kind) == (1, 2, 3, "scale-up")
    assert d.reason == "scale up 2→3: mean latency 612 ms > 500 ms over 3m; first scale-up"
    assert d.notable


def test_step_down_after_downscale_time() -> None:
    p = policy()
    ds, state = feed(p, (obs(t * STEP, 0.1, serving=3) for t in range(200)))
    downs = [d for d in ds if d.action == "down"]
    assert len(downs) == 1 and downs[0].now == 895.0
    assert downs[0].reason == (
        "scale down 3→2: mean latency 100 ms < 150 ms over 15m; first scale-down"
    )
    assert state.last_down == 895.0 and len(state.samples) < 200 and len(state.wanted) <= 2


def test_pool_grows_under_load_and_shrinks_back() -> None:
    """Latency from a crude capacity model: 2.4 machines' worth of load, then 0.3."""
    p = policy(upscale_every="5m", downscale_every="20m")

    def latency(t: float, n: int) -> float:
        load = 2.4 if 600 <= t < 7200 else 0.3
        rho = load / n
        return 0.1 / (1 - rho) if rho < 0.95 else 2.0

    pool = Pool(serving=1)
    acts = pool.run(p, latency, until=5 * 3600)
    sizes = [d.size_after for d in acts]
    assert sizes == [2, 3, 2, 1], [d.reason for d in acts]
    assert max(d.size_after for d in pool.decisions) <= 4


def test_no_flapping_on_noise_between_the_thresholds() -> None:
    rng = random.Random(7)
    p = policy()
    ds, _ = feed(p, (obs(t * STEP, rng.uniform(0.16, 0.49)) for t in range(6 * 720)))
    assert [d for d in ds if d.action != "none"] == []


def test_no_flapping_on_noise_around_the_upscale_threshold() -> None:
    """Above, below, above...: the mean stays below the threshold, so no scale-up."""
    rng = random.Random(3)
    p = policy()
    lat = (0.52 if rng.random() < 0.2 else 0.48 for i in range(10**9))
    ds, _ = feed(p, (obs(t * STEP, next(lat)) for t in range(6 * 720)))
    assert all(d.action == "none" for d in ds)


def test_spikes_shorter_than_upscale_time_are_ignored() -> None:
    p = policy()
    # 40 s of 1 s latency every 10 minutes, for 6 hours: the 3-minute mean stays below
    # (40 x 1 s + 140 x 0.3 s) / 180 = 456 ms.
    ds, _ = feed(p, (obs(t, 1.0 if t % 600 < 40 else 0.3) for t in range(0, 6 * 3600, 5)))
    assert all(d.action == "none" for d in ds)
    # (While the first window fills, its mean so far is above: "slow", never acted on.)
    assert {d.kind for d in ds} == {"slow", "steady"}


def test_upscale_every_is_a_cooldown_with_the_wait_in_the_reason() -> None:
    p = policy(max_backends=10)
    pool = Pool(serving=2)
    acts = pool.run(p, lambda t, n: 0.9, until=3600)
    # First at 3m, then every 15m (the streak restarts at each scale-up and needs 3m again,
    # which is inside the cooldown).
    assert [d.now for d in acts] == [175.0, 1075.0, 1975.0, 2875.0]
    blocked = [d for d in pool.decisions if d.kind == "cooldown-up"]
    # The window restarted after the scale-up at 175 s: full again 3m later, 12m remain.
    assert blocked[0].now == 355.0
    assert blocked[0].reason.endswith("cooldown: next scale-up in 12m (upscale-every 15m)")
    # Recorded once per cooldown, not every 5 seconds.
    assert sum(d.notable for d in blocked) == 4  # one per scale-up
    assert "last scale-up 15 min ago" in acts[1].reason


def test_downscale_every_counts_from_the_last_scale_down_and_the_last_scale_up() -> None:
    p = policy(max_backends=10, min_backends=1)
    pool = Pool(serving=6)
    acts = pool.run(p, lambda t, n: 0.1, until=4 * 3600)
    assert [d.now for d in acts] == [895.0, 4495.0, 8095.0, 11695.0]  # 15m, then every 1h
    assert "last scale-down 60 min ago" in acts[1].reason

    # A scale-up 10 minutes ago holds a scale-down for downscale-every.
    state = ScalerState(last_up=0.0)
    ds, _ = feed(p, (obs(600 + t * STEP, 0.1, serving=4) for t in range(800)), state)
    downs = [d for d in ds if d.action == "down"]
    assert downs[0].now == 3600.0  # downscale-every after the scale-up
    waits = [d for d in ds if d.kind == "cooldown-down"]
    assert waits[0].reason.endswith(
        "cooldown: next scale-down in 35m05s (downscale-every 1h since the last scale-up)"
    )


def test_a_scale_up_never_waits_for_a_scale_down() -> None:
    p = policy()
    state = ScalerState(last_down=0.0)
    ds, _ = feed(p, (obs(60 + t * STEP, 0.9) for t in range(40)), state)
    assert [d.now for d in ds if d.action == "up"] == [235.0]


# --- bounds ---------------------------------------------------------------------------------


def test_below_min_scales_up_at_once_to_min() -> None:
    p = policy(min_backends=3, max_backends=6)
    d, _ = decide(obs(0, None, serving=0), p, ScalerState(last_up=-1.0))
    assert (d.action, d.count, d.kind) == ("up", 3, "below-min")
    assert d.reason == "scale up 0→3: below min-backends 3"
    # Booting machines count: one serving and two provisioning is min-backends already.
    d, _ = decide(obs(5, 0.3, serving=1, provisioning=2), p, ScalerState())
    assert d.action == "none"


def test_above_max_scales_down_at_once_to_max() -> None:
    p = policy(min_backends=1, max_backends=2)
    d, _ = decide(obs(0, 0.3, serving=4, provisioning=1), p, ScalerState())
    assert (d.action, d.count, d.size_after) == ("down", 3, 2)
    assert d.reason == "scale down 5→2: above max-backends 2"


def test_at_max_is_recorded_once_and_not_acted_on() -> None:
    p = policy(max_backends=4)
    ds, _ = feed(p, (obs(t * STEP, 0.612, serving=4) for t in range(200)))
    assert all(d.action == "none" for d in ds)
    at_max = [d for d in ds if d.kind == "at-max"]
    assert at_max[0].reason == "mean latency 612 ms > 500 ms over 3m, but at max-backends 4"
    assert [d.notable for d in ds].count(True) == 1 and at_max[0].notable


def test_at_min_does_not_scale_down() -> None:
    p = policy(min_backends=2)
    ds, _ = feed(p, (obs(t * STEP, 0.05, serving=2) for t in range(2000)))
    assert all(d.action == "none" for d in ds)
    assert ds[-1].kind == "at-min" and "at min-backends 2" in ds[-1].reason


def test_provisioning_machines_count_toward_max() -> None:
    p = policy(max_backends=4)
    ds, _ = feed(p, (obs(t * STEP, 0.9, serving=3, provisioning=1) for t in range(100)))
    assert all(d.action == "none" for d in ds)
    assert ds[-1].kind == "at-max"


def test_threshold_mode_waits_for_a_booting_machine() -> None:
    p = policy(max_backends=10, upscale_every="1m")
    state = ScalerState(last_up=0.0)
    # The last scale-up's machine is still booting: latency is high, but one more would be a
    # guess; wait and see what the booting one does.
    ds, state = feed(p, (obs(t, 0.9, serving=2, provisioning=1) for t in range(5, 400, 5)), state)
    assert all(d.action == "none" for d in ds)
    assert ds[-1].kind == "booting"
    assert ds[-1].reason.endswith("waiting for 1 new backend(s) to boot")
    # It serves now (three serving), still slow: the streak kept running, so act at once.
    d, _ = decide(obs(405, 0.9, serving=3), p, state)
    assert (d.action, d.size_after) == ("up", 4)


def test_max_step_in_threshold_mode_is_the_step() -> None:
    p = policy(max_backends=10, max_step=3)
    ds, _ = feed(p, (obs(t * STEP, 0.9, serving=2) for t in range(36)))
    assert (ds[-1].action, ds[-1].count) == ("up", 3)
    # ...but never past max-backends.
    p = policy(max_backends=4, max_step=3)
    ds, _ = feed(p, (obs(t * STEP, 0.9, serving=2) for t in range(36)))
    assert (ds[-1].action, ds[-1].count, ds[-1].size_after) == ("up", 2, 4)
    # ...and never below min-backends.
    p = policy(min_backends=2, max_backends=6, max_step=3)
    ds, _ = feed(p, (obs(t * STEP, 0.05, serving=3) for t in range(180)))
    assert (ds[-1].action, ds[-1].count, ds[-1].size_after) == ("down", 1, 2)


@dataclass
class World:
    """Machines that boot, drain and fail at the mercy of hypothesis, and obey the decisions
    the way the task does: ups and replacements are created (booting), downs drain."""

    serving: int
    booting: list[bool] = field(default_factory=list)  # True: a replacement
    failing: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    draining: int = 0
    names: int = 0

    def observation(self, now: float, latency: float | None) -> Observation:
        return Observation(
            now=now,
            latency=latency,
            requests_per_second=20.0,
            serving=self.serving,
            provisioning=len(self.booting),
            draining=self.draining,
            failing=tuple(self.failing),
            replacing=sum(self.booting),
        )

    def physical(self) -> int:
        return self.serving + len(self.booting) + self.draining


@settings(max_examples=150, deadline=None)
@given(
    lo=st.integers(1, 3),
    extra=st.integers(0, 4),
    max_step=st.integers(1, 3),
    mode=st.sampled_from(["threshold", "target"]),
    idle=st.sampled_from(["hold", "scale-down"]),
    start=st.integers(0, 6),
    steps=st.lists(
        st.tuples(
            st.one_of(st.none(), st.floats(0.0, 3.0)),  # latency
            st.integers(0, 3),  # machines that finish booting
            st.integers(0, 2),  # drains that finish
            st.booleans(),  # a serving machine starts failing
        ),
        min_size=1,
        max_size=120,
    ),
)
def test_max_backends_holds_under_any_sequence(
    lo: int,
    extra: int,
    max_step: int,
    mode: str,
    idle: str,
    start: int,
    steps: list[tuple[float | None, int, int, bool]],
) -> None:
    hi = lo + extra
    p = policy(
        min_backends=lo,
        max_backends=hi,
        max_step=max_step,
        mode=mode,
        idle=idle,
        upscale_time="0s",
        upscale_every="0s",
        downscale_time="0s",
        downscale_every="0s",
        target_latency="0.5s",
    )
    world = World(serving=start)
    state = ScalerState()
    for i, (latency, booted, drained, fails) in enumerate(steps):
        o = world.observation(i * STEP, latency)
        was_within = o.size <= hi
        d, state = decide(o, p, state)
        assert d.size_before == o.size
        if was_within:
            assert d.size_after <= hi, d
        if d.action == "up":
            world.booting += [False] * d.count
        elif d.action == "down":
            assert d.size_after >= min(lo, o.size), d
            gone = min(d.count, world.serving)
            world.serving -= gone
            world.draining += gone
        elif d.action == "replace":
            assert d.size_after == d.size_before
            for key in d.replace:
                world.failing.remove(key)
                world.replaced.append(key)
                world.booting.append(True)
        # The world moves on: boots finish (a replacement then retires its failed machine),
        # drains finish, a machine fails.
        for _ in range(min(booted, len(world.booting))):
            if world.booting.pop(0):
                world.replaced.pop(0)  # retired; the new one takes its place in `serving`
            else:
                world.serving += 1
        world.draining -= min(drained, world.draining)
        if fails and world.serving > len(world.failing) + len(world.replaced):
            world.names += 1
            world.failing.append(f"m{world.names}")
        # Replacements in flight never take the machine count past max by more than max-step.
        if was_within:
            assert world.serving + len(world.booting) - sum(world.booting) <= hi
            assert sum(world.booting) <= max_step


# --- replacement ----------------------------------------------------------------------------


def test_replace_a_failing_backend() -> None:
    p = policy()
    d, state = decide(obs(0, 0.3, serving=3, failing=("b", "a")), p, ScalerState())
    assert (d.action, d.replace, d.count, d.size_after) == ("replace", ("a",), 1, 3)
    assert d.reason == "replace a: failing health checks for 3m; pool stays at 3"
    assert d.notable
    # The task reports the replacement in flight and leaves "a" out of failing: "b" waits for
    # a free slot (max-step 1).
    d, state = decide(obs(5, 0.3, serving=3, provisioning=1, replacing=1, failing=("b",)), p, state)
    assert d.action == "none"
    # The new machine serves, "a" is retired: now "b".
    d, state = decide(obs(10, 0.3, serving=3, failing=("b",)), p, state)
    assert (d.action, d.replace) == ("replace", ("b",))


def test_a_key_is_never_replaced_twice_while_its_replacement_boots() -> None:
    """Even when the task keeps reporting it failing (the safety net in the state)."""
    p = policy(max_step=2)
    d, state = decide(obs(0, 0.3, serving=3, failing=("a",)), p, ScalerState())
    assert d.replace == ("a",)
    for t in range(5, 300, 5):
        d, state = decide(obs(t, 0.3, serving=3, provisioning=1, failing=("a",)), p, state)
        assert d.action == "none", d
    # The create failed (nothing provisioning), "a" still fails: replace it again.
    d, state = decide(obs(300, 0.3, serving=3, failing=("a",)), p, state)
    assert d.replace == ("a",)


def test_replacements_in_flight_are_bounded_by_max_step() -> None:
    p = policy(max_step=2)
    d, _ = decide(obs(0, 0.3, serving=4, failing=("d", "c", "b", "a")), p, ScalerState())
    assert d.replace == ("a", "b")
    d, _ = decide(
        obs(0, 0.3, serving=4, provisioning=1, replacing=1, failing=("d", "c")), p, ScalerState()
    )
    assert d.replace == ("c",)


def test_replacement_comes_before_scaling_but_the_streak_keeps_running() -> None:
    p = policy(max_backends=6)
    _, state = feed(p, (obs(t * STEP, 0.9, serving=3) for t in range(35)))
    d, state = decide(obs(175, 0.9, serving=3, failing=("x",)), p, state)
    assert d.action == "replace"
    d, state = decide(obs(180, 0.9, serving=3, provisioning=1, replacing=1), p, state)
    assert (d.action, d.size_before, d.size_after) == ("up", 3, 4)  # a replacement is no boot


# --- target mode ----------------------------------------------------------------------------


def test_target_mode_scales_toward_desired_by_max_step() -> None:
    p = policy(mode="target", target_latency="300ms", max_backends=10, max_step=2)
    ds, _ = feed(p, (obs(t * STEP, 0.9, serving=2) for t in range(36)))
    assert [d.action for d in ds[:35]] == ["none"] * 35
    d = ds[35]
    assert (d.action, d.count, d.desired) == ("up", 2, 6)
    assert d.reason == (
        "scale up 2→4: mean latency 900 ms over 3m on 2 vs target 300 ms: wants 6; first scale-up"
    )


def test_target_mode_counts_booting_machines_toward_desired() -> None:
    p = policy(mode="target", target_latency="300ms", max_backends=10, max_step=5)
    # Two serve at 900 ms: the pool wants 6; four are booting already, so one more.
    ds, _ = feed(p, (obs(t * STEP, 0.9, serving=2, provisioning=3) for t in range(36)))
    assert (ds[-1].action, ds[-1].count, ds[-1].size_after) == ("up", 1, 6)
    ds, _ = feed(p, (obs(t * STEP, 0.9, serving=2, provisioning=4) for t in range(36)))
    assert all(d.action == "none" for d in ds) and ds[-1].kind == "steady"


def test_target_mode_scale_down_and_exact_ratios() -> None:
    p = policy(
        mode="target", target_latency="300ms", max_backends=10, max_step=2, downscale_tolerance=0
    )
    ds, _ = feed(p, (obs(t * STEP, 0.1, serving=5) for t in range(180)))
    d = ds[-1]
    # ceil(5 * 100 / 300) = 2: down by max-step 2.
    assert (d.action, d.count, d.desired, d.size_after) == ("down", 2, 2, 3)
    # 2 * 150 / 300 is exactly 1, not a hair more: one is enough.
    d, _ = decide(obs(0, 0.15, serving=2), p, ScalerState())
    assert d.desired == 1 and d.kind == "fast"
    # On target: steady.
    d, _ = decide(obs(0, 0.3, serving=3), p, ScalerState())
    assert d.kind == "steady" and d.desired == 3


def test_target_mode_scales_down_only_to_a_size_that_keeps_the_margin() -> None:
    """Issue 10, item 7: downscale-tolerance (default 0.4) is the hysteresis that stops a
    wandering load from flapping between two sizes."""
    p = policy(mode="target", target_latency="300ms", max_backends=10, max_step=2)
    assert p.downscale_tolerance == 0.4
    # 5 backends at 100 ms: 4 would read 125 ms and 3 about 167 ms, both under 180 ms (0.6 of
    # the target); 2 would read 250 ms. Down to 3, not to 2 (which tolerance 0 would pick).
    ds, _ = feed(p, (obs(t * STEP, 0.1, serving=5) for t in range(180)))
    d = ds[-1]
    assert (d.action, d.count, d.desired, d.size_after) == ("down", 2, 3, 3)
    assert "wants 3 keeping 0.4 below it" in d.reason
    # 3 backends at 170 ms: 2 would read 255 ms, under the target but not 40 % under it.
    ds, _ = feed(p, (obs(t * STEP, 0.17, serving=3) for t in range(180)))
    assert all(d.action == "none" for d in ds) and ds[-1].kind == "steady"
    # 3 at 110 ms: 2 would read 165 ms: down.
    ds, _ = feed(p, (obs(t * STEP, 0.11, serving=3) for t in range(180)))
    assert (ds[-1].action, ds[-1].size_after) == ("down", 2)
    # The margin is for scaling down only: 2 at 340 ms (above the 10 % band) scale up.
    ds, _ = feed(p, (obs(t * STEP, 0.34, serving=2) for t in range(36)))
    assert (ds[-1].action, ds[-1].size_after) == ("up", 3)


def test_target_mode_at_max_says_what_it_wanted() -> None:
    p = policy(mode="target", target_latency="300ms", max_backends=4)
    ds, _ = feed(p, (obs(t * STEP, 1.2, serving=4) for t in range(40)))
    assert ds[-1].kind == "at-max"
    assert ds[-1].reason.startswith("mean latency 1200 ms over 3m on 4 vs target 300 ms: wants 16")
    assert ds[-1].reason.endswith("but at max-backends 4")


def test_target_mode_leaves_failing_backends_out_of_the_estimate() -> None:
    p = policy(mode="target", target_latency="300ms", max_backends=10)
    # "z" is failing and its replacement boots: 3 backends produced 600 ms, twice the target.
    o = obs(0, 0.6, serving=4, provisioning=1, failing=("z",))
    d, _ = decide(o, p, ScalerState(replaced=("z",)))
    assert (d.action, d.desired, d.kind) == ("none", 6, "slow")
    o = obs(0, 0.6, serving=4, provisioning=1, replacing=1)  # the same, as the task reports it
    d, _ = decide(o, p, ScalerState())
    assert (d.action, d.desired, d.kind) == ("none", 6, "slow")
    # ...and when the task reports both, "z" is not counted out twice.
    o = obs(0, 0.6, serving=4, provisioning=1, replacing=1, failing=("z",))
    d, _ = decide(o, p, ScalerState(replaced=("z",)))
    assert (d.action, d.desired, d.kind) == ("none", 6, "slow")


# --- idle -----------------------------------------------------------------------------------


def test_idle_hold_keeps_the_size_and_restarts_the_streaks() -> None:
    p = policy(idle="hold")
    ds, state = feed(p, (obs(t * STEP, 0.9) for t in range(30)))  # 2m30s slow
    assert len(state.samples) == 30
    d, state = decide(obs(150, None, rps=0.0), p, state)
    assert (d.action, d.kind, d.notable) == ("none", "idle", True)
    assert d.reason == 'idle: no request completed; holding at 2 (idle = "hold")'
    assert state.samples == ()
    d, state = decide(obs(155, 0.02, rps=0.2), p, state)
    assert d.reason == 'idle: 0.2 req/s < min-requests 1/s; holding at 2 (idle = "hold")'
    assert not d.notable  # the same reason as before
    # Slow again: the streak starts over, so no scale-up at 3m from the first one.
    ds, _ = feed(p, (obs(160 + t * STEP, 0.9) for t in range(35)), state)
    assert all(d.action == "none" for d in ds)
    # A night of nothing never shrinks the pool.
    ds, _ = feed(p, (obs(t * STEP, None, serving=4, rps=0.0) for t in range(12 * 720)))
    assert all(d.action == "none" for d in ds)


def test_idle_scale_down_counts_as_fast() -> None:
    p = policy(idle="scale-down", min_backends=1)
    pool = Pool(serving=3)
    acts = pool.run(p, lambda t, n: None, until=3 * 3600)
    assert [(d.now, d.size_after) for d in acts] == [(895.0, 2), (4495.0, 1)]
    assert acts[0].reason.startswith(
        "scale down 3→2: mean latency 0 ms < 150 ms over 15m (no request completed; idle = "
        '"scale-down")'
    )
    # Below min-requests counts as idle too, whatever the latency says.
    ds, _ = feed(p, (obs(t * STEP, 2.0, serving=3, rps=0.5) for t in range(180)))
    assert ds[-1].action == "down"


# --- victims, reasons, settings -------------------------------------------------------------


def test_pick_victims_unhealthy_then_fewest_in_flight_then_newest() -> None:
    cands = [
        Candidate("old-idle", True, 0, 100.0),
        Candidate("new-idle", True, 0, 500.0),
        Candidate("busy", True, 7, 900.0),
        Candidate("sick", False, 9, 10.0),
        Candidate("new-idle-b", True, 0, 500.0),
        Candidate("one", True, 1, 1000.0),
    ]
    assert pick_victims(cands, 6) == ["sick", "new-idle", "new-idle-b", "old-idle", "one", "busy"]
    assert pick_victims(cands, 2) == ["sick", "new-idle"]
    assert pick_victims(cands, 0) == []
    assert pick_victims(list(reversed(cands)), 3) == pick_victims(cands, 3)
    assert pick_victims([], 2) == []


def test_every_reason_has_its_numbers() -> None:
    p = policy(max_backends=8, upscale_every="1h")
    pool = Pool(serving=2)
    pool.run(p, lambda t, n: 0.75, until=1200)
    reasons: dict[str, str] = {}
    for d in pool.decisions:
        reasons.setdefault(d.kind, d.reason)
    assert reasons["slow"].startswith("mean latency 750 ms > 500 ms over 5s of 3m")
    assert reasons["slow"].endswith("; scale up after 3m")
    assert reasons["scale-up"] == (
        "scale up 2→3: mean latency 750 ms > 500 ms over 3m; first scale-up"
    )
    assert "cooldown: next scale-up in 57m (upscale-every 1h)" in reasons["cooldown-up"]
    d, _ = decide(obs(0, 0.3), p, ScalerState())
    assert d.reason == "mean latency 300 ms over 5s of 3m between 150 ms and 500 ms; 2 backend(s)"


def test_the_same_inputs_give_the_same_decision_in_dry_run() -> None:
    seq = [obs(t * STEP, 0.9) for t in range(50)]
    a, _ = feed(policy(), seq)
    b, _ = feed(policy(dry_run=True), seq)
    assert a == b


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (45, "45s"), (60, "1m"), (185, "3m05s"), (3600, "1h"), (3720, "1h02m")],
)
def test_durations_read_well(seconds: float, text: str) -> None:
    assert span(seconds) == text


def test_provisioning_settings_validate() -> None:
    assert policy().mode == "threshold" and policy().idle == "hold"
    with pytest.raises(ValueError, match="target-latency"):
        policy(target_latency="0s")
    with pytest.raises(ValueError, match="downscale-latency"):
        policy(downscale_latency="600ms", upscale_latency="500ms")
    # A disabled Go file with odd values still loads.
    Provisioning.model_validate({"downscale-latency": "1s", "upscale-latency": "500ms"})


# --- issue 10: the 2015 windows, the tolerance band, stabilisation, min-backends ------------


@pytest.mark.parametrize("seed", range(20))
def test_a_mostly_slow_pool_scales_up_within_about_upscale_time(seed: int) -> None:
    """80 % of intervals above 500 ms (mean about 690 ms): the 3-minute mean is far above the
    threshold, so the scale-up comes once 3 minutes are observed, however the slow intervals
    are interleaved (an unbroken run of them took hours)."""
    rng = random.Random(seed)
    p = policy()

    def latency() -> float:
        return rng.uniform(0.52, 0.95) if rng.random() < 0.8 else rng.uniform(0.2, 0.48)

    ds, _ = feed(p, (obs(t * STEP, latency()) for t in range(60)))
    ups = [d.now for d in ds if d.action == "up"]
    assert ups and ups[0] <= p.upscale_time + STEP, [d.reason for d in ds[30:40]]


def test_the_windows_are_time_weighted() -> None:
    """A long interval (the task was late) weighs its length, not one sample."""
    p = policy(upscale_time="60s")
    state = ScalerState()
    # 55 s at 200 ms in one observation, then 5 s at 3 s: (55 x 0.2 + 5 x 3) / 60 = 433 ms.
    for t, lat in ((0, 0.2), (55, 0.2), (60, 3.0)):
        d, state = decide(obs(t, lat), p, state)
    assert d.action == "none" and d.reason.startswith("mean latency 433 ms over 1m between")


def test_target_mode_tolerance_band() -> None:
    p = policy(mode="target", target_latency="300ms", max_backends=10)
    # 320 ms on 2 is 1.07 x the target: within 0.1, no change (it used to want 3).
    ds, _ = feed(p, (obs(t * STEP, 0.32) for t in range(200)))
    assert all(d.action == "none" for d in ds) and ds[-1].kind == "steady"
    assert "within 0.1 of it: wants 2" in ds[-1].reason
    ds, _ = feed(p.model_copy(update={"tolerance": 0.0}), (obs(t * STEP, 0.32) for t in range(40)))
    assert [d.size_after for d in ds if d.action == "up"] == [3]


def test_scale_down_waits_for_the_highest_size_wanted_in_the_stabilisation_window() -> None:
    p = policy(downscale_time="5m", downscale_stabilization="20m", downscale_every="0s")
    assert policy().stabilization == 900.0  # default: downscale-time
    # Slow for 3m (wants 3 at 2), then fast: the 3 wanted at 175 s holds the pool at 2 until
    # 20m later, although the 5-minute mean is fast long before.
    seq = [obs(t * STEP, 0.9) for t in range(30)] + [obs(150 + t * STEP, 0.1) for t in range(400)]
    ds, _ = feed(p.model_copy(update={"max_backends": 2}), seq)
    downs = [d for d in ds if d.action == "down"]
    assert downs and downs[0].now >= 150 + 20 * 60
    assert any(d.kind == "stabilizing" for d in ds)


def test_min_backends_below_1_is_refused() -> None:
    with pytest.raises(ValueError, match=r"min-backends \(0\) must be at least 1"):
        Provisioning.model_validate({"min-backends": 0, "max-backends": 2})


def test_max_health_failures_is_seconds_of_failure_whatever_the_check_interval() -> None:
    """180 means 3 minutes (Go checked every second), with checks every 2 s while down."""
    from doproxy.core.health import Health

    h = Health(rise=2, fall=5)
    for t in range(0, 182, 2):
        h.record(False, 1000.0 + t)
    assert h.failures == 91  # far from 180 checks...
    assert h.failing_for(1000.0 + 178) < 180 <= h.failing_for(1000.0 + 180)  # ...but 3 minutes
    h.record(True, 1182.0)  # one pass ends the run
    assert h.failing_for(1200.0) == 0.0


def test_repairs_respect_the_cooldowns() -> None:
    """Issue 10, item 11: a below-min repair counts as a scale-up, and the machine that comes
    back (a reboot, a manual enable) does not get the newest destroyed at once."""
    p = policy(min_backends=2, max_backends=2, downscale_every="1h")
    # One of two vanished: repaired at once.
    d, state = decide(obs(0, 0.3, serving=1), p, ScalerState())
    assert (d.action, d.kind, d.size_after) == ("up", "below-min", 2)
    assert state.last_up == 0
    # The lost one comes back a minute later: 3 > max 2, but the repair was 1 min ago.
    d, state = decide(obs(60, 0.3, serving=3), p, state)
    assert (d.action, d.kind, d.notable) == ("none", "cooldown-down", True)
    assert d.reason == (
        "above max-backends 2; cooldown: scale down 3→2 in 59m "
        "(downscale-every 1h since the last scale-up)"
    )
    d, state = decide(obs(3599, 0.3, serving=3), p, state)
    assert d.action == "none"
    d, state = decide(obs(3600, 0.3, serving=3), p, state)
    assert (d.action, d.kind, d.size_after) == ("down", "above-max", 2)
    assert state.last_down == 3600
    # Without a recent scale-up a lowered max-backends acts at once.
    d, _ = decide(obs(0, 0.3, serving=4), p, ScalerState())
    assert (d.action, d.kind, d.count) == ("down", "above-max", 2)


def test_a_latency_scale_down_waits_downscale_every_after_a_repair() -> None:
    p = policy(min_backends=2, max_backends=4, downscale_every="1h")
    _, state = decide(obs(0, 0.05, serving=1), p, ScalerState())  # repaired to 2
    ds, _ = feed(p, (obs(5 + t * STEP, 0.05, serving=3) for t in range(800)), state)
    downs = [d for d in ds if d.action == "down"]
    assert downs and downs[0].now >= 3600
    assert any(d.kind == "cooldown-down" for d in ds)


# --- max-cost-per-hour (issue 14, part 3) ----------------------------------------------------

PRICE = 0.00893  # a s-1vcpu-1gb droplet per hour ($6 a month)


def test_max_cost_per_hour_stops_a_scale_up_as_max_backends_does() -> None:
    # Two droplets cost $0.018/h; a third would make $0.027/h, above the $0.02/h cap.
    p = policy(max_backends=10, max_cost_per_hour=0.02)
    ds, _ = feed(p, (obs(t * STEP, 0.612, cost=2 * PRICE, price=PRICE) for t in range(200)))
    assert all(d.action == "none" for d in ds)
    capped = [d for d in ds if d.kind == "at-max-cost"]
    assert capped and capped[0] is ds[35]  # once the upscale window is full
    assert capped[0].reason == (
        "mean latency 612 ms > 500 ms over 3m, but at max-cost-per-hour $0.02/h: the pool "
        "costs $0.018/h, a backend $0.0089/h"
    )
    # Notable once, when it begins binding (logged and kept in the history once).
    assert [d.notable for d in ds].count(True) == 1 and capped[0].notable
    assert all(d.cost_before == d.cost_after == 2 * PRICE for d in capped)


def test_max_cost_per_hour_cuts_the_step_to_what_it_allows() -> None:
    p = policy(mode="target", target_latency="300ms", max_backends=10, max_step=4)
    cheap = policy(
        mode="target",
        target_latency="300ms",
        max_backends=10,
        max_step=4,
        max_cost_per_hour=4 * PRICE + 1e-6,
    )
    obs_ = [obs(t * STEP, 0.9, cost=2 * PRICE, price=PRICE) for t in range(36)]
    free, _ = feed(p, obs_)
    assert (free[-1].action, free[-1].count) == ("up", 4)
    ds, _ = feed(cheap, obs_)
    d = ds[-1]
    assert (d.action, d.count, d.size_after, d.kind) == ("up", 2, 4, "scale-up")
    assert d.reason.endswith("(max-cost-per-hour $0.036/h allows 2 more at $0.0089/h)")
    assert d.cost_before == pytest.approx(2 * PRICE)
    assert d.cost_after == pytest.approx(4 * PRICE)


def test_cost_before_and_after_on_every_decision() -> None:
    p = policy()
    ds, _ = feed(p, (obs(t * STEP, 0.612, cost=0.05, price=0.01) for t in range(36)))
    d = ds[-1]
    assert d.action == "up"
    assert (d.cost_before, d.cost_after) == (0.05, pytest.approx(0.06))
    assert ds[0].cost_before == ds[0].cost_after == 0.05  # no action: no change
    # Without a price for a new machine the cost after an action is unknown.
    ds, _ = feed(p, (obs(t * STEP, 0.612, cost=0.05) for t in range(36)))
    assert (ds[-1].cost_before, ds[-1].cost_after) == (0.05, None)
    # Without costs at all (a task that does not measure them): None, as before.
    ds, _ = feed(p, (obs(t * STEP, 0.612) for t in range(36)))
    assert (ds[-1].cost_before, ds[-1].cost_after) == (None, None)


def test_max_cost_per_hour_is_not_checked_without_a_price_and_says_so() -> None:
    p = policy(max_cost_per_hour=0.01)
    ds, _ = feed(p, (obs(t * STEP, 0.612, cost=0.05) for t in range(36)))
    d = ds[-1]
    assert d.action == "up"
    assert d.reason.endswith(
        "(max-cost-per-hour $0.01/h not checked: a new backend's price is unknown)"
    )


def test_free_backends_and_no_cap_never_bind() -> None:
    for p, price in ((policy(max_cost_per_hour=0.01), 0.0), (policy(), PRICE)):
        ds, _ = feed(p, (obs(t * STEP, 0.612, cost=1.0, price=price) for t in range(36)))
        assert ds[-1].action == "up" and "max-cost" not in ds[-1].reason


def test_the_cost_cap_holds_back_neither_the_min_backends_repair_nor_replacements() -> None:
    p = policy(min_backends=3, max_cost_per_hour=0.01)
    d, _ = decide(obs(0, 0.3, serving=1, cost=PRICE, price=PRICE), p, ScalerState())
    assert (d.action, d.size_after) == ("up", 3)
    assert d.cost_after == pytest.approx(3 * PRICE)
    p = policy(max_cost_per_hour=0.01)
    d, _ = decide(obs(0, 0.3, serving=2, failing=("7",), cost=0.02, price=PRICE), p, ScalerState())
    assert d.action == "replace"
    # Above the cap (it was lowered): no scale-down for cost, only no scale-up.
    ds, _ = feed(p, (obs(t * STEP, 0.612, serving=2, cost=0.05, price=PRICE) for t in range(400)))
    assert all(d.action == "none" for d in ds)
    assert ds[-1].kind == "at-max-cost"
