"""The autoscaler end to end: real proxy, real backends (local processes or fake droplets that
serve), real load. Durations are short, set in each test's config."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from doproxy.config import load_settings
from doproxy.core.inventory_model import InventoryEntry
from doproxy.inventory import load_inventory
from doproxy.loadgen import LoadResult, run_load
from doproxy.machines import open_provider
from doproxy.runtime import Runtime
from doproxy.testing.fake_digitalocean import FakeDigitalOcean
from tests.conftest import wait_for
from tests.procs import start_proxy_process

TOKEN = "dop_v1_autoscaler-test-token"

POLICY = """
[health]
interval = "200ms"
down-interval = "200ms"
rise = 1

[provisioning]
enable = true
min-backends = 1
max-backends = 3
upscale-latency = "100ms"
upscale-time = "1s"
upscale-every = "1s"
downscale-latency = "70ms"
downscale-time = "1500ms"
downscale-every = "1s"
interval = "250ms"
drain-timeout = "5s"
"""

# Each backend serves 2 requests at once, 40 ms each: 8 clients on one backend wait ~160 ms.
BACKEND = "--capacity 2 --service-time 0.04"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_range(width: int = 20) -> str:
    """A random range below the kernel's ephemeral ports (32768-60999), so no outgoing
    connection takes a port between the provider's check and the backend's bind."""
    import random

    base = random.randrange(20000, 32768 - width)
    return f"{base}-{base + width - 1}"


def local_config(tmp: Path, tag: str, extra: str = "") -> Path:
    cfg = tmp / "doproxy.toml"
    cfg.write_text(
        f"""bind = "127.0.0.1:0"
watch-config = false
inventory-file = "inventory.toml"

[admin]
bind = "127.0.0.1:0"

[backend]
new-host-health-path = "/health"
{POLICY}
[local-provisioner]
enable = true
command = "python -m doproxy.demo_backend --host {{host}} --port {{port}} --name {{name}} {BACKEND}"
ports = "{port_range()}"
boot-timeout = "10s"
stop-timeout = "2s"
tags = ["{tag}"]
{extra}"""
    )
    return cfg


def serving(rt: Runtime) -> int:
    assert rt.server is not None
    return len(rt.server.pool.eligible)


@dataclass
class Scaled:
    grew_to: int
    heavy: LoadResult
    light: LoadResult


async def scale_up_and_down(rt: Runtime) -> Scaled:
    """Heavy load until the pool grows, then light load until it is back to one backend."""
    assert rt.server is not None
    await wait_for(lambda: serving(rt) == 1, timeout=15)  # min-backends, created at start
    host, port = rt.server.addresses[0]
    stop = asyncio.Event()
    heavy = LoadResult()
    load = asyncio.create_task(run_load(host, port, 8, 30.0, stop=stop, result=heavy))
    try:
        await wait_for(lambda: serving(rt) >= 2, timeout=25)
    finally:
        stop.set()
        await load
    grew_to = serving(rt)
    # Light load: latency falls below downscale-latency, the pool shrinks while serving it.
    stop = asyncio.Event()
    light = LoadResult()
    load = asyncio.create_task(run_load(host, port, 1, 30.0, stop=stop, result=light))
    try:
        scaler = rt.autoscaler
        assert scaler is not None
        await wait_for(lambda: serving(rt) == 1 and not scaler.retiring, timeout=25)
    finally:
        stop.set()
        await load
    return Scaled(grew_to, heavy, light)


@pytest.mark.timeout(90)
async def test_local_provider_scales_up_under_load_and_back_down(tmp_path: Path) -> None:
    tag = f"doproxy-test-{uuid.uuid4().hex[:8]}"
    cfg = local_config(tmp_path, tag)
    settings = load_settings(cfg)
    rt = Runtime(settings, [], cfg)
    await rt.start()
    try:
        result = await scale_up_and_down(rt)
        assert result.grew_to >= 2
        assert result.light.failed == 0, result.light.errors  # 0 failed during the scale-down
        assert result.heavy.failed == 0, result.heavy.errors
        assert rt.autoscaler is not None
        actions = [r.action for r in rt.autoscaler.history]
        assert "up" in actions and "down" in actions
        reasons = " | ".join(r.reason for r in rt.autoscaler.history)
        assert "ms" in reasons  # decisions carry their numbers
        entries = load_inventory(tmp_path / "inventory.toml")
        assert len([e for e in entries if e.state == "active"]) == 1
    finally:
        await rt.stop()
        await destroy_all(settings, tmp_path)


async def destroy_all(settings: object, folder: Path) -> None:
    from doproxy.core.settings import Settings

    assert isinstance(settings, Settings)
    provider = open_provider(settings, folder)
    for m in await provider.list():
        await provider.destroy(m.id)
    await provider.close()


async def machines(settings: object, folder: Path) -> set[str]:
    from doproxy.core.settings import Settings

    assert isinstance(settings, Settings)
    provider = open_provider(settings, folder, {"DIGITALOCEAN_TOKEN": TOKEN})
    try:
        return {m.id for m in await provider.list()}
    finally:
        await provider.close()


def inventory_ids(folder: Path) -> set[str]:
    return {str(e.id) for e in load_inventory(folder / "inventory.toml") if e.id not in (0, "")}


def provisioning(folder: Path) -> list[InventoryEntry]:
    try:
        return [e for e in load_inventory(folder / "inventory.toml") if e.state == "provisioning"]
    except Exception:
        return []


@pytest.mark.timeout(90)
async def test_kill_9_during_a_local_provision_leaks_and_forgets_nothing(tmp_path: Path) -> None:
    tag = f"doproxy-test-{uuid.uuid4().hex[:8]}"
    # The backend sleeps before it listens, so the kill lands while it boots.
    cfg = local_config(
        tmp_path,
        tag,
    ).read_text()
    cfg = cfg.replace("min-backends = 1", "min-backends = 2").replace(
        'command = "python -m doproxy.demo_backend',
        'command = "python -m doproxy.demo_backend --boot-delay 1.5',
    )
    (tmp_path / "doproxy.toml").write_text(cfg)
    settings = load_settings(tmp_path / "doproxy.toml")
    try:
        proxy = await start_proxy_process(tmp_path / "doproxy.toml")
        await wait_for(lambda: len(provisioning(tmp_path)) >= 1, timeout=15)
        os.kill(proxy.pid, signal.SIGKILL)
        await proxy.proc.wait()
        # Restart: it reconciles (adopts what was booting), then fills up to min-backends.
        proxy = await start_proxy_process(tmp_path / "doproxy.toml")
        try:

            async def settled() -> bool:
                ids = inventory_ids(tmp_path)
                live = await machines(settings, tmp_path)
                entries = load_inventory(tmp_path / "inventory.toml")
                return len(ids) == 2 and ids == live and all(e.state == "active" for e in entries)

            async with asyncio.timeout(30):
                while not await settled():
                    await asyncio.sleep(0.1)
        finally:
            await proxy.stop()
        # After a clean stop the machines keep running and stay in the inventory.
        assert inventory_ids(tmp_path) == await machines(settings, tmp_path)
    finally:
        await destroy_all(settings, tmp_path)


# --- the same against the fake DigitalOcean API ---------------------------------------------


def do_config(tmp: Path, url: str, port: int, extra: str = "") -> Path:
    cfg = tmp / "doproxy.toml"
    cfg.write_text(
        f"""bind = "127.0.0.1:0"
watch-config = false
inventory-file = "inventory.toml"

[admin]
bind = "127.0.0.1:0"

[backend]
new-host-port = {port}
new-host-health-path = "/health"
{POLICY}
[do-provisioner]
enable = true
token = "{TOKEN}"
api-url = "{url}"
create-timeout = "20s"
poll-interval = "50ms"
{extra}"""
    )
    return cfg


@pytest.fixture
async def fake_do() -> AsyncIterator[tuple[FakeDigitalOcean, int]]:
    port = free_port()
    async with FakeDigitalOcean(
        token=TOKEN,
        active_after=0.3,
        serve_backends=True,
        backend_port=port,
        backend_capacity=2,
        backend_service_time=0.04,
    ) as fake:
        yield fake, port
        assert fake.violations == []


@pytest.mark.timeout(90)
async def test_fake_droplets_scale_up_under_load_and_back_down(
    tmp_path: Path, fake_do: tuple[FakeDigitalOcean, int]
) -> None:
    fake, port = fake_do
    cfg = do_config(tmp_path, fake.url, port)
    rt = Runtime(load_settings(cfg), [], cfg)
    await rt.start()
    try:
        result = await scale_up_and_down(rt)
        assert result.grew_to >= 2
        assert result.light.failed == 0, result.light.errors
        assert fake.created_count >= 2
        await wait_for(lambda: len(fake.droplets) == 1, timeout=10)
        assert {str(i) for i in fake.droplets} == inventory_ids(tmp_path)
        # A scale-down saves its victim's own price (a s-1vcpu-1gb droplet's).
        assert rt.autoscaler is not None
        downs = [r for r in rt.autoscaler.history if r.action == "down"]
        assert downs and all(
            r.cost_before is not None
            and r.cost_after == pytest.approx(r.cost_before - round(6 / 672, 5))
            for r in downs
        )
    finally:
        await rt.stop()


@pytest.mark.timeout(90)
async def test_kill_9_during_a_droplet_provision_leaks_and_forgets_nothing(
    tmp_path: Path, fake_do: tuple[FakeDigitalOcean, int]
) -> None:
    fake, port = fake_do
    fake.active_after = 2.0  # the kill lands while the droplet is "new"
    cfg = do_config(tmp_path, fake.url, port)
    cfg.write_text(cfg.read_text().replace("min-backends = 1", "min-backends = 2"))
    proxy = await start_proxy_process(cfg)
    await wait_for(lambda: fake.created_count >= 1, timeout=15)
    os.kill(proxy.pid, signal.SIGKILL)
    await proxy.proc.wait()
    assert provisioning(tmp_path), "the intent was recorded before the droplet was created"
    proxy = await start_proxy_process(cfg)
    try:
        await wait_for(
            lambda: (
                len(inventory_ids(tmp_path)) == 2
                and {str(i) for i in fake.droplets} == inventory_ids(tmp_path)
                and not provisioning(tmp_path)
            ),
            timeout=30,
        )
    finally:
        await proxy.stop()
    assert {str(i) for i in fake.droplets} == inventory_ids(tmp_path)  # 0 leaked, 0 forgotten


@pytest.mark.timeout(90)
async def test_fake_droplets_scale_up_stops_at_max_cost_per_hour(
    tmp_path: Path,
    fake_do: tuple[FakeDigitalOcean, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A s-1vcpu-1gb droplet costs $6 a month ($0.00893/h in the fake, as in DigitalOcean's
    list): a cap of $0.02/h allows two. Under a load that wants more, the pool stops at two,
    says why once, and the API, the metrics and the inventory say what it costs."""
    import aiohttp
    from openapi_core import OpenAPI
    from openapi_core.testing import MockRequest, MockResponse
    from prometheus_client.parser import text_string_to_metric_families

    from doproxy.admin.openapi import SPEC
    from doproxy.admin.server import addr_path

    fake, port = fake_do
    price = round(6 / 672, 5)
    cfg = do_config(tmp_path, fake.url, port)
    cfg.write_text(
        cfg.read_text().replace("max-backends = 3", "max-backends = 5\nmax-cost-per-hour = 0.02")
    )
    caplog.set_level(logging.INFO, logger="doproxy.autoscaler")
    rt = Runtime(load_settings(cfg), [], cfg)
    await rt.start()
    try:
        assert rt.server is not None and rt.autoscaler is not None
        scaler = rt.autoscaler
        await wait_for(lambda: serving(rt) == 1, timeout=15)  # min-backends, created at start
        host, proxy_port = rt.server.addresses[0]
        stop = asyncio.Event()
        # 16 clients: ~160 ms on two backends, still slow; a third would be wanted.
        load = asyncio.create_task(run_load(host, proxy_port, 16, 30.0, stop=stop))
        try:
            await wait_for(
                lambda: any("at max-cost-per-hour" in r.reason for r in scaler.history),
                timeout=30,
            )
            # The load goes on: the cap keeps binding, and is said once, not every tick.
            await asyncio.sleep(2.0)
        finally:
            stop.set()
            await load
        assert fake.created_count == 2 and len(fake.droplets) == 2
        ups = [r for r in scaler.history if r.action == "up"]
        assert [(r.size_before, r.size_after) for r in ups] == [(0, 1), (1, 2)]
        assert (ups[1].cost_before, ups[1].cost_after) == (
            pytest.approx(price),
            pytest.approx(2 * price),
        )
        assert ups[1].cost_words() == "+$0.0089/h ($0.0089/h → $0.018/h)"
        capped = [r for r in caplog.records if "at max-cost-per-hour $0.02/h" in r.getMessage()]
        assert len(capped) == 1, [r.getMessage() for r in capped]
        assert capped[0].levelno == logging.WARNING
        assert "the pool costs $0.018/h, a backend $0.0089/h" in capped[0].getMessage()
        scale_up_lines = [
            r.getMessage() for r in caplog.records if "scale up 1→2" in r.getMessage()
        ]
        assert scale_up_lines and scale_up_lines[0].endswith("; +$0.0089/h ($0.0089/h → $0.018/h)")
        # Every entry records its droplet's price.
        assert [e.price_hourly for e in load_inventory(tmp_path / "inventory.toml")] == [price] * 2

        spec = OpenAPI.from_dict(SPEC)
        url = "http://" + addr_path(rt.inventory_path).read_text().strip()
        async with aiohttp.ClientSession() as session:
            answers = {}
            for path in ("/api/autoscaler", "/api/status"):
                async with session.get(url + path) as r:
                    body = await r.json()
                req = MockRequest("http://127.0.0.1", "get", path)
                spec.validate_response(
                    req, MockResponse(json.dumps(body).encode(), status_code=200)
                )
                answers[path] = body
            async with session.get(url + "/metrics") as r:
                text = await r.text()
        cost = answers["/api/autoscaler"]["cost"]
        assert cost == answers["/api/status"]["cost"]
        assert cost["per_hour"] == pytest.approx(2 * price)
        assert (cost["machines"], cost["unpriced"], cost["max-cost-per-hour"]) == (2, 0, 0.02)
        assert cost["new_backend"] == pytest.approx(price)
        decided = answers["/api/autoscaler"]["decisions"]
        assert any(d["cost_after"] == pytest.approx(2 * price) for d in decided)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["doproxy_pool_cost_per_hour"].samples[0].value == pytest.approx(2 * price)
        assert families["doproxy_pool_unpriced_backends"].samples[0].value == 0
        assert TOKEN not in text and TOKEN not in json.dumps(answers)
    finally:
        await rt.stop()
