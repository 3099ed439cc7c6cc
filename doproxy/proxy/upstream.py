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

A connection goes back to the pool only when both the request and the response were complete,
neither side asked to close, and it is *clean*: its parser stands exactly at a message boundary
with no byte left over, and it is reading (no pause left over from a slow client's backpressure).
Pooling happens after llhttp returns from the bytes that completed the response, never inside
its callbacks, so bytes that follow the response in the same read are seen before anyone can
take the connection. Any byte after a complete response (a second response, a body after
204/304 or after a HEAD response's head, a partial head, junk), in the same read or later while
idle, closes the connection and counts once as a protocol error of the backend. An idle
connection that the backend closes is removed from the pool at once (connection_lost/eof), so the
next request dials afresh instead of failing.

Backpressure: when this connection's write buffer fills (a backend reading an upload slowly),
pause_writing pauses reading from the client, and resume_writing resumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Final, cast

import httptools

from doproxy.core.http11 import head_text
from doproxy.proxy.backend import Backend
from doproxy.proxy.writes import flush_writes

if TYPE_CHECKING:
    from doproxy.proxy.client import ClientConnection

log = logging.getLogger(__name__)


DEFAULT_MAX_HEAD: Final = 64 * 1024


class _NoCallbacks:
    """A parser protocol object with no callbacks: llhttp only validates."""

    __slots__ = ()


class _HeadResponseDone(Exception):
    """Raised inside the parser to stop it after the head of a response to HEAD.

    llhttp cannot be told that a response answers a HEAD request (httptools hides the
    on_headers_complete return value), so it would wait for Content-Length bytes that never come.
    """


class _StrayBytes(Exception):
    """Raised inside the parser when a new message begins after the response was complete."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_after_head",
        "_awaiting_head",
        "_headbuf",
        "backend",
        "client",
        "closed",
        "done",
        "feeding",
        "got_bytes",
        "idle_since",
        "last_head",
        "lean_parser",
        "max_head",
        "max_idle",
        "parser",
        "paused",
        "release_pending",
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
        self.max_head = DEFAULT_MAX_HEAD  # bytes a response head may take (the client sets it)
        self._after_head = 0  # bytes received after the head of a response to HEAD
        # Clean-state bookkeeping (see the module docstring).
        self.done = False  # the response of the current exchange is complete
        self.feeding = False  # inside parser.feed_data: pooling waits until it returns
        self.release_pending = False  # release() once feed_data returns
        self.max_idle = 0  # idle connections its backend may keep (release's argument)
        self.paused = False  # reading paused for the client's backpressure

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.backend.connections += 1

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None or self.done:
            # Bytes from an idle connection, or after the response was complete: they belong
            # to no request. Never reuse this connection.
            self.stray("bytes after a complete response")
            return
        if self.tunnel:
            client.tunnel_from_backend(data)
            return
        self.got_bytes = True
        if self._awaiting_head:
            if not self._headbuf and client.express_response(self, data):
                return
            self._headbuf = self._headbuf + data if self._headbuf else data
            if (
                len(self._headbuf) > self.max_head
                and self._headbuf.find(b"\r\n\r\n", 0, self.max_head) < 0
            ):
                client.backend_protocol_error(self, "response head too large")
                return
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            client.backend_switched_protocols(self, data[e.args[0] :])
        except httptools.HttpParserCallbackError as e:
            err = e.__context__
            if isinstance(err, _HeadResponseDone):
                # Fresh parser for the next response on this keep-alive connection.
                self.parser = httptools.HttpResponseParser(self)
                self._awaiting_head = True
                self._headbuf = b""
                self.done = True
                if self.client is not None:
                    self.client.response_complete(self)
                if self._after_head:
                    self.stray("a body after the head of a response to HEAD")
            elif isinstance(err, _StrayBytes):
                self.stray("bytes after a complete response")
            else:
                raise
        except httptools.HttpParserError as e:
            if self.done:
                self.stray("bytes after a complete response")
            elif self.client is not None:
                self.client.backend_protocol_error(self, str(e))
        finally:
            self.feeding = False
        if self.release_pending:
            self.release_pending = False
            self.release(time.monotonic(), self.max_idle)

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

    def pause_reading(self) -> None:
        """Stop reading for the client's backpressure (resume_reading undoes it)."""
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_reading_for_backend()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_reading_for_backend()

    # --- llhttp callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            raise _StrayBytes()  # a second message after a complete response

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
            # Only a response to HEAD stops the parser here; what followed its head is a body
            # that must not be.
            self._after_head = len(buf) - end - 4
        self.last_head = head
        client = self.client
        if client is not None:
            client.response_head(self, status, head, text, parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if self.client is not None:
            self.client.response_body(body)

    def on_message_complete(self) -> None:
        self._awaiting_head = True
        if self.parser.get_status_code() >= 200:
            self.done = True  # from now on, any byte is a stray one
        if self.client is not None:
            self.client.response_complete(self)

    def stop_after_head(self) -> None:
        raise _HeadResponseDone()

    # --- helpers ----------------------------------------------------------------------------

    def stray(self, detail: str) -> None:
        """Bytes that belong to no request: close, and count one protocol error."""
        if self.closed:
            return
        self.release_pending = False
        client = self.client
        if client is not None:
            client.backend_protocol_error(self, detail)
            return
        self.backend.protocol_errors += 1
        log.warning(
            "backend %s: %s; closing that connection. Fix the backend: those bytes answer no "
            "request",
            self.backend.name,
            detail,
        )
        self.abort()

    def release(self, now: float, max_idle: int) -> None:
        """Go back onto the backend's idle stack (LIFO; closed instead when it already holds
        `max_idle`), reading again and clean. Called with the exchange complete; from inside
        the parser, the pooling waits until the parser has seen every byte of the read (see
        the module docstring)."""
        if self.closed:
            return
        if self.feeding:
            self.release_pending = True
            self.max_idle = max_idle
            return
        self.done = False
        self._after_head = 0
        if self.paused:
            self.resume_reading()
        idle = self.backend.idle
        if len(idle) >= max_idle:
            self.close()
            return
        self.idle_since = now
        idle.append(self)

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
