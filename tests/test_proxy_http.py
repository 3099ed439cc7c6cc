"""HTTP/1.1 semantics through the proxy: framing, pipelining, keep-alive, errors."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.conftest import StartProxy, port_of, wait_for
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


async def test_runs_on_uvloop() -> None:
    import uvloop

    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def test_pipelined_requests_answered_in_order(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])
    c = await Client.connect(port_of(proxy))
    await c.send(b"".join(get(f"/p{i}") for i in range(10)))
    for i in range(10):
        r = await c.response()
        assert r.body == f"GET /p{i} len=0".encode()
    await c.close()


async def test_pipelined_post_bodies_stay_with_their_requests(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])
    c = await Client.connect(port_of(proxy))
    reqs = b""
    for i in range(5):
        body = b"x" * (i * 1000)
        reqs += b"POST /b%d HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s" % (
            i,
            len(body),
            body,
        )
    await c.send(reqs)
    for i in range(5):
        r = await c.response()
        assert r.body == b"POST /b%d len=%d" % (i, i * 1000)
    await c.close()


async def test_chunked_request_is_rechunked_to_backend(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])
    raw = (
        b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    r = await request(port_of(proxy), raw)
    assert r.status == 200
    assert r.body == b"POST /up len=11"
    sent = echo_backend.all_received
    assert b"Transfer-Encoding: chunked\r\n" in sent
    # Chunk extensions and trailers are dropped (documented rule), the data is intact.
    assert b"ext=1" not in sent
    assert b"X-Trailer" not in sent
    assert sent.endswith(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")


async def _chunked_backend(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
) -> None:
    rr = RequestReader(reader)
    while await rr.next() is not None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
            b"3\r\nabc\r\n4\r\ndefg\r\n0\r\nX-T: 1\r\n\r\n"
        )
        await writer.drain()


async def test_chunked_response_to_http11_and_http10_clients(
    start_proxy: StartProxy, backend_factory: object
) -> None:
    backend = await backend_factory(_chunked_backend)  # type: ignore[operator]
    proxy = await start_proxy([backend.port])
    c = await Client.connect(port_of(proxy))
    await c.send(get("/"))
    r = await c.response()
    assert r.body == b"abcdefg"
    assert r.header("transfer-encoding") == b"chunked"
    assert r.header("x-t") is None  # trailers are dropped
    # Still keep-alive: a second request on the same connection works.
    await c.send(get("/again"))
    assert (await c.response()).body == b"abcdefg"
    await c.close()
    # An HTTP/1.0 client cannot take chunked: it gets the body delimited by close.
    c = await Client.connect(port_of(proxy))
    await c.send(b"GET / HTTP/1.0\r\n\r\n")
    data = await asyncio.wait_for(c.reader.read(), 5)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")  # our version, whatever the client's (RFC 9110 2.5)
    assert b"transfer-encoding" not in head.lower()
    assert b"Connection: close" in head
    assert body == b"abcdefg"


async def _close_delimited_backend(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
) -> None:
    await RequestReader(reader).next()
    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-close body")
    await writer.drain()
    writer.close()


async def test_read_until_close_response_is_chunked_for_http11(
    start_proxy: StartProxy, backend_factory: object
) -> None:
    backend = await backend_factory(_close_delimited_backend)  # type: ignore[operator]
    proxy = await start_proxy([backend.port])
    c = await Client.connect(port_of(proxy))
    await c.send(get("/"))
    r = await c.response()
    assert r.body == b"until-close body"
    assert r.header("transfer-encoding") == b"chunked"
    # The client connection stays usable although the backend connection closed.
    await c.send(get("/"))
    assert (await c.response()).body == b"until-close body"
    await c.close()


async def _status_backend(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
) -> None:
    rr = RequestReader(reader)
    while (req := await rr.next()) is not None:
        if req.url == b"/204":
            writer.write(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
        elif req.url == b"/304":
            writer.write(b'HTTP/1.1 304 Not Modified\r\nETag: "e"\r\n\r\n')
        elif req.method == b"HEAD":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        else:
            writer.write(respond(200, b"body"))
        await writer.drain()


async def test_head_204_304_carry_no_body(start_proxy: StartProxy, backend_factory: object) -> None:
    backend = await backend_factory(_status_backend)  # type: ignore[operator]
    proxy = await start_proxy([backend.port])
    c = await Client.connect(port_of(proxy))
    await c.send(b"HEAD /x HTTP/1.1\r\nHost: h\r\n\r\n")
    r = await c.response(head_request=True)
    assert r.status == 200
    assert r.header("content-length") == b"1234"
    await c.send(get("/204"))
    r = await c.response()
    assert (r.status, r.body) == (204, b"")
    await c.send(get("/304"))
    r = await c.response()
    assert (r.status, r.body) == (304, b"")
    # The connection is still in sync: a normal request after them gets its own body.
    await c.send(get("/plain"))
    r = await c.response()
    assert (r.status, r.body) == (200, b"body")
    await c.close()
    assert backend.connections == 1


async def test_http10_client_keep_alive_and_close(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])
    c = await Client.connect(port_of(proxy))
    await c.send(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    r = await c.response()
    assert r.body == b"GET /a len=0"
    assert r.header("connection") == b"keep-alive"
    await c.send(b"GET /b HTTP/1.0\r\n\r\n")
    r = await c.response()
    assert r.body == b"GET /b len=0"
    assert await c.closed()
    # The backend got HTTP/1.1 with a Host header even though the client sent none.
    assert b"GET /a HTTP/1.1\r\n" in echo_backend.all_received
    assert f"Host: 127.0.0.1:{echo_backend.port}".encode() in echo_backend.all_received


async def test_hop_by_hop_headers_are_dropped(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])
    raw = (
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
        b"X-Forwarded-For: 10.1.1.1\r\nX-Forwarded-Proto: https\r\nX-Kept: yes\r\n\r\n"
    )
    r = await request(port_of(proxy), raw)
    assert r.status == 200
    sent = echo_backend.all_received.lower()
    for name in (b"x-secret", b"keep-alive:", b"proxy-connection", b"te:", b"connection:"):
        assert name not in sent, name
    assert b"x-kept: yes" in sent
    # An untrusted client's X-Forwarded-For is replaced by its address (test_forwarding.py).
    assert b"x-forwarded-for: 127.0.0.1\r\n" in sent
    assert b"10.1.1.1" not in sent
    # X-Forwarded-Proto states what the proxy saw, whatever the client claimed.
    assert b"x-forwarded-proto: http\r\n" in sent


async def test_add_x_forwarded_for_false_sends_none(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    # false: doproxy adds no X-Forwarded-For, and an untrusted client's is still removed.
    proxy = await start_proxy([echo_backend.port], {"add-x-forwarded-for": False})
    await request(port_of(proxy), get("/", extra="X-Forwarded-For: 10.1.1.1\r\n"))
    await request(port_of(proxy), get("/"))
    sent = echo_backend.all_received
    assert sent.count(b"\r\nHost: example.test\r\n") == 2
    assert b"X-Forwarded-For" not in sent
    assert b"10.1.1.1" not in sent
    assert sent.count(b"X-Real-IP: 127.0.0.1\r\n") == 2


async def test_round_robin_alternates(start_proxy: StartProxy, backend_factory: object) -> None:
    b1 = await backend_factory(answering(200, b"one"))  # type: ignore[operator]
    b2 = await backend_factory(answering(200, b"two"))  # type: ignore[operator]
    proxy = await start_proxy([b1.port, b2.port])
    c = await Client.connect(port_of(proxy))
    seen = []
    for _ in range(6):
        await c.send(get())
        seen.append((await c.response()).body)
    await c.close()
    assert seen == [b"one", b"two"] * 3


async def test_expect_100_continue(start_proxy: StartProxy, echo_backend: RawBackend) -> None:
    proxy = await start_proxy([echo_backend.port])
    c = await Client.connect(port_of(proxy))
    await c.send(
        b"POST /e HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    await c.send(b"hello")
    r = await c.response()
    assert r.body == b"POST /e len=5"
    assert b"expect" not in echo_backend.all_received.lower()
    await c.close()


async def test_no_backend_is_503(start_proxy: StartProxy) -> None:
    proxy = await start_proxy([])
    r = await request(port_of(proxy), get())
    assert r.status == 503


async def test_unreachable_backend_is_502(start_proxy: StartProxy) -> None:
    proxy = await start_proxy([await dead_port()])
    r = await request(port_of(proxy), get())
    assert r.status == 502


async def test_backend_response_timeout_is_504(
    start_proxy: StartProxy, backend_factory: object
) -> None:
    backend = await backend_factory(silent)  # type: ignore[operator]
    proxy = await start_proxy([backend.port], {"timeouts": {"response-header": "0.3s"}})
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r = await asyncio.wait_for(request(port_of(proxy), get()), 5)
    assert r.status == 504
    assert loop.time() - t0 >= 0.3


async def _dies_mid_response(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
) -> None:
    await RequestReader(reader).next()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
    await writer.drain()
    writer.transport.abort()


async def test_backend_dies_mid_response_client_sees_close(
    start_proxy: StartProxy, backend_factory: object
) -> None:
    backend = await backend_factory(_dies_mid_response)  # type: ignore[operator]
    proxy = await start_proxy([backend.port])
    c = await Client.connect(port_of(proxy))
    await c.send(get())
    got = b""
    async with asyncio.timeout(5):  # the point: no hang
        while True:
            try:
                data = await c.reader.read(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            got += data
    assert got.startswith(b"HTTP/1.1 200")
    assert len(got.partition(b"\r\n\r\n")[2]) < 100000


async def _closes_idle_after_each(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
) -> None:
    # Answers one request with a keep-alive response, then closes the connection anyway,
    # as a backend with a short keep-alive timeout does.
    await RequestReader(reader).next()
    writer.write(respond(200, b"conn %d" % backend.connections))
    await writer.drain()
    writer.close()


async def test_pooled_connection_closed_by_backend_is_not_used(
    start_proxy: StartProxy, backend_factory: object
) -> None:
    backend = await backend_factory(_closes_idle_after_each)  # type: ignore[operator]
    proxy = await start_proxy([backend.port])
    for i in range(1, 4):
        r = await request(port_of(proxy), get())
        assert (r.status, r.body) == (200, b"conn %d" % i)
        # wait until the proxy noticed the close, so the next request finds an empty pool
        await wait_for(lambda: not proxy.pool.backends[0].idle)
    assert backend.connections == 3


async def test_stale_pooled_connection_is_retried_for_idempotent_requests(
    start_proxy: StartProxy, backend_factory: object
) -> None:
    # A backend that drops the connection as the second request arrives on it: the proxy's
    # pooled connection looked fine, the GET goes out on a fresh connection instead.
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
    ) -> None:
        rr = RequestReader(reader)
        n = 0
        while await rr.next() is not None:
            n += 1
            if n == 2:
                writer.transport.abort()
                return
            writer.write(respond(200, b"ok"))
            await writer.drain()

    backend = await backend_factory(handler)  # type: ignore[operator]
    proxy = await start_proxy([backend.port])
    c = await Client.connect(port_of(proxy))
    await c.send(get())
    assert (await c.response()).status == 200
    await c.send(get())
    assert (await c.response()).status == 200
    assert backend.connections == 2
    # The same trap for a POST: it is never replayed, the client gets a 502.
    await c.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx")
    assert (await c.response()).status == 502
    assert backend.connections == 2
    await c.close()


async def test_idle_keep_alive_client_is_closed(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port], {"timeouts": {"keep-alive": "0.2s"}})
    c = await Client.connect(port_of(proxy))
    await c.send(get())
    assert (await c.response()).status == 200
    assert await c.closed(timeout=3)


async def test_upstream_idle_timeout_closes_pooled_connections(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port], {"timeouts": {"upstream-idle": "0.2s"}})
    await request(port_of(proxy), get())
    backend = proxy.pool.backends[0]
    await wait_for(lambda: len(backend.idle) == 1)
    await wait_for(lambda: len(backend.idle) == 0, timeout=3)


async def test_max_idle_per_backend(start_proxy: StartProxy, echo_backend: RawBackend) -> None:
    proxy = await start_proxy([echo_backend.port], {"limits": {"max-idle-per-backend": 2}})
    clients = [await Client.connect(port_of(proxy)) for _ in range(5)]
    # Five concurrent slow requests need five backend connections...
    for c in clients:
        await c.send(get())
    for c in clients:
        assert (await c.response()).status == 200
    for c in clients:
        await c.close()
    # ...but at most two stay pooled.
    assert len(proxy.pool.backends[0].idle) <= 2


async def test_dial_timeout_is_504(start_proxy: StartProxy) -> None:
    # A backend whose accept queue is full: the kernel drops the proxy's SYN, so the connect
    # hangs until [backend] dial-timeout.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    try:
        proxy = await start_proxy(
            [port],
            {"backend": {"dial-timeout": "0.3s"}, "timeouts": {"response-header": "30s"}},
        )
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await asyncio.wait_for(request(port_of(proxy), get()), 10)
        elapsed = loop.time() - t0
        assert r.status == 504
        # Well before the response-header timeout: it was the connect that timed out. (A
        # millisecond of slack: uvloop's loop clock is cached at millisecond resolution.)
        assert 0.299 <= elapsed < 5
    finally:
        for s in fillers:
            s.close()
        srv.close()


async def test_configured_balancer_is_used(
    start_proxy: StartProxy, backend_factory: object
) -> None:
    # hash on the client address: every request from this client lands on one backend.
    ports = [(await backend_factory(answering(200, t))).port for t in (b"one", b"two", b"three")]  # type: ignore[operator]
    proxy = await start_proxy(ports, {"loadbalancing": {"type": "hash"}})
    c = await Client.connect(port_of(proxy))
    seen = set()
    for _ in range(6):
        await c.send(get())
        seen.add((await c.response()).body)
    await c.close()
    assert len(seen) == 1


@pytest.mark.parametrize(
    ("hash_key", "extra"),
    [("header:X-User", "X-User: {n}\r\n"), ("cookie:sid", "Cookie: theme=dark; sid={n}\r\n")],
)
async def test_hash_on_a_header_or_cookie(
    hash_key: str, extra: str, start_proxy: StartProxy, backend_factory: object
) -> None:
    ports = [(await backend_factory(answering(200, t))).port for t in (b"a", b"b", b"c")]  # type: ignore[operator]
    proxy = await start_proxy(ports, {"loadbalancing": {"type": "hash", "hash-key": hash_key}})
    seen: dict[int, set[bytes]] = {}
    for n in range(12):
        for split in (False, True):  # express lane and general path agree
            raw = get(extra=extra.format(n=n))
            c = await Client.connect(port_of(proxy))
            if split:
                await c.send(raw[:10])
                await wait_for(lambda: any(conn._in_head for conn in proxy.connections))
                await c.send(raw[10:])
            else:
                await c.send(raw)
            seen.setdefault(n, set()).add((await c.response()).body)
            await c.close()
    assert all(len(v) == 1 for v in seen.values())  # one key, one backend
    assert len(set().union(*seen.values())) > 1  # different keys spread out
    # Without the header or cookie: round robin.
    bodies = {(await request(port_of(proxy), get())).body for _ in range(3)}
    assert bodies == {b"a", b"b", b"c"}
