"""Test helpers: raw backends that record what reaches them, and a raw HTTP/1.1 client.

Everything runs on real sockets on 127.0.0.1 with port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httptools

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "RawBackend"], Awaitable[None]]


def find_header(headers: list[tuple[bytes, bytes]], name: str) -> bytes | None:
    """The first value of header `name` (any case), or None."""
    want = name.lower().encode()
    for n, v in headers:
        if n.lower() == want:
            return v
    return None


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    reason: bytes = b""

    def header(self, name: str) -> bytes | None:
        return find_header(self.headers, name)

    def header_names(self) -> set[bytes]:
        return {n.lower() for n in self.headers}


class RawBackend:
    """A TCP server on 127.0.0.1:0 that records every byte it receives, per connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.received: list[bytearray] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def all_received(self) -> bytes:
        return b"".join(bytes(r) for r in self.received)

    async def start(self) -> RawBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        buf = bytearray()
        self.received.append(buf)
        self.writers.append(writer)
        recording = _RecordingReader(reader, buf)
        try:
            await self.handler(recording, writer, self)  # type: ignore[arg-type]
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in self.writers:
                w.close()
            await self.server.wait_closed()


class _RecordingReader:
    """Wraps a StreamReader and keeps a copy of everything read through it."""

    def __init__(self, reader: asyncio.StreamReader, buf: bytearray) -> None:
        self._r = reader
        self._buf = buf

    async def read(self, n: int = -1) -> bytes:
        data = await self._r.read(n)
        self._buf += data
        return data

    async def readuntil(self, sep: bytes = b"\n") -> bytes:
        data = await self._r.readuntil(sep)
        self._buf += data
        return data

    async def readexactly(self, n: int) -> bytes:
        data = await self._r.readexactly(n)
        self._buf += data
        return data

    async def readline(self) -> bytes:
        data = await self._r.readline()
        self._buf += data
        return data

    def at_eof(self) -> bool:
        return self._r.at_eof()


@dataclass
class ParsedRequest:
    method: bytes
    url: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    version: str = "1.1"
    keep_alive: bool = True

    def header(self, name: str) -> bytes | None:
        return find_header(self.headers, name)


class _ReqCollector:
    def __init__(self) -> None:
        self.done: list[ParsedRequest] = []
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, n: bytes, v: bytes) -> None:
        self.headers.append((n, v))

    def on_body(self, b: bytes) -> None:
        self.body += b

    def on_message_complete(self) -> None:
        self.done.append(ParsedRequest(b"", self.url, self.headers, bytes(self.body)))


class RequestReader:
    """Reads whole requests off a backend connection (for handlers)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.c = _ReqCollector()
        self.parser = httptools.HttpRequestParser(self.c)

    async def next(self) -> ParsedRequest | None:
        while not self.c.done:
            data = await self.reader.read(65536)
            if not data:
                return None
            with contextlib.suppress(httptools.HttpParserUpgrade):
                self.parser.feed_data(data)
            if self.c.done:
                break
        req = self.c.done.pop(0)
        req.method = self.parser.get_method()
        req.version = self.parser.get_http_version()
        req.keep_alive = self.parser.should_keep_alive()
        return req


def respond(
    status: int = 200, body: bytes = b"ok", headers: list[tuple[str, str]] | None = None
) -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
    for n, v in headers or []:
        head += f"{n}: {v}\r\n"
    return head.encode() + b"\r\n" + body


def answering(status: int, body: bytes) -> Handler:
    """A keep-alive backend that answers every request with `status` and `body`."""

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
    ) -> None:
        rr = RequestReader(reader)
        while await rr.next() is not None:
            writer.write(respond(status, body))
            await writer.drain()

    return handler


def holding(answer: asyncio.Event, arrived: asyncio.Event | None = None) -> Handler:
    """A keep-alive backend that answers every request 200 "ok", each only once `answer` is
    set; `arrived`, when given, is set as each request arrives."""

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
    ) -> None:
        rr = RequestReader(reader)
        while await rr.next() is not None:
            if arrived is not None:
                arrived.set()
            await answer.wait()
            writer.write(respond(200, b"ok"))
            await writer.drain()

    return handler


async def silent(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
) -> None:
    """A backend that reads a request and never answers."""
    await RequestReader(reader).next()
    await reader.read()


async def dead_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago: nothing listens there."""
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port: int = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    return port


async def echo_handler(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
) -> None:
    """Keep-alive backend: answers each request with a summary of what it received."""
    rr = RequestReader(reader)
    while True:
        req = await rr.next()
        if req is None:
            return
        body = b"%s %s len=%d" % (req.method, req.url, len(req.body))
        writer.write(respond(200, body, [("X-Conn", str(backend.connections))]))
        await writer.drain()


class _RespCollector:
    def __init__(self) -> None:
        self.done: list[Response] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.reason = b""
        self.complete = False

    def on_message_begin(self) -> None:
        self.headers = []
        self.body = bytearray()

    def on_status(self, s: bytes) -> None:
        self.reason = s

    def on_header(self, n: bytes, v: bytes) -> None:
        self.headers.append((n, v))

    def on_body(self, b: bytes) -> None:
        self.body += b


@dataclass
class Client:
    """A raw HTTP/1.1 client connection to the proxy."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    buffered: bytearray = field(default_factory=bytearray)

    @classmethod
    async def connect(cls, port: int, **kw: object) -> Client:
        r, w = await asyncio.open_connection("127.0.0.1", port, **kw)  # type: ignore[arg-type]
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, head_request: bool = False) -> Response:
        """Read one response. Raises EOFError if the connection closes first."""
        coll = _RespCollector()
        results: list[Response] = []

        def complete() -> None:
            results.append(
                Response(parser.get_status_code(), coll.headers, bytes(coll.body), coll.reason)
            )

        coll.on_message_complete = complete  # type: ignore[attr-defined]
        if head_request:
            coll.on_headers_complete = complete  # type: ignore[attr-defined]
        parser = httptools.HttpResponseParser(coll)
        while True:
            if self.buffered:
                data = bytes(self.buffered)
                self.buffered.clear()
            else:
                data = await self.reader.read(1 << 20)
            if not data:
                raise EOFError("connection closed before a complete response")
            offset = 0
            try:
                parser.feed_data(data)
                offset = len(data)
            except httptools.HttpParserUpgrade as e:
                offset = e.args[0]
            if results:
                r = results[0]
                if r.status < 200 and r.status != 101:
                    # interim response: keep reading with a fresh parser
                    return await self._after_interim(data, r)
                self.buffered += data[offset:] if offset < len(data) else b""
                return r

    async def _after_interim(self, data: bytes, interim: Response) -> Response:
        # Re-feed what followed the interim response's blank line.
        end = data.find(b"\r\n\r\n")
        self.buffered += data[end + 4 :]
        self.interim.append(interim)
        return await self.response()

    interim: list[Response] = field(default_factory=list)

    async def closed(self, timeout: float = 5.0) -> bool:
        """True when the proxy closed the connection (EOF or reset) within `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    data = await self.reader.read(65536)
                    if not data:
                        return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


async def request(port: int, raw: bytes, head_request: bool = False) -> Response:
    c = await Client.connect(port)
    try:
        await c.send(raw)
        return await c.response(head_request)
    finally:
        await c.close()


def get(path: str = "/", host: str = "example.test", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()
