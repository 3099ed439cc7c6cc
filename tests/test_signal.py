"""The autoscaler's signal: what it measures (docs/autoscaling.md, "The signal").

Every exchange a backend finished or failed counts, with the time its user waited for the
response head: a timeout counts as its full wait, a streamed body or a tunnel not at all beyond
its head. The totals belong to the listener, so a backend leaving the pool never makes an
interval read as idle.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from doproxy.autoscaler import Autoscaler
from doproxy.core.settings import Settings
from doproxy.machines import FileStore
from doproxy.proxy.backend import Backend
from tests.conftest import StartProxy, port_of
from tests.support import RawBackend, RequestReader, get, request, silent

pytestmark = pytest.mark.timeout(30)


async def test_a_timeout_counts_as_its_full_wait(
    start_proxy: StartProxy, backend_factory: Any
) -> None:
    backend = await backend_factory(silent)
    proxy = await start_proxy(
        [backend.port], {"timeouts": {"response-header": "0.4s"}, "retries": {"attempts": 0}}
    )
    r = await asyncio.wait_for(request(port_of(proxy), get()), 5)
    assert r.status == 504
    assert proxy.exchanges == 1
    assert proxy.exchange_time >= 0.35  # the wait, not zero and not "nothing happened"


async def test_a_streamed_body_counts_only_until_its_head(
    start_proxy: StartProxy, backend_factory: Any
) -> None:
    async def stream(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
    ) -> None:
        await RequestReader(reader).next()
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(5):
            await asyncio.sleep(0.2)  # the stream's pace, not a readiness wait
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    backend = await backend_factory(stream)
    proxy = await start_proxy([backend.port])
    r = await asyncio.wait_for(request(port_of(proxy), get()), 5)
    assert r.body == b"xxxxx"
    assert proxy.exchanges == 1
    assert proxy.exchange_time < 0.5  # the body took about 1 s; the head came at once
    assert proxy.pool.backends[0].latency_sum < 0.5


class _Runtime:
    """The Proxy protocol the scaler needs, with traffic set by the test."""

    def __init__(self, settings: Settings, backends: list[Backend], folder: Path) -> None:
        self.settings = settings
        self.backends = backends
        self.inventory_path = folder / "inventory.toml"
        self.store = FileStore(self.inventory_path)
        self.owner = "doproxy-owner-test"
        self.totals = (0, 0.0)

    def traffic(self) -> tuple[int, float]:
        return self.totals

    def wake_state(self) -> tuple[int, float | None, bool]:
        return 0, None, False

    def wake_failure_handled(self) -> None:
        pass

    async def reload(self) -> bool:
        return True

    async def apply_inventory(self) -> bool:
        return True

    def takes_traffic(self, key: str) -> bool:
        return False


class _Provider:
    kind = "local"

    async def close(self) -> None:
        return None


def test_a_backend_leaving_the_pool_does_not_read_as_idle(tmp_path: Path) -> None:
    from doproxy.core.inventory_model import InventoryEntry

    settings = Settings.model_validate({"provisioning": {"enable": False}})
    b1, b2 = (
        Backend(InventoryEntry(id=i, name=f"b{i}", server_host=f"127.0.0.1:{9000 + i}"))
        for i in (1, 2)
    )
    rt = _Runtime(settings, [b1, b2], tmp_path)
    scaler = Autoscaler(rt, _Provider())  # type: ignore[arg-type]
    rt.totals = (100, 20.0)
    scaler.observe(0.0)
    # b2 served half of the next interval's requests and then left the pool.
    rt.backends = [b1]
    rt.totals = (200, 50.0)
    obs = scaler.observe(5.0)
    assert obs.latency == pytest.approx(0.3)  # 100 exchanges, 30 s of waiting
    assert obs.requests_per_second == pytest.approx(20.0)
