"""The servers under test and the backends: config files in a temp dir, start, readiness.

Every process listens on 127.0.0.1 only, on ports found free just before. Config files, pid
files and logs live in the run's temporary directory and vanish with it.
"""

from __future__ import annotations

import os
import sys
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import ProcStat, Service, pinned, process_tree, start, stop, wait_ready

BODIES = {"/2b": 2, "/16k": 16 * 1024}
READY_PATH = "/2b"

# Proxy keys, in table order. "none" is wrk straight at one backend (the ceiling).
NONE, HAPROXY, NGINX, DOPROXY = "none", "haproxy", "nginx", "doproxy"
PROXY_KEYS = (NONE, HAPROXY, NGINX, DOPROXY)
# Processes (nginx, doproxy) or threads (HAProxy) of every proxy under test: `--workers`.
WORKERS = 1


def set_workers(count: int) -> None:
    global WORKERS
    WORKERS = max(count, 1)


def base_label(proxy: str) -> str:
    n = WORKERS
    return {
        NONE: "no proxy",
        HAPROXY: f"HAProxy, nbthread {n}",
        NGINX: f"nginx, {n} worker{'s' if n > 1 else ''}",
        DOPROXY: "doproxy" if n == 1 else f"doproxy, {n} workers",
    }[proxy]


BACKEND_PORTS = 2  # the nginx backend listens on this many ports


LOG = "+log"  # a key's suffix: the proxy writes an access log line for every request


def parse_key(key: str) -> tuple[str, str, int | None]:
    """A target key: "haproxy", or with the pool-size dimension "haproxy@200" or
    "doproxy:leastconn@200" -> (proxy, doproxy's balancer or "", pool size or None).
    A key may end in "+log" (see `logs`)."""
    head, _, size = key.removesuffix(LOG).partition("@")
    proxy, _, balancer = head.partition(":")
    return proxy, balancer, int(size) if size else None


def logs(key: str) -> bool:
    """Does this target write an access log (`--access-log`)?"""
    return key.endswith(LOG)


def variant_key(proxy: str, balancer: str, size: int) -> str:
    return f"{proxy}{':' + balancer if balancer else ''}@{size}"


def label_of(key: str) -> str:
    proxy, balancer, size = parse_key(key)
    text = base_label(proxy) + (f" {balancer}" if balancer else "")
    text += f", {size} backends" if size is not None else ""
    return text + (", access log" if logs(key) else "")


def reference_of(key: str) -> str:
    """The row a target's ratios are taken against: HAProxy with the same pool, and with its
    access log on when the target's is."""
    _, _, size = parse_key(key)
    ref = HAPROXY if size is None else variant_key(HAPROXY, "", size)
    return ref + (LOG if logs(key) else "")


def pool_ports(ports: list[int], size: int | None) -> list[int]:
    """The inventory for a pool of `size`: the backend ports repeated (as issue 12 measured:
    the same two servers, many entries)."""
    return list(ports) if size is None else [ports[i % len(ports)] for i in range(size)]


class Scraper:
    """Scrapes doproxy's admin /metrics once a second while the benchmark runs, as Prometheus
    would: the admin listener is on by default, so its cost belongs in the numbers."""

    def __init__(self, addr_file: Path, every: float = 1.0) -> None:
        self.addr_file = addr_file  # written by doproxy once its admin listener is up
        self.every = every
        self.scrapes = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                url = f"http://{self.addr_file.read_text().strip()}/metrics"
                with urllib.request.urlopen(url, timeout=5) as r:
                    r.read()
                self.scrapes += 1
            except OSError:
                self.failures += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def note(self) -> str:
        return (
            f"doproxy's admin /metrics was scraped once a second throughout: {self.scrapes} "
            f"scrapes, {self.failures} failed"
        )


@dataclass
class Target:
    """Something wrk is pointed at: a proxy we started, or a backend directly."""

    key: str
    port: int
    service: Service | None = None
    procs: list[ProcStat] = field(default_factory=list)  # whose CPU time we read
    scraper: Scraper | None = None
    access_log: Path | None = None  # the file its access log goes to (`--access-log`)
    log_lines: int = 0  # lines found in it after the measured runs (bench.runner counts)
    log_requests: int = 0  # requests wrk completed in those runs

    @property
    def label(self) -> str:
        return label_of(self.key)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _nginx_main(workdir: Path, max_conns: int = 4096, processes: int = 1) -> str:
    """The top of an nginx.conf that runs in the foreground with everything in `workdir`."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}daemon off;\nmaster_process on;\nworker_processes {processes};\n"
        f"worker_rlimit_nofile {2 * max_conns + 64};\n"
        f"error_log stderr warn;\npid {workdir}/nginx.pid;\n"
        f"events {{ worker_connections {max_conns}; }}\n"
    )


def _nginx_http_common(workdir: Path) -> str:
    temp = "".join(
        f"    {kind}_temp_path {workdir}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"    access_log off;\n    keepalive_requests 1000000;\n    keepalive_timeout 75s;\n{temp}"
    )


def backend_nginx_conf(workdir: Path, ports: list[int], docroot: Path) -> str:
    listens = "".join(f"        listen 127.0.0.1:{p};\n" for p in ports)
    return (
        _nginx_main(workdir)
        + "http {\n"
        + _nginx_http_common(workdir)
        + "    default_type application/octet-stream;\n"
        + "    open_file_cache max=16;\n    open_file_cache_valid 1h;\n"
        + "    server {\n"
        + listens
        + f"        root {docroot};\n"
        + "    }\n}\n"
    )


def nginx_proxy_conf(
    workdir: Path,
    port: int,
    backends: list[int],
    max_conns: int = 4096,
    access_log: Path | None = None,
) -> str:
    """`access_log`: log every request there in nginx's combined format, buffered as doproxy
    buffers its own (64 KiB, flushed within a second)."""
    servers = "".join(f"        server 127.0.0.1:{p};\n" for p in backends)
    common = _nginx_http_common(workdir)
    if access_log is not None:
        common = common.replace(
            "access_log off;", f"access_log {access_log} combined buffer=64k flush=1s;"
        )
    return (
        _nginx_main(workdir, max_conns, WORKERS)
        + "http {\n"
        + common
        + "    upstream backends {\n"
        + servers
        + "        keepalive 64;\n        keepalive_requests 1000000;\n    }\n"
        + "    server {\n"
        + f"        listen 127.0.0.1:{port};\n"
        + "        location / {\n"
        + "            proxy_pass http://backends;\n"
        + "            proxy_http_version 1.1;\n"
        + '            proxy_set_header Connection "";\n'
        + "            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n"
        + "            proxy_set_header X-Forwarded-Proto $scheme;\n"
        + "            proxy_set_header X-Forwarded-Host $http_host;\n"
        + "            proxy_set_header X-Forwarded-Port $server_port;\n"
        + "            proxy_set_header X-Real-IP $remote_addr;\n"
        + "        }\n    }\n}\n"
    )


# The forwarding headers doproxy adds by default (forwarded-header = "x-forwarded"), added by
# HAProxy and nginx too, so that every proxy does the same work per request and every backend
# parses the same request head.
_HAPROXY_FORWARDING = (
    "    http-request set-header X-Forwarded-Proto http\n"
    "    http-request set-header X-Forwarded-Host %[req.hdr(host)]\n"
    "    http-request set-header X-Forwarded-Port %[dst_port]\n"
    "    http-request set-header X-Real-IP %[src]\n"
)


def haproxy_conf(
    port: int, backends: list[int], max_conns: int = 4096, access_log: bool = False
) -> str:
    """`access_log`: `option httplog` for every request, written to standard output (HAProxy
    writes no files itself; the harness points its standard output at a file)."""
    servers = "".join(f"    server b{i} 127.0.0.1:{p}\n" for i, p in enumerate(backends, 1))
    logging = ("    log stdout format raw local0\n", "    log global\n    option httplog\n")
    return (
        f"global\n    nbthread {WORKERS}\n    maxconn {max_conns}\n"
        + (logging[0] if access_log else "")
        + "\ndefaults\n    mode http\n    timeout connect 5s\n    timeout client 30s\n"
        "    timeout server 30s\n    option http-keep-alive\n    http-reuse always\n"
        "    option forwardfor\n" + (logging[1] if access_log else "") + "\n"
        f"frontend fe\n    bind 127.0.0.1:{port}\n"
        + _HAPROXY_FORWARDING
        + "    default_backend be\n\n"
        f"backend be\n    balance roundrobin\n{servers}"
    )


def doproxy_files(
    port: int,
    backends: list[int],
    balancer: str = "",
    health_checks: bool = True,
    access_log: str = "",
) -> dict[str, str]:
    inventory = "".join(
        f'[[droplet]]\nid = {i}\nname = "b{i}"\nserver-host = "127.0.0.1:{p}"\n\n'
        for i, p in enumerate(backends, 1)
    )
    config = (
        f'bind = "127.0.0.1:{port}"\nwatch-config = false\ninventory-file = "inventory.toml"\n'
        + (f"workers = {WORKERS}\n" if WORKERS > 1 else "")
        # The combined format, as nginx's and close to HAProxy's httplog.
        + (f'access-log = true\naccess-log-file = "{access_log}"\n' if access_log else "")
        # The admin listener is on, as by default; port 0 so runs side by side never collide.
        + '[admin]\nbind = "127.0.0.1:0"\n'
    )
    if balancer:
        config += f'[loadbalancing]\ntype = "{balancer}"\n'
    if not health_checks:
        config += "[backend]\ndisable-health-check = true\n"
    return {"doproxy.toml": config, "inventory.toml": inventory}


def _workdir(base: Path, name: str) -> Path:
    d = base / name
    d.mkdir(mode=0o755)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / kind).mkdir(mode=0o755)
    return d


def _nginx_cmd(workdir: Path) -> list[str]:
    return ["nginx", "-p", str(workdir), "-e", "stderr", "-c", str(workdir / "nginx.conf")]


def start_backends(base: Path, ports: list[int], cpus: str | None) -> Service:
    """One nginx serving /2b and /16k on every port in `ports`."""
    workdir = _workdir(base, "backends")
    docroot = workdir / "www"
    docroot.mkdir(mode=0o755)
    for path, size in BODIES.items():
        (docroot / path.lstrip("/")).write_bytes(b"x" * size)
    (workdir / "nginx.conf").write_text(backend_nginx_conf(workdir, ports, docroot))
    service = start("backend nginx", pinned(_nginx_cmd(workdir), cpus), workdir / "log")
    try:
        for port in ports:
            wait_ready(service, port, READY_PATH)
    except BaseException:
        stop(service)
        raise
    return service


def _start_proxy(
    key: str, base: Path, port: int, ports: list[int], cpus: str | None, max_conns: int = 4096
) -> Service:
    workdir = _workdir(base, key)
    proxy, balancer, size = parse_key(key)
    backends = pool_ports(ports, size)
    access = access_log_path(base, key)
    stdout = None
    if proxy == HAPROXY:
        (workdir / "haproxy.cfg").write_text(
            haproxy_conf(port, backends, max_conns, access_log=access is not None)
        )
        cmd = ["haproxy", "-db", "-f", str(workdir / "haproxy.cfg")]
        stdout = access  # its log lines; warnings go to standard error, the log
    elif proxy == NGINX:
        (workdir / "nginx.conf").write_text(
            nginx_proxy_conf(workdir, port, backends, max_conns, access)
        )
        cmd = _nginx_cmd(workdir)
    elif proxy == DOPROXY:
        # With the pool-size dimension, health checks are off, as in issue 12's measurement:
        # the balancers' cost is measured, not that of checking the same two servers 200 times.
        files = doproxy_files(
            port,
            backends,
            balancer,
            health_checks=size is None,
            access_log=access.name if access is not None else "",
        )
        for name, text in files.items():
            (workdir / name).write_text(text)
        config = str(workdir / "doproxy.toml")
        cmd = [sys.executable, "-m", "doproxy", "--config", config, "--log-level", "warning"]
    else:
        raise ValueError(key)
    return start(label_of(key), pinned(cmd, cpus), workdir / "log", cwd=workdir, stdout=stdout)


def access_log_path(base: Path, key: str) -> Path | None:
    """Where target `key` writes its access log, or None when it writes none."""
    return base / key / "access.log" if logs(key) else None


def start_target(
    key: str,
    base: Path,
    port: int,
    backends: list[int],
    cpus: str | None,
    max_conns: int = 4096,
) -> Target:
    """Start proxy `key` (or, for "none", point at the first backend) and wait until it serves.
    `max_conns`: the client connections HAProxy and nginx are configured for (doproxy has no
    such limit; it raises its open-files limit at start)."""
    if parse_key(key)[0] == NONE:
        return Target(key, backends[0])
    service = _start_proxy(key, base, port, backends, cpus, max_conns)
    try:
        wait_ready(service, port, READY_PATH)
    except BaseException:
        stop(service)
        raise
    scraper = None
    if parse_key(key)[0] == DOPROXY:
        scraper = Scraper(base / key / "inventory.toml.admin.addr")
    target = Target(key, port, service, process_tree(service.pid), scraper)
    target.access_log = access_log_path(base, key)
    return target
