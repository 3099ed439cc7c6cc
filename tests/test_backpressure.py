"""100 MB each way through a real doproxy process: bodies stream, nothing piles up in memory.

While the slow side does not read, the fast side must be held back (backpressure) and the
proxy's peak RSS must stay far below the body size.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.procs import ProxyProcess, start_proxy_process, write_config
from tests.support import RequestReader

BODY = 100 * 1024 * 1024
BLOCK = b"z" * (256 * 1024)
STALL_BOUND = 40 * 1024 * 1024  # socket buffers on both hops plus the proxy's write buffers
RSS_GROWTH_BOUND_KIB = 40 * 1024


class Download:
    """A backend that streams a 100 MB response and counts what it managed to write."""

    def __init__(self) -> None:
        self.written = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await RequestReader(reader).next()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BODY)
        sent = 0
        while sent < BODY:
            writer.write(BLOCK)
            sent += len(BLOCK)
            await writer.drain()
            self.written = sent
        writer.close()


@pytest.fixture
async def proxy_for(tmp_path: Path) -> AsyncIterator[list[ProxyProcess]]:
    procs: list[ProxyProcess] = []
    yield procs
    for p in procs:
        await p.stop()


async def _progress_settles(read: object, attr: str, window: float = 0.3) -> int:
    """Wait until a counter stops growing (the pipe is full), return its value."""
    last = -1
    async with asyncio.timeout(20):
        while True:
            now = getattr(read, attr)
            if now == last and now > 0:
                return int(now)
            last = now
            await asyncio.sleep(window)


@pytest.mark.timeout(90)
async def test_slow_client_download_is_not_buffered(
    tmp_path: Path, proxy_for: list[ProxyProcess]
) -> None:
    dl = Download()
    server = await asyncio.start_server(dl.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = await start_proxy_process(write_config(tmp_path, [port]))
    proxy_for.append(proxy)
    base_rss, _ = proxy.rss_kib()

    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=1 << 20)
    writer.write(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    # The client stops reading. The backend must stall well before 100 MB.
    stalled_at = await _progress_settles(dl, "written")
    assert stalled_at < STALL_BOUND, f"backend wrote {stalled_at} bytes to a client not reading"
    # Now read everything.
    got = 0
    async with asyncio.timeout(60):
        while got < BODY:
            data = await reader.read(1 << 20)
            assert data, "connection closed early"
            got += len(data)
    assert got == BODY
    _, peak = proxy.rss_kib()
    assert peak - base_rss < RSS_GROWTH_BOUND_KIB, f"proxy RSS grew by {peak - base_rss} KiB"
    writer.close()
    server.close()


class Upload:
    """A backend that does not read the body until told to, then counts it."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.received = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"Content-Length: %d" % BODY in head
        await self.go.wait()
        while self.received < BODY:
            data = await reader.read(1 << 20)
            if not data:
                break
            self.received += len(data)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()


class Sender:
    def __init__(self) -> None:
        self.sent = 0

    async def send(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"PUT /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % BODY)
        while self.sent < BODY:
            writer.write(BLOCK)
            await writer.drain()
            self.sent += len(BLOCK)


@pytest.mark.timeout(90)
async def test_slow_backend_upload_is_not_buffered(
    tmp_path: Path, proxy_for: list[ProxyProcess]
) -> None:
    up = Upload()
    server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = await start_proxy_process(write_config(tmp_path, [port]))
    proxy_for.append(proxy)
    base_rss, _ = proxy.rss_kib()

    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    sender = Sender()
    task = asyncio.create_task(sender.send(writer))
    stalled_at = await _progress_settles(sender, "sent")
    assert stalled_at < STALL_BOUND, f"client pushed {stalled_at} bytes to a backend not reading"
    up.go.set()
    async with asyncio.timeout(60):
        await task
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert up.received == BODY
    _, peak = proxy.rss_kib()
    assert peak - base_rss < RSS_GROWTH_BOUND_KIB, f"proxy RSS grew by {peak - base_rss} KiB"
    writer.close()
    server.close()
