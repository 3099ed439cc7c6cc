"""WebSocket through the proxy: a byte tunnel once the backend answers 101, over ws:// and wss://."""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus

from doproxy.proxy.server import make_tls_context
from tests.conftest import StartProxy, port_of
from tests.support import Client, RawBackend

BackendFactory = Callable[..., Awaitable[RawBackend]]

MAX_MESSAGE = 4 * 1024 * 1024

MESSAGES: list[str | bytes] = [
    "hello",
    "héllo wörld ✓",
    b"\x00\x01\x02\xff\xfe",
    b"",
    "t" * 70_000,  # needs a 64-bit frame length
    random.Random(1).randbytes(1024 * 1024),  # 1 MiB, incompressible
    "last",
]


@dataclass
class WsBackend:
    port: int
    requests: list[Headers] = field(default_factory=list)


@pytest.fixture
async def ws_backend() -> AsyncIterator[WsBackend]:
    backend = WsBackend(0)

    async def echo(ws: ServerConnection) -> None:
        assert ws.request is not None
        backend.requests.append(ws.request.headers)
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0, max_size=MAX_MESSAGE, compression=None) as server:
        backend.port = server.sockets[0].getsockname()[1]
        yield backend


@dataclass
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file = tmp_path / "cert.pem"
    key_file = tmp_path / "key.pem"
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(cert_file, append=i > 0)
    cert.private_key_pem.write_to_path(key_file)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client)
    return Tls(make_tls_context(str(cert_file), str(key_file)), client)


async def echo_through(uri: str, client_ssl: ssl.SSLContext | None = None) -> None:
    async with asyncio.timeout(10):
        async with connect(
            uri,
            ssl=client_ssl,
            proxy=None,
            compression=None,
            max_size=MAX_MESSAGE,
            close_timeout=2,
        ) as ws:
            # One at a time...
            for message in MESSAGES:
                await ws.send(message)
                assert await ws.recv() == message
            # ...and a burst, sent before any echo is read.
            burst = [f"burst {i}" if i % 2 else f"burst {i}".encode() for i in range(50)]
            for message in burst:
                await ws.send(message)
            assert [await ws.recv() for _ in burst] == burst
        # The close handshake went through the tunnel both ways.
        assert ws.close_code == 1000


async def test_websocket_echo(start_proxy: StartProxy, ws_backend: WsBackend) -> None:
    proxy = await start_proxy([ws_backend.port])
    await echo_through(f"ws://127.0.0.1:{port_of(proxy)}/chat?room=1")
    assert len(ws_backend.requests) == 1
    headers = ws_backend.requests[0]
    assert headers["Upgrade"].lower() == "websocket"
    assert "upgrade" in headers["Connection"].lower()
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-For"] == "127.0.0.1"


async def test_websocket_echo_over_tls(
    start_proxy: StartProxy, ws_backend: WsBackend, tls: Tls
) -> None:
    proxy = await start_proxy([ws_backend.port], {}, ssl_context=tls.server)
    await echo_through(f"wss://127.0.0.1:{port_of(proxy)}/chat", tls.client)
    assert len(ws_backend.requests) == 1
    headers = ws_backend.requests[0]
    assert headers["Upgrade"].lower() == "websocket"
    assert headers["X-Forwarded-Proto"] == "https"


async def test_two_websockets_at_once(start_proxy: StartProxy, ws_backend: WsBackend) -> None:
    proxy = await start_proxy([ws_backend.port])
    uri = f"ws://127.0.0.1:{port_of(proxy)}/"
    async with asyncio.timeout(5):
        async with (
            connect(uri, proxy=None, close_timeout=2) as a,
            connect(uri, proxy=None, close_timeout=2) as b,
        ):
            await a.send("to a")
            await b.send(b"to b")
            assert await b.recv() == b"to b"
            assert await a.recv() == "to a"
    assert len(ws_backend.requests) == 2


UPGRADE_REQUEST = (
    b"GET /chat HTTP/1.1\r\n"
    b"Host: example.test\r\n"
    b"Connection: Upgrade\r\n"
    b"Upgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"\r\n"
)
# A masked text frame "Hello" (RFC 6455 section 5.7), sent right behind the upgrade request.
EARLY_FRAME = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"


async def test_refused_upgrade_gives_the_response_and_no_tunnel(
    start_proxy: StartProxy, backend_factory: BackendFactory
) -> None:
    backend_done = asyncio.Event()

    async def refuse(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
    ) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 6\r\n\r\nnope!\n"
            )
            await writer.drain()
            await reader.read()  # record whatever else arrives, until the proxy hangs up
        finally:
            backend_done.set()

    backend = await backend_factory(refuse)
    proxy = await start_proxy([backend.port])
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(UPGRADE_REQUEST + EARLY_FRAME)
        async with asyncio.timeout(5):
            data = await c.reader.read()  # until the proxy closes
        answer, _, rest = data.partition(b"nope!\n")
        assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        assert b"upgrade" not in answer.lower()
        # No tunnel: what the client sent behind the upgrade is parsed as HTTP (never dropped
        # silently, never tunnelled); a WebSocket frame is no request: 400, and the end.
        assert rest.startswith(b"HTTP/1.1 400 ")
    finally:
        await c.close()
    async with asyncio.timeout(5):
        await backend_done.wait()  # the proxy closed its backend connection too
    sent = backend.all_received
    assert backend.connections == 1
    assert sent.startswith(b"GET /chat HTTP/1.1\r\n")
    assert b"Upgrade: websocket\r\n" in sent
    # Only the request head reached the backend, never the frame sent behind it.
    assert sent.endswith(b"\r\n\r\n")
    assert sent.count(b"\r\n\r\n") == 1
    assert EARLY_FRAME not in sent


async def test_refused_upgrade_with_websockets_client(
    start_proxy: StartProxy, backend_factory: BackendFactory
) -> None:
    async def refuse(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\n\r\nnope!\n")
        await writer.drain()
        await reader.read()

    backend = await backend_factory(refuse)
    proxy = await start_proxy([backend.port])
    async with asyncio.timeout(5):
        with pytest.raises(InvalidStatus) as info:
            async with connect(f"ws://127.0.0.1:{port_of(proxy)}/", proxy=None):
                pass
    assert info.value.response.status_code == 403
    assert info.value.response.body == b"nope!\n"
