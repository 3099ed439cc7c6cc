"""Processes the benchmark starts: free ports, start and stop by PID, readiness, CPU from /proc."""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """Something the benchmark needs did not work; the message says what."""


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1, found by binding port 0 (all held until the end)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pinned(cmd: Sequence[str], cpus: str | None) -> list[str]:
    """`cmd` run under `taskset -c CPUS` (taskset execs, so the PID stays the command's)."""
    return ["taskset", "-c", cpus, *cmd] if cpus else list(cmd)


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    utime: int  # clock ticks, all threads
    stime: int
    starttime: int  # identifies the process, so a reused PID is never mistaken for it


def read_stat(pid: int) -> ProcStat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); ppid is field 4, utime 14, stime 15, starttime 22.
    return ProcStat(pid, int(fields[1]), int(fields[11]), int(fields[12]), int(fields[19]))


def _all_stats() -> list[ProcStat]:
    stats = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := read_stat(int(entry))) is not None:
            stats.append(st)
    return stats


def process_tree(root: int) -> list[ProcStat]:
    """`root` and all its descendants (e.g. the nginx master and its workers)."""
    children: dict[int, list[ProcStat]] = {}
    by_pid: dict[int, ProcStat] = {}
    for st in _all_stats():
        by_pid[st.pid] = st
        children.setdefault(st.ppid, []).append(st)
    if root not in by_pid:
        return []
    tree, todo = [], [by_pid[root]]
    while todo:
        st = todo.pop()
        tree.append(st)
        todo.extend(children.get(st.pid, []))
    return tree


def cpu_ticks(procs: Iterable[ProcStat]) -> tuple[int, int]:
    """Summed (utime, stime) of these processes now; fails if one of them has gone away."""
    user = system = 0
    for old in procs:
        st = read_stat(old.pid)
        if st is None or st.starttime != old.starttime:
            raise BenchError(f"process {old.pid} exited during the measurement")
        user += st.utime
        system += st.stime
    return user, system


def machine_busy_ticks() -> int:
    """Non-idle CPU time of the whole machine, all CPUs (user, nice, system, irq, softirq)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[1:8])
    return user + nice + system + irq + softirq


def children_cpu_ticks() -> float:
    """CPU time of our exited, waited-for children (wrk), in clock ticks."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * CLK_TCK


@dataclass
class Service:
    """A server process we started; stopped by its PID only."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def start(
    name: str,
    cmd: Sequence[str],
    log_path: Path,
    cwd: Path | None = None,
    stdout: Path | None = None,
) -> Service:
    """Start `cmd` with its standard error (and output, unless `stdout` names a file to append
    it to instead) in `log_path`."""
    with contextlib.ExitStack() as files:
        log = files.enter_context(log_path.open("wb"))
        # Appending: the harness may truncate the file between runs while it is written.
        out = log if stdout is None else files.enter_context(stdout.open("ab"))
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=log if stdout is not None else subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,  # a Ctrl-C in the terminal reaches only the harness
        )
    return Service(name, proc, log_path)


def count_and_truncate(path: Path) -> int:
    """The lines in `path` (a log its writer appends to), then empty it for the next run."""
    lines = 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                lines += chunk.count(b"\n")
        os.truncate(path, 0)
    except FileNotFoundError:
        return 0
    return lines


def http_get_status(port: int, path: str, timeout: float = 1.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def wait_ready(service: Service, port: int, path: str, timeout: float = 15.0) -> None:
    """Poll a TCP connect plus a real GET until it answers 200, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not service.alive():
            raise BenchError(f"{service.name} exited early:\n{service.log_tail()}")
        try:
            status = http_get_status(port, path)
        except (OSError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {e}"
        else:
            if status == 200:
                return
            last = f"HTTP {status}"
        time.sleep(0.05)
    raise BenchError(
        f"{service.name} not ready on port {port} after {timeout:.0f}s ({last}):\n"
        f"{service.log_tail()}"
    )


def stop(service: Service, timeout: float = 10.0) -> None:
    """SIGTERM by PID, wait; SIGKILL the process and any leftover descendants if it hangs."""
    tree = process_tree(service.pid)
    if service.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(service.pid, signal.SIGTERM)
    try:
        service.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(service.pid, signal.SIGKILL)
        service.proc.wait()
    for st in tree:  # e.g. nginx workers orphaned by a killed master
        now = read_stat(st.pid)
        if st.pid != service.pid and now is not None and now.starttime == st.starttime:
            with contextlib.suppress(ProcessLookupError):
                os.kill(st.pid, signal.SIGKILL)
