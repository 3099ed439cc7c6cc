"""Workloads and one bounded wrk run, parsed from a small Lua `done()` hook that prints JSON."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError, pinned

MARKER = "BENCHJSON "

# wrk calls done() once at the end; latency values are in microseconds.
DONE_LUA = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHJSON {\\"requests\\":%d,\\"duration_us\\":%d,\\"bytes\\":%d," ..
    "\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d," ..
    "\\"p50_us\\":%.1f,\\"p99_us\\":%.1f,\\"mean_us\\":%.1f,\\"max_us\\":%.1f}\\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
"""


@dataclass(frozen=True)
class Workload:
    body: str  # "2 B" / "16 KiB"
    path: str
    connections: int
    close: bool = False  # send `Connection: close`: one request per TCP connection

    @property
    def label(self) -> str:
        mode = ", Connection: close" if self.close else ""
        return f"{self.body}, c{self.connections}{mode}"


WORKLOADS = (
    Workload("2 B", "/2b", 50),
    Workload("2 B", "/2b", 200),
    Workload("16 KiB", "/16k", 50),
    Workload("16 KiB", "/16k", 200),
    Workload("2 B", "/2b", 50, close=True),
)


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    p50_us: float
    p99_us: float
    socket_errors: int  # connect + read + write + timeout
    status_errors: int  # responses with status >= 400

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def write_script(directory: Path) -> Path:
    path = directory / "done.lua"
    path.write_text(DONE_LUA)
    return path


def wrk_command(
    url: str, workload: Workload, duration: int, script: Path, cpus: str | None
) -> list[str]:
    cmd = ["wrk", "-t1", f"-c{workload.connections}", f"-d{duration}s", "--latency"]
    cmd += ["--timeout", "5s", "-s", str(script)]
    if workload.close:
        cmd += ["-H", "Connection: close"]
    return pinned([*cmd, url], cpus)


def parse_output(stdout: str) -> WrkResult:
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            data = json.loads(line[len(MARKER) :])
            break
    else:
        raise BenchError(f"no result line in wrk output:\n{stdout}")
    socket_errors = sum(data[k] for k in ("connect", "read", "write", "timeout"))
    return WrkResult(
        requests=data["requests"],
        duration_s=data["duration_us"] / 1e6,
        p50_us=data["p50_us"],
        p99_us=data["p99_us"],
        socket_errors=socket_errors,
        status_errors=data["status"],
    )


def run_wrk(
    url: str, workload: Workload, duration: int, script: Path, cpus: str | None
) -> WrkResult:
    """One wrk run, killed if it overruns its duration by 30 s."""
    cmd = wrk_command(url, workload, duration, script, cpus)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"wrk did not finish in time: {' '.join(cmd)}") from e
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    return parse_output(done.stdout)
