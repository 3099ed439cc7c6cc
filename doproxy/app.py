"""Composition root: builds the proxy from a config file, runs it, shuts it down."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

import uvloop

from doproxy.config import load_settings, resolve_relative
from doproxy.core.balancers import make_balancer
from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Settings
from doproxy.health import HealthChecker
from doproxy.inventory import load_inventory
from doproxy.proxy.backend import Backend, Pool
from doproxy.proxy.server import ProxyServer, make_tls_context
from doproxy.statistics import StatsCollector

log = logging.getLogger(__name__)


def build_pool(
    settings: Settings, entries: list[InventoryEntry], clock: Callable[[], float] = time.monotonic
) -> Pool:
    backends = [Backend(e) for e in entries]
    return Pool(backends=backends, balancer=make_balancer(settings.loadbalancing.type, clock))


async def run_proxy(
    settings: Settings,
    entries: list[InventoryEntry],
    base: Path,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[ProxyServer], None] | None = None,
) -> None:
    """Serve until `stop` is set or SIGTERM/SIGINT arrives, then shut down gracefully."""
    ssl_ctx = None
    if settings.https:
        ssl_ctx = make_tls_context(
            str(resolve_relative(base / "x", settings.tls_cert_file)),
            str(resolve_relative(base / "x", settings.tls_key_file)),
        )
    loop = asyncio.get_running_loop()
    server = ProxyServer(settings, build_pool(settings, entries, time.monotonic), ssl_ctx)
    await server.listen()
    checker = HealthChecker(settings, sink=lambda backend, state: server.pool.refresh())
    checker.watch(server.pool.backends)
    stats = StatsCollector(lambda: server.pool, settings.backend.latency_average_seconds)
    stats_task = loop.create_task(stats.run(time.monotonic))
    for host, port in server.addresses:
        log.info("listening on %s:%d (%s)", host, port, "https" if ssl_ctx else "http")
    log.info("%d backend(s), balancing %s", len(entries), settings.loadbalancing.type)
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(server)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info(
        "shutting down: finishing in-flight requests (grace %.1fs)",
        settings.timeouts.shutdown_grace,
    )
    stats_task.cancel()
    await checker.stop()
    await server.shutdown()
    log.info("stopped")


def serve(config_file: str) -> None:
    """`doproxy --config FILE`: load the config and inventory, serve until told to stop."""
    settings = load_settings(config_file)
    inventory = load_inventory(resolve_relative(config_file, settings.inventory_file))
    base = Path(config_file).resolve().parent
    uvloop.run(run_proxy(settings, inventory, base))


async def _demo(bind: str, count: int) -> None:
    from doproxy.demo_backend import start_demo_backend

    entries = []
    servers = []
    for i in range(count):
        server, port = await start_demo_backend(f"demo-backend-{i + 1}")
        servers.append(server)
        entries.append(
            InventoryEntry(id=i + 1, name=f"demo-backend-{i + 1}", server_host=f"127.0.0.1:{port}")
        )
    settings = Settings.model_validate(
        {"bind": bind, "watch-config": False, "backend": {"new-host-health-path": "/health"}}
    )

    def ready(server: ProxyServer) -> None:
        host, port = server.addresses[0]
        print(f"doproxy demo: proxy on http://{host}:{port} in front of {count} demo backends")
        for e in entries:
            print(f"  backend {e.name} at {e.server_host}")
        print(f"try:  curl -s http://{host}:{port}/hello   (repeat it: the backends take turns)")
        print("stop with Ctrl-C")

    try:
        await run_proxy(settings, entries, Path.cwd(), on_ready=ready)
    finally:
        for s in servers:
            s.close()


def demo(bind: str = "127.0.0.1:8000", count: int = 2) -> None:
    uvloop.run(_demo(bind, count))
