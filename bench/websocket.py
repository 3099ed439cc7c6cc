"""WebSocket tunnels through each proxy: echoes per second and the proxy's CPU per echo.

`python -m bench.websocket [--tunnels 1000] [--seconds 10] [--size 1024]` (issue 12, part 4)
starts a WebSocket echo backend and each proxy in turn in front of it (HAProxy nbthread 1,
nginx one worker, doproxy as it ships with its admin listener on), and for each one:

1. opens `--tunnels` WebSocket connections through it (the upgrade request, the backend's 101),
   every one of them must succeed;
2. once all are open, each tunnel sends a `--size` binary message (masked, as a client must),
   waits for its echo, checks it byte for byte, and sends the next, for `--seconds`;
3. counts the echoes completed in that window, their round-trip times, and the CPU time
   (user + system, /proc) of all the proxy's processes during exactly that window.

An echo is two messages through the proxy, one each way. The proxy is pinned to CPU 0, the
load client and the backend to CPU 1, as in the main benchmark; on a 2-CPU machine the client
and backend, both Python on uvloop, may be what limits the echoes per second, so the CPU per
echo is the number to compare (the ratio to HAProxy's measured in the same run).

The backend (`serve`) answers the handshake as RFC 6455 says, unmasks every frame and sends its
payload back in an unmasked frame; a plain GET gets 200 (the proxies' readiness probe and
doproxy's health checks). The client (`client`) is a uvloop process with a bare Protocol per
tunnel. Bounded: the tunnels must open within `--timeout` seconds, each client run is killed
30 s after its window, and every process started is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from bench.procs import (
    CLK_TCK,
    BenchError,
    Service,
    free_ports,
    pinned,
    process_tree,
    read_stat,
    start,
    stop,
    wait_ready,
)
from bench.servers import (
    DOPROXY,
    HAPROXY,
    NGINX,
    READY_PATH,
    _nginx_cmd,
    _nginx_main,
    _workdir,
    base_label,
    doproxy_files,
    haproxy_conf,
)

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B85"
MARKER = "WSJSON "


def _frame_head(size: int, masked: bool) -> bytes:
    """A final binary frame's header for a payload of `size` bytes."""
    bit = 0x80 if masked else 0
    if size < 126:
        return bytes((0x82, bit | size))
    if size < 1 << 16:
        return bytes((0x82, bit | 126)) + size.to_bytes(2, "big")
    return bytes((0x82, bit | 127)) + size.to_bytes(8, "big")


# --- the echo backend ---------------------------------------------------------------------


class EchoServer(asyncio.Protocol):
    """One backend connection: HTTP until an upgrade, then WebSocket frames echoed back."""

    def __init__(self) -> None:
        self.buf = b""
        self.ws = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.ws:
            self._frames()
        else:
            self._heads()

    def _heads(self) -> None:
        assert self.transport is not None
        while not self.ws:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end], self.buf[end + 4 :]
            key = b""
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            if not key:
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                continue
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            self.ws = True
        self._frames()

    def _frames(self) -> None:
        assert self.transport is not None
        buf = self.buf
        out = []
        while len(buf) >= 2:
            n = buf[1] & 0x7F
            at = 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, at = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, at = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < at + 4 + n:
                break
            mask = buf[at : at + 4]
            payload = buf[at + 4 : at + 4 + n]
            buf = buf[at + 4 + n :]
            # Unmask all at once: a big-integer XOR with the key repeated.
            key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
            plain = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")
            out.append(_frame_head(n, masked=False) + plain)
        self.buf = buf
        if out:
            self.transport.write(b"".join(out))


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoServer, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


# --- the load client ------------------------------------------------------------------------


class Tunnel(asyncio.Protocol):
    """One client connection: the upgrade, then one message at a time, echoed back."""

    def __init__(self, host: str, message: bytes, payload: bytes, stats: Stats) -> None:
        key = base64.b64encode(os.urandom(16))
        self.request = (
            (
                f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
            ).encode()
            + key
            + b"\r\n\r\n"
        )
        self.message = message  # the whole masked frame, sent again and again
        self.echo = _frame_head(len(payload), masked=False) + payload  # what must come back
        self.stats = stats
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buf = b""
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None
        self.running = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.opened.done():
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end], self.buf[end + 4 :]
            if not head.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(BenchError(f"upgrade refused: {head[:60]!r}"))
                return
            self.opened.set_result(None)
            return
        self.buf = self.buf + data if self.buf else data
        echo = self.echo
        while len(self.buf) >= len(echo):
            got, self.buf = self.buf[: len(echo)], self.buf[len(echo) :]
            now = time.perf_counter()
            stats = self.stats
            if got != echo:
                stats.bad += 1
            elif stats.counting:
                stats.echoes += 1
                stats.rtts.append(now - self.sent_at)
            if self.running:
                self.send(now)

    def send(self, now: float) -> None:
        assert self.transport is not None
        self.sent_at = now
        self.transport.write(self.message)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(BenchError(f"closed before the upgrade: {exc}"))
        elif self.running:
            self.stats.lost += 1


@dataclass
class Stats:
    echoes: int = 0
    bad: int = 0  # echoes that differed from what was sent
    lost: int = 0  # tunnels closed while running
    counting: bool = False
    rtts: list[float] = field(default_factory=list)  # round trips, seconds


def _ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        st = read_stat(pid)
        if st is not None:
            total += st.utime + st.stime
    return total


async def _client(args: argparse.Namespace) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    payload = os.urandom(args.size)
    mask = os.urandom(4)
    key = int.from_bytes((mask * (args.size // 4 + 1))[: args.size], "big")
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(args.size, "big")
    message = _frame_head(args.size, masked=True) + mask + masked
    stats = Stats()
    tunnels: list[Tunnel] = []
    sem = asyncio.Semaphore(100)  # handshakes at once

    async def one() -> None:
        async with sem:
            t = Tunnel(f"127.0.0.1:{args.port}", message, payload, stats)
            tunnels.append(t)
            await loop.create_connection(lambda: t, "127.0.0.1", args.port)
            await t.opened

    try:
        async with asyncio.timeout(args.timeout):
            await asyncio.gather(*(one() for _ in range(args.tunnels)))
        pids = [int(p) for p in args.pids.split(",") if p]
        now = time.perf_counter()
        for t in tunnels:
            t.running = True
            t.send(now)
        await asyncio.sleep(1.0)  # every tunnel busy before the window opens
        stats.counting = True
        t0, ticks0 = time.perf_counter(), _ticks(pids)
        await asyncio.sleep(args.seconds)
        stats.counting = False
        t1, ticks1 = time.perf_counter(), _ticks(pids)
        for t in tunnels:
            t.running = False
    finally:
        for t in tunnels:
            if t.transport is not None:
                t.transport.close()
    rtts = sorted(stats.rtts)
    return {
        "echoes": stats.echoes,
        "seconds": t1 - t0,
        "cpu_s": (ticks1 - ticks0) / CLK_TCK,
        "p50_us": rtts[len(rtts) // 2] * 1e6 if rtts else 0.0,
        "p99_us": rtts[int(len(rtts) * 0.99)] * 1e6 if rtts else 0.0,
        "bad": stats.bad,
        "lost": stats.lost,
    }


# --- the harness ----------------------------------------------------------------------------


@dataclass
class Result:
    label: str
    echoes: int
    seconds: float
    cpu_s: float
    p50_us: float
    p99_us: float
    bad: int
    lost: int

    @property
    def rate(self) -> float:
        return self.echoes / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu_s * 1e6 / self.echoes if self.echoes else float("nan")


def nginx_ws_conf(workdir: Path, port: int, backend: int, max_conns: int) -> str:
    return (
        _nginx_main(workdir, max_conns)
        + "http {\n    access_log off;\n"
        + "".join(
            f"    {kind}_temp_path {workdir}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + f"    upstream backends {{\n        server 127.0.0.1:{backend};\n        keepalive 64;\n"
        + "    }\n    server {\n"
        + f"        listen 127.0.0.1:{port};\n"
        + "        location / {\n"
        + "            proxy_pass http://backends;\n"
        + "            proxy_http_version 1.1;\n"
        + "            proxy_set_header Upgrade $http_upgrade;\n"
        + '            proxy_set_header Connection "upgrade";\n'
        + "            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n"
        + "            proxy_read_timeout 3600s;\n"
        + "        }\n    }\n}\n"
    )


def start_proxy(
    key: str, base: Path, port: int, backend: int, cpus: str | None, conns: int
) -> Service:
    """Proxy `key` in front of the echo backend, pinned to `cpus`, ready for `conns` clients."""
    workdir = _workdir(base, key)
    if key == HAPROXY:
        conf = haproxy_conf(port, [backend], conns).replace(
            "    timeout server 30s\n", "    timeout server 30s\n    timeout tunnel 1h\n"
        )
        (workdir / "haproxy.cfg").write_text(conf)
        cmd = ["haproxy", "-db", "-f", str(workdir / "haproxy.cfg")]
    elif key == NGINX:
        # Generous: with 2 per tunnel exactly, nginx still ran out ("reusing connections").
        (workdir / "nginx.conf").write_text(nginx_ws_conf(workdir, port, backend, 2 * conns))
        cmd = _nginx_cmd(workdir)
    elif key == DOPROXY:
        for name, text in doproxy_files(port, [backend]).items():
            (workdir / name).write_text(text)
        cmd = [sys.executable, "-m", "doproxy", "--config", str(workdir / "doproxy.toml")]
        cmd += ["--log-level", "warning"]
    else:
        raise SystemExit(f"unknown proxy {key}")
    service = start(base_label(key), pinned(cmd, cpus), workdir / "log", cwd=workdir)
    try:
        wait_ready(service, port, READY_PATH)
    except BaseException:
        stop(service)
        raise
    return service


def run_client(port: int, pids: list[int], args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, "-m", "bench.websocket", "client", "--port", str(port)]
    cmd += ["--pids", ",".join(map(str, pids)), "--tunnels", str(args.tunnels)]
    cmd += ["--seconds", str(args.seconds), "--size", str(args.size)]
    cmd += ["--timeout", str(args.timeout)]
    limit = args.timeout + args.seconds + 30
    try:
        done = subprocess.run(
            pinned(cmd, args.load_cpu), capture_output=True, text=True, timeout=limit
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError("the WebSocket client did not finish in time") from e
    for line in done.stdout.splitlines():
        if line.startswith(MARKER):
            data: dict[str, float] = json.loads(line[len(MARKER) :])
            return data
    raise BenchError(f"the WebSocket client failed:\n{done.stderr.strip()[-2000:]}")


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        raise SystemExit(f"the hard open-files limit ({hard}) is below {need}: raise it")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))


def table(results: dict[str, list[Result]], args: argparse.Namespace) -> str:
    def med(rs: list[Result], f: str) -> float:
        return float(statistics.median(getattr(r, f) for r in rs))

    ref = results.get(base_label(HAPROXY))
    ref_rate = med(ref, "rate") if ref else 0.0
    ref_cpu = med(ref, "cpu_us") if ref else 0.0
    lines = [
        f"{args.tunnels} WebSocket tunnels echoing {args.size}-byte messages, {args.seconds} s "
        f"windows, {args.reps} run(s) each, medians (an echo = one message each way)",
        "",
        "| proxy | echoes/s | round trip p50 | p99 | proxy CPU µs/echo | echoes/s ÷ HAProxy "
        "| CPU ÷ HAProxy | bad echoes | tunnels lost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, rs in results.items():
        rate, cpu = med(rs, "rate"), med(rs, "cpu_us")
        lines.append(
            f"| {label} | {rate:,.0f} | {med(rs, 'p50_us') / 1000:.2f} ms "
            f"| {med(rs, 'p99_us') / 1000:.2f} ms | {cpu:.1f} "
            f"| {rate / ref_rate if ref_rate else float('nan'):.2f} "
            f"| {cpu / ref_cpu if ref_cpu else float('nan'):.2f} "
            f"| {sum(r.bad for r in rs)} | {sum(r.lost for r in rs)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        import uvloop

        uvloop.run(_serve())
        return 0
    if argv[:1] == ["client"]:
        import uvloop

        p = argparse.ArgumentParser(prog="python -m bench.websocket client")
        for name in ("--port", "--tunnels", "--seconds", "--size"):
            p.add_argument(name, type=int, required=True)
        p.add_argument("--pids", default="")
        p.add_argument("--timeout", type=float, default=60.0)
        args = p.parse_args(argv[1:])
        _raise_nofile(args.tunnels + 100)
        print(MARKER + json.dumps(uvloop.run(_client(args))), flush=True)
        return 0
    p = argparse.ArgumentParser(
        prog="python -m bench.websocket",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tunnels", type=int, default=1000)
    p.add_argument("--seconds", type=int, default=10, help="per window, at most 30 (10)")
    p.add_argument("--size", type=int, default=1024, help="message bytes (1024)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to open the tunnels")
    p.add_argument("--proxies", default=f"{HAPROXY},{NGINX},{DOPROXY}")
    p.add_argument("--proxy-cpu", default="0")
    p.add_argument("--load-cpu", default="1")
    args = p.parse_args(argv)
    args.seconds = max(1, min(args.seconds, 30))
    if (os.cpu_count() or 1) < 2:
        args.proxy_cpu = args.load_cpu = None
    _raise_nofile(4 * args.tunnels + 300)
    keys = [k.strip() for k in args.proxies.split(",") if k.strip()]
    if HAPROXY not in keys:
        keys.insert(0, HAPROXY)  # the reference
    results: dict[str, list[Result]] = {base_label(k): [] for k in keys}
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="doproxy-ws-") as d:
        base = Path(d)
        base.chmod(0o755)
        cmd = pinned([sys.executable, "-m", "bench.websocket", "serve"], args.load_cpu)
        backend = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        stack.callback(backend.wait, 10)
        stack.callback(backend.terminate)
        assert backend.stdout is not None
        backend_port = int(backend.stdout.readline())
        ports = free_ports(len(keys))
        services = {}
        for key, port in zip(keys, ports, strict=True):
            # nginx counts both sides of a tunnel in worker_connections
            conns = 2 * args.tunnels + 100
            service = start_proxy(key, base, port, backend_port, args.proxy_cpu, conns)
            stack.callback(stop, service)
            services[key] = (service, port)
        for rep in range(args.reps):
            for key in keys[rep % len(keys) :] + keys[: rep % len(keys)]:
                service, port = services[key]
                pids = [st.pid for st in process_tree(service.pid)]
                try:
                    data = run_client(port, pids, args)
                except BenchError as e:
                    raise BenchError(
                        f"{base_label(key)}: {e}\nits log:\n{service.log_tail()}"
                    ) from None
                if not service.alive():
                    raise BenchError(f"{base_label(key)} exited:\n{service.log_tail()}")
                r = Result(
                    base_label(key),
                    echoes=int(data["echoes"]),
                    seconds=data["seconds"],
                    cpu_s=data["cpu_s"],
                    p50_us=data["p50_us"],
                    p99_us=data["p99_us"],
                    bad=int(data["bad"]),
                    lost=int(data["lost"]),
                )
                results[r.label].append(r)
                print(
                    f"rep {rep + 1} {r.label:<20} {r.rate:10,.0f} echoes/s  "
                    f"cpu {r.cpu_us:5.1f} µs/echo  p99 {r.p99_us / 1000:.2f} ms",
                    file=sys.stderr,
                )
                time.sleep(1.0)  # the closed tunnels' sockets settle
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
