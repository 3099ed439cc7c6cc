"""A small HTTP backend for the demo and the tests: answers every request with who it is.

It is an asyncio Protocol with httptools, like the proxy, so it is cheap enough to stand beside
it on one machine. `GET /health` answers 200 "ok"; any other request gets a short text body that
names the backend, the method and the path, after reading (and counting) the request body.
"""

from __future__ import annotations

import asyncio
from typing import cast

import httptools


class DemoBackendProtocol(asyncio.Protocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body_len = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.body_len = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body_len += len(body)

    def on_message_complete(self) -> None:
        if self.transport is None:
            return
        method = self.parser.get_method()
        if self.url == b"/health":
            body = b"ok\n"
        else:
            body = b"%s: %s %s (%d bytes in)\n" % (
                self.name.encode(),
                method,
                self.url,
                self.body_len,
            )
        keep = self.parser.should_keep_alive()
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(body)
        if not keep:
            head += b"Connection: close\r\n"
        self.transport.write(head + b"\r\n" + (b"" if method == b"HEAD" else body))
        if not keep:
            self.transport.close()


async def start_demo_backend(
    name: str, host: str = "127.0.0.1", port: int = 0
) -> tuple[asyncio.Server, int]:
    """Start one demo backend; returns the server and the port it listens on."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: DemoBackendProtocol(name), host, port)
    return server, server.sockets[0].getsockname()[1]
