from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from doproxy.app import build_pool
from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Settings
from doproxy.proxy.server import ProxyServer
from tests.etcd import INSTALL, EtcdCluster, etcd_available
from tests.support import RawBackend, echo_handler

StartProxy = Callable[..., Awaitable[ProxyServer]]


def pytest_asyncio_loop_factories() -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    # The proxy runs on uvloop in production; the tests do too.
    return {"uvloop": uvloop.new_event_loop}


def port_of(server: ProxyServer) -> int:
    return server.addresses[0][1]


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    """Start a ProxyServer on 127.0.0.1:0 in front of the given backend ports.

    Settings are given as the config file's nested dict (kebab-case keys), e.g.
    `await start_proxy([port], {"timeouts": {"response-header": "1s"}})`.
    """
    started: list[ProxyServer] = []

    async def _start(
        ports: list[int],
        config: dict[str, Any] | None = None,
        ssl_context: Any = None,
    ) -> ProxyServer:
        data: dict[str, Any] = {"bind": "127.0.0.1:0"}
        data.update(config or {})
        settings = Settings.model_validate(data)
        entries = [
            InventoryEntry(id=i + 1, name=f"b{i + 1}", server_host=f"127.0.0.1:{p}")
            for i, p in enumerate(ports)
        ]
        server = ProxyServer(settings, build_pool(settings, entries), ssl_context)
        await server.listen()
        started.append(server)
        return server

    yield _start
    for server in started:
        await server.shutdown(grace=0)


@pytest.fixture
async def echo_backend() -> AsyncIterator[RawBackend]:
    b = await RawBackend(echo_handler).start()
    yield b
    await b.close()


@pytest.fixture
async def backend_factory() -> AsyncIterator[Callable[..., Awaitable[RawBackend]]]:
    made: list[RawBackend] = []

    async def _make(handler: Any) -> RawBackend:
        b = await RawBackend(handler).start()
        made.append(b)
        return b

    yield _make
    for b in made:
        await b.close()


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdCluster]:
    """A one-member etcd cluster of its own (tests/etcd.py), ended after the test."""
    if not etcd_available():
        pytest.skip(f"etcd not installed: {INSTALL}")
    async with EtcdCluster(tmp_path / "etcd", size=1) as cluster:
        yield cluster


@pytest.fixture
async def etcd3(tmp_path: Path) -> AsyncIterator[EtcdCluster]:
    """A three-member etcd cluster of its own, ended after the test."""
    if not etcd_available():
        pytest.skip(f"etcd not installed: {INSTALL}")
    async with EtcdCluster(tmp_path / "etcd", size=3) as cluster:
        yield cluster


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition (not a sleep-as-readiness: it returns as soon as it holds)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to test a compiled data plane older than its source (edit, then forget make)."""

    import doproxy.proxy as dp
    from doproxy._compiled import COMPILED, source_path

    if dp.compiled():
        root = source_path("doproxy.__init__").parent  # the package folder
        # The compiled modules' own libraries and the group's: a library left behind by a
        # module that no longer exists (renamed, merged) says nothing about this build.
        stems = {name.rpartition(".")[2] for name in COMPILED} | {"dataplane__mypyc"}
        built = min(p.stat().st_mtime for p in root.rglob("*.so") if p.name.split(".")[0] in stems)
        for name in COMPILED:
            if source_path(name).stat().st_mtime > built:
                pytest.exit(
                    f"{name} changed after it was compiled: run `make test` (or "
                    "`.venv/bin/pip install -e .`) to rebuild, or set DOPROXY_PURE_PYTHON=1",
                    returncode=2,
                )
