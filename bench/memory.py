"""Memory of idle keep-alive client connections: doproxy vs HAProxy vs nginx, in one run.

`python -m bench.memory [--connections 10000]` starts the same two nginx backends as the main
benchmark and each proxy in turn (HAProxy nbthread 1 and nginx with one worker configured for
that many connections; doproxy as it ships, with its admin listener on), then for each one:

1. one request through it (so lazily built state exists), then the resident memory (VmRSS) of
   all its processes, summed: the cost before the first idle connection;
2. `--connections` client connections, each sending one keep-alive `GET /2b` and reading the
   answer, then staying open and idle;
3. the resident memory again, once every connection has its answer; the difference divided
   by the connections is the cost of one idle keep-alive connection.

Bounded: every connection must be answered within `--timeout` seconds (default 120) or the
run fails, and every process started is stopped by its PID. The client raises its own
open-files limit to the hard one (it holds every connection at once).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError, free_ports, process_tree, stop
from bench.servers import DOPROXY, HAPROXY, NGINX, base_label, start_backends, start_target

REQUEST = b"GET /2b HTTP/1.1\r\nHost: bench\r\n\r\n"


def rss_kib(pids: list[int]) -> int:
    """VmRSS of these processes, summed, in KiB (processes gone meanwhile count 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


async def open_idle(port: int, count: int, limit: float) -> list[asyncio.StreamWriter]:
    """`count` connections, each answered once and left open."""
    writers: list[asyncio.StreamWriter] = []
    sem = asyncio.Semaphore(200)  # connections being set up at once: no SYN flood of our own

    async def one() -> None:
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writers.append(writer)
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise BenchError(f"unexpected answer: {head[:40]!r}")
            await reader.readexactly(2)  # the 2-byte body

    try:
        async with asyncio.timeout(limit):
            await asyncio.gather(*(one() for _ in range(count)))
    except BaseException:
        for w in writers:
            w.close()
        raise
    return writers


@dataclass
class Row:
    label: str
    before_kib: int
    after_kib: int
    connections: int

    @property
    def per_connection(self) -> float:
        return (self.after_kib - self.before_kib) / self.connections

    def line(self) -> str:
        return (
            f"| {self.label} | {self.before_kib / 1024:.1f} MiB | {self.after_kib / 1024:.1f} MiB "
            f"| {self.per_connection:.2f} KiB |"
        )


async def measure(pids: list[int], port: int, count: int, limit: float) -> tuple[int, int]:
    warm = await open_idle(port, 1, limit)
    for w in warm:
        w.close()
    await asyncio.sleep(0.5)  # let the warm-up connection's close settle (a pause, not a wait)
    before = rss_kib(pids)
    writers = await open_idle(port, count, limit)
    after = rss_kib(pids)
    for w in writers:
        w.close()
    return before, after


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to open them all")
    p.add_argument("--proxies", default=f"{HAPROXY},{NGINX},{DOPROXY}")
    args = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # HAProxy wants two descriptors per connection and refuses to start below that; the
    # proxies inherit our limits. Root may raise the hard limit, others must have it.
    need = 2 * (args.connections + 100) + 300
    if hard != resource.RLIM_INFINITY and hard < need:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, need))
            hard = need
    if hard != resource.RLIM_INFINITY and hard < need:
        print(f"the hard open-files limit ({hard}) is below {need}: raise it", file=sys.stderr)
        return 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    rows: list[Row] = []
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="doproxy-mem-") as d:
        base = Path(d)
        base.chmod(0o755)
        keys = args.proxies.split(",")
        backend_ports, ports = free_ports(2), free_ports(len(keys))
        backends = start_backends(base, backend_ports, None)
        stack.callback(stop, backends)
        for key, port in zip(keys, ports, strict=True):
            target = start_target(key, base, port, backend_ports, None, args.connections + 100)
            assert target.service is not None
            try:
                pids = [st.pid for st in process_tree(target.service.pid)]
                before, after = asyncio.run(measure(pids, port, args.connections, args.timeout))
            finally:
                if target.scraper is not None:
                    target.scraper.stop()
                stop(target.service)
            rows.append(Row(base_label(key), before, after, args.connections))
            print(f"{base_label(key)}: {before} KiB -> {after} KiB", file=sys.stderr)
    print(f"{args.connections} idle keep-alive connections (resident memory of all processes)\n")
    print("| proxy | before the first | with them all | per connection |")
    print("|---|---|---|---|")
    for row in rows:
        print(row.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
