"""The client side of the proxy: one asyncio Protocol per client connection.

Theory of operation
-------------------
Bytes from the client go through llhttp (httptools), which calls back per request event. Each
request becomes an `Exchange`; exchanges queue in arrival order (pipelining) and only the head of
the queue is forwarded, so responses come back in order. Later requests wait, buffered, with
reading paused. The exchange owns the steps that end it (retry on another backend, finish with
the backend's response, fail with the proxy's own answer); the connection drives it and goes on
to the next one. What a head becomes (the request head a backend gets, the response head and
framing the client gets) is decided by core/http11's plan functions; the connection applies
the plan. Every close of the client connection goes through `teardown`.

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
import contextlib
import logging
from typing import Final, cast

import httptools

from doproxy.core.forwarding import (
    PROXY_BAD,
    PROXY_MORE,
    Hop,
    IPNetwork,
    hop_for,
    is_trusted,
    parse_proxy_header,
)
from doproxy.core.http11 import (
    BODY_CHUNKED,
    BODY_RAW,
    BODY_REFUSED,
    GENERAL,
    IDEMPOTENT_METHODS,
    LAST_CHUNK,
    REWRITE,
    RequestScan,
    chunk,
    cookie_value,
    error_response,
    express_response_plan,
    interim_head,
    keep_alive_of,
    plain_request_plan,
    request_plan,
    response_plan,
    scan_request,
    split_head,
    switches,
    websocket_101,
)
from doproxy.errors import (
    BadGateway,
    BadRequest,
    ClientError,
    ContentTooLarge,
    GatewayTimeout,
    HeaderFieldsTooLarge,
    MethodNotAllowed,
    RequestTimeout,
    ServiceUnavailable,
    URITooLong,
)
from doproxy.proxy.backend import Backend
from doproxy.proxy.state import ConnectionTerms, ProxyState
from doproxy.proxy.upstream import UpstreamConnection
from doproxy.proxy.writes import flush_writes, write_now, write_soon

log = logging.getLogger(__name__)

# Reasons reading from the client is paused (bit flags).
_PAUSE_BACKEND: Final = 1  # the backend's write buffer is full
_PAUSE_QUEUE: Final = 2  # a pipelined request waits behind the active one
_PAUSE_BUFFER: Final = 4  # request body bytes are buffered while no backend connection is ready
_PAUSE_TUNNEL: Final = 8  # the tunnel peer's write buffer is full

# Deadline kinds checked by the server's sweep.
DEADLINE_NONE: Final = 0
DEADLINE_HEADER: Final = 1
DEADLINE_IDLE: Final = 2
DEADLINE_RESPONSE: Final = 3
DEADLINE_BACKEND_READ: Final = 4
DEADLINE_CLIENT_WRITE: Final = 5
DEADLINE_TUNNEL: Final = 6
DEADLINE_LINGER: Final = 7

# How the client connection is closed (teardown).
TEARDOWN_CLOSE: Final = 0
TEARDOWN_LINGER: Final = 1  # end our side, then read and drop what the client still sends
TEARDOWN_ABORT: Final = 2  # a reset

# A lingering close reads and drops what the client still sends for at most this long (nginx's
# lingering_timeout), so the response it was sent is not destroyed by a reset.
LINGER_TIME: Final = 5.0

# How an exchange lets go of its backend connection (Exchange.let_go).
_REUSE: Final = 0  # back to the backend's idle stack (closed instead if it already is)
_CLOSE: Final = 1  # close it: it is not at a clean message boundary, or it asked to close
_ABORT: Final = 2  # abort it: its late answer must reach no one

_BUFFER_LIMIT: Final = (
    256 * 1024
)  # bytes of request body held while a backend connection is dialled


_STATUS_ERRORS: dict[int, type[ClientError]] = {
    502: BadGateway,
    503: ServiceUnavailable,
    504: GatewayTimeout,
}


class Exchange:
    """One request and its response, and the steps that end it (uvicorn's per-request cycle
    object): `retry` on another backend, `finish` with the backend's response, `fail` with the
    proxy's own answer. Its client connection drives it, and it tells the connection when it
    is done (`ClientConnection.finished`, `failed`) so the connection goes on to the next one.

    Defaults live on the class and an instance stores only what differs: a new exchange per
    request then costs one small object, not two dozen attribute writes.
    """

    method = b""
    version = b"1.1"
    head = b""
    host: bytes | None = None
    keep_alive = True
    chunked_in = False
    buffered = 0
    request_done = False
    is_head = False
    expect_continue = False
    upgrade = False  # a WebSocket upgrade was requested
    backend: Backend | None = None
    upstream: UpstreamConnection | None = None
    started = 0.0  # when the request went out to its (latest) backend
    # For the autoscaler's signal (time to the response head, as users wait for it): when the
    # exchange first asked for a backend, and when the response head arrived.
    begun = 0.0
    head_at = 0.0
    response_started = False
    sent_body = False
    out_mode = 0  # http11.BODY_RAW (a literal: compilers such as mypyc want literal defaults)
    # Bytes after an upgrade request's head: the tunnel's first bytes if the backend agrees,
    # else parsed as the next requests once this one is answered.
    tunnel_data = b""
    body_size = 0  # request body bytes received (for [limits] max-body-bytes)
    backend_keep_alive = True
    until_close = False
    upgrade_body = 0  # Content-Length of a request with a (refused) Upgrade
    tried: tuple[Backend, ...] = ()  # backends that failed this request (retries avoid them)
    hash_key: bytes | None = None  # what a `hash` balancer hashes, when not the client address
    # The body as sent, kept for a retry of an idempotent request up to [retries]
    # buffer-body-bytes; None when not kept (not idempotent, or too large).
    kept: list[bytes] | None = None
    kept_size = 0
    status = 0  # the status answered to the client (access log, per-class counts)
    body_sent = 0  # response body bytes handed to the client (counted while the access log is on)

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.body: list[bytes] = []

    # --- retries ----------------------------------------------------------------------------

    def may_resend(self) -> bool:
        """May this request be sent again after some of it reached a backend? Only an
        idempotent one, complete, whose body (if any) was kept in full for a retry."""
        return (
            self.method in IDEMPOTENT_METHODS
            and self.request_done
            and (not self.sent_body or self.kept is not None)
        )

    def keep_for_retry(self, chunks: list[bytes]) -> None:
        """Remember body bytes being sent, while a retry could still resend them."""
        retries = self.conn.server.settings.retries
        if not self.sent_body and self.kept is None and not self.tried:
            # The first body bytes of the first attempt: decide whether to keep them.
            if self.method not in IDEMPOTENT_METHODS or not retries.attempts:
                return
            self.kept = []
        kept = self.kept
        if kept is None:
            return
        size = self.kept_size + sum(len(c) for c in chunks)
        if size > retries.buffer_body_bytes:
            self.kept = None  # too large to keep: this request will not be retried once sent
            return
        kept.extend(chunks)
        self.kept_size = size

    def retry(self, err: ClientError) -> bool:
        """Send this request to a different backend, if retries, the budget and the pool
        allow.

        The caller has checked that resending is safe. Returns False (having changed nothing)
        when it does not retry.
        """
        if not self.retry_allowed(err):
            return False
        self._retry_now(err)
        return True

    def retry_allowed(self, err: ClientError) -> bool:
        conn = self.conn
        server = conn.server
        backend = self.backend
        if backend is None or self.response_started:
            return False
        if len(self.tried) + 1 > server.settings.retries.attempts:
            return False
        tried = (*self.tried, backend)
        if not any(b not in tried for b in server.pool.eligible):
            return False  # nowhere else to go
        if not server.retry_budget.withdraw(conn._now()):
            log.warning(
                "retry budget exhausted: not retrying after %s; backends are failing, check "
                "them ([retries] budget-percent caps the extra load retries may add)",
                err.detail,
            )
            return False
        return True

    def _retry_now(self, err: ClientError) -> None:
        backend = self.backend
        assert backend is not None
        backend.in_flight -= 1
        backend.failures += 1
        self.tried = (*self.tried, backend)
        self.backend = None
        self.upstream = None
        if self.sent_body and self.kept is not None:
            # Send the kept body again (it is kept again as it goes out).
            self.body = self.kept + self.body
            self.buffered = self.kept_size
            self.kept, self.kept_size = [], 0
            self.sent_body = False
        conn = self.conn
        conn.server.retried += 1
        log.info("retrying on another backend after %s from %s", err.detail, backend.name)
        conn._start(self)

    def retry_on_status(self, up: UpstreamConnection, status: int, reusable: bool) -> bool:
        """A backend answered 502/503/504 (by default) to a request that may be resent, and
        nothing of the answer reached the client yet: try another backend instead."""
        if status not in self.conn.server.settings.retries.on_status or not self.may_resend():
            return False
        err = _STATUS_ERRORS.get(status, BadGateway)(f"backend answered {status}")
        if not self.retry_allowed(err):
            return False
        self.let_go(up, _REUSE if reusable else _ABORT)
        self._retry_now(err)
        return True

    # --- the end of an exchange -------------------------------------------------------------

    def finish(self, up: UpstreamConnection | None, reusable: bool, abort: bool = False) -> None:
        """The response is complete, or was cut short (`abort`): count it, let go of the
        backend connection `up` (pooled when `reusable`), and let the client connection go on
        to what comes next."""
        conn = self.conn
        now = conn._now()
        backend = self.backend
        if conn._access_log:
            # A response cut short is logged with the status its head carried and the body
            # bytes that got out, as nginx does; the warning that cut it says why.
            self.log_access(now, backend)
        # Latency is the time to the response head: a streamed body or a tunnel says nothing
        # about how long the backend made the user wait.
        head_at = self.head_at or now
        server = conn.server
        if self.begun:
            server.count_exchange(head_at - self.begun)
        if backend is not None:
            backend.in_flight -= 1
            backend.requests += 1
            backend.responses[self.status // 100] += 1
            if self.started:
                latency = head_at - self.started
                backend.latency_sum += latency
                backend.samples.append(latency)
                if server.pool.observe_latency:
                    backend.latency.observe(latency, now)
            self.backend = None
        if up is not None:
            self.let_go(up, _REUSE if reusable else _ABORT if abort else _CLOSE, now)
        conn.finished(self, now, abort)

    def fail(self, err: ClientError) -> None:
        """Answer with an error instead of a backend's response."""
        if self.response_started:
            self.finish(self.upstream, reusable=False, abort=True)
            return
        conn = self.conn
        server = conn.server
        failed = self.backend  # (and the backend the access log names)
        if failed is not None:
            failed.in_flight -= 1
            failed.failures += 1
            # The gateway error this backend caused is counted as its response.
            failed.responses[err.status // 100] += 1
            self.backend = None
        else:
            server.generated[err.status // 100] += 1
        if self.begun and err.status != 503:
            # A backend failed it (refused, reset, timed out, broke HTTP): the user waited all
            # that time, so the autoscaler's signal counts it. (503: no backend to ask.)
            server.count_exchange(conn._now() - self.begun)
        up = self.upstream
        if up is not None:
            self.let_go(up, _CLOSE)
        log.debug("answering %d: %s", err.status, err.detail)
        # Keep the connection only when the request is fully read and nothing else is odd.
        keep = self.keep_alive and self.request_done and not self.upgrade and not server.draining
        page = err.page or server.error_body(err.status)
        out = error_response(
            err.status, page, close=not keep, head=self.is_head, retry_after=err.retry_after
        )
        if conn._access_log:
            self.status = err.status
            self.body_sent = 0 if self.is_head else len(out) - out.find(b"\r\n\r\n") - 4
            self.log_access(conn._now(), failed)
        conn.failed(out, keep)

    def drop(self) -> None:
        """Let go of an unfinished exchange's backend: its connection is aborted (never reused
        mid-message) and its in-flight count released. Blames nobody."""
        up = self.upstream
        if up is not None:
            self.let_go(up, _ABORT)
        if self.backend is not None:
            self.backend.in_flight -= 1
            self.backend = None

    def let_go(self, up: UpstreamConnection, how: int, now: float = 0.0) -> None:
        """The one way an exchange parts from its backend connection: detached from both
        sides, then pooled (_REUSE, at `now` if the caller has the time), closed or aborted."""
        self.upstream = None
        up.client = None
        if how == _REUSE and not up.closed:
            up.release(now or self.conn._now(), self.conn.server.max_idle)
        elif how == _ABORT:
            up.abort()
        else:
            up.close()

    def log_access(self, now: float, backend: Backend | None) -> None:
        """One access log line for this exchange, answered by `backend` (called only when
        access-log is on, so none of this costs anything when it is off)."""
        conn = self.conn
        sink = conn.server.access
        if sink is None:
            return  # a reload turned the log off after this connection opened
        # The head as forwarded: its request line is "METHOD target HTTP/1.1", and Referer and
        # User-Agent pass unchanged (they are end-to-end headers). No head: a request refused
        # before it was understood, logged as "-".
        head = self.head
        method = target = b""
        referer: bytes | None = None
        agent: bytes | None = None
        if head:
            method = self.method
            first = head[: head.find(b"\r\n")]
            target = first[len(method) + 1 : first.rfind(b" ")]
            low = head.decode("latin-1").lower()
            referer = _header_value(head, low, "\r\nreferer:")
            agent = _header_value(head, low, "\r\nuser-agent:")
        sink.request(
            conn.peer_ip,
            method,
            target,
            self.version,
            self.status,
            self.body_sent,
            referer,
            agent,
            now - self.begun if self.begun else 0.0,  # from the first dispatch, retries included
            backend.entry.server_host if backend is not None else None,
            len(self.tried),
        )


class _LeanParser:
    """A lean parser (llhttp with no per-header callbacks) and the connection it parses for:
    only body bytes call back into Python, and they go to `conn`.

    An idle keep-alive connection holds none: it takes one from `_LEAN_FREE` for a request and
    gives it back when it goes idle again, or when it closes after the client's last request
    (the parser is then between messages, with nothing of the last request left in it). A
    parser with its callbacks is about 640 bytes; most of a server's connections are idle at
    any moment, so they share the few that are in use.
    """

    __slots__ = ("conn", "parser")

    def __init__(self) -> None:
        self.conn: ClientConnection | None = None
        self.parser = httptools.HttpRequestParser(self)
        # After a request with `Connection: close` (or HTTP/1.0's default), llhttp refuses
        # any further bytes, which would make the parser useless to the next connection. A
        # lean parser is only ever fed one message per chunk (what follows it goes to the
        # full parser), and only a connection that said close is closed after its answer, so
        # this leniency changes nothing else: it lets close connections give theirs back.
        self.parser.set_dangerous_leniencies(lenient_keep_alive=True)

    def on_body(self, body: bytes) -> None:
        conn = self.conn
        assert conn is not None
        conn._lean_body(body)


# Lean parsers between requests, ready for any connection (see _LeanParser). Bounded: a burst
# of busy connections leaves at most this many behind, about 160 KiB.
_LEAN_FREE: Final[list[_LeanParser]] = []
_LEAN_FREE_MAX: Final = 256


def _spent_parser() -> httptools.HttpRequestParser:
    """What `parser` refers to while no request is being parsed: a parser in llhttp's error
    state, so that a bug that fed it would answer 400, never parse into a shared state."""
    p = httptools.HttpRequestParser(object())
    with contextlib.suppress(httptools.HttpParserError):
        p.feed_data(b"\0")
    return p


_SPENT: Final = _spent_parser()


_LEAN_MAX: Final = 16 * 1024  # a chunk longer than this is not a lone request head worth decoding


def _header_value(head: bytes, low: str, name: str) -> bytes | None:
    """The value of the first header `name` ("\\r\\nreferer:") in a validated head, `low` being
    the head decoded as latin-1 and lower-cased; None when absent."""
    i = low.find(name)
    if i < 0:
        return None
    return head[i + len(name) : low.find("\r\n", i + 2)].strip(b" \t")


class ClientConnection(asyncio.Protocol):
    def __init__(self, server: ProxyState, port: bytes = b"") -> None:
        """`port`: the listener's port, as text (X-Forwarded-Port); b"": asked of the socket."""
        self.server = server
        self._port = port
        self.transport: asyncio.Transport | None = None
        # Two parsers, switched only between requests (where llhttp's state is clean):
        # - lean: no per-header callbacks; used when one data chunk holds exactly one whole
        #   request head, which is then rewritten as raw bytes (the common case, and fast);
        # - full: callbacks per URL piece and header; everything else (split heads, pipelining,
        #   chunked bodies).
        self._full_parser: httptools.HttpRequestParser | None = None  # made when first needed
        self._lean: _LeanParser | None = None  # taken for a request, given back when idle
        self.parser = _SPENT
        self._body_left = -1  # express lane: Content-Length bytes still to come, or -1
        # A list, not a deque: an empty list is 56 bytes where a deque is 760 (it allocates a
        # block of 64 slots up front), and an idle connection's queue is empty. Pipelined
        # requests are few (reading pauses behind the first), so popping the front is cheap.
        self.queue: list[Exchange] = []
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
        terms = server.terms  # the settings' values, read once per settings (ConnectionTerms)
        self._terms: ConnectionTerms = terms
        self._max_url_bytes = terms.max_url_bytes
        self._max_header_bytes = terms.max_header_bytes
        self._max_response_head = terms.max_response_head
        self._access_log = terms.access_log
        self._hash_header = terms.hash_header
        self._hash_cookie = terms.hash_cookie
        self._t_header = terms.t_header
        self._t_idle = terms.t_idle
        self._t_response = terms.t_response
        self._t_body = terms.t_body
        self._t_backend_read = terms.t_backend_read
        self._t_client_write = terms.t_client_write
        self._t_tunnel = terms.t_tunnel
        # The request body's own deadline (client-body), beside the phase deadline above: a
        # body can still be arriving while the backend already answers. 0 = none.
        self.body_deadline = 0.0
        self._max_body = terms.max_body
        # A bad request behind good pipelined ones: answered once they are (see _reject).
        self._rejected: ClientError | None = None
        self._rejected_head = False  # it was a HEAD: its answer has no body
        self._client_eof = False  # the client half-closed: close once nothing is in flight
        self._now = server.clock
        # A response head waits here for the first body bytes, so both go out in one write.
        self._held: bytes | None = None
        self._plain_upgrade: Exchange | None = None  # a request whose Upgrade was refused

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer_ip = str(peer[0]).encode()
        terms = self._terms
        port = self._port
        if not port:
            # Asked of the socket only when the listener did not say (uvloop formats both
            # addresses with printf each time: a sixth of a new connection's own cost).
            sock = transport.get_extra_info("sockname")
            port = str(sock[1]).encode() if isinstance(sock, tuple) and len(sock) > 1 else b""
        self._max_header_count = terms.max_header_count
        self._underscores = terms.underscores
        self._host_ok: bytes | None = None  # the last Host value found valid here
        # Forwarding headers from this peer are believed (and appended to) only when it is a
        # trusted proxy; from anyone else they are removed.
        self._trusted_nets: tuple[IPNetwork, ...] = terms.trusted_nets
        self._trusted = bool(self._trusted_nets) and is_trusted(
            self.peer_ip.decode("latin-1"), self._trusted_nets
        )
        # A trusted proxy must send a PROXY header first (HAProxy's accept-proxy, limited to
        # the trusted sources); anyone else speaks HTTP at once.
        self._proxy_wait = self._trusted and terms.proxy_protocol
        self._proxy_buf = b""
        # What the proxy adds to every request on this connection: shared between connections
        # (hop_for), and cut where the Host value goes for the express lane.
        self._set_hop(
            hop_for(
                terms.forwarded_header,
                terms.add_x_forwarded_for,
                terms.via,
                self.peer_ip,
                self.scheme,
                port,
            )
        )
        self.server.connections.add(self)
        self.deadline_kind = DEADLINE_HEADER
        self.deadline = self._now() + self._t_header

    def _set_hop(self, hop: Hop) -> None:
        self._hop = hop
        self._tail_parts: tuple[bytes, ...] = hop.parts

    def _proxy_header(self, data: bytes) -> bytes:
        """Consume the PROXY protocol header a trusted proxy sends before any HTTP; return
        the bytes after it (b"" while it is incomplete, or when the connection was closed)."""
        buf = self._proxy_buf + data if self._proxy_buf else data
        n, client = parse_proxy_header(buf)
        if n == PROXY_MORE:
            self._proxy_buf = buf  # bounded: parse_proxy_header refuses a longer header
            return b""
        self._proxy_wait = False
        self._proxy_buf = b""
        if n == PROXY_BAD:
            log.warning(
                "closing connection from %s: no valid PROXY protocol header; that trusted "
                "proxy must send one (v1 or v2): fix its setting, or set proxy-protocol = false",
                self.peer_ip.decode("latin-1"),
            )
            self.teardown(TEARDOWN_CLOSE)
            return b""
        if client:
            # The client the proxy in front saw: from now on it is the peer for forwarding
            # headers, trust, hash balancing and the access log.
            self.peer_ip = client.encode()
            self._trusted = is_trusted(client, self._trusted_nets)
            self._set_hop(self._hop.with_client(self.peer_ip))
        elif client is not None:
            # A client the balancer cannot name (PROXY UNKNOWN): its headers are its own,
            # not the balancer's, so they are not believed. The balancer's address stands.
            self._trusted = False
        return buf[n:]

    def data_received(self, data: bytes) -> None:
        if self._proxy_wait and not (data := self._proxy_header(data)):
            return
        if self._tunnel is not None:
            t = self._tunnel.transport
            if t is not None:
                write_now(t, data)
                if self.deadline_kind == DEADLINE_TUNNEL:
                    self.deadline = self._now() + self._t_tunnel
            return
        if self.closed or self._rejected is not None:
            return  # closing (a lingering close drops what still arrives), or see _reject
        if self._plain_upgrade is not None:
            self._upgrade_body(data)
            return
        if self.parsing is None and not self._in_head:
            # Between requests. The express lane: one chunk holding exactly one whole request
            # head, with no queue ahead of it, chunked body or upgrade (the common case).
            if not self.queue and len(data) <= _LEAN_MAX:
                text = data.decode("latin-1")
                # (A 3-byte chunk has no "\r\n\r\n" at all: find's -1 must not pass.)
                if len(text) > 3 and text.find("\r\n\r\n") + 4 == len(text):
                    if data[0] == 13 or data[0] == 10:
                        # Empty lines before the request line are ignored (RFC 9112 2.2), as
                        # llhttp ignores them on the general path.
                        data = data.lstrip(b"\r\n")
                        if not data:
                            return
                        text = text.lstrip("\r\n")
                    scan = scan_request(text)
                    if scan[0] != GENERAL:
                        self._express(data, text, scan)
                        return
            if self._full_parser is None:
                self._full_parser = httptools.HttpRequestParser(self)
            self.parser = self._full_parser
        elif self._body_left >= 0 and len(data) > self._body_left:
            # An express request's body ends inside this chunk and more follows (pipelining):
            # feed exactly the body, then treat the rest as a new chunk.
            left = self._body_left
            self.data_received(data[:left])
            if not self.closed:
                self.data_received(data[left:])
            return
        if self.deadline_kind == DEADLINE_IDLE:
            # First bytes of a new request on an idle connection: the head deadline starts now.
            self.deadline_kind = DEADLINE_HEADER
            self.deadline = self._now() + self._t_header
        parser = self.parser
        try:
            parser.feed_data(data)
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
            if self._head_bytes > self._max_header_bytes:
                self._reject(HeaderFieldsTooLarge())
                return
        if self.parsing is not None and not self._in_head:
            self.body_deadline = self._now() + self._t_body  # a body is arriving: it may stall
        elif self.body_deadline:
            self.body_deadline = 0.0
        queue = self.queue
        if queue and queue[0].backend is None:
            self._start(queue[0])
        else:
            self._flush()

    def eof_received(self) -> bool | None:
        if self.closed:
            return False  # a lingering close ends when the client closes
        # TLS has no half-close in asyncio: after the client's close_notify the transport shuts
        # down whatever we return, and returning True only logs a warning. So over TLS the
        # client has closed the connection (as nginx sees it too); its response is not sent.
        t = self.transport
        half_close = t is None or t.get_extra_info("sslcontext") is None
        tunnel = self._tunnel
        if tunnel is not None:
            if tunnel.transport is not None and tunnel.transport.can_write_eof():
                flush_writes()  # nothing queued may be overtaken or lost
                tunnel.transport.write_eof()
            return half_close
        self._client_eof = True
        if self.parsing is not None and not self._in_head:
            # The client ended its request body early: its fault, never the backend's.
            self._reject(BadRequest("request body cut short by the client"))
        # A client that half-closes after its request still gets its response (as nginx does);
        # with nothing in flight there is nothing to wait for.
        return half_close and bool(self.queue) and not self.closed

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        lean = self._lean
        if lean is not None:
            # In whatever state it was left: not for another connection. Unlinked, so that
            # this connection is freed when the last reference goes, not by the cycle
            # collector (the parser and its callbacks' owner refer to each other).
            lean.conn = None
            self._lean = None
        self.server.connection_closed(self)
        if self._access_log and self.queue and self.queue[0].begun:
            self._log_unfinished(self.queue[0])
        tunnel = self._tunnel
        if tunnel is not None:
            self._tunnel = None
            tunnel.client = None
            tunnel.close()
        for ex in self.queue:
            ex.drop()  # the response has no reader: never reuse its connection
        self.queue.clear()

    def pause_writing(self) -> None:
        self._writing_paused = True
        up = self._tunnel or (self.queue[0].upstream if self.queue else None)
        if up is not None:
            up.pause_reading()
        if not self.closed:
            # From now on a stall is the client's: it must read within client-write.
            self.deadline_kind = DEADLINE_CLIENT_WRITE
            self.deadline = self._now() + self._t_client_write

    def resume_writing(self) -> None:
        self._writing_paused = False
        up = self._tunnel or (self.queue[0].upstream if self.queue else None)
        if up is not None:
            up.resume_reading()
        if self.deadline_kind == DEADLINE_CLIENT_WRITE and not self.closed:
            self._phase_deadline()

    # --- request parsing (llhttp callbacks) -------------------------------------------------

    def on_message_begin(self) -> None:
        self.parsing = Exchange(self)
        self._url = b""
        self._headers = []
        self._in_head = True
        self._head_bytes = 0
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._max_url_bytes:
            raise URITooLong()

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name, value))
        if len(headers) > self._max_header_count:
            raise HeaderFieldsTooLarge("too many header fields")
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self._max_header_bytes:
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
        if not parser.should_keep_alive():
            ex.keep_alive = False
        self._build_request_head(ex, self._url, self._headers)
        if self._hash_header:
            self._set_hash_key(ex, self._headers)
        if self._max_body:
            self._check_declared_length(self._headers)
        self._queue_parsed(ex)

    def _set_hash_key(self, ex: Exchange, fields: list[tuple[bytes, bytes]]) -> None:
        """The header (or cookie) value the `hash` balancer keys on; absent means round robin."""
        want = self._hash_header.encode()
        for name, value in fields:
            if name.lower() == want:
                if self._hash_cookie:
                    found = cookie_value(value, self._hash_cookie)
                    if found is not None:
                        ex.hash_key = found
                        return
                else:
                    ex.hash_key = value
                    return

    def _check_declared_length(self, fields: list[tuple[bytes, bytes]]) -> None:
        """A Content-Length above [limits] max-body-bytes is refused before anything is sent."""
        for name, value in fields:
            if name.lower() == b"content-length" and int(value) > self._max_body:
                raise ContentTooLarge()

    def _queue_parsed(self, ex: Exchange) -> None:
        queue = self.queue
        queue.append(ex)
        if len(queue) > 1:
            self._pause(_PAUSE_QUEUE)
        else:
            self.deadline_kind = DEADLINE_NONE

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        if self._max_body:
            ex.body_size += len(body)
            if ex.body_size > self._max_body:
                raise ContentTooLarge()
        ex.body.append(chunk(body) if ex.chunked_in else body)
        ex.buffered += len(body)
        if self._body_left >= 0:
            self._body_left -= len(body)

    def on_message_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        if ex.chunked_in:
            ex.body.append(LAST_CHUNK)
        ex.request_done = True
        self.parsing = None
        self._body_left = -1

    def _express(self, data: bytes, text: str, scan: RequestScan) -> None:
        """A whole request head in one chunk: validate it with the lean parser (llhttp with no
        per-header callbacks), rewrite it as raw bytes and start it.

        llhttp has validated every line once feed_data returns (no obs-fold, no bare CR/LF,
        token names, one valid Content-Length), so what scan_request found in `text` (the
        head decoded as latin-1: one byte, one character, so positions match) is exact: a
        header name can only follow a line break.
        """
        lean = self._lean
        if lean is None:
            lean = _LEAN_FREE.pop() if _LEAN_FREE else _LeanParser()
            lean.conn = self
            self._lean = lean
        parser = lean.parser
        self.parser = parser
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(MethodNotAllowed("CONNECT is not supported by a reverse proxy"))
            return
        except httptools.HttpParserError as e:
            self._reject(BadRequest(str(e)))
            return
        self.server.express_requests += 1
        ex = Exchange(self)
        try:
            self._rewrite_head(ex, data, text, scan, parser.get_method())
        except ClientError as e:
            self._reject(e)
            return
        if self._hash_header:
            self._set_hash_key(ex, split_head(data[:-2])[1])
        if self._max_body and self._body_left > self._max_body:
            self._reject(ContentTooLarge(), ex)
            return
        if self._body_left > 0:
            self.parsing = ex  # the body follows in later chunks (see _lean_body)
            self.body_deadline = self._now() + self._t_body
        else:
            self._body_left = -1
            ex.request_done = True
        self.queue.append(ex)
        self.deadline_kind = DEADLINE_NONE
        self._start(ex)

    def _lean_body(self, body: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        ex.body.append(body)
        n = len(body)
        ex.buffered += n
        self._body_left -= n
        if self._body_left == 0:
            self._body_left = -1
            ex.request_done = True
            self.parsing = None

    def _rewrite_head(
        self, ex: Exchange, data: bytes, text: str, scan: RequestScan, method: bytes
    ) -> None:
        line_end = scan[1]
        if line_end > self._max_url_bytes:
            raise URITooLong()
        if len(data) > self._max_header_bytes:
            raise HeaderFieldsTooLarge()
        # More fields than max-header-count? Each line takes at least 3 bytes ("a:" and a line
        # break), so only a head that long can have that many, and only then are lines counted.
        if (
            len(data) > 3 * self._max_header_count
            and text.count("\n") - 2 > self._max_header_count  # the request and blank lines
        ):
            raise HeaderFieldsTooLarge("too many header fields")
        # The version from the request line llhttp accepted, which spells it "HTTP/" in
        # capitals (httptools' get_http_version formats a new string on every call).
        version = text[line_end - 9 : line_end]
        if version == " HTTP/1.1":
            keep_alive = True
        elif version == " HTTP/1.0":
            ex.version = b"1.0"
            keep_alive = False
        else:
            raise BadRequest("only HTTP/1.0 and HTTP/1.1 are supported")
        ex.method = method
        if method == b"HEAD":
            ex.is_head = True
        if scan[0] != REWRITE:
            head, host, keep_alive, length = plain_request_plan(
                data, scan, method, keep_alive, self._tail_parts, self._hop, self._host_ok
            )
            if head:
                if host is not None:
                    self._host_ok = host
                    ex.host = host
                if not keep_alive:
                    ex.keep_alive = False
                ex.head = head
                self._body_left = length
                return
        # Hop-by-hop or forwarding headers to rewrite, other than a lone Connection:
        # keep-alive or close: the general path's rules.
        if not keep_alive_of(text.lower(), keep_alive):
            ex.keep_alive = False
        head = data[:-2]  # without the blank line
        first, fields = split_head(head)
        self._build_request_head(ex, first[len(method) + 1 : first.rfind(b" ")], fields)
        self._body_left = scan[7]

    def _build_request_head(
        self, ex: Exchange, url: bytes, fields: list[tuple[bytes, bytes]]
    ) -> None:
        """The general path: every header rule (http11.request_plan), applied to `ex`."""
        plan = request_plan(
            ex.method,
            ex.version,
            url,
            fields,
            self._hop,
            self._trusted,
            self._underscores,
            self._host_ok,
        )
        if plan.valid is not None:
            self._host_ok = plan.valid
        ex.head = plan.head
        ex.host = plan.host
        if plan.chunked:
            ex.chunked_in = True
        if plan.websocket:
            ex.upgrade = True
        if plan.expect_continue:
            ex.expect_continue = True
        if plan.upgrade_body:
            ex.upgrade_body = plan.upgrade_body

    def _upgrade_requested(self, rest: bytes) -> None:
        """llhttp stopped after a request that asked to switch protocols.

        That parser is spent: what followed the head waits in `ex.tunnel_data` and is either
        the tunnel's first bytes (the backend agreed to a WebSocket upgrade) or parsed by a
        fresh parser as the next requests once this one is answered, so nothing pipelined
        behind an upgrade is dropped.
        """
        ex = self.queue[-1] if self.queue else None
        if ex is None or ex.request_done is False:
            self._reject(BadRequest("bad upgrade request"))
            return
        self._in_head = False
        self._full_parser = None
        self.parser = _SPENT
        if not ex.upgrade and ex.upgrade_body:
            # A refused upgrade (h2c or anything but WebSocket) with a Content-Length body,
            # which llhttp did not read: counted here.
            ex.request_done = False
            self._plain_upgrade = ex
            self._upgrade_body(rest)
            return
        ex.tunnel_data = rest
        self._pause(_PAUSE_QUEUE)
        self._flush()

    def _upgrade_body(self, data: bytes) -> None:
        """Body bytes of a request whose Upgrade was refused (see _upgrade_requested)."""
        ex = self._plain_upgrade
        if ex is None:
            return
        if ex.request_done:
            ex.tunnel_data += data  # pipelined behind it: parsed once it is answered
            self._pause(_PAUSE_QUEUE)
            return
        take = data[: ex.upgrade_body]
        ex.upgrade_body -= len(take)
        if take:
            ex.body.append(take)
            ex.buffered += len(take)
            self.body_deadline = self._now() + self._t_body
        if ex.upgrade_body == 0:
            ex.request_done = True
            self.body_deadline = 0.0
            ex.tunnel_data = data[len(take) :]
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
                write_now(t, ex.body[0])
            else:
                flush_writes()  # nothing queued may be overtaken or lost
                t.writelines(ex.body)
            ex.keep_for_retry(ex.body)
            ex.body = []
            ex.buffered = 0
            ex.sent_body = True
            if ex.request_done and not ex.response_started:
                self._await_response()

    def _start(self, ex: Exchange) -> None:
        server = self.server
        pool = server.pool  # the snapshot current as this request starts
        now = self._now()
        if not ex.begun:
            ex.begun = now
        waker = server.waker
        if ex.tried:
            eligible = [b for b in pool.eligible if b not in ex.tried]
        else:
            server.retry_budget.deposit()
            eligible = pool.eligible
            if waker is not None:
                waker.seen(ex.head)
        # The hash key: the configured header or cookie (absent: round robin), or the client.
        backend = pool.balancer.pick(eligible, ex.hash_key if self._hash_header else self.peer_ip)
        if backend is None:
            err: ClientError = ServiceUnavailable("no backend available")
            if waker is not None and not ex.tried:
                # Scale to zero: held while the pool wakes (reading nothing more meanwhile).
                held = waker.hold(self, ex)
                if held is None:
                    self._pause(_PAUSE_BUFFER)
                    return
                err = held
            ex.fail(err)
            return
        ex.backend = backend
        backend.in_flight += 1
        idle = backend.idle
        while idle:
            # (The pool knows its connections only as Pooled; they are all upstream ones.)
            up = cast(UpstreamConnection, idle.pop())
            if not up.closed:
                up.reused = True
                self._attach(ex, up, now)
                return
        self._dial(backend, ex)

    def _dial(self, backend: Backend, ex: Exchange) -> None:
        """Connect to `backend` for `ex`, reading nothing more from the client meanwhile."""
        self._pause(_PAUSE_BUFFER)
        server = self.server
        task = server.pool.dial(
            backend,
            server.settings.backend.dial_timeout,
            lambda: UpstreamConnection(backend),
            lambda proto, err: self.dial_done(ex, cast(UpstreamConnection | None, proto), err),
        )
        server.track_dial(task)

    def wake_done(self, ex: Exchange, err: ClientError | None) -> None:
        """The waker hands a held exchange back: the pool is awake (None) or it is not."""
        if self.closed or not self.queue or self.queue[0] is not ex:
            return
        self._resume(_PAUSE_BUFFER)
        if err is not None:
            ex.fail(err)
        else:
            self._start(ex)

    def dial_done(
        self, ex: Exchange, up: UpstreamConnection | None, err: ClientError | None
    ) -> None:
        """The pool's dial for `ex` finished, with a connection or an error."""
        if self.closed or not self.queue or self.queue[0] is not ex:
            if up is not None:
                up.release(self._now(), self.server.max_idle)
            return
        self._resume(_PAUSE_BUFFER)
        if up is None:
            assert err is not None
            if ex.backend is not None:
                self.server.backend_failed(ex.backend)
            # Nothing was sent: any method may go to another backend.
            if not ex.retry(err):
                ex.fail(err)
            return
        self._attach(ex, up, self._now())

    def _attach(self, ex: Exchange, up: UpstreamConnection, now: float) -> None:
        ex.upstream = up
        up.client = self
        up.got_bytes = False
        up.max_head = self._max_response_head
        t = up.transport
        assert t is not None
        backend = ex.backend
        assert backend is not None
        head = ex.head
        if ex.host is None:
            # An HTTP/1.0 request may lack Host; HTTP/1.1 to the backend needs one.
            head = head[:-2] + b"Host: " + backend.host_header + b"\r\n\r\n"
        ex.started = now
        if ex.body:
            ex.keep_for_retry(ex.body)
            ex.body.insert(0, head)
            flush_writes()  # nothing queued may be overtaken or lost
            t.writelines(ex.body)
            ex.body = []
            ex.buffered = 0
            ex.sent_body = True
        else:
            write_soon(self.server.loop, t, head)
        if ex.request_done:
            self._await_response(now)
        else:
            # The backend's response timer starts once the body has been sent; until then the
            # body's own deadline (client-body) runs.
            self.deadline_kind = DEADLINE_NONE
        if ex.expect_continue and not ex.request_done and self.transport is not None:
            write_now(self.transport, b"HTTP/1.1 100 Continue\r\n\r\n")
        if self._writing_paused:
            up.pause_reading()

    # --- response (called by UpstreamConnection) --------------------------------------------

    def express_response(self, up: UpstreamConnection, data: bytes) -> bool:
        """The express lane for responses: one chunk holding a whole Content-Length response.

        Decides from the raw bytes before anything is parsed, and returns False (having done
        nothing) when the response needs the general path. Otherwise llhttp validates it with
        no Python callbacks, and head and body go to the client in one write.
        """
        ex = self.queue[0]
        if ex.version != b"1.1" or ex.is_head or ex.upgrade or not ex.request_done:
            return False
        keep = ex.keep_alive and not self.server.draining
        out, status, length, backend_keep_alive = express_response_plan(data, keep)
        if not status:
            return False
        try:
            up.lean_parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.backend_protocol_error(up, str(e))
            return True
        backend = ex.backend
        if status // 100 == 5:
            if backend is not None:
                self.server.backend_failed(backend)
            if ex.retry_on_status(up, status, backend_keep_alive):
                return True
        elif backend is not None and backend.passive_failures:
            self.server.backend_ok(backend)
        t = self.transport
        if t is not None and not t.is_closing():
            write_soon(self.server.loop, t, out)
        if not keep:
            ex.keep_alive = False
        ex.status = status  # counted by class in Exchange.finish
        if self._access_log:
            ex.body_sent = length
        self.server.express_responses += 1
        ex.finish(up, reusable=backend_keep_alive)
        return True

    def response_head(
        self, up: UpstreamConnection, status: int, head: bytes, text: str, backend_keep_alive: bool
    ) -> None:
        """The backend's response head as raw bytes validated by llhttp (without the blank
        line), and the same decoded as latin-1 for searching."""
        ex = self.queue[0]
        if status < 200:
            if status != 100 and status != 101 and ex.version == b"1.1":
                # Interim responses such as 103 Early Hints pass to HTTP/1.1 clients, under
                # the same hop-by-hop rules as final ones.
                self._write(interim_head(head, text))
            elif status == 101 and not switches(text.lower()):
                # llhttp switches only with Upgrade and Connection: upgrade; a bare 101 would
                # leave the exchange waiting for a final response that never comes.
                self.backend_protocol_error(up, "101 without Upgrade")
            return  # 100 is answered by the proxy itself; 101 is handled as an upgrade
        if not ex.request_done:
            # An early final response (e.g. 413 before the upload ended): the connection to
            # that backend cannot be reused, and the client's closes after it.
            ex.backend_keep_alive = False
        if status >= 500:
            if ex.backend is not None:
                self.server.backend_failed(ex.backend)
            if ex.retry_on_status(up, status, reusable=False):
                return
        elif ex.backend is not None and ex.backend.passive_failures:
            self.server.backend_ok(ex.backend)
        ex.head_at = now = self._now()
        if self._writing_paused:
            # The client is not reading: a stall from here on is its own, not the backend's.
            if self.deadline_kind != DEADLINE_CLIENT_WRITE:
                self.deadline_kind = DEADLINE_CLIENT_WRITE
                self.deadline = now + self._t_client_write
        else:
            self.deadline_kind = DEADLINE_BACKEND_READ
            self.deadline = now + self._t_backend_read
        ex.response_started = True
        ex.status = status
        ex.backend_keep_alive = backend_keep_alive and ex.backend_keep_alive
        keep = ex.keep_alive and ex.request_done and not self.server.draining
        head, body, until_close, keep = response_plan(
            status, head, text, ex.version, ex.is_head, keep
        )
        if body == BODY_REFUSED:
            # Nothing of the response has reached the client yet, so it can still get a 502.
            ex.response_started = False
            self.backend_protocol_error(up, f"Transfer-Encoding {head.decode('latin-1')!r}")
            return
        ex.until_close = until_close
        ex.out_mode = body
        if not keep:
            ex.keep_alive = False
        self._held = head
        if ex.is_head:
            up.stop_after_head()

    def response_body(self, body: bytes) -> None:
        if self.deadline_kind == DEADLINE_BACKEND_READ:
            self.deadline = self._now() + self._t_backend_read
        ex = self.queue[0]
        mode = ex.out_mode
        if mode == BODY_RAW:
            self._write(body)
        elif mode == BODY_CHUNKED:
            self._write(chunk(body))
        else:
            return
        if self._access_log:
            ex.body_sent += len(body)

    def response_complete(self, up: UpstreamConnection) -> None:
        if not self.queue:
            return
        ex = self.queue[0]
        if not ex.response_started:
            return  # a 1xx interim response ended; the final one follows
        if ex.out_mode == BODY_CHUNKED:
            self._write(LAST_CHUNK)
        # A connection offered an upgrade that the backend declined is not reused either.
        reusable = ex.request_done and ex.backend_keep_alive and not ex.upgrade
        ex.finish(up, reusable)

    def backend_lost(self, up: UpstreamConnection) -> None:
        """The backend closed the connection (or it broke) while attached to an exchange."""
        if self._tunnel is up:
            self._tunnel = None
            self.teardown(TEARDOWN_CLOSE)
            return
        if not self.queue or self.queue[0].upstream is not up:
            return
        ex = self.queue[0]
        if ex.response_started:
            if ex.until_close:
                # A close-delimited response ends with the connection: that is success.
                if ex.out_mode == BODY_CHUNKED:
                    self._write(LAST_CHUNK)
                ex.finish(up, reusable=False)
                return
            # The response was cut short: the client must see a broken response, not a hang.
            log.warning(
                "backend %s closed mid-response (the client got it cut short); see that "
                "backend's logs",
                ex.backend,
            )
            ex.finish(up, reusable=False, abort=True)
            return
        ex.upstream = None
        if up.reused and not up.got_bytes and not ex.sent_body and ex.method in IDEMPOTENT_METHODS:
            # A pooled connection the backend had already closed: try once on a fresh one.
            # Safe because the method is idempotent and no body byte was sent.
            backend = ex.backend
            assert backend is not None
            self._dial(backend, ex)
            return
        err = BadGateway("backend closed the connection")
        if ex.backend is not None:
            self.server.backend_failed(ex.backend)
        if not (ex.may_resend() and ex.retry(err)):
            ex.fail(err)

    def backend_protocol_error(self, up: UpstreamConnection, detail: str) -> None:
        log.warning(
            "invalid response from backend %s: %s; fix the backend (docs/http.md says what "
            "doproxy accepts)",
            up.backend,
            detail,
        )
        up.backend.protocol_errors += 1
        ex = self.queue[0] if self.queue else None
        if ex is None:
            up.client = None
            up.abort()
            return
        ex.let_go(up, _ABORT)
        if ex.response_started:
            ex.finish(up, reusable=False, abort=True)
        else:
            ex.fail(BadGateway("invalid response from backend"))

    def backend_switched_protocols(self, up: UpstreamConnection, rest: bytes) -> None:
        """The backend answered 101: from now on both sides are a plain byte tunnel."""
        ex = self.queue[0]
        if not ex.upgrade:
            self.backend_protocol_error(up, "101 without a WebSocket upgrade request")
            return
        out = websocket_101(up.last_head)
        if not out:
            # The tunnel opens only to the protocol the client asked for.
            self.backend_protocol_error(up, "101 to a protocol other than websocket")
            return
        self.deadline_kind = DEADLINE_TUNNEL
        self.deadline = self._now() + self._t_tunnel
        self._write(out)
        if rest:
            self._write(rest)
        # The 101 is this exchange's answer (a tunnel never reaches finish): its class count.
        up.backend.responses[1] += 1
        if self._access_log:
            ex.status = 101  # logged when the tunnel closes (connection_lost)
            ex.body_sent = len(rest)
        up.tunnel = True
        self._tunnel = up
        t = up.transport
        assert t is not None
        if ex.tunnel_data:
            write_now(t, ex.tunnel_data)
        self._paused = 0
        if self.transport is not None:
            self.transport.resume_reading()

    def tunnel_from_backend(self, data: bytes) -> None:
        if self.deadline_kind == DEADLINE_TUNNEL:
            self.deadline = self._now() + self._t_tunnel
        self._write(data)
        if self._access_log and self.queue:
            self.queue[0].body_sent += len(data)  # as nginx counts a tunnel's bytes

    # --- completion -------------------------------------------------------------------------

    def _log_refused(self, bad: Exchange | None, err: ClientError, is_head: bool) -> None:
        """The access log line of a request refused as the client's fault (_reject): with its
        request line once its head was parsed, else "-"."""
        ex = bad if bad is not None else Exchange(self)
        if not ex.response_started:
            ex.status = err.status
            out = error_response(err.status, self.server.error_body(err.status), head=is_head)
            ex.body_sent = len(out) - out.find(b"\r\n\r\n") - 4
        # (Otherwise the backend's answer had begun: its status and the bytes sent stand.)
        ex.log_access(self._now(), ex.backend)

    def _log_unfinished(self, ex: Exchange) -> None:
        """The connection closed with `ex` unfinished: a WebSocket tunnel that ended (101),
        a response cut short (the status its head carried), or a client that left before any
        answer (499, nginx's "client closed request")."""
        if not ex.status:
            ex.status = 499
        ex.log_access(self._now(), ex.backend)

    def finished(self, ex: Exchange, now: float, abort: bool) -> None:
        """`ex`, the active exchange, has been answered (Exchange.finish): go on to what
        follows it, or close (abort: its response was cut short)."""
        if abort:
            self.queue.pop(0)
            self.teardown(TEARDOWN_ABORT)
            return
        if self._held is not None:
            self._write(b"")
        queue = self.queue
        queue.pop(0)
        if not ex.keep_alive or not ex.request_done:
            # Always a lingering close (RFC 9112 9.6), even after the client's own last
            # request: nothing seen after it is no proof that nothing is on its way, and a
            # close with bytes unread resets the connection, which can destroy the answer
            # before the client has read it (the differential test found it: a client that
            # sent more after an HTTP/1.0 request, in a later write, got nothing). The
            # half-close sends our FIN right behind the answer, so a client that closes once
            # it has its answer ends the linger at once.
            if (
                ex.request_done
                and not queue
                and self._rejected is None
                and self.parsing is None
                and not self._in_head
            ):
                self._give_back_lean()  # whole messages only: it is between two
            self.teardown(TEARDOWN_LINGER)
            return
        self._continue(now)
        if ex.tunnel_data and not self.closed:
            # Requests pipelined behind an upgrade that did not happen (see _upgrade_requested).
            self._plain_upgrade = None
            self.data_received(ex.tunnel_data)
        elif self._plain_upgrade is ex:
            self._plain_upgrade = None

    def failed(self, answer: bytes, keep: bool) -> None:
        """The active exchange failed (Exchange.fail): send the proxy's `answer`, then go on
        to what follows it, or close."""
        self._write(answer)
        self.queue.pop(0)
        if not keep:
            self.teardown(TEARDOWN_LINGER)
        else:
            self._continue(self._now())

    def _continue(self, now: float) -> None:
        """After an exchange: start the next pipelined request, or wait for one."""
        queue = self.queue
        if queue:
            nxt = queue[0]
            if len(queue) == 1 and self._rejected is None:
                self._resume(_PAUSE_QUEUE)
            if nxt.tunnel_data or (not nxt.keep_alive and nxt.request_done):
                # Nothing after it will be served; but a body still arriving must be read.
                self._pause(_PAUSE_QUEUE)
            self._flush()
            return
        err = self._rejected
        if err is not None:
            # The bad request that followed the good ones: its answer comes last.
            self._rejected = None
            self.server.generated[err.status // 100] += 1
            page = self.server.error_body(err.status)
            self._write(error_response(err.status, page, head=self._rejected_head))
            self.teardown(TEARDOWN_LINGER)
            return
        # The common case: nothing pipelined; wait for the next request.
        if self._paused & _PAUSE_QUEUE:
            self._resume(_PAUSE_QUEUE)
        if self._client_eof:
            # The client is done sending (a partial head it left will never complete): close,
            # with nothing to linger for.
            self.teardown(TEARDOWN_CLOSE)
        elif self.server.draining:
            self.teardown(TEARDOWN_LINGER)
        elif self.parsing is None:
            self.deadline_kind = DEADLINE_IDLE
            self.deadline = now + self._t_idle
            self._give_back_lean()
        elif self._in_head:
            self.deadline_kind = DEADLINE_HEADER
            self.deadline = now + self._t_header
        else:
            self.deadline_kind = DEADLINE_NONE  # a body is arriving: client-body watches it

    def _give_back_lean(self) -> None:
        """Between messages: the lean parser goes back for any connection's next request."""
        lean = self._lean
        if lean is not None:
            self._lean = None
            self.parser = _SPENT
            lean.conn = None
            if len(_LEAN_FREE) < _LEAN_FREE_MAX:
                _LEAN_FREE.append(lean)

    def _reject(self, err: ClientError, refused: Exchange | None = None) -> None:
        """The client's fault: a malformed request, a stalled or cut body, a body too large.

        Nothing of a malformed request was forwarded; a request whose body went wrong while
        being forwarded is aborted at its backend (which is not blamed). Requests accepted
        before it on this connection are answered first, in order; then the error, and the
        connection closes. `refused`: the express lane's request, for the access log (the
        general path's is `parsing`).
        """
        if self.closed:
            return
        if self.transport is None:
            self.teardown(TEARDOWN_CLOSE)
            return
        log.debug("rejecting request from %s: %s", self.peer_ip.decode(), err.detail)
        bad = self.parsing
        # Was the refused request a HEAD? Known once its head was parsed (llhttp's method of
        # a head it refused midway may be the previous request's: not asked).
        head = bad is not None and bad.is_head
        if self._access_log and (
            bad is not None or self._in_head or not isinstance(err, RequestTimeout)
        ):
            # (A connection that sent nothing at all before client-header passed is no
            # request, and not logged, as nginx does not.)
            self._log_refused(refused or bad, err, head)
        self.parsing = None
        self._in_head = False
        self.body_deadline = 0.0
        queue = self.queue
        if bad is not None and queue and queue[-1] is bad:
            queue.pop()
            bad.drop()
            if bad.response_started:
                # Its answer had begun: it cannot be completed, and must not look complete.
                self.teardown(TEARDOWN_ABORT)
                return
        if queue:
            self._rejected = err
            self._rejected_head = head
            self._pause(_PAUSE_QUEUE)
            # The good ones may have been parsed in the same read: start the first, or pass
            # on the body bytes it got.
            if queue[0].backend is None:
                self._start(queue[0])
            else:
                self._flush()
            return
        self._held = None
        self.server.generated[err.status // 100] += 1
        self._write(error_response(err.status, self.server.error_body(err.status), head=head))
        self.teardown(TEARDOWN_LINGER)

    def on_deadline(self, kind: int) -> None:
        """The server's sweep found this connection's deadline passed."""
        self.deadline_kind = DEADLINE_NONE
        if kind == DEADLINE_IDLE:
            self.teardown(TEARDOWN_CLOSE)
        elif kind == DEADLINE_BACKEND_READ:
            if self.queue:
                ex = self.queue[0]
                log.warning(
                    "backend %s: response stalled for backend-read; cut. Check the backend, "
                    "or raise [timeouts] backend-read for slow streams",
                    ex.backend,
                )
                if ex.backend is not None:
                    self.server.backend_failed(ex.backend)
                ex.finish(ex.upstream, reusable=False, abort=True)
        elif kind == DEADLINE_CLIENT_WRITE:
            t = self.transport
            if self.closed and t is not None and not t.get_write_buffer_size():
                # A lingering close whose answer has all been taken since: now the linger.
                self.deadline_kind = DEADLINE_LINGER
                self.deadline = self._now() + LINGER_TIME
                return
            # The client stopped reading: its fault; the backend is not blamed.
            log.info("client %s read nothing for client-write; closed", self.peer_ip.decode())
            self.teardown(TEARDOWN_ABORT)
        elif kind == DEADLINE_TUNNEL:
            log.info("tunnel idle for tunnel-idle; closed")
            self.teardown(TEARDOWN_CLOSE)  # the backend side closes with it (connection_lost)
        elif kind == DEADLINE_LINGER:
            self.teardown(TEARDOWN_ABORT)
        elif kind == DEADLINE_HEADER:
            if self._in_head or self.parsing is not None or not self.queue:
                self._reject(RequestTimeout("client too slow to send the request head"))
        elif kind == DEADLINE_RESPONSE and self.queue:
            ex = self.queue[0]
            if not ex.response_started:
                log.warning(
                    "backend %s: no response within the response-header timeout; check the "
                    "backend, or raise [timeouts] response-header",
                    ex.backend,
                )
                err = GatewayTimeout("backend did not answer in time")
                if ex.backend is not None:
                    self.server.backend_failed(ex.backend)
                up = ex.upstream
                if ex.may_resend() and up is not None:
                    ex.let_go(up, _ABORT)
                    if ex.retry(err):
                        return
                ex.fail(err)

    def on_body_deadline(self, now: float) -> None:
        """The sweep found the request body stalled for client-body: whose fault is it?"""
        paused = self._paused
        if paused & _PAUSE_BACKEND and self.queue:
            # The backend has read nothing of the body for that long (its socket stays full,
            # so the proxy stopped reading the client): the backend's fault, as nginx's
            # proxy_send_timeout has it.
            self.body_deadline = 0.0
            ex = self.queue[0]
            log.warning(
                "backend %s read nothing of a request body for client-body; giving up. Check "
                "the backend, or raise [timeouts] client-body",
                ex.backend,
            )
            if ex.backend is not None:
                self.server.backend_failed(ex.backend)
            ex.fail(GatewayTimeout("backend stopped reading the request body"))
            return
        if paused:
            # The proxy itself stopped reading (a queue, a dial): not a stall.
            self.body_deadline = now + self._t_body
            return
        self.body_deadline = 0.0
        self._reject(RequestTimeout("client too slow to send the request body"))

    def _await_response(self, now: float = 0.0) -> None:
        """The request has been sent in full (at `now`, if the caller has the time): the
        backend must start answering in time."""
        self.deadline_kind = DEADLINE_RESPONSE
        self.deadline = (now or self._now()) + self._t_response

    def _phase_deadline(self) -> None:
        """Set the deadline of the phase the connection is in (after a client-write pause)."""
        now = self._now()
        if self._tunnel is not None:
            self.deadline_kind, self.deadline = DEADLINE_TUNNEL, now + self._t_tunnel
        elif self.queue:
            ex = self.queue[0]
            if ex.response_started:
                self.deadline_kind = DEADLINE_BACKEND_READ
                self.deadline = now + self._t_backend_read
            elif ex.upstream is not None and ex.request_done:
                self._await_response()
            else:
                self.deadline_kind = DEADLINE_NONE
        elif self._in_head:
            self.deadline_kind, self.deadline = DEADLINE_HEADER, now + self._t_header
        elif self.parsing is None:
            self.deadline_kind, self.deadline = DEADLINE_IDLE, now + self._t_idle
        else:
            self.deadline_kind = DEADLINE_NONE

    def shutdown(self) -> None:
        """Graceful shutdown: idle connections close now, busy ones after their response."""
        if not self.queue and self.parsing is None and self._tunnel is None:
            self.teardown(TEARDOWN_CLOSE)

    # --- small helpers ----------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            data = held + data
        t = self.transport
        if t is not None and not t.is_closing():
            write_now(t, data)

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

    def teardown(self, how: int) -> None:
        """The one way the client connection is closed: TEARDOWN_CLOSE, TEARDOWN_LINGER (a
        lingering close, when the client may still be sending) or TEARDOWN_ABORT (a reset:
        nothing more reaches the client, not even a response head still held back). Whoever
        closes, connection_lost follows and lets go of what the connection still holds (its
        exchanges' backend connections, a tunnel)."""
        self.closed = True
        if how == TEARDOWN_ABORT:
            self._held = None
        elif self._held is not None:
            self._write(b"")
        t = self.transport
        if t is None:
            return
        flush_writes()  # nothing queued may be overtaken or lost
        if how == TEARDOWN_ABORT:
            t.abort()
            return
        # Over TLS, close() is already a staged close: the transport sends close_notify and
        # reads (and drops) until the client's, so it needs no lingering of ours; and without
        # a half-close, lingering would only hold back the end of the response.
        if how == TEARDOWN_LINGER and not t.is_closing() and t.can_write_eof():
            # Lingering close (RFC 9112 9.6, nginx's lingering_close): the client may still be
            # sending (a body that was not read, requests pipelined behind a close), and
            # closing with unread bytes resets the connection, which can destroy the response
            # in the client's receive buffer. So: end our side, then read and drop what
            # arrives until the client closes or LINGER_TIME passes.
            self.body_deadline = 0.0
            self._paused = 0
            t.resume_reading()
            t.write_eof()
            if t.get_write_buffer_size():
                # The rest of the answer goes first: the client must take it within
                # client-write, as any answer (on_deadline then starts the linger).
                self.deadline_kind = DEADLINE_CLIENT_WRITE
                self.deadline = self._now() + self._t_client_write
            else:
                self.deadline_kind = DEADLINE_LINGER
                self.deadline = self._now() + LINGER_TIME
            return
        t.close()
        if t.get_write_buffer_size():
            # The rest of the answer waits for the client to read it: within client-write, as
            # any answer, or the connection is cut. Without this a client that stopped reading
            # would hold a closed connection (a descriptor and its buffer) for ever, whenever
            # writing had not paused and started that deadline already.
            self.deadline_kind = DEADLINE_CLIENT_WRITE
            self.deadline = self._now() + self._t_client_write
