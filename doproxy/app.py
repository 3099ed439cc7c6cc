"""Composition root: builds the proxy from a config file, runs it, shuts it down."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import uvloop

from doproxy import service
from doproxy.config import load_settings, resolve_relative
from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Settings, parse_bind
from doproxy.inventory import load_inventory
from doproxy.proxy.server import ProxyServer
from doproxy.runtime import Runtime, build_pool

__all__ = ["build_pool", "demo", "run_proxy", "serve"]

log = logging.getLogger(__name__)


async def run_proxy(
    settings: Settings,
    entries: list[InventoryEntry],
    config_file: Path | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[Runtime], None] | None = None,
    upgrade: bool = False,
) -> None:
    """Serve until `stop` is set or SIGTERM/SIGINT arrives, then shut down gracefully.

    `on_ready` gets the started runtime: its server's addresses, and its admin listener's URL
    (runtime.admin, when enabled). `upgrade`: take over from the doproxy running on the
    config's inventory (doproxy.upgrade); a runtime that hands over to a successor stops too.
    """
    runtime = Runtime(settings, entries, config_file, upgrade=upgrade)
    await runtime.start()
    stop = stop or asyncio.Event()
    runtime.on_handed_over = stop.set
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(runtime)
    service.settle_heap()
    # Under systemd (Type=notify) the unit is "started" from here: the listener accepts, and
    # SIGTERM drains instead of killing. MAINPID: after an upgrade the new process (a child of
    # the old one) is the service's main process (NotifyAccess=all lets it say so).
    service.notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS={runtime.status()}")
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    if not runtime.handed_over:
        # Not after a handover: the successor is the service's main process now, and with
        # NotifyAccess=all systemd would take our STOPPING=1 as the whole service stopping.
        service.notify("STOPPING=1\nSTATUS=stopping: finishing in-flight requests")
    log.info(
        "%s: finishing in-flight requests (grace %.1fs)",
        "handed over, draining" if runtime.handed_over else "shutting down",
        runtime.settings.timeouts.shutdown_grace,
    )
    await runtime.stop()
    log.info("stopped")


def raise_file_limit() -> int:
    """Raise the soft limit on open files to the hard one, and return it.

    Each proxied connection holds two descriptors (client and backend) and the idle pool more;
    the usual soft limit of 1,024 would cap a proxy at a few hundred connections. Go's runtime,
    HAProxy (from maxconn) and nginx (worker_rlimit_nofile) raise it the same way; the hard
    limit stays the administrator's (systemd's LimitNOFILE=, ulimit -Hn)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.debug("open files limit stays %d: %s", soft, e)
            return soft
        return hard
    return soft


def serve(config_file: str, upgrade: bool = False) -> None:
    """`doproxy --config FILE`: load the config and inventory, serve until told to stop.
    `doproxy upgrade --config FILE`: the same, taking over from the running doproxy."""
    raise_file_limit()
    settings = load_settings(config_file)
    inventory = load_inventory(resolve_relative(config_file, settings.inventory_file))
    uvloop.run(run_proxy(settings, inventory, Path(config_file), upgrade=upgrade))


DEMO_CONFIG = """\
# Written by `doproxy demo`: the proxy, autoscaling local demo backends (1 to 4).
bind = "{bind}"
watch-config = false
inventory-file = "inventory.toml"

[backend]
new-host-health-path = "/health"

[health]
interval = "1s"

[provisioning]
enable = true
min-backends = {min_backends}
max-backends = 4
upscale-latency = "90ms"
upscale-time = "3s"
upscale-every = "5s"
downscale-latency = "60ms"
downscale-time = "8s"
downscale-every = "8s"
interval = "1s"
drain-timeout = "5s"
orphans = "destroy"
# `doproxy demo --rollouts`: short windows, so a rollout takes about half a minute.
canary-weight = 25
canary-time = "10s"
rollout-step-time = "5s"
rollout-min-requests = 20

[admin]
# The status page and the admin API. Loopback only, whatever the proxy's bind: read-only on
# loopback needs no token.
bind = "{admin}"

[local-provisioner]
enable = true
# Each backend serves at most 4 requests at once, 50 ms each: latency rises with concurrency.
command = '''python -m doproxy.demo_backend --host {{host}} --port {{port}} --name {{name}}
  --capacity 4 --service-time 0.05'''
ports = "{ports}"
boot-timeout = "10s"
stop-timeout = "2s"
tags = ["doproxy-demo", "{run}"]  # this run's own tag: it destroys only its own backends
"""

# `doproxy demo --load`: heavy load until the pool has grown, then light load so it shrinks.
LOAD_PHASES = ((24, 40.0), (2, 50.0))

# `doproxy demo --rollouts`: under a steady load, a release three times slower (rolled back),
# then a good one (completed). The demo backend's command, with other service times.
DEMO_COMMAND = (
    "python -m doproxy.demo_backend --host {host} --port {port} --name {name} --capacity 4"
)
ROLLOUTS = (
    ("a slower release", DEMO_COMMAND + " --service-time 0.15"),
    ("a good release", DEMO_COMMAND + " --service-time 0.04"),
)
ROLLOUT_LOAD = (4, 150.0)  # clients, at most seconds


async def _demo(bind: str, load: bool, ports: str = "9100-9199", rollouts: bool = False) -> None:
    import tempfile

    from doproxy.loadgen import LoadResult, run_load
    from doproxy.machines import open_provider

    folder = Path(tempfile.mkdtemp(prefix="doproxy-demo-"))
    config = folder / "doproxy.toml"
    run = f"demo-{os.getpid()}"
    # The status page on the port after the proxy's (8001 for `make run`'s 8000: a URL that
    # stays the same from run to run); a proxy on port 0 gets an admin port 0 too, so demos
    # started by tests never collide.
    try:
        proxy_port = parse_bind(bind)[1]
    except ValueError:
        proxy_port = 0  # load_settings says what is wrong with it, with the config's words
    admin = f"127.0.0.1:{proxy_port + 1 if 0 < proxy_port < 65535 else 0}"
    config.write_text(
        DEMO_CONFIG.format(
            bind=bind, ports=ports, run=run, admin=admin, min_backends=2 if rollouts else 1
        ),
        encoding="utf-8",
    )
    settings = load_settings(config)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    def ready(runtime: Runtime) -> None:
        server = runtime.server
        assert server is not None
        host, port = server.addresses[0]
        print(f"doproxy demo: proxy on http://{host}:{port}, autoscaling 1-4 local demo backends")
        print(f"  config and inventory: {folder}")
        if runtime.admin is not None:
            print(f"  status page: {runtime.admin.url()}")
        print(f"try:  curl -s http://{host}:{port}/hello")
        if rollouts:
            work = _roll(host, port, server, runtime)
            tasks.append(asyncio.get_running_loop().create_task(work))
        elif load:
            tasks.append(asyncio.get_running_loop().create_task(_drive(host, port, server)))
        else:
            print("      doproxy demo --load   drives load, so you can watch the pool scale")
        print("stop with Ctrl-C")

    async def _drive(host: str, port: int, server: ProxyServer) -> None:
        while not server.pool.eligible:  # noqa: ASYNC110 - the first backend is booting
            await asyncio.sleep(0.1)
        for clients, seconds in LOAD_PHASES:
            print(f"load: {clients} clients for {seconds:.0f}s")
            result = LoadResult()
            runner = asyncio.get_running_loop().create_task(
                run_load(host, port, clients, seconds, result=result)
            )
            seen = 0
            while not runner.done():
                await asyncio.sleep(5.0)
                fresh = sorted(result.latencies[seen:])
                seen = len(result.latencies)
                p50 = fresh[len(fresh) // 2] * 1000 if fresh else 0.0
                up = len(server.pool.eligible)
                print(
                    f"  {len(fresh) / 5:6.0f} req/s  median {p50:6.1f} ms  "
                    f"failed {result.failed}  backends serving: {up}"
                )
            await runner
        print("load finished; the pool shrinks back to 1 backend. Ctrl-C to stop.")

    async def _roll(host: str, port: int, server: ProxyServer, runtime: Runtime) -> None:
        from doproxy.provisioning import Spec

        scaler = runtime.autoscaler
        assert scaler is not None
        while len(server.pool.eligible) < 2:  # noqa: ASYNC110 - the pool is booting
            await asyncio.sleep(0.1)
        clients, seconds = ROLLOUT_LOAD
        print(f"load: {clients} clients, steady, while two rollouts run")
        result = LoadResult()
        done = asyncio.Event()
        runner = asyncio.get_running_loop().create_task(
            run_load(host, port, clients, seconds, stop=done, result=result)
        )
        try:
            await asyncio.sleep(3.0)  # the old machines' latency, for the canary to beat
            for what, command in ROLLOUTS:
                begun = await scaler.rollouts.start(Spec(command=command), "the demo")
                print(f"rollout {begun['id']}: {what}: {begun['reason']}")
                said = ""
                while scaler.rollouts.active:
                    cur = scaler.rollouts.status()["current"] or {}
                    line = f"  {cur.get('phase')}: {cur.get('old')} old, {cur.get('new')} new"
                    if line != said:
                        print(line)
                        said = line
                    await asyncio.sleep(0.5)
                ended = scaler.rollouts.history[-1]
                print(f"  {ended['phase']}: {ended['reason']}")
        finally:
            done.set()
            await runner
        print(f"rollouts finished; {result.ok} requests answered, {result.failed} failed.")
        print("Ctrl-C to stop.")

    try:
        await run_proxy(settings, [], config, stop=stop, on_ready=ready)
    finally:
        for t in tasks:
            t.cancel()
        provider = open_provider(settings, folder)
        try:
            for m in await provider.list():
                await provider.destroy(m.id)
            left = await provider.list()
        finally:
            await provider.close()
        # The folder is the demo's own, made for this run: removed once nothing it started
        # is left (else kept, with the inventory that names what is still running).
        if not left:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"doproxy demo: {len(left)} backend(s) still running, see {folder}")


def demo(
    bind: str = "127.0.0.1:8000",
    load: bool = False,
    ports: str = "9100-9199",
    rollouts: bool = False,
) -> None:
    uvloop.run(_demo(bind, load, ports, rollouts))
