"""Metrics: the data plane's plain counters, and their Prometheus exposition at scrape time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from doproxy.core.histogram import REQUEST_BOUNDS, Histogram, cumulative
from doproxy.proxy.backend import Backend, Pool
from tests.conftest import StartProxy, port_of, wait_for
from tests.support import (
    RawBackend,
    RequestReader,
    answering,
    dead_port,
    get,
    request,
    respond,
)

Factory = Callable[..., Awaitable[RawBackend]]

NO_EJECTION = {"passive-health": {"consecutive-failures": 0}}


def failing_on(path: bytes, name: bytes) -> Callable[..., Awaitable[None]]:
    """A keep-alive backend answering 500 "`name` failed" to `path` and 200 `name` to the rest."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, b: RawBackend) -> None:
        rr = RequestReader(r)
        while (req := await rr.next()) is not None:
            if req.url == path:
                w.write(respond(500, name + b" failed"))
            else:
                w.write(respond(200, name))
            await w.drain()

    return handler


def by_class(counts: list[int]) -> dict[int, int]:
    return {i: n for i, n in enumerate(counts) if n}


def test_histogram_buckets_are_prometheus_le_buckets() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(v)
    # A value equal to a bound is in that bound's bucket ("le" is <=).
    assert h.counts == [2, 2, 1]
    assert h.cumulative() == [(0.1, 2), (1.0, 4), (float("inf"), 5)]
    assert h.count == 5 and h.sum == 4.65
    assert cumulative(REQUEST_BOUNDS, [0] * 15)[-1] == (float("inf"), 0)


async def test_responses_are_counted_per_backend_and_class(
    start_proxy: StartProxy, backend_factory: Factory
) -> None:
    a = await backend_factory(failing_on(b"/boom", b"a"))
    b = await backend_factory(failing_on(b"/boom", b"b"))
    proxy = await start_proxy([a.port, b.port], NO_EJECTION)
    got = [(await request(port_of(proxy), get(path))).body for path in ["/", "/boom", "/"] * 4]
    # Which backend answered, and how, is in the body.
    for backend in proxy.pool.backends:
        mine = b"a" if backend.port == a.port else b"b"
        want = {2: got.count(mine), 5: got.count(mine + b" failed")}
        assert by_class(backend.responses) == {k: v for k, v in want.items() if v}
    assert sum(sum(b.responses) for b in proxy.pool.backends) == 12
    # Every exchange's wait is in the histogram; its count and sum are the listener's totals.
    assert sum(proxy.durations) == proxy.exchanges == 12
    assert 0 < proxy.exchange_time < 12 * REQUEST_BOUNDS[-1]
    assert proxy.generated == [0] * 10


async def test_generated_responses_and_gateway_errors(
    start_proxy: StartProxy, backend_factory: Factory
) -> None:
    # A refused connection: the 502 is the failing backend's response.
    proxy = await start_proxy([await dead_port()])
    assert (await request(port_of(proxy), get())).status == 502
    backend = proxy.pool.backends[0]
    assert by_class(backend.responses) == {5: 1}
    assert sum(proxy.durations) == proxy.exchanges == 1
    # A malformed request: doproxy answers it, no backend involved.
    bad = b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
    assert (await request(port_of(proxy), bad)).status == 400
    assert by_class(proxy.generated) == {4: 1}
    # No backend at all: 503, no backend to blame, and no exchange for the autoscaler.
    empty = await start_proxy([])
    assert (await request(port_of(empty), get())).status == 503
    assert by_class(empty.generated) == {5: 1}
    assert sum(empty.durations) == empty.exchanges == 0


async def test_a_websocket_upgrade_counts_as_1xx(start_proxy: StartProxy) -> None:
    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0) as server:
        proxy = await start_proxy([server.sockets[0].getsockname()[1]])
        async with connect(f"ws://127.0.0.1:{port_of(proxy)}/") as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
        backend: Backend = proxy.pool.backends[0]
        assert by_class(backend.responses) == {1: 1}


async def test_retries_and_ejections_are_listener_totals(
    start_proxy: StartProxy, backend_factory: Factory
) -> None:
    good = await backend_factory(answering(200, b"good"))
    proxy = await start_proxy(
        [await dead_port(), good.port],
        {"passive-health": {"consecutive-failures": 1, "max-ejection-percent": 50}},
    )
    for _ in range(2):
        assert (await request(port_of(proxy), get())).status == 200
    # The dead one failed once: retried elsewhere, and ejected at once (1 failure in a row).
    await wait_for(lambda: proxy.ejections == 1)
    assert proxy.retried == 1
    dead = proxy.pool.backends[0]
    assert dead.ejections == 1 and by_class(dead.responses) == {}
    proxy.set_pool(Pool([proxy.pool.backends[1]], proxy.pool.balancer))
    assert proxy.ejections == 1  # the ejected backend left the pool; its ejection stays
