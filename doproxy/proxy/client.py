"""The client side of the proxy: one asyncio Protocol per client connection.

Theory of operation
-------------------
Bytes from the client go through llhttp (httptools), which calls back per request event. Each
request becomes an `Exchange`; exchanges queue in arrival order (pipelining) and only the head of
the queue is forwarded, so responses come back in order. Later requests wait, buffered, with
reading paused.

Nothing of a request is forwarded until the parser has accepted the whole chunk of bytes it came
in: callbacks only collect, and `data_received` forwards after `feed_data` returns. A malformed
or ambiguous request therefore never reaches a backend: it gets a 400 (or 414/431/501) and the
connection is closed.

Lifecycle of one exchange:

    parsing head --> waiting for backend (pick, pooled connection or dial) --> forwarding
        --> response head --> response body --> complete --> next exchange / keep-alive idle
                                                          \\-> close (client or proxy asked)

A WebSocket upgrade turns into a byte tunnel only after the backend answers 101. Any other
Upgrade (h2c in particular) is stripped and the connection closes after that response.

Backpressure: reading from the client is paused for any of several reasons at once (a bit each:
the backend's write buffer is full, queued pipelined requests, bytes buffered while dialing) and
resumed only when none is left. Reading from the backend is paused while the client's write
buffer is full.

Timeouts are deadlines checked by the server's sweep (no timer per request): the head of a
request must arrive within `client-header` (408), an idle keep-alive connection is closed after
`keep-alive`, and a backend must start its response within `response-header` (504).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from doproxy.core.http_rules import (
    CONNECTION,
    IDEMPOTENT_METHODS,
    LAST_CHUNK,
    REQUEST_SPECIAL,
    RESPONSE_SPECIAL,
    chunk,
    connection_tokens,
    error_response,
)
from doproxy.errors import (
    BadGateway,
    BadRequest,
    ClientError,
    ExpectationFailed,
    GatewayTimeout,
    HeaderFieldsTooLarge,
    MethodNotAllowed,
    NotImplementedByProxy,
    RequestTimeout,
    ServiceUnavailable,
    URITooLong,
)
from doproxy.proxy.backend import Backend, Pool

if TYPE_CHECKING:
    from doproxy.proxy.server import ProxyServer
    from doproxy.proxy.upstream import UpstreamConnection

log = logging.getLogger(__name__)

# Reasons reading from the client is paused (bit flags).
_PAUSE_BACKEND = 1  # the backend's write buffer is full
_PAUSE_QUEUE = 2  # a pipelined request waits behind the active one
_PAUSE_BUFFER = 4  # request body bytes are buffered while no backend connection is ready
_PAUSE_TUNNEL = 8  # the tunnel peer's write buffer is full

# Deadline kinds checked by the server's sweep.
DEADLINE_NONE = 0
DEADLINE_HEADER = 1
DEADLINE_IDLE = 2
DEADLINE_RESPONSE = 3

# Output framing of a response body towards the client.
_OUT_RAW = 0  # pass bytes as they are (Content-Length, or close-delimited for HTTP/1.0)
_OUT_CHUNKED = 1  # re-encode as chunked
_OUT_NONE = 2  # no body (HEAD, 204, 304)

_BUFFER_LIMIT = 256 * 1024  # bytes of request body held while a backend connection is dialled


class Exchange:
    """One request and its response."""

    __slots__ = (
        "backend",
        "backend_keep_alive",
        "body",
        "buffered",
        "chunked_in",
        "expect_continue",
        "head",
        "host",
        "is_head",
        "keep_alive",
        "method",
        "out_mode",
        "request_done",
        "response_started",
        "sent_body",
        "started",
        "tunnel_data",
        "until_close",
        "upgrade",
        "upstream",
        "version",
    )

    def __init__(self) -> None:
        self.method = b""
        self.version = b"1.1"
        self.head = b""
        self.host: bytes | None = None
        self.keep_alive = True
        self.chunked_in = False
        self.body: list[bytes] = []
        self.buffered = 0
        self.request_done = False
        self.is_head = False
        self.expect_continue = False
        self.upgrade = False  # a WebSocket upgrade was requested
        self.backend: Backend | None = None
        self.upstream: UpstreamConnection | None = None
        self.started = 0.0
        self.response_started = False
        self.sent_body = False
        self.out_mode = _OUT_RAW
        self.tunnel_data = b""
        self.backend_keep_alive = True
        self.until_close = False


class ClientConnection(asyncio.Protocol):
    def __init__(self, server: ProxyServer, pool: Pool) -> None:
        self.server = server
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Exchange] = deque()
        self.parsing: Exchange | None = None
        self.peer_ip = b""
        self.scheme = b"https" if server.tls else b"http"
        self.deadline = 0.0
        self.deadline_kind = DEADLINE_NONE
        self.closed = False
        self._paused = 0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0  # raw bytes received while the head is incomplete
        self._head_size = 0  # parsed header bytes of the current request
        self._in_head = False
        self._writing_paused = False
        self._tunnel: UpstreamConnection | None = None
        self._limits = server.settings.limits
        self._batching = False
        self._out: list[bytes] = []

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer_ip = str(peer[0]).encode()
        self.server.connections.add(self)
        self._set_deadline(DEADLINE_HEADER, self.server.timeouts.client_header)

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            t = self._tunnel.transport
            if t is not None:
                t.write(data)
            return
        if self.closed:
            return
        if not self._in_head and self.parsing is None:
            # First bytes of a new request on an idle connection: the head deadline starts now.
            self._set_deadline(DEADLINE_HEADER, self.server.timeouts.client_header)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._upgrade_requested(data[e.args[0] :])
        except httptools.HttpParserCallbackError as e:
            err = e.__context__
            if isinstance(err, ClientError):
                self._reject(err)
                return
            raise
        except httptools.HttpParserError as e:
            self._reject(BadRequest(str(e)))
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self._limits.max_header_bytes:
                self._reject(HeaderFieldsTooLarge())
                return
        self._flush()

    def eof_received(self) -> bool | None:
        tunnel = self._tunnel
        if tunnel is not None:
            if tunnel.transport is not None and tunnel.transport.can_write_eof():
                tunnel.transport.write_eof()
            return True
        # A client that half-closes after its request still gets its response (as nginx does);
        # with nothing in flight there is nothing to wait for.
        return bool(self.queue)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connection_closed(self)
        tunnel = self._tunnel
        if tunnel is not None:
            self._tunnel = None
            tunnel.client = None
            tunnel.close()
        for ex in self.queue:
            up = ex.upstream
            if up is not None:
                ex.upstream = None
                up.client = None
                up.abort()  # the response has no reader: never reuse this connection
            if ex.backend is not None:
                ex.backend.in_flight -= 1
                ex.backend = None
        self.queue.clear()

    def pause_writing(self) -> None:
        self._writing_paused = True
        up = self._tunnel or (self.queue[0].upstream if self.queue else None)
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        up = self._tunnel or (self.queue[0].upstream if self.queue else None)
        if up is not None and up.transport is not None and not up.closed:
            up.transport.resume_reading()

    # --- request parsing (llhttp callbacks) -------------------------------------------------

    def on_message_begin(self) -> None:
        self.parsing = Exchange()
        self._url = b""
        self._headers = []
        self._in_head = True
        self._head_bytes = 0
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_url_bytes:
            raise URITooLong()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self._limits.max_header_bytes:
            raise HeaderFieldsTooLarge()

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        self._in_head = False
        parser = self.parser
        version = parser.get_http_version()
        method = parser.get_method()
        if version == "1.1":
            ex.version = b"1.1"
        elif version == "1.0":
            ex.version = b"1.0"
        else:
            raise BadRequest(f"HTTP/{version} is not supported")
        if method == b"CONNECT":
            raise MethodNotAllowed("CONNECT is not supported by a reverse proxy")
        ex.method = method
        ex.is_head = method == b"HEAD"
        ex.keep_alive = parser.should_keep_alive()
        self._build_request_head(ex)
        self.queue.append(ex)
        if len(self.queue) > 1:
            self._pause(_PAUSE_QUEUE)
        else:
            self._set_deadline(DEADLINE_NONE, 0.0)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        ex.body.append(chunk(body) if ex.chunked_in else body)
        ex.buffered += len(body)

    def on_message_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        if ex.chunked_in:
            ex.body.append(LAST_CHUNK)
        ex.request_done = True
        self.parsing = None

    def _build_request_head(self, ex: Exchange) -> None:
        lines: list[bytes] = []
        host: bytes | None = None
        xff: bytes | None = None
        conn_values: list[bytes] | None = None
        te: bytes | None = None
        upgrade: bytes | None = None
        for name, value in self._headers:
            lname = name.lower()
            if lname not in REQUEST_SPECIAL:
                lines.append(name + b": " + value + b"\r\n")
                continue
            if lname == b"host":
                if host is not None:
                    raise BadRequest("more than one Host header")
                host = value
            elif lname == b"x-forwarded-for":
                xff = value if xff is None else xff + b", " + value
            elif lname == CONNECTION:
                if conn_values is None:
                    conn_values = []
                conn_values.append(value)
            elif lname == b"transfer-encoding":
                te = value if te is None else te + b", " + value
            elif lname == b"upgrade":
                upgrade = value
            elif lname == b"expect":
                if value.lower() == b"100-continue":
                    ex.expect_continue = ex.version == b"1.1"
                else:
                    raise ExpectationFailed("only Expect: 100-continue is supported")
            # Keep-Alive, Proxy-Connection, TE, Trailer, HTTP2-Settings and the client's own
            # X-Forwarded-Proto/-Host are dropped: the proxy states those facts itself.
        if host is None and ex.version == b"1.1":
            raise BadRequest("HTTP/1.1 request without Host")
        if te is not None:
            if ex.version != b"1.1":
                raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
            codings = [c.strip() for c in te.lower().split(b",")]
            if codings[-1] != b"chunked":
                # RFC 9112 6.3: the body length cannot be known; 400 and close.
                raise BadRequest("Transfer-Encoding does not end in chunked")
            if len(codings) > 1:
                raise NotImplementedByProxy(f"Transfer-Encoding {te.decode('latin-1')!r}")
            ex.chunked_in = True
            lines.append(b"Transfer-Encoding: chunked\r\n")
        if conn_values is not None:
            tokens = connection_tokens(conn_values) - {b"close", b"keep-alive", b"upgrade"}
            if tokens:  # headers named by Connection are hop-by-hop too
                lines = [ln for ln in lines if ln.split(b":", 1)[0].lower() not in tokens]
        if upgrade is not None and upgrade.strip().lower() == b"websocket":
            ex.upgrade = True
            lines.append(b"Connection: upgrade\r\nUpgrade: websocket\r\n")
        if host is not None:
            lines.append(b"Host: " + host + b"\r\n")
            lines.append(b"X-Forwarded-Host: " + host + b"\r\n")
        ex.host = host
        if self.server.settings.add_x_forwarded_for:
            xff = self.peer_ip if xff is None else xff + b", " + self.peer_ip
        if xff is not None:
            lines.append(b"X-Forwarded-For: " + xff + b"\r\n")
        lines.append(b"X-Forwarded-Proto: " + self.scheme + b"\r\n")
        ex.head = ex.method + b" " + self._url + b" HTTP/1.1\r\n" + b"".join(lines)

    def _upgrade_requested(self, rest: bytes) -> None:
        """llhttp stopped after a request that asked to switch protocols."""
        ex = self.queue[-1] if self.queue else None
        if ex is None or ex.request_done is False:
            self._reject(BadRequest("bad upgrade request"))
            return
        self._in_head = False
        if ex.upgrade:
            # WebSocket: bytes after the head belong to the tunnel, once the backend agrees.
            ex.tunnel_data = rest
        else:
            # h2c or anything else: forwarded as a plain request without Upgrade; the parser is
            # spent, so the connection closes after the response.
            ex.keep_alive = False
        self._pause(_PAUSE_QUEUE)
        self._flush()

    # --- forwarding -------------------------------------------------------------------------

    def _flush(self) -> None:
        """Start the active exchange, or pass newly parsed body bytes to its backend."""
        if not self.queue:
            return
        ex = self.queue[0]
        up = ex.upstream
        if up is None:
            if ex.backend is None:
                self._start(ex)
            elif ex.buffered > _BUFFER_LIMIT:
                self._pause(_PAUSE_BUFFER)
            return
        if ex.body:
            t = up.transport
            assert t is not None
            if len(ex.body) == 1:
                t.write(ex.body[0])
            else:
                t.writelines(ex.body)
            ex.body = []
            ex.buffered = 0
            ex.sent_body = True

    def _start(self, ex: Exchange) -> None:
        pool = self.pool
        backend = pool.balancer.pick(pool.eligible, None)
        if backend is None:
            self._fail(ex, ServiceUnavailable("no backend available"))
            return
        ex.backend = backend
        backend.in_flight += 1
        idle = backend.idle
        while idle:
            up = idle.pop()
            if not up.closed:
                up.reused = True
                self._attach(ex, up)
                return
        self._pause(_PAUSE_BUFFER)
        self.server.dial(backend, self, ex)

    def dial_done(
        self, ex: Exchange, up: UpstreamConnection | None, err: ClientError | None
    ) -> None:
        """The server's dial for `ex` finished, with a connection or an error."""
        if self.closed or not self.queue or self.queue[0] is not ex:
            if up is not None:
                self.server.release(up)
            return
        self._resume(_PAUSE_BUFFER)
        if up is None:
            assert err is not None
            self._fail(ex, err)
            return
        self._attach(ex, up)

    def _attach(self, ex: Exchange, up: UpstreamConnection) -> None:
        ex.upstream = up
        up.client = self
        up.got_bytes = False
        t = up.transport
        assert t is not None
        backend = ex.backend
        assert backend is not None
        # An HTTP/1.0 request may lack Host; HTTP/1.1 to the backend needs one.
        host = b"" if ex.host is not None else b"Host: " + backend.host_header + b"\r\n"
        head = ex.head + host + b"\r\n"
        loop_time = self.server.loop.time()
        ex.started = loop_time
        self.deadline = loop_time + self.server.timeouts.response_header
        self.deadline_kind = DEADLINE_RESPONSE
        if ex.body:
            ex.body.insert(0, head)
            t.writelines(ex.body)
            ex.body = []
            ex.buffered = 0
            ex.sent_body = True
        else:
            t.write(head)
        if ex.expect_continue and not ex.request_done and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self._writing_paused and up.transport is not None:
            up.transport.pause_reading()

    # --- response (called by UpstreamConnection) --------------------------------------------

    def response_head(
        self,
        up: UpstreamConnection,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        backend_keep_alive: bool,
    ) -> None:
        ex = self.queue[0]
        if status < 200:
            if status == 100 or status == 101 or ex.version != b"1.1":
                return  # 100 is answered by the proxy itself; 101 is handled as an upgrade
            out = [b"HTTP/1.1 ", str(status).encode(), b" ", reason, b"\r\n"]
            for name, value in headers:
                if name.lower() not in RESPONSE_SPECIAL:
                    out.append(name + b": " + value + b"\r\n")
            out.append(b"\r\n")
            self._write(b"".join(out))
            return
        self.deadline_kind = DEADLINE_NONE
        ex.response_started = True
        lines = [b"HTTP/", ex.version, b" ", str(status).encode(), b" ", reason, b"\r\n"]
        length: bytes | None = None
        chunked = False
        conn_values: list[bytes] | None = None
        for name, value in headers:
            lname = name.lower()
            if lname not in RESPONSE_SPECIAL:
                lines.append(name + b": " + value + b"\r\n")
            elif lname == b"content-length":
                length = value
            elif lname == b"transfer-encoding":
                chunked = True
            elif lname == CONNECTION:
                if conn_values is None:
                    conn_values = []
                conn_values.append(value)
        if conn_values is not None:
            tokens = connection_tokens(conn_values) - {b"close", b"keep-alive"}
            if tokens:
                lines = lines[:7] + [
                    ln for ln in lines[7:] if ln.split(b":", 1)[0].lower() not in tokens
                ]
        ex.backend_keep_alive = backend_keep_alive
        ex.until_close = False
        if ex.is_head or status == 204 or status == 304:
            ex.out_mode = _OUT_NONE
            if length is not None and status != 204:
                lines.append(b"Content-Length: " + length + b"\r\n")
        elif length is not None and not chunked:
            ex.out_mode = _OUT_RAW
            lines.append(b"Content-Length: " + length + b"\r\n")
        elif ex.version == b"1.1":
            ex.until_close = not chunked
            ex.out_mode = _OUT_CHUNKED
            lines.append(b"Transfer-Encoding: chunked\r\n")
        else:
            ex.until_close = not chunked
            ex.out_mode = _OUT_RAW  # HTTP/1.0 client: the body ends when we close
            ex.keep_alive = False
        keep = ex.keep_alive and not self.server.draining and not ex.upgrade
        if not keep:
            ex.keep_alive = False
            lines.append(b"Connection: close\r\n\r\n")
        elif ex.version == b"1.0":
            lines.append(b"Connection: keep-alive\r\n\r\n")
        else:
            lines.append(b"\r\n")
        self._write(b"".join(lines))
        if ex.out_mode == _OUT_NONE and ex.is_head:
            up.stop_after_head()

    def response_body(self, body: bytes) -> None:
        ex = self.queue[0]
        if ex.out_mode == _OUT_RAW:
            self._write(body)
        elif ex.out_mode == _OUT_CHUNKED:
            self._write(chunk(body))

    def response_complete(self, up: UpstreamConnection) -> None:
        if not self.queue:
            return
        ex = self.queue[0]
        if not ex.response_started:
            return  # a 1xx interim response ended; the final one follows
        if ex.out_mode == _OUT_CHUNKED:
            self._write(LAST_CHUNK)
        reusable = ex.request_done and ex.backend_keep_alive and not ex.upgrade
        self._finish(ex, up, reusable)

    def backend_lost(self, up: UpstreamConnection) -> None:
        """The backend closed the connection (or it broke) while attached to an exchange."""
        if self._tunnel is up:
            self._tunnel = None
            self._close()
            return
        if not self.queue or self.queue[0].upstream is not up:
            return
        ex = self.queue[0]
        if ex.response_started:
            if ex.until_close:
                # A close-delimited response ends with the connection: that is success.
                if ex.out_mode == _OUT_CHUNKED:
                    self._write(LAST_CHUNK)
                self._finish(ex, up, reusable=False)
                return
            # The response was cut short: the client must see a broken response, not a hang.
            log.warning("backend %s closed mid-response", ex.backend)
            self._finish(ex, up, reusable=False, abort=True)
            return
        ex.upstream = None
        if up.reused and not up.got_bytes and not ex.sent_body and ex.method in IDEMPOTENT_METHODS:
            # A pooled connection the backend had already closed: try once on a fresh one.
            # Safe because the method is idempotent and no body byte was sent.
            backend = ex.backend
            assert backend is not None
            self._pause(_PAUSE_BUFFER)
            self.server.dial(backend, self, ex)
            return
        self._fail(ex, BadGateway("backend closed the connection"))

    def backend_protocol_error(self, up: UpstreamConnection, detail: str) -> None:
        log.warning("invalid response from backend %s: %s", up.backend, detail)
        ex = self.queue[0] if self.queue else None
        up.client = None
        up.abort()
        if ex is None:
            return
        ex.upstream = None
        if ex.response_started:
            self._finish(ex, up, reusable=False, abort=True)
        else:
            self._fail(ex, BadGateway("invalid response from backend"))

    def backend_switched_protocols(self, up: UpstreamConnection, rest: bytes) -> None:
        """The backend answered 101: from now on both sides are a plain byte tunnel."""
        ex = self.queue[0]
        if not ex.upgrade:
            self.backend_protocol_error(up, "101 without a WebSocket upgrade request")
            return
        out = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        for name, value in up._headers:
            lname = name.lower()
            if lname not in RESPONSE_SPECIAL:
                out.append(name + b": " + value + b"\r\n")
        out.append(b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n")
        self.deadline_kind = DEADLINE_NONE
        self._write(b"".join(out))
        if rest:
            self._write(rest)
        up.tunnel = True
        self._tunnel = up
        t = up.transport
        assert t is not None
        if ex.tunnel_data:
            t.write(ex.tunnel_data)
        self._paused = 0
        if self.transport is not None:
            self.transport.resume_reading()

    def tunnel_from_backend(self, data: bytes) -> None:
        self._write(data)

    # --- completion -------------------------------------------------------------------------

    def _finish(
        self, ex: Exchange, up: UpstreamConnection | None, reusable: bool, abort: bool = False
    ) -> None:
        backend = ex.backend
        if backend is not None:
            backend.in_flight -= 1
            backend.requests += 1
            if ex.started:
                backend.latency_sum += self.server.loop.time() - ex.started
            ex.backend = None
        if up is not None:
            ex.upstream = None
            up.client = None
            if reusable and not up.closed:
                self.server.release(up)
            elif abort:
                up.abort()
            else:
                up.close()
        self.queue.popleft()
        if abort:
            self._abort()
            return
        if not ex.keep_alive or not ex.request_done:
            self._close()
            return
        self._next()

    def _next(self) -> None:
        if self.queue:
            nxt = self.queue[0]
            if len(self.queue) == 1:
                self._resume(_PAUSE_QUEUE)
            if nxt.tunnel_data or not nxt.keep_alive:
                self._pause(_PAUSE_QUEUE)
            self._flush()
        else:
            self._resume(_PAUSE_QUEUE)
            if self.server.draining:
                self._close()
            elif self.parsing is None:
                self._set_deadline(DEADLINE_IDLE, self.server.timeouts.keep_alive)
            else:
                self._set_deadline(DEADLINE_HEADER, self.server.timeouts.client_header)

    def _fail(self, ex: Exchange, err: ClientError) -> None:
        """Answer `ex` with an error instead of a backend's response."""
        if ex.response_started:
            self._finish(ex, ex.upstream, reusable=False, abort=True)
            return
        if ex.backend is not None:
            ex.backend.in_flight -= 1
            ex.backend.failures += 1
            ex.backend = None
        up = ex.upstream
        if up is not None:
            ex.upstream = None
            up.client = None
            up.close()
        log.debug("answering %d: %s", err.status, err.detail)
        # Keep the connection only when the request is fully read and nothing else is odd.
        keep = ex.keep_alive and ex.request_done and not ex.upgrade and not self.server.draining
        self._write(error_response(err.status, self.server.error_body(err.status), close=not keep))
        self.queue.popleft()
        if not keep:
            self._close()
        else:
            self._next()

    def _reject(self, err: ClientError) -> None:
        """A malformed request: answer it and close. Nothing of it was forwarded."""
        self.closed = True
        if self.transport is None:
            return
        log.debug("rejecting request from %s: %s", self.peer_ip.decode(), err.detail)
        if not self.queue or not self.queue[0].response_started:
            self.transport.write(
                error_response(err.status, self.server.error_body(err.status), close=True)
            )
        for ex in self.queue:
            if ex.upstream is not None:
                up = ex.upstream
                ex.upstream = None
                up.client = None
                up.abort()
            if ex.backend is not None:
                ex.backend.in_flight -= 1
                ex.backend = None
        self.queue.clear()
        self.transport.close()

    def on_deadline(self, kind: int) -> None:
        """The server's sweep found this connection's deadline passed."""
        self.deadline_kind = DEADLINE_NONE
        if kind == DEADLINE_IDLE:
            self._close()
        elif kind == DEADLINE_HEADER:
            if self._in_head or self.parsing is not None or not self.queue:
                self._reject(RequestTimeout("client too slow to send the request head"))
        elif kind == DEADLINE_RESPONSE and self.queue:
            ex = self.queue[0]
            if not ex.response_started:
                log.warning(
                    "backend %s: no response within the response-header timeout", ex.backend
                )
                self._fail(ex, GatewayTimeout("backend did not answer in time"))

    def shutdown(self) -> None:
        """Graceful shutdown: idle connections close now, busy ones after their response."""
        if not self.queue and self.parsing is None and self._tunnel is None:
            self._close()

    # --- small helpers ----------------------------------------------------------------------

    def _set_deadline(self, kind: int, timeout: float) -> None:
        self.deadline_kind = kind
        self.deadline = self.server.loop.time() + timeout if kind else 0.0

    def _write(self, data: bytes) -> None:
        if self._batching:
            self._out.append(data)
            return
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def begin_batch(self) -> None:
        """Collect writes until end_batch: one syscall for a response's head and body.

        The upstream connection brackets each chunk it parses with these, so a small response
        costs one write to the client instead of one per parser event.
        """
        self._batching = True

    def end_batch(self) -> None:
        self._batching = False
        out = self._out
        if out:
            self._out = []
            t = self.transport
            if t is not None and not t.is_closing():
                if len(out) == 1:
                    t.write(out[0])
                else:
                    t.writelines(out)

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def pause_reading_for_backend(self) -> None:
        self._pause(_PAUSE_BACKEND if self._tunnel is None else _PAUSE_TUNNEL)

    def resume_reading_for_backend(self) -> None:
        self._resume(_PAUSE_BACKEND if self._tunnel is None else _PAUSE_TUNNEL)

    def _close(self) -> None:
        self.closed = True
        if self._batching:
            self.end_batch()
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
