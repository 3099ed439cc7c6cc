"""`doproxy simulate`: the autoscale policy on a modelled workload, with a virtual clock.

Theory of operation
-------------------
Nothing real runs and no time passes: a loop advances a virtual clock one `tick` (1 s) at a
time and feeds the real decision function (doproxy.core.autoscale.decide) one Observation
per `[provisioning] interval`, exactly as the autoscaler task does.

The pool is a fluid model of capacity-limited servers. Each backend serves `concurrency`
requests at a time, each taking `service-time` on average: its capacity is concurrency /
service-time requests per second. Requests are spread evenly over the serving backends.

- Below capacity, the latency is an M/M/c queue's mean response time (Erlang C): the service
  time at low load, rising sharply as utilisation nears 1.
- Above capacity, a backlog builds up (arrivals minus what the pool serves) and every request
  also waits for the backlog ahead of it to drain. Requests that would wait longer than
  `give-up` seconds are dropped, as a client timeout would.
- The queues follow the arrival rate smoothed over `settle` seconds (a queue takes time to
  build), a measured latency carries a little noise (lognormal), and arrivals are
  Poisson-ish.

What the decisions do: a scale-up creates machines that serve after `boot-time` (they count
as provisioning meanwhile); a scale-down picks its victims with the real pick_victims rule and
stops sending them requests at once; they are billed until their in-flight requests finish
(the current latency, at most `drain-timeout`). Machine-minutes count every machine that
exists: serving, booting or draining.

The workloads are functions of time in "machines' worth" of load, so they suit any model:
step, ramp, spike (short bursts that should be ignored, then a sustained surge) and noisy
(a steady load with heavy short-term noise and a slow wander). The rng is injected (seeded),
so a run is reproducible.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from doproxy.core.autoscale import (
    Candidate,
    Decision,
    Observation,
    ScalerState,
    decide,
    pick_victims,
)
from doproxy.core.autoscale import span as format_span
from doproxy.core.durations import parse_duration
from doproxy.core.settings import Provisioning
from doproxy.errors import DoproxyError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

log = logging.getLogger(__name__)

WORKLOADS = ("step", "ramp", "spike", "noisy")

# The policy when no config file is found: the Go design's thresholds, quicker timings so a
# three-hour run shows whole cycles, room for six backends.
DEMO_POLICY = Provisioning.model_validate(
    {
        "enable": True,
        "min-backends": 1,
        "max-backends": 6,
        "upscale-latency": "500ms",
        "upscale-time": "2m",
        "upscale-every": "5m",
        "downscale-latency": "150ms",
        "downscale-time": "10m",
        "downscale-every": "15m",
        "max-step": 1,
        "interval": "5s",
    }
)


@dataclass(frozen=True)
class Model:
    """One backend, and how the pool around it behaves."""

    service_time: float = 0.1  # s per request on an idle backend
    concurrency: int = 1  # requests a backend works on at once (workers, cores)
    boot_time: float = 90.0  # s from create to serving
    give_up: float = 30.0  # s: a request that would wait longer is dropped
    noise: float = 0.05  # relative noise of a measured latency
    tick: float = 1.0  # s of virtual time per step
    # s: the queues follow the arrival rate smoothed over this much time; a queue does not
    # reach its steady state in one second, so a one-second burst is not a slow second.
    settle: float = 10.0

    @property
    def capacity(self) -> float:
        """Requests per second one backend serves at full utilisation."""
        return self.concurrency / self.service_time

    def latency(self, rate: float) -> float:
        """Mean response time of one backend offered `rate` req/s (M/M/c, Erlang C); at or
        above capacity, the value at 97 % (the backlog term adds the rest)."""
        c = self.concurrency
        a = min(rate * self.service_time, 0.97 * c)  # offered load in erlangs
        if a <= 0:
            return self.service_time
        erlang_b = 1.0
        for k in range(1, c + 1):
            erlang_b = a * erlang_b / (k + a * erlang_b)
        rho = a / c
        erlang_c = erlang_b / (1 - rho * (1 - erlang_b))
        return self.service_time * (1 + erlang_c / (c * (1 - rho)))


@dataclass(frozen=True)
class Workload:
    """The offered load over time, in machines' worth (times Model.capacity is req/s)."""

    name: str
    rate: Callable[[float], float]  # virtual time (s) -> load; called once per tick, in order
    initial: float  # the load at the start, without noise: it sizes the starting pool


def workload(name: str, duration: float, rng: random.Random) -> Workload:
    """One of WORKLOADS, shaped to `duration`. The noisy one draws from `rng` as it goes."""
    d = duration
    if name == "step":
        return Workload(name, lambda t: 3.0 if d / 9 <= t < d / 2 else 0.4, 0.4)
    if name == "ramp":

        def ramp(t: float) -> float:
            up, top, down = d / 12, d / 2, 11 * d / 12
            if t < up or t >= down:
                return 0.3
            if t < top:
                return 0.3 + 3.0 * (t - up) / (top - up)
            return 3.3 - 3.0 * (t - top) / (down - top)

        return Workload(name, ramp, 0.3)
    if name == "spike":
        # Bursts shorter than the usual upscale-time at 2 and 2.5 times the load, then a surge
        # that lasts.
        bursts = [(0.15, 40.0, 2.0), (0.3, 60.0, 2.5), (0.45, 45.0, 2.0)]

        def spike(t: float) -> float:
            for at, length, factor in bursts:
                if at * d <= t < at * d + length:
                    return 1.1 * factor
            if 0.6 * d <= t < 0.6 * d + d / 6:
                return 2.6
            return 1.1

        return Workload(name, spike, 1.1)
    if name == "noisy":
        wander = [0.0]

        def noisy(t: float) -> float:
            # A slow random walk pulled back to the mean (about 8 minutes' memory, +-16 %),
            # plus heavy second-to-second noise.
            wander[0] = 0.998 * wander[0] + rng.gauss(0.0, 0.01)
            return max(1.2 * (1.0 + wander[0] + rng.gauss(0.0, 0.25)), 0.0)

        return Workload(name, noisy, 1.2)
    raise ValueError(f"unknown workload {name!r}; one of {', '.join(WORKLOADS)}")


def steady_phases(name: str, duration: float) -> list[tuple[float, float]]:
    """The spans of a workload over which its load does not change course: (start, end)."""
    d = duration
    if name == "step":
        return [(0.0, d / 9), (d / 9, d / 2), (d / 2, d)]
    if name == "ramp":
        return [(0.0, d / 12), (d / 12, d / 2), (d / 2, 11 * d / 12), (11 * d / 12, d)]
    if name == "spike":
        return [(0.0, 0.6 * d), (0.6 * d, 0.6 * d + d / 6), (0.6 * d + d / 6, d)]
    return [(0.0, d)]


def direction_changes(res: Result, phases: Sequence[tuple[float, float]]) -> list[int]:
    """Per phase, how often a scale action went the other way from the one before it in that
    phase: 0 or 1 is a policy that settles, more is flapping."""
    out = []
    for start, end in phases:
        dirs = [
            d.action for d in res.actions if start <= d.now < end and d.action in ("up", "down")
        ]
        out.append(sum(a != b for a, b in itertools.pairwise(dirs)))
    return out


@dataclass
class _Machine:
    key: str
    started: float
    until: float = 0.0  # booting: ready at; draining: gone at


@dataclass
class Result:
    workload: str
    policy: Provisioning
    model: Model
    duration: float
    # One entry per decision interval: what the scaler saw.
    times: list[float] = field(default_factory=list)
    offered: list[float] = field(default_factory=list)  # req/s
    rps: list[float] = field(default_factory=list)  # completed req/s
    latency: list[float | None] = field(default_factory=list)
    serving: list[int] = field(default_factory=list)
    provisioning: list[int] = field(default_factory=list)
    draining: list[int] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)  # the notable ones
    machine_seconds: float = 0.0
    offered_total: float = 0.0
    dropped: float = 0.0

    @property
    def actions(self) -> list[Decision]:
        return [d for d in self.decisions if d.action != "none"]

    @property
    def max_latency(self) -> float:
        return max((x for x in self.latency if x is not None), default=0.0)

    @property
    def peak_size(self) -> int:
        return max((s + p for s, p in zip(self.serving, self.provisioning, strict=True)), default=0)

    @property
    def slow_seconds(self) -> float:
        """Time the scaler saw latency above upscale-latency (threshold) or target-latency."""
        limit = _limit(self.policy)
        step = self.policy.interval
        return sum(step for x in self.latency if x is not None and x > limit)


def _limit(policy: Provisioning) -> float:
    return policy.upscale_latency if policy.mode == "threshold" else policy.target_latency


def simulate(
    policy: Provisioning,
    load: Workload,
    duration: float,
    model: Model | None = None,
    rng: random.Random | None = None,
    start: int | None = None,
) -> Result:
    """Run `policy` on `load` for `duration` virtual seconds. `start` is the initial pool size
    (default: the smallest that carries the initial load below 70 % utilisation)."""
    m = model or Model()
    rng = rng or random.Random(0)
    res = Result(load.name, policy, m, duration)
    lo, hi = policy.min_backends, policy.max_backends
    if start is None:
        start = max(math.ceil(load.initial / 0.7 - 1e-9), 1)
    start = min(max(start, lo), hi)
    serial = 0

    def new(t: float, until: float = 0.0) -> _Machine:
        nonlocal serial
        serial += 1
        return _Machine(f"sim-{serial:03d}", t, until)

    serving = [new(-3600.0) for _ in range(start)]
    booting: list[_Machine] = []
    draining: list[_Machine] = []
    state = ScalerState()
    backlog = 0.0
    lat_sum = done = offered = 0.0
    current = m.service_time
    smoothed = 0.0  # the arrival rate as the queues feel it (they do not settle in a second)
    settle = 1.0 - math.exp(-m.tick / m.settle)
    next_decision = policy.interval
    t = 0.0
    while t < duration:
        # Machines become ready, drains finish.
        for mach in [b for b in booting if b.until <= t]:
            booting.remove(mach)
            serving.append(mach)
        draining = [v for v in draining if v.until > t]
        res.machine_seconds += (len(serving) + len(booting) + len(draining)) * m.tick

        # One tick of traffic.
        rate = load.rate(t) * m.capacity
        mean = rate * m.tick
        arrivals = max(rng.gauss(mean, math.sqrt(mean)), 0.0) if mean > 0 else 0.0
        offered += arrivals
        res.offered_total += arrivals
        capacity = len(serving) * m.capacity
        served = min(backlog + arrivals, capacity * m.tick)
        backlog += arrivals - served
        limit = m.give_up * capacity
        if backlog > limit:
            res.dropped += backlog - limit
            backlog = limit
        smoothed += (arrivals / m.tick - smoothed) * settle
        if served > 0:
            wait = backlog / capacity if capacity > 0 else 0.0
            per_backend = min(smoothed, capacity) / max(len(serving), 1)
            current = (m.latency(per_backend) + wait) * math.exp(rng.gauss(0.0, m.noise))
            lat_sum += current * served
            done += served
        t += m.tick

        if t + 1e-9 < next_decision:
            continue
        # One decision per interval, on what the interval measured.
        next_decision += policy.interval
        latency = lat_sum / done if done > 0 else None
        obs = Observation(
            now=t,
            latency=latency,
            requests_per_second=done / policy.interval,
            serving=len(serving),
            provisioning=len(booting),
            draining=len(draining),
        )
        res.times.append(t)
        res.offered.append(offered / policy.interval)
        res.rps.append(done / policy.interval)
        res.latency.append(latency)
        lat_sum = done = offered = 0.0
        decision, state = decide(obs, policy, state)
        if decision.notable:
            res.decisions.append(decision)
        if decision.action == "up":
            booting += [new(t, t + m.boot_time) for _ in range(decision.count)]
        elif decision.action == "down":
            cands = [Candidate(s.key, True, 0, s.started) for s in serving]
            for key in pick_victims(cands, decision.count):
                victim = next(s for s in serving if s.key == key)
                serving.remove(victim)
                victim.until = t + min(policy.drain_timeout, current)
                draining.append(victim)
        res.serving.append(len(serving))
        res.provisioning.append(len(booting))
        res.draining.append(len(draining))
    return res


# --- output ---------------------------------------------------------------------------------


def describe(policy: Provisioning) -> str:
    """The policy in one line."""
    if policy.mode == "threshold":
        how = (
            f"threshold: up when > {policy.upscale_latency * 1000:g} ms for "
            f"{format_span(policy.upscale_time)} (every {format_span(policy.upscale_every)}), "
            f"down when < {policy.downscale_latency * 1000:g} ms for "
            f"{format_span(policy.downscale_time)} (every {format_span(policy.downscale_every)})"
        )
    else:
        how = (
            f"target {policy.target_latency * 1000:g} ms: up after "
            f"{format_span(policy.upscale_time)} (every {format_span(policy.upscale_every)}) "
            f"beyond +{policy.tolerance:g}, down after {format_span(policy.downscale_time)} "
            f"(every {format_span(policy.downscale_every)}) to stay "
            f"-{policy.downscale_tolerance:g} under it"
        )
    return (
        f"{how}; {policy.min_backends}..{policy.max_backends} backends, "
        f"max-step {policy.max_step}, idle = {policy.idle}"
    )


def _clock(t: float) -> str:
    s = round(t)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def summary(res: Result) -> str:
    m = res.model
    lines = [
        f"workload {res.workload}, {format_span(res.duration)} of virtual time",
        f"  model: {m.concurrency} x {m.service_time * 1000:g} ms per backend "
        f"({m.capacity:g} req/s each), boot {format_span(m.boot_time)}",
    ]
    for d in res.decisions:
        mark = "*" if d.action != "none" else " "
        lines.append(f"  {_clock(d.now)} {mark} {d.reason}")
    ups = sum(d.action == "up" for d in res.decisions)
    downs = sum(d.action == "down" for d in res.decisions)
    lost = 100.0 * res.dropped / res.offered_total if res.offered_total else 0.0
    changes = direction_changes(res, steady_phases(res.workload, res.duration))
    lines.append(f"  direction changes per phase of the workload: {', '.join(map(str, changes))}")
    lines.append(
        f"  result: {ups} scale-up(s), {downs} scale-down(s); max latency "
        f"{res.max_latency * 1000:.0f} ms; above {_limit(res.policy) * 1000:g} ms for "
        f"{format_span(res.slow_seconds)}; peak {res.peak_size} backends; "
        f"{res.machine_seconds / 60:.0f} machine-minutes; "
        f"{res.dropped:.0f} requests dropped ({lost:.2g} %, waited > {m.give_up:g} s)"
    )
    return "\n".join(lines)


def plot(results: Sequence[Result], path: str | Path) -> None:
    """One column per result: load, latency, pool size, decisions. Needs matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, MultipleLocator
    except ImportError:
        raise DoproxyError(
            "--plot needs matplotlib, an optional extra: pip install 'doproxy[plot]'"
        ) from None

    cols = len(results)
    fig = Figure(figsize=(10.5 if cols == 1 else 4.6 * cols, 9.0), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, without pyplot's global state
    axes = fig.subplots(4, cols, sharex="col", squeeze=False, height_ratios=[2, 3, 2.4, 1.4])
    hours = FuncFormatter(lambda x, _pos: f"{int(x // 3600)}:{int(x % 3600 // 60):02d}")
    for col, res in enumerate(results):
        load, lat, size, marks = (axes[row][col] for row in range(4))
        _plot_one(res, load, lat, size, marks)
        # Round ticks (10 min, 30 min, 1 h...), about 7 across one column, 4 in a grid.
        most = 7 if cols == 1 else 4
        steps = (60, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
        step = next((x for x in steps if res.duration / x <= most), res.duration)
        marks.xaxis.set_major_locator(MultipleLocator(step))
        marks.xaxis.set_major_formatter(hours)
        marks.set_xlabel("virtual time (h:mm)")
        load.set_title(f"{res.workload}", fontsize=11, loc="left", fontweight="bold")
    first = results[0]
    fig.suptitle(
        f"doproxy simulate — {describe(first.policy)}",
        fontsize=9,
    )
    fig.savefig(path, dpi=100)


def _plot_one(res: Result, load: Axes, lat: Axes, size: Axes, marks: Axes) -> None:
    t = res.times
    p = res.policy
    cap = [s * res.model.capacity for s in res.serving]
    load.plot(t, res.offered, color="tab:blue", lw=0.8, label="offered")
    load.step(t, cap, where="post", color="black", lw=1.2, label="capacity (serving)")
    load.fill_between(
        t,
        res.offered,
        cap,
        where=[o > c for o, c in zip(res.offered, cap, strict=True)],
        color="tab:red",
        alpha=0.25,
        step="post",
        label="overload",
    )
    load.set_ylabel("requests/s")
    load.legend(loc="upper right", fontsize=7, ncols=3)
    load.set_ylim(bottom=0)

    ms = [x * 1000 if x is not None else math.nan for x in res.latency]
    lat.plot(t, ms, color="tab:purple", lw=0.8, label="pool latency (per interval)")
    if p.mode == "threshold":
        lat.axhline(p.upscale_latency * 1000, color="tab:red", ls="--", lw=1, label="upscale")
        lat.axhline(p.downscale_latency * 1000, color="tab:green", ls="--", lw=1, label="downscale")
    else:
        lat.axhline(p.target_latency * 1000, color="tab:red", ls="--", lw=1, label="target")
    lat.set_yscale("log")
    lat.set_ylabel("latency (ms)")
    lat.legend(loc="upper right", fontsize=7, ncols=3)

    serving = res.serving
    booting = [s + b for s, b in zip(serving, res.provisioning, strict=True)]
    draining = [b + d for b, d in zip(booting, res.draining, strict=True)]
    size.fill_between(t, 0, serving, step="post", color="tab:blue", alpha=0.6, label="serving")
    size.fill_between(
        t, serving, booting, step="post", color="tab:orange", alpha=0.6, label="provisioning"
    )
    size.fill_between(
        t, booting, draining, step="post", color="tab:gray", alpha=0.4, label="draining"
    )
    size.axhline(p.max_backends, color="black", ls=":", lw=1)
    size.axhline(p.min_backends, color="black", ls=":", lw=1)
    size.set_ylim(0, p.max_backends + 1.5)
    size.set_ylabel("backends")
    size.legend(loc="upper right", fontsize=7, ncols=3)

    rows = ["scale up", "scale down", "replace", "cooldown", "at max", "idle"]
    style = {
        "up": ("scale up", "^", "tab:green"),
        "down": ("scale down", "v", "tab:red"),
        "replace": ("replace", "s", "tab:orange"),
    }
    kinds = {
        "cooldown-up": ("cooldown", "o", "tab:gray"),
        "cooldown-down": ("cooldown", "o", "tab:gray"),
        "at-max": ("at max", "o", "tab:gray"),
        "idle": ("idle", "o", "tab:gray"),
    }
    for d in res.decisions:
        row, marker, color = style.get(d.action) or kinds.get(d.kind, ("", "", ""))
        if not row:
            continue
        marks.plot([d.now], [rows.index(row)], marker=marker, color=color, ms=7, ls="none")
        if d.action in ("up", "down"):
            for ax in (load, lat, size):
                ax.axvline(d.now, color=color, lw=0.6, alpha=0.35)
            marks.annotate(
                f"{d.size_before}→{d.size_after}",
                (d.now, rows.index(row)),
                textcoords="offset points",
                xytext=(0, 6 if d.action == "up" else -11),
                ha="center",
                fontsize=6,
            )
    marks.set_yticks(range(len(rows)), rows, fontsize=7)
    marks.set_ylim(len(rows) - 0.5, -0.8)
    marks.set_xlim(0, res.duration)
    marks.set_ylabel("decisions")
    marks.grid(axis="x", alpha=0.3)


# --- the command ----------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `simulate` sub-command's arguments (the CLI calls this, then `run`)."""
    s = sub.add_parser(
        "simulate",
        help="run the autoscale policy on a modelled workload (virtual clock; nothing real)",
        description="Feed the autoscale decision a modelled workload on a virtual clock and "
        "report its decisions, latency and machine-minutes. The policy is the config's "
        "[provisioning] when the config file exists, else demo values. "
        "--plot needs matplotlib (pip install 'doproxy[plot]').",
    )
    s.add_argument("--workload", choices=[*WORKLOADS, "all"], default="step")
    s.add_argument("--duration", default="3h", help="virtual time to simulate (default 3h)")
    s.add_argument("--plot", metavar="FILE.png", help="draw latency, pool size and decisions")
    s.add_argument("--seed", type=int, default=1, help="for the workload's noise (default 1)")
    s.add_argument(
        "--service-time",
        default="100ms",
        help="a request's service time on an idle backend (default 100ms)",
    )
    s.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="requests one backend serves at once (default 1)",
    )
    s.add_argument("--boot-time", default="90s", help="from create to serving (default 90s)")


def run(args: argparse.Namespace) -> int:
    try:
        model = Model(
            service_time=parse_duration(args.service_time),
            concurrency=args.concurrency,
            boot_time=parse_duration(args.boot_time),
        )
    except ValueError as e:
        raise DoproxyError(f"simulate: {e}") from None
    if model.service_time <= 0 or model.concurrency < 1 or model.boot_time < 0:
        raise DoproxyError("simulate: --service-time > 0, --concurrency >= 1, --boot-time >= 0")
    return main(args.config, args.workload, args.duration, args.plot, args.seed, model)


def main(
    config_file: str,
    workload_name: str = "step",
    duration: str = "3h",
    plot_file: str | None = None,
    seed: int = 1,
    model: Model | None = None,
    out: Callable[[str], None] = print,
) -> int:
    """`doproxy simulate`. The policy is the config's [provisioning] when the file exists,
    else DEMO_POLICY; says which."""
    from doproxy.config import load_settings

    try:
        seconds = parse_duration(duration)
    except ValueError as e:
        raise DoproxyError(f"--duration: {e}") from None
    if seconds <= 0:
        raise DoproxyError("--duration must be positive")
    if Path(config_file).exists():
        policy = load_settings(config_file).provisioning
        off = "" if policy.enable else " (enable = false there; simulated all the same)"
        out(f"policy: [provisioning] of {config_file}{off}")
    else:
        policy = DEMO_POLICY
        out(f"policy: demo values ({config_file} not found)")
    out(f"  {describe(policy)}")
    names = WORKLOADS if workload_name == "all" else (workload_name,)
    results = []
    for name in names:
        # One rng per workload, seeded from --seed: a workload's run does not depend on
        # which others ran before it.
        rng = random.Random(f"{seed}:{name}")
        res = simulate(policy, workload(name, seconds, rng), seconds, model, rng)
        results.append(res)
        out(summary(res))
    if plot_file:
        plot(results, plot_file)
        out(f"plot written to {plot_file}")
    return 0
