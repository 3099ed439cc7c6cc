"""Instructions per proxied request, counted by callgrind: the data plane's cost, without noise.

`python -m bench.instructions [--python .venv/bin/python] [--requests 4000] [--close]` starts
one nginx serving a 2-byte file on two 127.0.0.1 ports (the backends), and doproxy in front of
them under `valgrind --tool=callgrind` with instrumentation off. Ten keep-alive clients send a
3-header GET (with --close: each request on a connection of its own, `Connection: close`)
each until the proxy has warmed up; then instrumentation is switched on for `--requests` more,
off again, and the instructions counted in between are divided by that number.

Unlike wall-clock or CPU time, this count barely moves between runs (about ±1,000 of ~38,000)
and not at all with the machine's load, so it tells whether a change to the request path made
it cheaper or dearer. It counts user space only (Python, llhttp, uvloop, libc), not the kernel.
Measure the data plane as installed: run it with the python of a venv where doproxy is compiled
(`pip install -e .`), or with DOPROXY_PURE_PYTHON unset. docs/benchmarks.md has the numbers.

Needs valgrind (callgrind_control) and nginx (scripts/debian-deps.sh bench installs nginx).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REQUEST = b"GET /2b HTTP/1.1\r\nHost: x\r\n\r\n"
CLOSE = b"GET /2b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
CLIENTS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def nginx_conf(work: Path, ports: list[int]) -> str:
    temp = " ".join(
        f"{d}_temp_path {work}/{d};" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    listen = " ".join(f"listen 127.0.0.1:{p};" for p in ports)
    # As root, nginx's workers would run as nobody, who cannot read the private temp directory.
    user = "user root; " if os.geteuid() == 0 else ""
    return (
        f"{user}daemon off; master_process on; worker_processes 1; error_log stderr warn;"
        f" pid {work}/nginx.pid;\n"
        "events { worker_connections 4096; }\n"
        f"http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 75s; {temp}\n"
        f" server {{ {listen} root {work}/www; }} }}\n"
    )


async def client(port: int, n: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(n):
        writer.write(REQUEST)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):  # counting errors would measure the wrong path
            raise SystemExit(f"unexpected response: {head[:200]!r}")
        await reader.readexactly(2)
    writer.close()


async def closing_client(port: int, n: int) -> None:
    """Each request on a connection of its own, `Connection: close`, read to the proxy's
    close: what the `Connection: close` workload of the bench does."""
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(CLOSE)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            raise SystemExit(f"unexpected response: {head[:200]!r}")
        await reader.read()  # the body, then the proxy's close
        writer.close()


CLOSING = False  # --close


async def drive(port: int, conns: int, each: int) -> None:
    one = closing_client if CLOSING else client
    await asyncio.gather(*(one(port, each) for _ in range(conns)))


def wait_until_serving(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            asyncio.run(drive(port, 1, 1))
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def total_instructions(out: Path) -> int:
    total = 0
    for name in glob.glob(f"{out}*"):
        with open(name, errors="replace") as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
    return total


def measure(python: str, requests: int, keep: Path | None) -> float:
    for tool in ("valgrind", "callgrind_control", "nginx"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            raise SystemExit(f"{tool} is needed (apt-get install valgrind nginx)")
    work = Path(tempfile.mkdtemp(prefix="doproxy-instructions-"))
    (work / "www").mkdir()
    (work / "www" / "2b").write_bytes(b"ok")
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work / d).mkdir()
    backends = [free_port(), free_port()]
    (work / "nginx.conf").write_text(nginx_conf(work, backends))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    ng = subprocess.Popen(
        [nginx, "-c", str(work / "nginx.conf"), "-p", str(work)], stderr=subprocess.DEVNULL
    )
    port = free_port()
    (work / "doproxy.toml").write_text(
        f'bind = "127.0.0.1:{port}"\nwatch-config = false\n[health]\ninterval = "60s"\n'
    )
    (work / "inventory.toml").write_text(
        "".join(
            f'[[backend]]\nid = {i + 1}\nname = "b{i + 1}"\nserver-host = "127.0.0.1:{p}"\n'
            for i, p in enumerate(backends)
        )
    )
    out = (keep or work) / "callgrind.out"
    env = dict(os.environ)
    env.pop("DOPROXY_PURE_PYTHON", None)  # measure the data plane as installed
    proxy = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            python,
            "-m",
            "doproxy",
            "--config",
            str(work / "doproxy.toml"),
        ],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_serving(port)
        asyncio.run(drive(port, CLIENTS, 40))  # warm-up: pooled backend connections, caches
        control = ["callgrind_control"]
        subprocess.run([*control, "-i", "on", str(proxy.pid)], stdout=subprocess.DEVNULL)
        asyncio.run(drive(port, CLIENTS, requests // CLIENTS))
        subprocess.run([*control, "-i", "off", str(proxy.pid)], stdout=subprocess.DEVNULL)
        subprocess.run([*control, "-d", str(proxy.pid)], stdout=subprocess.DEVNULL)
        time.sleep(1)
        return total_instructions(out) / (requests // CLIENTS * CLIENTS)
    finally:
        proxy.terminate()
        proxy.wait(30)
        ng.terminate()
        ng.wait(10)
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.instructions", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the python whose doproxy to measure (default: this one), e.g. .venv/bin/python",
    )
    parser.add_argument("--requests", type=int, default=4000, help="requests counted (4000)")
    parser.add_argument(
        "--close",
        action="store_true",
        help="a connection per request (Connection: close), as the bench's close workload",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        help="keep the callgrind output in this directory (for callgrind_annotate)",
    )
    args = parser.parse_args()
    global CLOSING
    CLOSING = args.close
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        args.keep = args.keep.resolve()
    # Absolute: valgrind runs it from a temporary directory, where `.venv/bin/python` (as the
    # docs write it) would name nothing.
    python = str(Path(args.python).absolute()) if os.sep in args.python else args.python
    per_request = measure(python, args.requests, args.keep)
    print(f"{per_request:,.0f} instructions per request ({args.python})")


if __name__ == "__main__":
    main()
