"""Scale to zero (issue 14, part 1) with the local provider: real backend processes, a real
listener, real requests."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from doproxy.admin.server import autoscaler_view
from doproxy.autoscaler import Autoscaler
from doproxy.config import load_settings
from doproxy.core.autoscale import Observation, ScalerState, decide
from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Provisioning
from doproxy.core.wake import WakeRules, ignored, wants_html
from doproxy.errors import ConfigError
from doproxy.inventory import load_inventory
from doproxy.machines import open_provider
from doproxy.runtime import Runtime
from tests.conftest import wait_for
from tests.support import get, request
from tests.test_autoscaler_e2e import destroy_all, port_range
from tests.test_status_page import browser  # noqa: F401 (a fixture)

CONFIG = """bind = "127.0.0.1:0"
watch-config = false
inventory-file = "inventory.toml"

[admin]
bind = "127.0.0.1:0"

[backend]
new-host-health-path = "/health"

[health]
interval = "200ms"
down-interval = "200ms"
rise = 1
{health}

[provisioning]
enable = true
scale-to-zero = true
min-backends = 0
max-backends = 2
idle-after = "{idle_after}"
wake-timeout = "{wake_timeout}"
wake-ignore = ["/healthz", "UptimeRobot"]
interval = "250ms"
drain-timeout = "1s"

[local-provisioner]
enable = true
command = "python -m doproxy.demo_backend --host {{host}} --port {{port}} --name {{name}}"
ports = "{ports}"
boot-timeout = "10s"
stop-timeout = "2s"
tags = ["{tag}"]
"""


def config(tmp: Path, idle_after: str = "1s", wake_timeout: str = "15s", health: str = "") -> Path:
    cfg = tmp / "doproxy.toml"
    cfg.write_text(
        CONFIG.format(
            idle_after=idle_after,
            wake_timeout=wake_timeout,
            health=health,
            ports=port_range(),
            # Random, not from the test folder's name: two test runs at once (a developer's and
            # make test) shared a tag, and one's teardown destroyed the other's machines.
            tag=f"stz-{uuid.uuid4().hex[:12]}",
        )
    )
    return cfg


async def machines(rt: Runtime) -> int:
    provider = open_provider(rt.settings, rt.base)
    try:
        return len(await provider.list())
    finally:
        await provider.close()


def entries(tmp: Path) -> int:
    return len(load_inventory(tmp / "inventory.toml"))


# --- the pure parts -------------------------------------------------------------------------


def test_wake_ignore_matches_paths_and_user_agents() -> None:
    rules = WakeRules.of(("/healthz", "UptimeRobot"))
    head = b"GET /healthz/deep HTTP/1.1\r\nHost: a\r\n\r\n"
    assert ignored(head, rules)
    assert ignored(
        b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: Mozilla (uptimerobot.com)\r\n\r\n", rules
    )
    assert not ignored(b"GET /health HTTP/1.1\r\nHost: a\r\nUser-Agent: curl\r\n\r\n", rules)
    assert ignored(b"GET http://a/healthz HTTP/1.1\r\nHost: a\r\n\r\n", rules)
    assert wants_html(b"GET / HTTP/1.1\r\nAccept: text/html,*/*\r\n\r\n")
    assert not wants_html(b"POST / HTTP/1.1\r\nAccept: text/html\r\n\r\n")


def policy(**kw: object) -> Provisioning:
    base: dict[str, object] = {
        "enable": True,
        "scale-to-zero": True,
        "min-backends": 0,
        "max-backends": 3,
        "idle-after": "60s",
    }
    return Provisioning.model_validate({**base, **kw})


def test_the_decision_wakes_with_one_machine_and_sleeps_after_idle_after() -> None:
    p = policy()
    asleep = Observation(now=100.0, latency=None, requests_per_second=0.0, serving=0)
    d, st = decide(asleep, p, ScalerState())
    assert d.action == "none" and d.kind == "asleep"
    many = Observation(now=101.0, latency=None, requests_per_second=0.0, serving=0, waiting=50)
    d, st = decide(many, p, st)
    assert (d.action, d.count, d.kind) == ("up", 1, "wake")
    booting = Observation(
        now=102.0, latency=None, requests_per_second=0.0, serving=0, provisioning=1, waiting=50
    )
    d, st = decide(booting, p, st)
    assert d.action == "none"  # exactly one machine, however many wait
    awake = Observation(now=103.0, latency=None, requests_per_second=0.0, serving=1, quiet_for=5)
    d, st = decide(awake, p, st)
    assert d.action == "none"  # awake and fast: a serving pool keeps one, whatever min says
    held = Observation(
        now=150.0, latency=None, requests_per_second=0.0, serving=1, quiet_for=61, waiting=3
    )
    d, st = decide(held, p, st)
    assert d.action == "none"  # never asleep while requests wait for it
    quiet = Observation(now=200.0, latency=None, requests_per_second=0.0, serving=2, quiet_for=61)
    d, st = decide(quiet, p, st)
    assert (d.action, d.count, d.kind, d.size_after) == ("down", 2, "sleep", 0)
    failed = Observation(
        now=300.0, latency=None, requests_per_second=0.0, serving=1, wake_failed=True
    )
    d, st = decide(failed, p, st)
    assert (d.action, d.kind, d.size_after) == ("down", "wake-failed", 0)


def test_min_backends_0_needs_scale_to_zero() -> None:
    with pytest.raises(ValueError, match="scale-to-zero"):
        Provisioning.model_validate({"enable": True, "min-backends": 0})


def test_scale_to_zero_with_workers_is_refused(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    cfg.write_text("workers = 2\n" + cfg.read_text())
    with pytest.raises(ConfigError, match="workers = 1"):
        load_settings(cfg)


# --- end to end ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(cfg: Path) -> AsyncIterator[tuple[Runtime, Autoscaler, int]]:
    """A runtime on `cfg` whose scaler has reconciled; stopped, its machines destroyed."""
    rt = Runtime(load_settings(cfg), [], cfg)
    server = await rt.start()
    try:
        scaler = rt.autoscaler
        assert scaler is not None
        await asyncio.wait_for(scaler.reconciled.wait(), 10)
        yield rt, scaler, server.addresses[0][1]
    finally:
        await rt.stop()
        await destroy_all(rt.settings, cfg.parent)


@pytest.mark.timeout(90)
async def test_a_sleeping_pool_wakes_once_for_50_requests_and_sleeps_again(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    async with running(cfg) as (rt, scaler, port):
        # Asleep from the start (min-backends 0): an uptime checker gets 503 and wakes nothing.
        for raw in (get("/healthz"), get("/", extra="User-Agent: UptimeRobot/2.0\r\n")):
            r = await request(port, raw)
            assert r.status == 503 and r.header("retry-after") == b"5"
        await asyncio.sleep(0.6)  # two scaler intervals: nothing may start
        assert not scaler.creating and await machines(rt) == 0
        view = autoscaler_view(rt)["scale_to_zero"]
        assert view["asleep"] is True and view["waiting"] == 0

        # 50 requests at once: all held, one machine created, all answered by it.
        responses = await asyncio.gather(*(request(port, get(f"/r{i}")) for i in range(50)))
        assert [r.status for r in responses] == [200] * 50
        assert await machines(rt) == 1 and entries(tmp_path) == 1
        assert rt.waker is not None and rt.waker.woken == 50
        view = autoscaler_view(rt)["scale_to_zero"]
        assert view["asleep"] is False and view["sleeps_in"] is not None

        # Quiet for idle-after (the checker keeps polling, and is no reason to stay awake).
        async def checker() -> None:
            while True:
                await request(port, get("/healthz"))
                await asyncio.sleep(0.2)

        polling = asyncio.create_task(checker())
        try:
            await wait_for(lambda: entries(tmp_path) == 0, timeout=20)
        finally:
            polling.cancel()
        assert await machines(rt) == 0
        decisions = [r.reason for r in scaler.history]
        assert any("wake up 0→1" in r for r in decisions), decisions
        assert any("scale down 1→0: no request for" in r for r in decisions), decisions

        # And it wakes again for the next real request.
        r = await request(port, get("/again"))
        assert r.status == 200


@pytest.mark.timeout(60)
async def test_a_backend_that_never_gets_healthy_fails_the_waiters_and_is_destroyed(
    tmp_path: Path,
) -> None:
    # The health check wants 204; the demo backend answers 200: never healthy.
    cfg = config(tmp_path, wake_timeout="3s", health="expect-status = [204]")
    async with running(cfg) as (rt, scaler, port):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        responses = await asyncio.gather(*(request(port, get(f"/w{i}")) for i in range(5)))
        waited = loop.time() - t0
        assert [r.status for r in responses] == [503] * 5
        assert 2.5 < waited < 6.0  # by wake-timeout, not before and not much after
        await wait_for(lambda: entries(tmp_path) == 0, timeout=15)
        assert await machines(rt) == 0
        assert any("no backend became healthy" in r.reason for r in scaler.history)


@pytest.mark.timeout(60)
async def test_a_browser_gets_a_page_that_reloads_while_the_pool_wakes(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    cfg.write_text(
        cfg.read_text().replace("scale-to-zero = true", "scale-to-zero = true\nwake-page = true")
    )
    async with running(cfg) as (_rt, _scaler, port):
        r = await request(port, get("/", extra="Accept: text/html,*/*\r\n"))
        assert r.status == 503 and b"http-equiv=refresh" in r.body
        assert (r.header("content-type") or b"").startswith(b"text/html")
        await wait_for(lambda: entries(tmp_path) == 1, timeout=15)  # it woke the pool

        # Once awake, the browser's reload gets the site.
        async def served() -> bool:
            r = await request(port, get("/", extra="Accept: text/html\r\n"))
            return r.status == 200

        async with asyncio.timeout(15):
            while not await served():
                await asyncio.sleep(0.1)


class _Pool:
    def __init__(self) -> None:
        self.backends: list[object] = []
        self.eligible: list[object] = []


class _Backend:
    def __init__(self, state: str) -> None:
        self.entry = InventoryEntry(id=1, server_host="127.0.0.1:1", state=state)


class _Conn:
    def __init__(self) -> None:
        self.closed = False
        self.done: list[object] = []

    def wake_done(self, ex: object, err: object) -> None:
        self.done.append(err)


class _Ex:
    head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.timeout(10)
async def test_the_waker_holds_only_while_asleep_or_waking_and_forgets_who_left() -> None:
    from doproxy.core.settings import Settings
    from doproxy.wake import Waker

    settings = Settings.model_validate(
        {
            "provisioning": {
                "enable": True,
                "scale-to-zero": True,
                "min-backends": 0,
                "wake-queue": 2,
            }
        }
    )
    pool = _Pool()
    pokes: list[int] = []
    waker = Waker(settings, lambda: pool, poke=lambda: pokes.append(1))  # type: ignore[arg-type,return-value]
    gone, c2, c3 = _Conn(), _Conn(), _Conn()
    assert waker.hold(gone, _Ex()) is None and pokes
    assert waker.hold(c2, _Ex()) is None
    err = waker.hold(c3, _Ex())
    assert err is not None and err.retry_after  # the queue is full
    gone.closed = True  # its client left: its place is free again
    assert waker.hold(c3, _Ex()) is None
    assert waker.waiting == 2
    await waker.stop()
    # Awake, with every backend in rotation down: an outage, answered 503 at once, never held.
    awake = Waker(settings, lambda: pool)  # type: ignore[arg-type,return-value]
    pool.backends = [_Backend("active")]
    err = awake.hold(_Conn(), _Ex())
    assert err is not None and err.status == 503 and not awake.held
    # Going to sleep (the last backend draining): a request is held, and wakes the pool.
    pool.backends = [_Backend("draining")]
    assert awake.hold(_Conn(), _Ex()) is None and awake.waiting == 1
    await awake.stop()


@pytest.mark.timeout(60)
async def test_the_status_page_shows_the_pool_asleep_then_awake(
    tmp_path: Path,
    browser: Any,  # noqa: F811 (the fixture imported above)
) -> None:
    async with running(config(tmp_path, idle_after="30s")) as (rt, _scaler, port):
        assert rt.admin is not None
        page = await browser.new_page()
        await page.goto(rt.admin.url())
        field = '#scaler dd[data-field="scale to zero"]'
        await page.wait_for_selector(field, timeout=10_000)
        assert "asleep" in (await page.text_content(field) or "")
        assert (await request(port, get("/wake"))).status == 200
        async with asyncio.timeout(10):  # the page polls the API (no eval: its CSP forbids it)
            while not (await page.text_content(field) or "").startswith("awake"):
                await asyncio.sleep(0.1)
