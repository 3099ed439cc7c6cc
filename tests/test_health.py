"""Active health checks against real backends on 127.0.0.1, with short intervals."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Settings
from doproxy.health import Checker, HealthChecker, Target, health_target, probe
from doproxy.proxy.backend import Backend
from doproxy.proxy.server import ProxyServer
from tests.conftest import StartProxy, port_of, wait_for
from tests.support import (
    Client,
    RawBackend,
    RequestReader,
    dead_port,
    get,
    request,
    respond,
    silent,
)

FAST = {"interval": "50ms", "down-interval": "50ms", "rise": 2, "fall": 2, "timeout": "500ms"}


class Switchable:
    """A backend whose /health answers `status` (settable); other paths answer its name."""

    def __init__(self, name: bytes, status: int = 200) -> None:
        self.name = name
        self.status = status
        self.probes = 0

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
    ) -> None:
        rr = RequestReader(reader)
        while (req := await rr.next()) is not None:
            if req.url == b"/health":
                self.probes += 1
                writer.write(respond(self.status, b"status %d" % self.status))
            else:
                writer.write(respond(200, self.name))
            await writer.drain()
            if not req.keep_alive:
                return


@pytest.fixture
async def checked(
    start_proxy: StartProxy, backend_factory: Callable[..., Awaitable[RawBackend]]
) -> AsyncIterator[Callable[..., Awaitable[tuple[ProxyServer, HealthChecker]]]]:
    checkers: list[HealthChecker] = []

    async def _make(
        backends: list[Switchable], health: dict[str, Any] | None = None
    ) -> tuple[ProxyServer, HealthChecker]:
        ports = [(await backend_factory(b.handle)).port for b in backends]
        proxy = await start_proxy(
            ports,
            {"health": {**FAST, **(health or {})}, "backend": {"new-host-health-path": "/health"}},
        )
        checker = HealthChecker(proxy.settings, sink=lambda b, s: proxy.pool.refresh())
        checker.watch(proxy.pool.backends)
        checkers.append(checker)
        return proxy, checker

    yield _make
    for c in checkers:
        await c.stop()


async def test_sick_backend_leaves_and_returns(
    checked: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = Switchable(b"A"), Switchable(b"B")
    proxy, _ = await checked([a, b])
    await wait_for(lambda: a.probes >= 2 and b.probes >= 2)
    assert len(proxy.pool.eligible) == 2
    caplog.set_level(logging.INFO, logger="doproxy.health")
    b.status = 503
    await wait_for(lambda: len(proxy.pool.eligible) == 1)
    # While B is down every request goes to A, none fails.
    c = await Client.connect(port_of(proxy))
    for _ in range(6):
        await c.send(get())
        r = await c.response()
        assert (r.status, r.body) == (200, b"A")
    await c.close()
    downs = b.probes
    await wait_for(lambda: b.probes >= downs + 3)  # keeps being checked while down
    b.status = 200
    await wait_for(lambda: len(proxy.pool.eligible) == 2)
    # Each transition is logged once, not on every probe.
    messages = [r.getMessage() for r in caplog.records]
    assert sum("is down" in m for m in messages) == 1
    assert sum("is up again" in m for m in messages) == 1
    assert any("status 503" in m for m in messages)


async def test_a_new_backend_failing_its_first_check_is_out_at_once(checked: Any) -> None:
    a, b = Switchable(b"A"), Switchable(b"B", status=500)
    proxy, _ = await checked([a, b], {"fall": 5, "interval": "10s", "down-interval": "10s"})
    await wait_for(lambda: len(proxy.pool.eligible) == 1)
    # One probe was enough (fall = 5 applies to backends that passed before), and it came
    # at once, not after the 10 s interval.
    assert b.probes == 1
    assert proxy.pool.eligible[0].port != proxy.pool.backends[1].port


async def test_all_backends_down_is_503(checked: Any) -> None:
    a = Switchable(b"A", status=500)
    proxy, _ = await checked([a])
    await wait_for(lambda: not proxy.pool.eligible)
    r = await request(port_of(proxy), get())
    assert r.status == 503


async def test_disabled_health_checks_check_nothing(start_proxy: StartProxy) -> None:
    settings = Settings.model_validate({"backend": {"disable-health-check": True}})
    proxy = await start_proxy([1])
    checker = HealthChecker(settings, sink=lambda b, s: None)
    checker.watch(proxy.pool.backends)
    assert checker._tasks == {}
    assert proxy.pool.eligible == proxy.pool.backends
    await checker.stop()


async def test_probe_timeout_counts_as_failure(
    backend_factory: Callable[..., Awaitable[RawBackend]],
) -> None:
    backend = await backend_factory(silent)
    t = Target("127.0.0.1", backend.port, "/", False, "h")
    assert await probe(t, 0.1, (), "") == "no answer within 0.1s"


async def test_probe_status_and_body_rules(
    backend_factory: Callable[..., Awaitable[RawBackend]],
) -> None:
    async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter, b: RawBackend) -> None:
        req = await RequestReader(r).next()
        assert req is not None
        status = int(req.url.strip(b"/"))
        w.write(respond(status, b"all good"))
        await w.drain()

    port = (await backend_factory(answer)).port

    def t(status: int) -> Target:
        return Target("127.0.0.1", port, f"/{status}", False, "h")

    assert await probe(t(200), 1, (), "") == ""
    assert await probe(t(404), 1, (), "") == ""  # anything below 500 passes, as in Go
    assert await probe(t(500), 1, (), "") == "status 500"
    assert await probe(t(404), 1, (200, 204), "") == "status 404"
    assert await probe(t(200), 1, (), "good") == ""
    assert await probe(t(200), 1, (), "bad") == "body does not contain 'bad'"


async def test_probe_refused() -> None:
    target = Target("127.0.0.1", await dead_port(), "/", False, "h")
    assert (await probe(target, 1, (), "")).startswith("cannot connect")


@pytest.mark.parametrize(
    ("health_url", "expected"),
    [
        # The 2015 files: with and without a scheme.
        (
            "http://10.132.169.170:8080/",
            Target("10.132.169.170", 8080, "/", False, "10.132.169.170:8080"),
        ),
        ("10.132.221.249:8080/", Target("10.132.221.249", 8080, "/", False, "10.132.221.249:8080")),
        ("https://h.example/ping?x=1", Target("h.example", 443, "/ping?x=1", True, "h.example")),
        ("", Target("10.0.0.9", 81, "/healthz", False, "10.0.0.9:81")),
    ],
)
def test_health_target(health_url: str, expected: Target) -> None:
    # Parsing only: nothing is ever sent to these addresses.
    entry = InventoryEntry(id=1, server_host="10.0.0.9:81", health_url=health_url)
    settings = Settings.model_validate({"backend": {"new-host-health-path": "/healthz"}})
    assert health_target(Backend(entry), settings) == expected


async def test_checks_share_one_kept_connection(
    backend_factory: Callable[..., Awaitable[RawBackend]],
) -> None:
    """Every check of a backend goes over one keep-alive connection (no connect, accept and
    close per check), and each gets its own answer."""
    accepted = 0

    async def keeps(r: asyncio.StreamReader, w: asyncio.StreamWriter, b: RawBackend) -> None:
        nonlocal accepted
        accepted += 1
        rr = RequestReader(r)
        n = 0
        while (req := await rr.next()) is not None:
            n += 1
            assert req.keep_alive
            w.write(respond(200 if n % 2 else 503, b"answer %d" % n))
            await w.drain()

    port = (await backend_factory(keeps)).port
    checker = Checker(Target("127.0.0.1", port, "/health", False, "h"))
    try:
        results = [await checker.check(1, (), "") for _ in range(6)]
        assert results == ["", "status 503"] * 3
        assert checker.connections == 1 and accepted == 1
    finally:
        checker.close()


async def test_a_kept_connection_closed_by_the_backend_is_not_a_failed_check(
    backend_factory: Callable[..., Awaitable[RawBackend]],
) -> None:
    """A backend that closes each connection after its answer (a keep-alive timeout of 0),
    without saying so: every check still passes, on a new connection when it must."""

    async def one_each(r: asyncio.StreamReader, w: asyncio.StreamWriter, b: RawBackend) -> None:
        req = await RequestReader(r).next()
        if req is not None:
            w.write(respond(200, b"ok"))
            await w.drain()
        w.close()

    port = (await backend_factory(one_each)).port
    checker = Checker(Target("127.0.0.1", port, "/health", False, "h"))
    try:
        for _ in range(5):
            assert await checker.check(1, (), "") == ""
            # Sent again at once, before the close may have arrived: the race a keep-alive
            # timeout makes. The retry on a new connection covers it.
        assert checker.connections == 5
    finally:
        checker.close()


async def test_bytes_nobody_asked_for_cost_the_connection_not_the_next_answer(
    backend_factory: Callable[..., Awaitable[RawBackend]],
) -> None:
    """A backend that sends a second response to one check: the check reads its own (the
    first), the connection is dropped, and the next check is answered on a new one."""
    accepted = 0

    async def doubles(r: asyncio.StreamReader, w: asyncio.StreamWriter, b: RawBackend) -> None:
        nonlocal accepted
        accepted += 1
        rr = RequestReader(r)
        while await rr.next() is not None:
            extra = respond(500, b"not asked for") if accepted == 1 else b""
            w.write(respond(200, b"ok") + extra)
            await w.drain()

    port = (await backend_factory(doubles)).port
    checker = Checker(Target("127.0.0.1", port, "/health", False, "h"))
    try:
        assert await checker.check(1, (), "") == ""
        assert await checker.check(1, (), "") == ""
        assert await checker.check(1, (), "") == ""
        assert checker.connections == 2 and accepted == 2
    finally:
        checker.close()
