"""One benchmark run: start the backends and every proxy, then measure them interleaved."""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import (
    CLK_TCK,
    BenchError,
    ProcStat,
    children_cpu_ticks,
    count_and_truncate,
    cpu_ticks,
    free_ports,
    machine_busy_ticks,
    process_tree,
    stop,
)
from bench.report import NOISY_PCT, Sample
from bench.servers import (
    BACKEND_PORTS,
    HAPROXY,
    NONE,
    PROXY_KEYS,
    Target,
    parse_key,
    start_backends,
    start_target,
)
from bench.wrk import WORKLOADS, Workload, run_wrk, write_script

Progress = Callable[[str], None]
PAUSE_S = 0.3  # between runs, so one run's closing connections do not overlap the next


@dataclass(frozen=True)
class Options:
    reps: int = 3
    duration: int = 5  # whole seconds: wrk accepts no fractions
    warmup: int = 1
    proxies: tuple[str, ...] = PROXY_KEYS
    workloads: tuple[Workload, ...] = WORKLOADS
    proxy_cpus: str | None = "0"  # taskset -c for the proxy under test
    load_cpus: str | None = "1"  # taskset -c for wrk and the backends
    quiet_wait: float = 5.0  # before each run, wait up to this long for other load to stop


@dataclass
class RunResult:
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # proxies that crashed or stopped answering


@dataclass(frozen=True)
class _Snapshot:
    """CPU counters read just before or just after one wrk run."""

    proxy: tuple[int, int]  # (utime, stime) ticks of the proxy's processes
    backends: int  # ticks of the backend nginx
    wrk: float  # ticks of exited children, i.e. wrk once it has been waited for
    machine: int  # non-idle ticks of the whole machine

    @classmethod
    def take(cls, proxy: Sequence[ProcStat], backends: Sequence[ProcStat]) -> _Snapshot:
        return cls(
            cpu_ticks(proxy), sum(cpu_ticks(backends)), children_cpu_ticks(), machine_busy_ticks()
        )


def _other_load_pct(before: _Snapshot, after: _Snapshot, seconds: float) -> float:
    """CPU used during the run by processes that are not part of it, in % of one CPU."""
    ours = sum(after.proxy) - sum(before.proxy) + after.backends - before.backends
    ours_ticks = ours + after.wrk - before.wrk
    other = after.machine - before.machine - ours_ticks
    return max(0.0, other / CLK_TCK / seconds * 100) if seconds > 0 else 0.0


def estimated_seconds(opts: Options) -> float:
    runs = opts.reps * len(opts.workloads) * len(opts.proxies)
    return runs * (opts.duration + PAUSE_S + 0.2) + len(opts.proxies) * (opts.warmup + 1) + 1


def _busy_pct(seconds: float) -> float:
    """Non-idle CPU of the whole machine over the next `seconds`, in % of one CPU."""
    before = machine_busy_ticks()
    time.sleep(seconds)
    return (machine_busy_ticks() - before) / CLK_TCK / seconds * 100


def _settle(max_wait: float) -> None:
    """Pause between runs, longer (bounded) while something else keeps the machine busy.

    Between runs our own servers are idle, so what is busy then is somebody else's load.
    """
    deadline = time.monotonic() + max_wait
    while _busy_pct(PAUSE_S) > NOISY_PCT and time.monotonic() < deadline:
        pass


def measure(
    target: Target,
    backends: Sequence[ProcStat],
    workload: Workload,
    rep: int,
    opts: Options,
    script: Path,
) -> Sample:
    """One wrk run, with the proxy's CPU time read from /proc just before and just after."""
    _count_log(target)
    before = _Snapshot.take(target.procs, backends)
    result = run_wrk(target.url(workload.path), workload, opts.duration, script, opts.load_cpus)
    after = _Snapshot.take(target.procs, backends)
    if target.service is not None and not target.service.alive():
        raise BenchError("exited during the run")
    if target.access_log is not None:
        target.log_requests += result.requests
    user = after.proxy[0] - before.proxy[0]
    system = after.proxy[1] - before.proxy[1]
    other = _other_load_pct(before, after, result.duration_s)
    return Sample(target.key, workload, rep, result, user, system, other)


def _count_log(target: Target) -> None:
    """With an access log: count the lines written since the last count (those of the last
    measured run, flushed since; before the first run, the warm-up's, not counted) and empty
    the file, so a long run does not fill the disk."""
    if target.access_log is None:
        return
    lines = count_and_truncate(target.access_log)
    if target.log_requests:
        target.log_lines += lines


def _log_counts(targets: Sequence[Target]) -> list[str]:
    """One note per target with an access log: lines written for the requests it served."""
    logging = [t for t in targets if t.access_log is not None and t.log_requests]
    if not logging:
        return []
    time.sleep(1.2)  # doproxy and nginx flush their buffers within a second
    notes = []
    for target in logging:
        _count_log(target)
        notes.append(
            f"{target.label} wrote {target.log_lines:,} access log lines for the "
            f"{target.log_requests:,} requests wrk completed in the measured runs"
        )
    return notes


def _describe(sample: Sample) -> str:
    w = sample.wrk
    text = f"{w.rps:10,.0f} req/s  p99 {w.p99_us / 1000:6.2f} ms"
    if parse_key(sample.proxy)[0] != NONE:
        text += f"  cpu {sample.user_us:5.1f} + {sample.sys_us:5.1f} µs/req"
    if sample.other_load_pct > NOISY_PCT:
        text += f"  (other load {sample.other_load_pct:.0f} % of a CPU)"
    if w.socket_errors or w.status_errors:
        text += f"  ERRORS socket {w.socket_errors} status>=400 {w.status_errors}"
    return text


def _rotated(items: Sequence[Target], by: int) -> list[Target]:
    """Each repetition starts with a different proxy, so none always runs first or last."""
    k = by % len(items) if items else 0
    return [*items[k:], *items[:k]]


def _warm_up(targets: Sequence[Target], opts: Options, script: Path, progress: Progress) -> None:
    if opts.warmup <= 0:
        return
    warm = Workload("2 B", "/2b", max(w.connections for w in opts.workloads))
    for target in targets:
        progress(f"warm-up {target.label}")
        run_wrk(target.url(warm.path), warm, opts.warmup, script, opts.load_cpus)


def _exit_note(target: Target) -> str:
    service = target.service
    if service is None or service.alive():
        return ""
    tail = " | ".join(line.strip() for line in service.log_tail(3).splitlines())
    return f" ({target.label} exited with code {service.proc.returncode}; log: {tail or 'empty'})"


def _measure_all(
    targets: list[Target],
    backends: Sequence[ProcStat],
    opts: Options,
    script: Path,
    progress: Progress,
    out: RunResult,
) -> None:
    total = opts.reps * len(opts.workloads) * len(targets)
    n = 0
    for rep in range(opts.reps):
        for workload in opts.workloads:
            for target in _rotated(targets, rep):
                n += 1
                if target.label in out.failed:
                    continue
                _settle(opts.quiet_wait)
                head = f"[{n:>2}/{total}] rep {rep + 1} {workload.label:<28} {target.label:<20}"
                try:
                    sample = measure(target, backends, workload, rep, opts, script)
                except BenchError as e:
                    if parse_key(target.key)[0] in (HAPROXY, NONE):
                        raise
                    why = f"{e}{_exit_note(target)}"
                    out.failed.append(target.label)
                    out.problems.append(f"{target.label}, {workload.label}: {why}")
                    progress(f"{head} FAILED: {why}")
                    continue
                out.samples.append(sample)
                progress(f"{head} {_describe(sample)}")


def _quiet_check(progress: Progress, out: RunResult) -> None:
    """Warn when something else keeps the machine busy: it skews every number."""
    pct = _busy_pct(1.0)
    if pct > NOISY_PCT:
        msg = (
            f"just before the first run other processes used {pct:.0f} % of a CPU "
            "(every run is checked again: see the noisy column)"
        )
        progress(f"warning: {msg}")
        out.problems.append(msg)


def _noise_note(samples: Sequence[Sample]) -> str | None:
    busy = [s.other_load_pct for s in samples if s.other_load_pct > NOISY_PCT]
    if not busy:
        return None
    return (
        f"other processes used more than {NOISY_PCT:.0f} % of a CPU during {len(busy)} of "
        f"{len(samples)} runs (median {statistics.median(busy):.0f} %, max {max(busy):.0f} %): "
        "req/s and latency of those runs are skewed; CPU per request is less affected"
    )


def _start_all(
    base: Path, opts: Options, stack: contextlib.ExitStack, progress: Progress
) -> tuple[list[Target], list[ProcStat]]:
    found = free_ports(BACKEND_PORTS + len(opts.proxies))
    backend_ports = found[:BACKEND_PORTS]
    ports = dict(zip(opts.proxies, found[BACKEND_PORTS:], strict=True))
    progress(f"starting backends on ports {backend_ports}")
    backends = start_backends(base, backend_ports, opts.load_cpus)
    stack.callback(stop, backends)
    targets = []
    for key in opts.proxies:
        target = start_target(key, base, ports[key], backend_ports, opts.proxy_cpus)
        if target.service is not None:
            stack.callback(stop, target.service)
        if target.scraper is not None:
            stack.callback(target.scraper.stop)
        progress(f"started {target.label} on port {target.port}")
        targets.append(target)
    return targets, process_tree(backends.pid)


def _log_notes(targets: Sequence[Target]) -> list[str]:
    notes = [t.scraper.note() for t in targets if t.scraper is not None]
    for target in targets:
        if target.service is not None and (tail := target.service.log_tail(3).strip()):
            lines = " | ".join(line.strip() for line in tail.splitlines())
            notes.append(f"{target.label} wrote to its log; last lines: `{lines}`")
    return notes


def run(opts: Options, progress: Progress) -> RunResult:
    """Start everything in a temp dir, measure, and stop every process we started."""
    out = RunResult()
    _quiet_check(progress, out)
    with contextlib.ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="doproxy-bench-")))
        base.chmod(0o755)  # nginx workers may run as another user and must read the docroot
        script = write_script(base)
        targets, backends = _start_all(base, opts, stack, progress)
        _warm_up(targets, opts, script, progress)
        _measure_all(targets, backends, opts, script, progress, out)
        out.problems.extend(_log_counts(targets))
        out.problems.extend(_log_notes(targets))
    if note := _noise_note(out.samples):
        out.problems.append(note)
    return out
