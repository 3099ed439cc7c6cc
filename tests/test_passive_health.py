"""Passive health: a backend failing real requests in a row is ejected for a while."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from doproxy.core.health import ejection_duration, may_eject
from tests.conftest import StartProxy, port_of, wait_for
from tests.support import RawBackend, RequestReader, answering, get, request, respond

Factory = Callable[..., Awaitable[RawBackend]]
PASSIVE = {
    "passive-health": {"consecutive-failures": 3, "ejection-time": "0.3s"},
    "retries": {"attempts": 0},  # so the failures reach the client and can be counted
}


async def test_failing_backend_is_ejected_then_returns_for_longer(
    start_proxy: StartProxy, backend_factory: Factory
) -> None:
    sick = await backend_factory(answering(500, b"sick"))
    good = await backend_factory(answering(200, b"good"))
    proxy = await start_proxy([sick.port, good.port], PASSIVE)
    bad = proxy.pool.backends[0]
    statuses = [(await request(port_of(proxy), get())).status for _ in range(6)]
    assert statuses.count(500) == 3  # round robin: every other request, until ejected
    assert bad.ejected_until > 0.0
    assert proxy.pool.eligible == [proxy.pool.backends[1]]
    for _ in range(4):  # while ejected, nothing goes to it
        assert (await request(port_of(proxy), get())).status == 200
    t0 = proxy.clock()
    await wait_for(lambda: bad.ejected_until == 0.0)
    assert proxy.clock() - t0 <= 0.5
    assert len(proxy.pool.eligible) == 2
    # Failing again: the second ejection lasts twice as long.
    for _ in range(6):
        await request(port_of(proxy), get())
    assert bad.ejections == 2
    assert bad.ejected_until - proxy.clock() > 0.35


async def test_never_ejects_more_than_max_percent(
    start_proxy: StartProxy, backend_factory: Factory
) -> None:
    a = await backend_factory(answering(500, b"a"))
    b = await backend_factory(answering(500, b"b"))
    proxy = await start_proxy([a.port, b.port], PASSIVE)
    for _ in range(12):
        await request(port_of(proxy), get())
    ejected = [x for x in proxy.pool.backends if x.ejected_until]
    assert len(ejected) == 1
    assert len(proxy.pool.eligible) == 1


async def test_success_resets_the_count(start_proxy: StartProxy, backend_factory: Factory) -> None:
    flaky_status = [500, 500, 200, 500, 500, 200, 500, 500, 200]

    async def flaky(r: asyncio.StreamReader, w: asyncio.StreamWriter, bk: RawBackend) -> None:
        rr = RequestReader(r)
        while await rr.next() is not None:
            w.write(respond(flaky_status.pop(0), b"x"))
            await w.drain()

    f = await backend_factory(flaky)
    proxy = await start_proxy([f.port], {**PASSIVE, "passive-health": {"consecutive-failures": 3}})
    for _ in range(9):
        await request(port_of(proxy), get())
    assert proxy.pool.backends[0].ejections == 0


@pytest.mark.parametrize(
    ("ejected", "size", "percent", "allowed"),
    [
        (0, 1, 50, False),
        (0, 2, 50, True),
        (1, 2, 50, False),
        (1, 4, 50, True),
        (2, 4, 50, False),
        (0, 3, 10, True),
        (1, 3, 10, False),
        (2, 10, 30, True),
        (3, 10, 30, False),
    ],
)
def test_may_eject(ejected: int, size: int, percent: float, allowed: bool) -> None:
    assert may_eject(ejected, size, percent) is allowed


def test_ejection_duration_doubles_up_to_a_limit() -> None:
    assert [ejection_duration(10, n, 60) for n in range(5)] == [10, 20, 40, 60, 60]
