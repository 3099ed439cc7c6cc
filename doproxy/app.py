"""Composition root: builds the proxy from a config file, runs it, shuts it down."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import uvloop

from doproxy.config import load_settings, resolve_relative
from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Settings
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
    on_ready: Callable[[ProxyServer], None] | None = None,
) -> None:
    """Serve until `stop` is set or SIGTERM/SIGINT arrives, then shut down gracefully."""
    runtime = Runtime(settings, entries, config_file)
    server = await runtime.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
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
        runtime.settings.timeouts.shutdown_grace,
    )
    await runtime.stop()
    log.info("stopped")


def serve(config_file: str) -> None:
    """`doproxy --config FILE`: load the config and inventory, serve until told to stop."""
    settings = load_settings(config_file)
    inventory = load_inventory(resolve_relative(config_file, settings.inventory_file))
    uvloop.run(run_proxy(settings, inventory, Path(config_file)))


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
        await run_proxy(settings, entries, on_ready=ready)
    finally:
        for s in servers:
            s.close()


def demo(bind: str = "127.0.0.1:8000", count: int = 2) -> None:
    uvloop.run(_demo(bind, count))
