"""What active health checks cost (issue 12, part 6): N backends checked every second.

`python -m bench.health [--backends 200] [--seconds 20]` starts a small keep-alive HTTP server
in another process (so its CPU is not counted), then, one after the other against it:

- doproxy's HealthChecker over N inventory entries that all point at it, in this process: the
  CPU (user + system, from os.times) this process used per second of wall time;
- HAProxy with N servers, each `check inter 1s` with an HTTP check of the same path: the CPU of
  its process (from /proc/<pid>/stat) per second of wall time, after the same warm-up;

and prints both and their ratio: the cores the checks cost. Issue 12 measured 0.107 cores for
200 backends every second (the whole proxy), and HAProxy 0.043.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time

from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Settings
from doproxy.health import HealthChecker
from doproxy.proxy.backend import Backend

# A minimal HTTP server: answers every request with 200, keeping the connection unless the
# request asks to close it (HAProxy's checks do; doproxy's keep it for the next check).
SERVER = """
import asyncio, sys
async def serve(r, w):
    try:
        while True:
            head = await r.readuntil(b"\\r\\n\\r\\n")
            close = b"close" in head.lower() or b"HTTP/1.0" in head.split(b"\\r\\n", 1)[0]
            w.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n"
                    + (b"Connection: close\\r\\n" if close else b"") + b"\\r\\nok")
            await w.drain()
            if close:
                break
    except Exception:
        pass
    w.close()
async def main():
    s = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=1024)
    print(s.sockets[0].getsockname()[1], flush=True)
    await s.serve_forever()
asyncio.run(main())
"""


async def measure(port: int, backends: int, seconds: float) -> tuple[float, float, int]:
    settings = Settings.model_validate({"health": {"interval": "1s", "path": "/health"}})
    pool = [
        Backend(InventoryEntry(id=i + 1, name=f"b{i}", server_host=f"127.0.0.1:{port}"))
        for i in range(backends)
    ]
    checker = HealthChecker(settings, sink=lambda b, s: None)
    checker.watch(pool)
    await asyncio.sleep(2.0)  # past the first round (every backend probed at once)
    start_cpu, start = os.times(), time.monotonic()
    await asyncio.sleep(seconds)
    end_cpu, end = os.times(), time.monotonic()
    await checker.stop()
    user = (end_cpu.user - start_cpu.user) / (end - start)
    system = (end_cpu.system - start_cpu.system) / (end - start)
    down = sum(1 for b in pool if not b.health.up)
    return user, system, down


HAPROXY_CONF = """global
    maxconn 4096

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout check 1s

frontend fe
    bind 127.0.0.1:{listen}
    default_backend be

backend be
    option httpchk
    http-check send meth GET uri /health ver HTTP/1.1 hdr Host h
{servers}
"""


def _cpu_seconds(pid: int) -> float:
    from pathlib import Path

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_haproxy(port: int, backends: int, seconds: float) -> float | None:
    """HAProxy's cores for the same checks; None when it is not installed."""
    import shutil
    import tempfile

    binary = shutil.which("haproxy")
    if binary is None:
        return None
    servers = "".join(f"    server b{i} 127.0.0.1:{port} check inter 1s\n" for i in range(backends))
    with tempfile.TemporaryDirectory() as tmp:
        conf = os.path.join(tmp, "haproxy.cfg")
        with open(conf, "w") as f:
            # HAProxy will not start without a listener: one that nobody sends anything to.
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                listen = s.getsockname()[1]
            f.write(HAPROXY_CONF.format(servers=servers, listen=listen))
        proc = subprocess.Popen([binary, "-f", conf], stdout=subprocess.DEVNULL)
        try:
            time.sleep(2.0)  # past its first round of checks, as doproxy's above
            start_cpu, start = _cpu_seconds(proc.pid), time.monotonic()
            time.sleep(seconds)
            end_cpu, end = _cpu_seconds(proc.pid), time.monotonic()
            if proc.poll() is not None:
                raise SystemExit(f"haproxy exited ({proc.returncode}): check {conf}")
        finally:
            proc.terminate()
            proc.wait(10)
    return (end_cpu - start_cpu) / (end - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.health", description=__doc__)
    p.add_argument("--backends", type=int, default=200)
    p.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args(argv)
    import uvloop  # the proxy's loop

    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        user, system, down = uvloop.run(measure(port, args.backends, args.seconds))
        haproxy = measure_haproxy(port, args.backends, args.seconds)
    finally:
        server.terminate()
        server.wait(10)
    ours = user + system
    print(
        f"{args.backends} backends checked every second: doproxy {ours:.3f} cores "
        f"({user:.3f} user + {system:.3f} system; {down} down)"
    )
    if haproxy is not None:
        print(f"  HAProxy {haproxy:.3f} cores; doproxy / HAProxy {ours / haproxy:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
