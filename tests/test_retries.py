"""Retries redispatch to a different backend, only when it is safe, within a budget."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from doproxy.core.retry import RetryBudget
from tests.conftest import StartProxy, port_of
from tests.support import (
    Client,
    RawBackend,
    RequestReader,
    answering,
    dead_port,
    get,
    request,
    respond,
    silent,
)

Factory = Callable[..., Awaitable[RawBackend]]


async def resetting(r: asyncio.StreamReader, w: asyncio.StreamWriter, b: RawBackend) -> None:
    """Reads a whole request, then drops the connection without answering."""
    await RequestReader(r).next()
    w.transport.abort()


POST = b"POST /order HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"


async def test_connect_failure_is_redispatched_for_any_method(
    start_proxy: StartProxy, backend_factory: Factory
) -> None:
    good = await backend_factory(answering(200, b"good"))
    proxy = await start_proxy([await dead_port(), good.port])
    for raw in (get(), POST) * 3:  # round robin tries the dead one every other time
        r = await request(port_of(proxy), raw)
        assert (r.status, r.body) == (200, b"good")
    assert proxy.retried >= 3
    # The POST bodies reached the good backend exactly once each.
    assert good.all_received.count(b"hello") == 3


async def test_idempotent_request_is_retried_after_503_but_post_is_not(
    start_proxy: StartProxy, backend_factory: Factory
) -> None:
    sick = await backend_factory(answering(503, b"sick"))
    good = await backend_factory(answering(200, b"good"))
    proxy = await start_proxy([sick.port, good.port])
    bodies = [(await request(port_of(proxy), get())).body for _ in range(4)]
    assert bodies == [b"good"] * 4
    # A POST that reached the sick backend gets its 503: it is never sent twice.
    statuses = [(await request(port_of(proxy), POST)).status for _ in range(2)]
    assert sorted(statuses) == [200, 503]
    assert sick.all_received.count(b"hello") + good.all_received.count(b"hello") == 2


async def test_post_to_a_dying_backend_is_never_sent_twice(
    start_proxy: StartProxy, backend_factory: Factory
) -> None:
    dying = await backend_factory(resetting)
    good = await backend_factory(answering(200, b"good"))
    proxy = await start_proxy([dying.port, good.port])
    results = [await request(port_of(proxy), POST) for _ in range(2)]
    statuses = sorted(r.status for r in results)
    assert statuses == [200, 502]
    # Each POST reached exactly one backend.
    assert dying.all_received.count(b"hello") == 1
    assert good.all_received.count(b"hello") == 1
    # A GET on the same dying backend is retried on the good one.
    for _ in range(2):
        assert (await request(port_of(proxy), get())).status == 200


async def test_no_retry_when_every_backend_fails(
    start_proxy: StartProxy, backend_factory: Factory
) -> None:
    a = await backend_factory(answering(503, b"a"))
    b = await backend_factory(answering(503, b"b"))
    proxy = await start_proxy([a.port, b.port])
    r = await request(port_of(proxy), get())
    assert r.status == 503  # the last backend's own answer, after trying both
    assert a.connections == 1 and b.connections == 1


async def test_retries_can_be_turned_off(start_proxy: StartProxy, backend_factory: Factory) -> None:
    sick = await backend_factory(answering(503, b"sick"))
    good = await backend_factory(answering(200, b"good"))
    proxy = await start_proxy([sick.port, good.port], {"retries": {"attempts": 0}})
    statuses = sorted([(await request(port_of(proxy), get())).status for _ in range(2)])
    assert statuses == [200, 503]
    assert proxy.retried == 0


async def test_response_timeout_is_retried_for_get(
    start_proxy: StartProxy, backend_factory: Factory
) -> None:
    slow = await backend_factory(silent)
    good = await backend_factory(answering(200, b"good"))
    proxy = await start_proxy([slow.port, good.port], {"timeouts": {"response-header": "0.2s"}})
    c = await Client.connect(port_of(proxy))
    for _ in range(2):
        await c.send(get())
        r = await c.response()
        assert (r.status, r.body) == (200, b"good")
    await c.close()


def test_budget_limits_retries_to_a_share_of_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0.0)
    for _ in range(100):
        budget.deposit()
    granted = sum(budget.withdraw(0.0) for _ in range(100))
    assert granted == 20
    # The minimum rate: with no traffic, min_per_second retries per second still pass.
    quiet = RetryBudget(ratio=0.2, min_per_second=2.0)
    assert quiet.withdraw(0.0) and quiet.withdraw(0.0)
    assert not quiet.withdraw(0.0)
    assert quiet.withdraw(0.5)  # half a second later: one more token


async def test_exhausted_budget_stops_retries(
    start_proxy: StartProxy, backend_factory: Factory
) -> None:
    sick = await backend_factory(answering(503, b"sick"))
    good = await backend_factory(answering(200, b"good"))
    proxy = await start_proxy(
        [sick.port, good.port],
        {"retries": {"budget-percent": 0, "budget-min-per-second": 0}},
    )
    statuses = sorted([(await request(port_of(proxy), get())).status for _ in range(2)])
    assert statuses == [200, 503]
    assert proxy.retried == 0


async def test_killing_and_restarting_a_backend_under_load_fails_no_get(
    start_proxy: StartProxy, backend_factory: Factory
) -> None:
    from doproxy.health import HealthChecker

    good = await backend_factory(answering(200, b"good"))
    writers: list[asyncio.StreamWriter] = []

    async def victim_handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        writers.append(w)
        rr = RequestReader(r)
        while await rr.next() is not None:
            w.write(respond(200, b"victim"))
            await w.drain()

    victim = await asyncio.start_server(victim_handler, "127.0.0.1", 0)
    vport = victim.sockets[0].getsockname()[1]
    proxy = await start_proxy(
        [good.port, vport],
        {"health": {"interval": "50ms", "down-interval": "50ms", "fall": 1, "rise": 1}},
    )
    checker = HealthChecker(proxy.settings, sink=lambda b, s: proxy.pool.refresh())
    checker.watch(proxy.pool.backends)
    statuses: list[int] = []
    bodies: set[bytes] = set()

    async def client(n: int) -> None:
        c = await Client.connect(port_of(proxy))
        for _ in range(n):
            await c.send(get())
            r = await c.response()
            statuses.append(r.status)
            bodies.add(r.body)
            await asyncio.sleep(0.002)  # pacing: a bounded, steady load
        await c.close()

    try:
        load = asyncio.gather(*(client(150) for _ in range(4)))
        await asyncio.sleep(0.1)
        victim.close()  # kill: stop accepting and drop every open connection
        for w in writers:
            w.transport.abort()
        await victim.wait_closed()
        await asyncio.sleep(0.3)
        victim = await asyncio.start_server(victim_handler, "127.0.0.1", vport)  # restart
        await load
    finally:
        victim.close()
        await checker.stop()
    assert len(statuses) == 600
    assert set(statuses) == {200}
    assert bodies == {b"good", b"victim"}


async def test_idempotent_body_is_kept_and_resent_up_to_the_limit(
    start_proxy: StartProxy, backend_factory: Factory
) -> None:
    dying = await backend_factory(resetting)
    good = await backend_factory(answering(200, b"good"))
    proxy = await start_proxy([dying.port, good.port], {"retries": {"buffer-body-bytes": 1000}})
    small = b"PUT /doc HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world"
    big_body = b"x" * 2000
    big = b"PUT /doc HTTP/1.1\r\nHost: h\r\nContent-Length: 2000\r\n\r\n" + big_body
    # Round robin sends the first of each pair to the dying backend.
    r = await request(port_of(proxy), small)
    assert r.status == 200  # retried on the good backend, with its whole body
    assert good.all_received.endswith(b"\r\n\r\nhello world")
    await request(port_of(proxy), get())  # the good backend's turn
    r = await request(port_of(proxy), big)
    assert r.status == 502  # too large to keep: not sent twice
    assert big_body not in good.all_received
