"""The rest of the HTTP edge's rules (docs/http.md): limits, early responses, upgrades, what
passes in responses. Each is checked on what the other side actually receives."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import StartProxy, port_of
from tests.support import Client, RawBackend, RequestReader, get, request, respond

pytestmark = pytest.mark.timeout(30)


# --- limits --------------------------------------------------------------------------------


@pytest.mark.parametrize("lane", ["express", "general"])
async def test_declared_body_over_max_body_bytes_is_413_before_anything_is_sent(
    start_proxy: StartProxy, echo_backend: RawBackend, lane: str
) -> None:
    proxy = await start_proxy([echo_backend.port], {"limits": {"max-body-bytes": 10}})
    head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n"
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(head if lane == "express" else head + b"01234567890")
        r = await asyncio.wait_for(c.response(), 5)
        assert r.status == 413
        assert r.header("connection") == b"close"
    finally:
        await c.close()
    assert echo_backend.connections == 0
    # At the limit it passes.
    ok = await request(
        port_of(proxy), b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789"
    )
    assert ok.body == b"POST / len=10"


async def test_chunked_body_over_max_body_bytes_is_413(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port], {"limits": {"max-body-bytes": 10}})
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n012345\r\n"
        )
        await c.send(b"6\r\n678901\r\n0\r\n\r\n")
        r = await asyncio.wait_for(c.response(), 5)
        assert r.status == 413
    finally:
        await c.close()
    # The backend never got a complete request: nothing was answered there.
    assert b"0\r\n\r\n" not in echo_backend.all_received


async def test_response_head_over_the_bound_is_502(
    start_proxy: StartProxy, backend_factory: object
) -> None:
    async def endless(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
    ) -> None:
        await RequestReader(reader).next()
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(200):
            writer.write(b"X-Filler-%d: %s\r\n" % (i, b"y" * 1000))
        await writer.drain()
        await reader.read()

    backend = await backend_factory(endless)  # type: ignore[operator]
    proxy = await start_proxy([backend.port], {"limits": {"max-response-header-bytes": 65536}})
    r = await asyncio.wait_for(request(port_of(proxy), get()), 5)
    assert r.status == 502
    assert proxy.pool.backends[0].protocol_errors == 1


# --- early final response --------------------------------------------------------------------


async def test_early_response_says_close_and_the_client_reads_it(
    start_proxy: StartProxy, backend_factory: object
) -> None:
    async def refuse(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(respond(413, b"too big"))
        await writer.drain()
        await reader.read()

    backend = await backend_factory(refuse)  # type: ignore[operator]
    proxy = await start_proxy([backend.port])
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000\r\n\r\n")
        await c.send(b"x" * 200_000)  # still uploading when the answer comes
        r = await asyncio.wait_for(c.response(), 5)
        assert (r.status, r.body) == (413, b"too big")
        assert r.header("connection") == b"close"
        # The client may go on sending for a while: the proxy reads and drops it (lingering
        # close) instead of resetting the connection under the response.
        await c.send(b"x" * 200_000)
        assert await c.closed()
    finally:
        await c.close()


# --- upgrades --------------------------------------------------------------------------------


def ws_request(version: bytes = b"1.1", connection: bytes = b"Upgrade") -> bytes:
    return (
        b"GET /ws HTTP/"
        + version
        + b"\r\nHost: example.test\r\nConnection: "
        + connection
        + b"\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )


@pytest.mark.parametrize(
    "raw",
    [ws_request(version=b"1.0"), ws_request(connection=b"keep-alive")],
    ids=["http10", "no-connection-upgrade"],
)
async def test_upgrade_not_offered_unless_websocket_in_http11_with_connection_upgrade(
    start_proxy: StartProxy, echo_backend: RawBackend, raw: bytes
) -> None:
    proxy = await start_proxy([echo_backend.port])
    r = await asyncio.wait_for(request(port_of(proxy), raw), 5)
    assert r.status == 200
    sent = echo_backend.all_received.lower()
    assert b"upgrade" not in sent


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
    ids=["other-protocol", "bare-101"],
)
async def test_tunnel_opens_only_on_101_websocket(
    start_proxy: StartProxy, backend_factory: object, answer: bytes
) -> None:
    async def switch(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        await reader.read()

    backend = await backend_factory(switch)  # type: ignore[operator]
    proxy = await start_proxy([backend.port])
    r = await asyncio.wait_for(request(port_of(proxy), ws_request()), 5)
    assert r.status == 502
    assert proxy.pool.backends[0].protocol_errors == 1


# --- responses -------------------------------------------------------------------------------


async def test_interim_response_loses_connection_named_headers(
    start_proxy: StartProxy, backend_factory: object
) -> None:
    async def hints(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
    ) -> None:
        await RequestReader(reader).next()
        writer.write(
            b"HTTP/1.1 103 Early Hints\r\nConnection: x-hop\r\nX-Hop: secret\r\n"
            b"Link: </s.css>; rel=preload\r\n\r\n" + respond(200, b"ok")
        )
        await writer.drain()
        await reader.read()

    backend = await backend_factory(hints)  # type: ignore[operator]
    proxy = await start_proxy([backend.port])
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(get())
        r = await asyncio.wait_for(c.response(), 5)
        assert r.status == 200
        (interim,) = c.interim
        assert interim.status == 103
        assert interim.header("link") is not None
        assert interim.header("x-hop") is None
        assert interim.header("connection") is None
    finally:
        await c.close()


async def test_transfer_coding_other_than_chunked_is_502(
    start_proxy: StartProxy, backend_factory: object
) -> None:
    async def gzip(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
    ) -> None:
        await RequestReader(reader).next()
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nnot-really-gzip")
        await writer.drain()
        writer.close()

    backend = await backend_factory(gzip)  # type: ignore[operator]
    proxy = await start_proxy([backend.port])
    r = await asyncio.wait_for(request(port_of(proxy), get()), 5)
    assert r.status == 502


async def test_http10_client_gets_an_http11_status_line(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(b"GET /old HTTP/1.0\r\n\r\n")
        data = await asyncio.wait_for(c.reader.read(), 5)
        assert data.startswith(b"HTTP/1.1 200 ")
        assert b"GET /old len=0" in data
    finally:
        await c.close()


async def test_error_answer_to_head_has_no_body(
    start_proxy: StartProxy, backend_factory: object
) -> None:
    """Found by the differential test: a 502 to a pipelined HEAD carried a body, which the
    client reads as the start of the next response."""

    async def bad(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
    ) -> None:
        rr = RequestReader(reader)
        while (req := await rr.next()) is not None:
            if req.url == b"/bad":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
            else:
                writer.write(respond(200, b"fine"))
            await writer.drain()

    backend = await backend_factory(bad)  # type: ignore[operator]
    proxy = await start_proxy([backend.port], {"retries": {"attempts": 0}})
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(b"HEAD /bad HTTP/1.1\r\nHost: a\r\n\r\n" + get("/next"))
        r = await asyncio.wait_for(c.response(head_request=True), 5)
        assert r.status == 502
        assert r.body == b""
        r2 = await asyncio.wait_for(c.response(), 5)
        assert (r2.status, r2.body) == (200, b"fine")
    finally:
        await c.close()
