"""h2c is refused: the upgrade is stripped, the request is served as HTTP/1.1, and a backend that
switches protocols anyway never gets a 101 through to the client."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tests.conftest import StartProxy, port_of
from tests.support import Client, RawBackend

BackendFactory = Callable[..., Awaitable[RawBackend]]

H2C_REQUEST = (
    b"GET /h2c HTTP/1.1\r\n"
    b"Host: example.test\r\n"
    b"Connection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    b"X-Keep: yes\r\n"
    b"\r\n"
)


async def test_h2c_upgrade_is_stripped_and_served_as_http11(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(H2C_REQUEST)
        async with asyncio.timeout(5):
            r = await c.response()
        assert r.status == 200
        assert r.body == b"GET /h2c len=0"
        assert r.header("Upgrade") is None
        assert r.header("Connection") is None
        # The parser that stopped at the upgrade is replaced: the connection carries on.
        await c.send(b"GET /next HTTP/1.1\r\nHost: example.test\r\n\r\n")
        async with asyncio.timeout(5):
            r2 = await c.response()
        assert r2.body == b"GET /next len=0"
    finally:
        await c.close()
    assert c.interim == []  # no 101 (nor any other interim response)
    sent = echo_backend.all_received
    assert sent.startswith(b"GET /h2c HTTP/1.1\r\n")
    head = sent.lower()
    assert b"upgrade" not in head
    assert b"h2c" not in head.replace(b"/h2c", b"")
    assert b"http2-settings" not in head
    assert b"aamaaabkaaraaaaaaaiaaaaa" not in head
    assert b"x-keep: yes\r\n" in head  # an end-to-end header still passes


async def test_h2c_upgrade_on_a_request_with_a_body(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])
    c = await Client.connect(port_of(proxy))
    try:
        head = H2C_REQUEST.replace(b"GET ", b"POST ").replace(
            b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n"
        )
        # A request pipelined behind the upgrade request and its body is answered too.
        await c.send(head + b"hello" + b"GET /after HTTP/1.1\r\nHost: example.test\r\n\r\n")
        async with asyncio.timeout(2):
            r = await c.response()
            r2 = await c.response()
        assert r.status == 200
        assert r.body == b"POST /h2c len=5"
        assert r2.body == b"GET /after len=0"
    finally:
        await c.close()
    sent = echo_backend.all_received
    assert b"\r\n\r\nhelloGET /after HTTP/1.1\r\n" in sent
    assert b"upgrade" not in sent.lower()
    assert b"http2-settings" not in sent.lower()


async def test_h2c_upgrade_body_in_later_writes(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    # The body follows the head in separate writes: it must still reach the backend as the
    # body, never be parsed as a new request.
    proxy = await start_proxy([echo_backend.port])
    c = await Client.connect(port_of(proxy))
    try:
        head = H2C_REQUEST.replace(b"GET ", b"POST ").replace(
            b"\r\n\r\n", b"\r\nContent-Length: 10\r\n\r\n"
        )
        await c.send(head)
        await c.send(b"hello")
        await c.send(b"GET /x")
        async with asyncio.timeout(2):
            r = await c.response()
        assert (r.status, r.body) == (200, b"POST /h2c len=10")
        assert await c.closed(timeout=2)
    finally:
        await c.close()
    # exactly Content-Length bytes were forwarded; the extra byte was not
    assert echo_backend.all_received.endswith(b"\r\n\r\nhelloGET /")


async def test_chunked_body_with_upgrade_is_refused(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])
    head = H2C_REQUEST.replace(b"GET ", b"POST ").replace(
        b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(head)
        r = await c.response()
        assert r.status == 400
    finally:
        await c.close()
    assert echo_backend.connections == 0


async def test_backend_101_to_h2c_never_reaches_the_client(
    start_proxy: StartProxy, backend_factory: BackendFactory
) -> None:
    async def switch(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
        )
        await writer.drain()
        await reader.read()

    backend = await backend_factory(switch)
    proxy = await start_proxy([backend.port])
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(H2C_REQUEST)
        async with asyncio.timeout(5):
            r = await c.response()
        assert r.status == 502
        assert r.header("Upgrade") is None
        # The client's connection is sound (only the backend's broke): it carries on.
        await c.send(H2C_REQUEST)
        async with asyncio.timeout(5):
            assert (await c.response()).status == 502
    finally:
        await c.close()
    assert c.interim == []
    # Each request reached the backend, without the upgrade (the broken connection is not
    # reused: the second request dialled afresh).
    assert backend.connections == 2
    assert b"h2c" not in backend.all_received.lower().replace(b"/h2c", b"")
    assert b"upgrade" not in backend.all_received.lower()
