"""The data plane during a reload storm (issue 12, part 6): p99 with and without reloads.

`python -m bench.reload_storm [--backends 2000] [--seconds 10] [--every 0.5]` starts the same
two nginx backends as the main benchmark and one doproxy whose inventory holds `--backends`
entries (the two backend ports repeated under different ids, as `--pool-sizes` does; health
checks off unless `--health-checks`), its admin listener on as it ships. Then, alternating,
`--reps` times each:

- quiet: `wrk -t1 -c50` at a moderate, paced load (every connection waits `--delay-ms` between
  its requests, so a stalled event loop shows in the latency instead of just slowing wrk down),
  for `--seconds`;
- storm: the same, while the harness reloads doproxy every `--every` seconds: it rewrites the
  inventory (alternately with and without its last entry, so every reload really changes the
  pool; `--same` keeps it unchanged) and sends SIGHUP (`--via sighup`, the default), or only
  rewrites the inventory and lets doproxy's file watcher apply it (`--via watch`:
  `watch-config = true`, the inventory-only path).

`--loop-lag` measures the reload itself instead, in this process and without traffic: a
Runtime on the same inventory is reloaded `--reloads` times (the inventory alternating) while
a 1 ms timer runs; it prints how long a reload took and the worst lateness of the timer during
each, i.e. how long the event loop could not serve anything.

It prints both phases' latency (p50, p99, p99.9, max), req/s, the proxy's CPU, the reloads seen
in doproxy's log and how long each took (from the harness's signal or write to doproxy's
"reloaded"/"inventory applied" line, so a reload that waits for a blocked loop counts whole),
and the ratio issue 12 asks about: p99 during the storm ÷ p99 without (target ≤ 2).

Bounded: each wrk run lasts `--seconds` (at most 30) and is killed 30 s past it; every
process started is stopped by its PID. The proxy is pinned to CPU 0 and wrk and the backends
to CPU 1 (`--proxy-cpu`, `--load-cpu`), as in the main benchmark. doproxy runs on this Python
(`--python` to pick another): the doproxy it imports is the one measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import (
    CLK_TCK,
    BenchError,
    Service,
    cpu_ticks,
    free_ports,
    pinned,
    process_tree,
    start,
    stop,
    wait_ready,
)
from bench.servers import READY_PATH, start_backends
from bench.wrk import MARKER

# wrk: every connection waits DELAY ms between its requests (a paced, moderate load), and
# done() prints the numbers as JSON (latency in microseconds).
PACED_LUA = """\
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "10")
delay = function() return delay_ms end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHJSON {\\"requests\\":%d,\\"duration_us\\":%d,\\"errors\\":%d,\\"status\\":%d," ..
    "\\"p50_us\\":%.1f,\\"p99_us\\":%.1f,\\"p999_us\\":%.1f,\\"max_us\\":%.1f}\\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
"""

# doproxy's log lines (cli.py's format): "2026-11-30 04:31:00,123 INFO doproxy.runtime: ..."
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) (\S+): (.*)$")
_DONE = ("reloaded: ", "inventory applied: ")
_FAILED = ("reload failed", "inventory not applied")


def inventory(ports: list[int], count: int) -> str:
    return "".join(
        f'[[droplet]]\nid = {i}\nname = "b{i}"\n'
        f'server-host = "127.0.0.1:{ports[i % len(ports)]}"\n\n'
        for i in range(1, count + 1)
    )


def config(port: int, via: str, health_checks: bool) -> str:
    text = (
        f'bind = "127.0.0.1:{port}"\nwatch-config = {"true" if via == "watch" else "false"}\n'
        'inventory-file = "inventory.toml"\n[admin]\nbind = "127.0.0.1:0"\n'
    )
    if not health_checks:
        text += "[backend]\ndisable-health-check = true\n"
    return text


def write_atomically(path: Path, text: str) -> None:
    """As an editor or `doproxy` itself would: a temp file renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Phase:
    name: str
    requests: int
    seconds: float
    p50_us: float
    p99_us: float
    p999_us: float
    max_us: float
    errors: int
    cpu_s: float  # the proxy's user + system CPU seconds during the run
    sent: list[float] = field(default_factory=list)  # wall-clock times reloads were asked for

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


class Storm:
    """Asks doproxy for a reload every `every` seconds until stopped (a thread)."""

    def __init__(
        self, service: Service, inv: Path, texts: list[str], every: float, via: str
    ) -> None:
        self.service, self.inv, self.texts, self.every, self.via = service, inv, texts, every, via
        self.sent: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="storm", daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.every):
            n += 1
            write_atomically(self.inv, self.texts[n % len(self.texts)])
            self.sent.append(time.time())
            if self.via == "sighup":
                os.kill(self.service.pid, signal.SIGHUP)

    def __enter__(self) -> Storm:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def run_wrk(
    url: str, seconds: int, conns: int, delay_ms: int, script: Path, cpus: str | None
) -> dict[str, float]:
    wrk = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    cmd = pinned([*wrk, "-s", str(script), url], cpus)
    env = {**os.environ, "BENCH_DELAY_MS": str(delay_ms)}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, env=env)
    except subprocess.TimeoutExpired as e:
        raise BenchError("wrk did not finish in time") from e
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    for line in done.stdout.splitlines():
        if line.startswith(MARKER):
            data: dict[str, float] = json.loads(line[len(MARKER) :])
            return data
    raise BenchError(f"no result line in wrk output:\n{done.stdout}")


def measure(
    name: str,
    service: Service,
    url: str,
    args: argparse.Namespace,
    script: Path,
    storm: Storm | None,
) -> Phase:
    procs = process_tree(service.pid)
    before = cpu_ticks(procs)
    with storm if storm is not None else contextlib.nullcontext():
        data = run_wrk(url, args.seconds, args.connections, args.delay_ms, script, args.load_cpu)
    after = cpu_ticks(procs)
    if not service.alive():
        raise BenchError(f"doproxy exited during the run:\n{service.log_tail()}")
    return Phase(
        name,
        requests=int(data["requests"]),
        seconds=data["duration_us"] / 1e6,
        p50_us=data["p50_us"],
        p99_us=data["p99_us"],
        p999_us=data["p999_us"],
        max_us=data["max_us"],
        errors=int(data["errors"] + data["status"]),
        cpu_s=(sum(after) - sum(before)) / CLK_TCK,
        sent=list(storm.sent) if storm is not None else [],
    )


def reload_times(log: Path, sent: list[float]) -> tuple[list[float], int]:
    """How long each reload asked for at `sent` took until doproxy logged it done (seconds),
    and how many failed. A request is matched with the first "done" line logged after it."""
    done: list[float] = []
    failed = 0
    for line in log.read_text(errors="replace").splitlines():
        m = _LOG_LINE.match(line)
        if m is None:
            continue
        msg = m.group(4)
        if msg.startswith(_DONE):
            stamp = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
            done.append(stamp.timestamp())
        elif msg.startswith(_FAILED):
            failed += 1
    took = []
    i = 0
    for t in sorted(sent):
        while i < len(done) and done[i] < t - 0.002:  # log stamps are truncated to the ms
            i += 1
        if i < len(done):
            took.append(max(0.0, done[i] - t))
            i += 1
    return took, failed


def _ms(us: float) -> str:
    return f"{us / 1000:.2f} ms"


def report(phases: list[Phase], took: list[float], failed: int, args: argparse.Namespace) -> str:
    quiet = [p for p in phases if p.name == "quiet"]
    storm = [p for p in phases if p.name == "storm"]
    lines = [
        f"{args.backends} backends, wrk -t1 -c{args.connections} paced ({args.delay_ms} ms "
        f"between a connection's requests), {args.seconds} s per run, reloads every "
        f"{args.every} s via {args.via}"
        + (" (inventory unchanged)" if args.same else " (inventory alternately one entry short)"),
        "",
        "| run | req/s | p50 | p99 | p99.9 | max | errors | proxy CPU | reloads asked |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        lines.append(
            f"| {p.name} | {p.rps:,.0f} | {_ms(p.p50_us)} | {_ms(p.p99_us)} | {_ms(p.p999_us)} "
            f"| {_ms(p.max_us)} | {p.errors} | {p.cpu_s / p.seconds:.2f} cores | {len(p.sent)} |"
        )
    lines.append("")
    if quiet and storm:
        q99 = statistics.median(p.p99_us for p in quiet)
        s99 = statistics.median(p.p99_us for p in storm)
        q999 = statistics.median(p.p999_us for p in quiet)
        s999 = statistics.median(p.p999_us for p in storm)
        lines.append(
            f"p99 during the storm ÷ without: {s99 / q99:.2f} (target ≤ 2; medians of the runs); "
            f"p99.9: {s999 / q999:.2f}"
        )
        asked = sum(len(p.sent) for p in storm)
        extra = sum(p.cpu_s for p in storm) - sum(p.cpu_s for p in quiet)
        if asked:
            lines.append(
                "proxy CPU per reload (storm minus quiet CPU ÷ reloads): "
                f"{extra / asked * 1000:.0f} ms"
            )
    if took:
        took_ms = sorted(t * 1000 for t in took)
        lines.append(
            f"reloads logged done: {len(took)} (failed: {failed}); asked → done: median "
            f"{statistics.median(took_ms):.0f} ms, max {took_ms[-1]:.0f} ms"
        )
    else:
        lines.append(f"no reload was logged done (failed: {failed}): see doproxy's log")
    return "\n".join(lines)


async def _loop_lag(args: argparse.Namespace) -> str:
    """In this process: a Runtime on `--backends` entries (no traffic), a 1 ms timer, and
    `--reloads` reloads, each after the inventory alternated; for each reload its wall time
    and the worst lateness of the timer while it ran: how long the loop was held up."""
    import asyncio

    from doproxy.config import load_settings
    from doproxy.inventory import load_inventory
    from doproxy.runtime import Runtime

    with tempfile.TemporaryDirectory(prefix="doproxy-lag-") as d:
        base = Path(d)
        ports = [9, 9]  # never dialled: no traffic, health checks off
        texts = [inventory(ports, args.backends - 1), inventory(ports, args.backends)]
        (base / "inventory.toml").write_text(texts[1])
        cfg = base / "doproxy.toml"
        cfg.write_text(config(0, "sighup", False))
        rt = Runtime(load_settings(cfg), load_inventory(base / "inventory.toml"), cfg)
        await rt.start()
        worst = [0.0]

        async def timer() -> None:
            while True:
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                worst[0] = max(worst[0], time.perf_counter() - t - 0.001)

        task = asyncio.get_running_loop().create_task(timer())
        took, late = [], []
        try:
            for i in range(args.reloads):
                write_atomically(base / "inventory.toml", texts[i % 2 if not args.same else 1])
                await asyncio.sleep(0.05)
                worst[0] = 0.0
                t = time.perf_counter()
                if not await rt.reload():
                    raise BenchError(f"reload failed: {rt.last_reload_error}")
                took.append(time.perf_counter() - t)
                await asyncio.sleep(0.005)
                late.append(worst[0])
        finally:
            task.cancel()
            await rt.stop()
    took_ms, late_ms = [t * 1000 for t in took], [t * 1000 for t in late]
    return (
        f"{args.backends} backends, {args.reloads} reloads in this process: a reload took "
        f"{statistics.median(took_ms):.1f} ms (median, max {max(took_ms):.1f}); the worst "
        f"lateness of a 1 ms timer during one: median {statistics.median(late_ms):.1f} ms, "
        f"max {max(late_ms):.1f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.reload_storm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--backends", type=int, default=2000)
    p.add_argument("--seconds", type=int, default=10, help="per wrk run, at most 30 (10)")
    p.add_argument("--reps", type=int, default=2, help="quiet and storm runs each (2)")
    p.add_argument("--every", type=float, default=0.5, help="seconds between reloads (0.5)")
    p.add_argument("--via", choices=("sighup", "watch"), default="sighup")
    p.add_argument("--same", action="store_true", help="reload an unchanged inventory")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--delay-ms", type=int, default=10)
    p.add_argument("--health-checks", action="store_true", help="leave health checks on")
    p.add_argument("--python", default=sys.executable, help="the Python that runs doproxy")
    p.add_argument("--proxy-cpu", default="0")
    p.add_argument("--load-cpu", default="1")
    p.add_argument("--keep-log", type=Path, help="copy doproxy's log here")
    p.add_argument(
        "--loop-lag",
        action="store_true",
        help="instead: reload doproxy's Runtime in this process --reloads times and report "
        "how long each held up its event loop (a 1 ms timer's lateness); no traffic, no wrk",
    )
    p.add_argument("--reloads", type=int, default=20, help="with --loop-lag (20)")
    args = p.parse_args(argv)
    if args.loop_lag:
        import uvloop

        print(uvloop.run(_loop_lag(args)))
        return 0
    args.seconds = max(1, min(args.seconds, 30))
    if (os.cpu_count() or 1) < 2:
        args.proxy_cpu = args.load_cpu = None
    phases: list[Phase] = []
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="doproxy-storm-") as d:
        base = Path(d)
        base.chmod(0o755)
        script = base / "paced.lua"
        script.write_text(PACED_LUA)
        backend_ports, (port,) = free_ports(2), free_ports(1)
        backends = start_backends(base, backend_ports, args.load_cpu)
        stack.callback(stop, backends)
        work = base / "doproxy"
        work.mkdir()
        inv = work / "inventory.toml"
        texts = [inventory(backend_ports, args.backends)]
        if not args.same:
            texts.append(inventory(backend_ports, args.backends - 1))
        inv.write_text(texts[0])
        (work / "doproxy.toml").write_text(config(port, args.via, args.health_checks))
        cmd = [args.python, "-m", "doproxy", "--config", str(work / "doproxy.toml")]
        cmd += ["--log-level", "info"]
        log = work / "log"
        service = start("doproxy", pinned(cmd, args.proxy_cpu), log, cwd=work)
        stack.callback(stop, service)
        wait_ready(service, port, READY_PATH, timeout=60)
        url = f"http://127.0.0.1:{port}/2b"
        print(f"doproxy serving {args.backends} backends on port {port}", file=sys.stderr)
        run_wrk(url, 2, args.connections, args.delay_ms, script, args.load_cpu)  # warm-up
        for rep in range(args.reps):
            for name in ("quiet", "storm"):
                storm = (
                    Storm(service, inv, texts, args.every, args.via) if name == "storm" else None
                )
                phase = measure(name, service, url, args, script, storm)
                phases.append(phase)
                print(
                    f"rep {rep + 1} {name}: {phase.rps:,.0f} req/s, p99 {_ms(phase.p99_us)}, "
                    f"max {_ms(phase.max_us)}, {len(phase.sent)} reloads asked",
                    file=sys.stderr,
                )
                time.sleep(1.0 if name == "storm" else 0.3)  # the last reload finishes
        sent = [t for ph in phases for t in ph.sent]
        took, failed = reload_times(log, sent)
        if args.keep_log:
            args.keep_log.write_bytes(log.read_bytes())
    print(report(phases, took, failed, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
