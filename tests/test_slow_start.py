"""Slow start (issue 12, part 5): the Pool's ramp with an injected clock, then end to end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from doproxy.config import load_settings
from doproxy.core.balancers import RAMP_STEPS
from doproxy.core.health import State
from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Settings
from doproxy.inventory import load_inventory
from doproxy.runtime import Runtime, build_pool
from tests.support import Client, RawBackend, echo_handler, get


def entries(*names: str) -> list[InventoryEntry]:
    return [
        InventoryEntry(id=i + 1, name=n, server_host=f"127.0.0.1:{9000 + i}")
        for i, n in enumerate(names)
    ]


def settings(slow_start: str = "10s", kind: str = "roundrobin") -> Settings:
    return Settings.model_validate({"loadbalancing": {"type": kind, "slow-start": slow_start}})


@pytest.mark.timeout(10)
def test_backends_at_start_up_are_warm_and_added_ones_ramp() -> None:
    now = [100.0]
    s = settings()
    pool = build_pool(s, entries("a", "b"), clock=lambda: now[0])
    assert pool.ramp_due == float("inf")  # nothing ramps at start-up
    a, b = pool.backends
    now[0] = 105.0
    grown = build_pool(s, entries("a", "b", "c"), clock=lambda: now[0], reuse=pool.backends)
    c = grown.backends[2]
    assert grown.backends[:2] == [a, b]  # reused, still warm
    assert c.eligible_since == 105.0
    # The first step change is due at 2/20 of the slow start (step 1 is the floor until then).
    assert grown.ramp_due == pytest.approx(105.0 + 2 * 10.0 / RAMP_STEPS)
    now[0] = 115.0
    grown.refresh()
    assert grown.ramp_due == float("inf")  # ramp over


@pytest.mark.timeout(10)
def test_health_down_then_up_starts_a_new_ramp() -> None:
    now = [0.0]
    pool = build_pool(settings(), entries("a", "b"), clock=lambda: now[0])
    a = pool.backends[0]
    a.health.state = State.DOWN
    now[0] = 50.0
    pool.refresh()
    assert a.eligible_since is None and pool.eligible == [pool.backends[1]]
    a.health.state = State.UP
    now[0] = 60.0
    pool.refresh()
    assert a.eligible_since == 60.0
    assert pool.ramp_due == pytest.approx(61.0)
    # Same for the end of an ejection.
    b = pool.backends[1]
    b.ejected_until = 80.0
    pool.refresh()
    b.ejected_until = 0.0
    now[0] = 80.0
    pool.refresh()
    assert b.eligible_since == 80.0


@pytest.mark.timeout(10)
def test_slow_start_off_ramps_nobody() -> None:
    now = [0.0]
    pool = build_pool(settings("0s"), entries("a"), clock=lambda: now[0])
    grown = build_pool(settings("0s"), entries("a", "b"), clock=lambda: now[0], reuse=pool.backends)
    assert grown.ramp_due == float("inf")


# --- end to end -------------------------------------------------------------------------------

MakeRuntime = Callable[[str, str], Awaitable[Runtime]]


def inventory(*ports: int) -> str:
    return "".join(
        f'[[droplet]]\nid = {p}\nname = "b{p}"\nserver-host = "127.0.0.1:{p}"\n' for p in ports
    )


@pytest.fixture
async def make_runtime(tmp_path: Path) -> AsyncIterator[MakeRuntime]:
    made: list[Runtime] = []

    async def _make(config_text: str, inventory_text: str) -> Runtime:
        cfg = tmp_path / "doproxy.toml"
        cfg.write_text(config_text)
        (tmp_path / "inventory.toml").write_text(inventory_text)
        rt = Runtime(load_settings(cfg), load_inventory(tmp_path / "inventory.toml"), cfg)
        await rt.start()
        made.append(rt)
        return rt

    yield _make
    for rt in made:
        await rt.stop()


SLOW_START = 2.0
REQUESTS = 300
SPREAD = 3.0  # seconds the requests are paced over: the ramp, then a third at full weight


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["roundrobin", "leastconn"])
async def test_an_added_backend_takes_a_growing_share(
    kind: str,
    make_runtime: MakeRuntime,
    backend_factory: Callable[..., Awaitable[RawBackend]],
    tmp_path: Path,
) -> None:
    old = await backend_factory(echo_handler)
    new = await backend_factory(echo_handler)
    config = (
        'bind = "127.0.0.1:0"\nwatch-config = false\ninventory-file = "inventory.toml"\n'
        f'[loadbalancing]\ntype = "{kind}"\nslow-start = "{SLOW_START}s"\n'
        "[backend]\ndisable-health-check = true\n[admin]\nenable = false\n"
    )
    rt = await make_runtime(config, inventory(old.port))
    assert rt.server is not None
    port = rt.server.addresses[0][1]
    client = await Client.connect(port)
    try:
        (tmp_path / "inventory.toml").write_text(inventory(old.port, new.port))
        assert await rt.apply_inventory()  # the new backend is eligible from now: its ramp
        added = next(b for b in rt.server.pool.backends if b.port == new.port)
        loop = asyncio.get_running_loop()
        start = loop.time()
        thirds = [0, 0, 0]
        for i in range(REQUESTS):
            # Paced on a schedule (a pace, not a readiness wait): request i goes out at
            # i/REQUESTS of SPREAD, or at once when the machine is running late.
            delay = start + SPREAD * i / REQUESTS - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            before = added.requests
            await client.send(get())
            assert (await client.response()).status == 200
            thirds[i * 3 // REQUESTS] += added.requests - before
    finally:
        await client.close()
    fair = REQUESTS / 3 / 2  # two backends
    # First third (ramp 1/20 .. 1/2): well under its share; last third (ramp over): about it.
    assert thirds[0] < 0.6 * fair, thirds
    assert thirds[0] < thirds[2], thirds
    assert thirds[2] > 0.8 * fair, thirds
