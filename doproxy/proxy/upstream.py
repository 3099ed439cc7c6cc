"""One keep-alive connection to a backend.

Theory of operation
-------------------
An upstream connection is either *idle* (in its backend's LIFO pool, `client is None`) or
*attached* to exactly one client connection for the length of one exchange. While attached it
parses the backend's response with llhttp (httptools) and hands each event straight to the
client connection, which writes it out: nothing is buffered here.

    dial --> attached --(response complete, reusable)--> idle --(picked)--> attached ...
               |  |                                        |
               |  +--(101 Switching Protocols)--> tunnel    +--(backend closed, timeout)--> closed
               +--(error, close, not reusable)--> closed

A connection goes back to the pool only when both the request and the response were complete and
neither side asked to close. An idle connection that the backend closes is removed from the pool
at once (connection_lost/eof), so the next request dials afresh instead of failing.

Backpressure: when this connection's write buffer fills (a backend reading an upload slowly),
pause_writing pauses reading from the client, and resume_writing resumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, cast

import httptools

from doproxy.proxy.client import flush_writes
from doproxy.proxy.scan import head_text

if TYPE_CHECKING:
    from doproxy.proxy.backend import Backend
    from doproxy.proxy.client import ClientConnection


class _NoCallbacks:
    """A parser protocol object with no callbacks: llhttp only validates."""

    __slots__ = ()


class _HeadResponseDone(Exception):
    """Raised inside the parser to stop it after the head of a response to HEAD.

    llhttp cannot be told that a response answers a HEAD request (httptools hides the
    on_headers_complete return value), so it would wait for Content-Length bytes that never come.
    """


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_awaiting_head",
        "_headbuf",
        "backend",
        "client",
        "closed",
        "got_bytes",
        "idle_since",
        "last_head",
        "lean_parser",
        "parser",
        "reused",
        "transport",
        "tunnel",
    )

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        # Validates whole responses for the express lane, with no Python callbacks at all.
        self.lean_parser = httptools.HttpResponseParser(_NoCallbacks())
        self.client: ClientConnection | None = None
        self.idle_since = 0.0
        self.reused = False
        self.closed = False
        self.got_bytes = False
        self.tunnel = False
        # The response head is handled as raw bytes (llhttp validates it, we copy it through
        # minus hop-by-hop lines): far cheaper than a Python callback per header.
        self._awaiting_head = True
        self._headbuf = b""
        self.last_head = b""

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.backend.connections += 1

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            # Bytes from an idle backend connection are a protocol error; never reuse it.
            self.close()
            return
        if self.tunnel:
            client.tunnel_from_backend(data)
            return
        self.got_bytes = True
        if self._awaiting_head:
            if not self._headbuf and client.express_response(self, data):
                return
            self._headbuf = self._headbuf + data if self._headbuf else data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            client.backend_switched_protocols(self, data[e.args[0] :])
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _HeadResponseDone):
                # Fresh parser for the next response on this keep-alive connection.
                self.parser = httptools.HttpResponseParser(self)
                self._awaiting_head = True
                self._headbuf = b""
                if self.client is not None:
                    self.client.response_complete(self)
            else:
                raise
        except httptools.HttpParserError as e:
            client.backend_protocol_error(self, str(e))

    def eof_received(self) -> bool | None:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        client = self.client
        if client is not None:
            self.client = None
            client.backend_lost(self)
        else:
            with contextlib.suppress(ValueError):
                self.backend.idle.remove(self)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_reading_for_backend()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_reading_for_backend()

    # --- llhttp callbacks -------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        buf = self._headbuf
        text, end = head_text(buf)
        head = buf[: end + 2]
        text = text[: end + 2]
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:
            self._headbuf = buf[end + 4 :]  # an interim response: the next head follows
        else:
            self._headbuf = b""
            self._awaiting_head = False
        self.last_head = head
        client = self.client
        if client is not None:
            client.response_head(self, status, head, text, parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if self.client is not None:
            self.client.response_body(body)

    def on_message_complete(self) -> None:
        self._awaiting_head = True
        if self.client is not None:
            self.client.response_complete(self)

    def stop_after_head(self) -> None:
        raise _HeadResponseDone()

    # --- helpers ----------------------------------------------------------------------------

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            flush_writes()  # a request head queued for this connection goes out first
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            flush_writes()
            self.transport.abort()
