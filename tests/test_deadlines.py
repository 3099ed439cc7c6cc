"""Every phase of an exchange has a deadline, and each one blames the right side.

| phase                               | deadline        | outcome                      | blamed  |
|-------------------------------------|-----------------|------------------------------|---------|
| request body stalls                 | client-body     | 408                          | client  |
| body cut short by the client's FIN  | -               | 400                          | client  |
| request sent, no response head      | response-header | 504                          | backend |
| response body stalls                | backend-read    | cut (no clean end)           | backend |
| client reads nothing                | client-write    | closed                       | client  |
| WebSocket tunnel silent             | tunnel-idle     | closed                       | nobody  |
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from doproxy.proxy.server import ProxyServer
from tests.conftest import StartProxy, port_of, wait_for
from tests.support import Client, RawBackend, RequestReader, answering, get, respond

pytestmark = pytest.mark.timeout(30)

UPLOAD_HEAD = b"POST /up HTTP/1.1\r\nHost: example.test\r\nContent-Length: 10\r\n\r\n"


def not_blamed(proxy: ProxyServer) -> None:
    for b in proxy.pool.backends:
        assert b.passive_failures == 0
        assert b.failures == 0
        assert not b.ejected_until


async def recording(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
) -> None:
    """Reads requests and answers each (with its body size) once it is whole."""
    rr = RequestReader(reader)
    while (req := await rr.next()) is not None:
        writer.write(respond(200, b"got %d" % len(req.body)))
        await writer.drain()


async def test_stalled_request_body_is_408_and_blames_no_backend(
    start_proxy: StartProxy, backend_factory: object
) -> None:
    backend = await backend_factory(recording)  # type: ignore[operator]
    proxy = await start_proxy(
        [backend.port],
        {
            "timeouts": {"client-body": "0.4s", "response-header": "0.2s"},
            "passive-health": {"consecutive-failures": 1},
        },
    )
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(UPLOAD_HEAD + b"12345")  # half the body, then nothing
        r = await asyncio.wait_for(c.response(), 5)
        assert r.status == 408
        assert await c.closed()
    finally:
        await c.close()
    not_blamed(proxy)
    assert proxy.pool.eligible  # still in rotation


async def test_slow_but_steady_body_is_not_a_stall(
    start_proxy: StartProxy, backend_factory: object
) -> None:
    """client-body is the longest silence, not the whole upload; and the backend's response
    timer starts only once the body has been sent, so a long upload is no 504."""
    backend = await backend_factory(recording)  # type: ignore[operator]
    proxy = await start_proxy(
        [backend.port], {"timeouts": {"client-body": "1s", "response-header": "0.3s"}}
    )
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(UPLOAD_HEAD)
        for i in range(10):  # 10 bytes over ~1.5 s: longer than both timeouts in total, each
            # gap far shorter than client-body
            await asyncio.sleep(0.15)  # the upload's pace, not a readiness wait
            await c.send(b"%d" % i)
        r = await asyncio.wait_for(c.response(), 5)
        assert (r.status, r.body) == (200, b"got 10")
    finally:
        await c.close()
    not_blamed(proxy)


@pytest.mark.parametrize("lane", ["express", "general"])
async def test_body_cut_by_client_fin_is_400_and_blames_no_backend(
    start_proxy: StartProxy, backend_factory: object, lane: str
) -> None:
    backend = await backend_factory(recording)  # type: ignore[operator]
    proxy = await start_proxy([backend.port], {"passive-health": {"consecutive-failures": 1}})
    c = await Client.connect(port_of(proxy))
    try:
        if lane == "express":
            await c.send(UPLOAD_HEAD)  # the head alone: the express lane takes it
            await c.send(b"123")
        else:
            await c.send(UPLOAD_HEAD + b"123")
        c.writer.write_eof()
        r = await asyncio.wait_for(c.response(), 5)
        assert r.status == 400
        assert await c.closed()
    finally:
        await c.close()
    not_blamed(proxy)
    assert b"123" not in backend.all_received or backend.connections == 1
    # Nothing was answered for the partial request by the backend.
    assert b"got" not in backend.all_received


async def test_response_body_stall_is_cut_and_blames_the_backend(
    start_proxy: StartProxy, backend_factory: object
) -> None:
    async def stall(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
    ) -> None:
        await RequestReader(reader).next()
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await reader.read()  # then nothing, until the proxy hangs up

    backend = await backend_factory(stall)  # type: ignore[operator]
    proxy = await start_proxy([backend.port], {"timeouts": {"backend-read": "0.3s"}})
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(get())
        data = b""
        with contextlib.suppress(ConnectionResetError):
            async with asyncio.timeout(5):
                while chunk := await c.reader.read(65536):
                    data += chunk
        # The client sees the start of the body and then a cut: no terminating chunk.
        assert b"hello" in data
        assert not data.endswith(b"0\r\n\r\n")
    finally:
        await c.close()
    assert proxy.pool.backends[0].passive_failures == 1


async def test_client_that_reads_nothing_is_closed_and_blames_no_backend(
    start_proxy: StartProxy, backend_factory: object
) -> None:
    big = b"x" * (32 * 1024 * 1024)

    async def huge(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
    ) -> None:
        await RequestReader(reader).next()
        writer.write(respond(200, big))
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    backend = await backend_factory(huge)  # type: ignore[operator]
    proxy = await start_proxy(
        [backend.port], {"timeouts": {"client-write": "0.4s", "backend-read": "30s"}}
    )
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(get())
        await wait_for(lambda: not proxy.connections, timeout=10)
    finally:
        await c.close()
    not_blamed(proxy)


@contextlib.asynccontextmanager
async def client_reading_nothing(port: int) -> AsyncIterator[socket.socket]:
    """A client connection with a small receive buffer, which never reads from it."""
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        yield sock


@pytest.mark.parametrize("size", [48 * 1024, 4 * 1024 * 1024])
async def test_client_that_stops_reading_cannot_hold_a_closed_connection(
    start_proxy: StartProxy, backend_factory: object, size: int
) -> None:
    # The client said close, so the connection is closed once the response is handed over
    # (a lingering close, bounded by LINGER_TIME); but a client that reads nothing leaves part
    # of it buffered in the proxy, the more so the larger it is. Whatever is left, the client
    # must read it within client-write, or the connection is cut: nothing may hold a closed
    # connection (a descriptor and its buffer) open for ever.
    from doproxy.proxy.client import LINGER_TIME

    backend = await backend_factory(answering(200, b"x" * size))  # type: ignore[operator]
    proxy = await start_proxy(
        [backend.port], {"timeouts": {"client-write": "0.5s", "backend-read": "30s"}}
    )
    async with client_reading_nothing(port_of(proxy)) as sock:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        await wait_for(lambda: b"GET / " in backend.all_received)
        await wait_for(lambda: not proxy.connections, timeout=LINGER_TIME + 3)
    not_blamed(proxy)


async def test_closed_connection_with_an_unread_answer_is_cut_after_client_write(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    # The state the test above cannot make on demand (loopback's kernel buffers take a
    # megabyte and more): a connection closed with the rest of its answer still buffered in
    # the proxy, below the high-water mark, so writing never paused and no client-write
    # deadline was running (pipelined answers to a client that stopped reading, say). The
    # close itself must start one.
    from doproxy.proxy.client import TEARDOWN_CLOSE

    proxy = await start_proxy([echo_backend.port], {"timeouts": {"client-write": "0.5s"}})
    async with client_reading_nothing(port_of(proxy)):
        await wait_for(lambda: len(proxy.connections) == 1)
        (conn,) = proxy._live()
        t = conn.transport
        assert t is not None
        t.set_write_buffer_limits(high=256 * 1024 * 1024)  # never paused
        t.write(b"x" * (32 * 1024 * 1024))  # more than the kernel takes
        assert t.get_write_buffer_size() > 0
        conn.teardown(TEARDOWN_CLOSE)
        await wait_for(lambda: not proxy.connections, timeout=4)
    not_blamed(proxy)


async def test_lingering_close_waits_for_the_rest_of_the_answer_then_lingers(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    # A lingering close with the end of the answer still buffered in the proxy: the client has
    # client-write to take it (not the linger's LINGER_TIME, which would cut a slow reader
    # mid-answer); once it has, the linger follows, until the client closes.
    from doproxy.proxy.client import DEADLINE_CLIENT_WRITE, DEADLINE_LINGER, TEARDOWN_LINGER

    proxy = await start_proxy([echo_backend.port], {"timeouts": {"client-write": "0.5s"}})
    c = await Client.connect(port_of(proxy))
    try:
        await wait_for(lambda: len(proxy.connections) == 1)
        (conn,) = proxy._live()
        t = conn.transport
        assert t is not None
        size = 32 * 1024 * 1024  # more than the kernel takes
        t.set_write_buffer_limits(high=256 * 1024 * 1024)  # never paused
        t.write(b"x" * size)
        assert t.get_write_buffer_size() > 0
        conn.teardown(TEARDOWN_LINGER)
        assert conn.deadline_kind == DEADLINE_CLIENT_WRITE
        got = 0
        async with asyncio.timeout(10):
            while data := await c.reader.read(1 << 20):
                got += len(data)
        assert got == size  # all of it, then the end (the proxy's half-close)
        # The client keeps its side open: past client-write, the connection lingers.
        await wait_for(lambda: conn.deadline_kind == DEADLINE_LINGER, timeout=3)
        assert proxy.connections
    finally:
        await c.close()
    await wait_for(lambda: not proxy.connections, timeout=3)
    not_blamed(proxy)


async def test_idle_tunnel_is_closed(start_proxy: StartProxy, backend_factory: object) -> None:
    async def ws(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        )
        await writer.drain()
        while await reader.read(65536):
            pass

    backend = await backend_factory(ws)  # type: ignore[operator]
    proxy = await start_proxy([backend.port], {"timeouts": {"tunnel-idle": "1s"}})
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(
            b"GET /ws HTTP/1.1\r\nHost: example.test\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        # Traffic keeps it open past tunnel-idle...
        for _ in range(8):  # 1.6 s in all, a byte every 0.2 s
            await asyncio.sleep(0.2)  # the traffic's pace, not a readiness wait
            await c.send(b"\x81\x00")
        assert proxy.connections
        # ...silence closes it.
        assert await c.closed(timeout=5)
    finally:
        await c.close()


async def test_backend_that_reads_no_body_is_504_and_blamed(
    start_proxy: StartProxy, backend_factory: object
) -> None:
    """The proxy stops reading the client while the backend's socket is full; if the backend
    reads nothing for client-body, the stall is the backend's (nginx's proxy_send_timeout)."""

    async def deaf(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(30)  # reads nothing more, answers nothing: the stall itself

    backend = await backend_factory(deaf)  # type: ignore[operator]
    proxy = await start_proxy([backend.port], {"timeouts": {"client-body": "0.5s"}})
    c = await Client.connect(port_of(proxy))
    size = 64 * 1024 * 1024
    try:
        await c.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
        c.writer.write(b"x" * (16 * 1024 * 1024))  # more than the sockets between can hold
        r = await asyncio.wait_for(c.response(), 10)
        assert r.status == 504
    finally:
        c.writer.transport.abort()
    assert proxy.pool.backends[0].passive_failures == 1


async def test_fin_after_a_partial_head_closes_once_the_good_ones_are_answered(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])  # client-header: the default 10 s
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(get("/good") + b"GET /never-ends HTTP/1.1\r\nHo")
        c.writer.write_eof()
        r = await asyncio.wait_for(c.response(), 5)
        assert r.body == b"GET /good len=0"
        assert await c.closed(timeout=2)  # not after client-header
    finally:
        await c.close()
    assert b"never-ends" not in echo_backend.all_received
