"""The express lanes and the general path apply the same rules.

A request sent in one write takes the express lane; the same request split over two writes
takes the general path (a head split across reads). Whatever the lane, the backend must receive
the same request line, the same header fields and the same body. The same holds for responses:
one write from the backend (express) or the head and body in separate writes (general).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from doproxy.proxy.server import ProxyServer
from tests.conftest import StartProxy, port_of, wait_for
from tests.support import Client, RawBackend, RequestReader, holding

REQUESTS = [
    b"GET /a?x=1 HTTP/1.1\r\nHost: app.test\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n",
    b"GET /b HTTP/1.1\r\nHOST: App.Test\r\nConnection: keep-alive\r\nX-Other: 1\r\n\r\n",
    b"GET /c HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: ftp\r\n\r\n",
    b"GET /d HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\n"
    b"Keep-Alive: timeout=5\r\nTE: trailers\r\n\r\n",
    b"POST /e HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello",
    b"GET /f HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET /g HTTP/1.0\r\nHost: h10\r\n\r\n",
    b"HEAD /h HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    # Targets and Host: absolute-form becomes origin-form with its authority as Host.
    b"GET http://abs.test:8080/i?q HTTP/1.1\r\nHost: other\r\nX-A: 1\r\n\r\n",
    b"GET http://abs10.test HTTP/1.0\r\nX-A: 1\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n",
    b"GET /j HTTP/1.1\r\nHost: [::1]:8080\r\nX-A: 1\r\n\r\n",
    # An empty line before the request line is ignored.
    b"\r\nGET /k HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n",
    # Forwarding headers, underscores and Via.
    b"GET /l HTTP/1.1\r\nHost: h\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n"
    b"X-Forwarded-Port: 1\r\nX-Forwarded-Host: e\r\nX_Forwarded_For: 6\r\nVia: 1.0 corp\r\n\r\n",
    b"GET /m HTTP/1.1\r\nHost: h\r\nX_Custom: 1\r\nX-B: a_b\r\n\r\n",
    b"GET /n HTTP/1.0\r\nX-Forwarded-For: 6.6.6.6\r\nVia: 1.0 corp\r\n\r\n",
]
# The forwarding settings, each with every request above.
CONFIGS = [
    {},
    {"forwarded-header": "both", "via": True},
    {"forwarded-header": "rfc7239", "add-x-forwarded-for": False},
    {"trusted-proxies": ["127.0.0.0/8"], "forwarded-header": "both"},
    {"allow-underscores-in-headers": True, "trusted-proxies": ["127.0.0.1"], "via": True},
]


def fields(raw: bytes) -> tuple[bytes, set[bytes], bytes]:
    """Request line, the set of header lines (names lower-cased), and the body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    first, *lines = head.split(b"\r\n")
    norm = set()
    for line in lines:
        name, _, value = line.partition(b":")
        value = value.strip()
        if name.lower() == b"connection" and value.lower() == b"keep-alive":
            continue  # may be kept as a truthful statement about the backend connection
        if name.lower() == b"host" and value.startswith(b"127.0.0.1:"):
            value = b"<the backend's server-host>"  # HTTP/1.0 without Host
        if name.lower() == b"x-forwarded-port":
            value = b"<the proxy's port>"  # each lane has its own proxy
        norm.add(name.lower() + b":" + value)
    return first, norm, body


async def _one_response(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
) -> None:
    rr = RequestReader(reader)
    while (req := await rr.next()) is not None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        if not req.keep_alive:
            return


def _mid_head(proxy: ProxyServer) -> bool:
    """True once the proxy has read part of a request head and waits for the rest."""
    return any(conn._in_head for conn in proxy.connections)


async def _send(proxy: ProxyServer, parts: list[bytes]) -> None:
    c = await Client.connect(port_of(proxy))
    for k, part in enumerate(parts):
        await c.send(part)
        if k < len(parts) - 1:
            await wait_for(lambda: _mid_head(proxy))  # each part is read on its own
    head_only = parts[0].startswith(b"HEAD")
    r = await c.response(head_request=head_only)
    assert r.status == 200
    await c.close()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(c) or "defaults")
@pytest.mark.parametrize("raw", REQUESTS, ids=lambda r: r.split(b" ")[1].decode())
async def test_request_lanes_agree(
    raw: bytes,
    config: dict[str, Any],
    start_proxy: StartProxy,
    backend_factory: Callable[..., Awaitable[RawBackend]],
) -> None:
    express = await backend_factory(_one_response)
    general = await backend_factory(_one_response)
    p1 = await start_proxy([express.port], config)
    p2 = await start_proxy([general.port], config)
    await _send(p1, [raw])
    cut = raw.index(b"\r\n") + 5  # inside the head: the general path must put it together
    await _send(p2, [raw[:cut], raw[cut:]])
    await wait_for(lambda: bool(express.received) and bool(general.received))
    a, b = fields(express.all_received), fields(general.all_received)
    # A lone head in one write takes the express lane; two writes, the general path.
    lone_head = raw.index(b"\r\n\r\n") + 4 == len(raw)
    assert (p1.express_requests, p2.express_requests) == (int(lone_head), 0)
    assert a == b
    # And both are right: HTTP/1.1 upstream, origin-form, forwarding headers set by the proxy.
    assert a[0].endswith(b" HTTP/1.1")
    assert a[0].split(b" ")[1].startswith(b"/") or a[0] == b"OPTIONS * HTTP/1.1"
    if not config:
        assert b"x-forwarded-proto:http" in a[1]
        assert b"x-forwarded-for:127.0.0.1" in a[1]
        assert not any(b"6.6.6.6" in f for f in a[1])
    assert not any(f.startswith((b"keep-alive:", b"te:", b"x-drop:")) for f in a[1])
    assert any(f.startswith(b"x_") for f in a[1]) == (
        b"\nX_" in raw and bool(config.get("allow-underscores-in-headers"))
    )


def _upstream_mid_head(proxy: ProxyServer) -> bool:
    """True once the proxy has read part of a response head and waits for the rest."""
    return any(
        ex.upstream is not None and ex.upstream._headbuf
        for conn in proxy.connections
        for ex in conn.queue
    )


def _response_backend(
    response: bytes, split: bool, proxy: list[ProxyServer]
) -> Callable[..., Awaitable[None]]:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
    ) -> None:
        rr = RequestReader(reader)
        while await rr.next() is not None:
            if split:
                cut = response.index(b"\r\n") + 3
                writer.write(response[:cut])
                await writer.drain()
                await wait_for(lambda: _upstream_mid_head(proxy[0]))  # two reads at the proxy
                writer.write(response[cut:])
            else:
                writer.write(response)
            await writer.drain()

    return handler


RESPONSES = [
    b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nnop",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\nX-A: 1\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\r\nok",
    # Every other hop-by-hop header, each as the last line and in mixed case, with decoys
    # that only start like one (they stay).
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTE-X: 1\r\nProxy-Connection: keep-alive\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTrailers-Note: 1\r\nContent-Length: 2\r\nTrailer: X-T\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nte: trailers\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nHTTP2-Settings: AAMA\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nUpgrade-Note: 1\r\nContent-Length: 2\r\nUPGRADE: h2c\r\n\r\nok",
]


@pytest.mark.parametrize("response", RESPONSES, ids=lambda r: str(RESPONSES.index(r)))
@pytest.mark.parametrize("client_close", [False, True])
async def test_response_lanes_agree(
    response: bytes,
    client_close: bool,
    start_proxy: StartProxy,
    backend_factory: Callable[..., Awaitable[RawBackend]],
) -> None:
    got = []
    lanes: list[int] = []
    for split in (False, True):
        holder: list[ProxyServer] = []
        backend = await backend_factory(_response_backend(response, split, holder))
        proxy = await start_proxy([backend.port])
        holder.append(proxy)
        c = await Client.connect(port_of(proxy))
        extra = b"Connection: close\r\n" if client_close else b""
        await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n" + extra + b"\r\n")
        r = await c.response()
        conn = r.header("connection")
        names = {n.lower() + b":" + v for n, v in r.headers if n.lower() != b"connection"}
        got.append((r.status, r.body, names, conn == b"close"))
        lanes.append(proxy.express_responses)
        if client_close:
            assert await c.closed()
        else:
            # the client connection stays usable
            await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert (await c.response()).body == r.body
        await c.close()
    assert got[0] == got[1]
    # Plain Content-Length responses in one write take the express lane; the others, and
    # every response split over two reads, the general path.
    assert lanes == [1 if response in RESPONSES[:3] else 0, 0]
    _, _, names, closing = got[0]
    assert closing == client_close
    hop = (b"keep-alive:", b"x-hop:", b"proxy-connection:", b"trailer:", b"te:", b"upgrade:")
    assert not any(n.startswith((*hop, b"http2-settings:")) for n in names)
    decoys = {b"te-x:", b"trailers-note:", b"upgrade-note:"}
    assert {n.split(b":")[0] + b":" for n in names} & decoys == {
        d for d in decoys if d[:-1] in response.lower()
    }


async def test_express_head_then_body_then_pipelined_request(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    # The head arrives alone (express lane), its body later, and the next request in the same
    # read as the end of the body: the body must end exactly at its Content-Length.
    proxy = await start_proxy([echo_backend.port])
    c = await Client.connect(port_of(proxy))
    await c.send(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n")
    await wait_for(lambda: proxy.express_requests == 1)
    await c.send(b"hello")
    await wait_for(lambda: echo_backend.all_received.endswith(b"hello"))
    await c.send(b"world" + b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await c.response()).body == b"POST /up len=10"
    assert (await c.response()).body == b"GET /next len=0"
    await c.close()
    assert b"\r\n\r\nhelloworldGET /next HTTP/1.1\r\n" in echo_backend.all_received


async def test_lean_parsers_are_shared_between_idle_connections(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    # An idle keep-alive connection holds no lean parser (memory: most connections are idle);
    # it takes one for a request and gives it back once idle. One connection's body in
    # progress must never reach another's parser.
    proxy = await start_proxy([echo_backend.port])
    a = await Client.connect(port_of(proxy))
    b = await Client.connect(port_of(proxy))
    # Heads alone take the express lane; each body follows in its own writes.
    await a.send(b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n\r\n")
    await wait_for(lambda: proxy.express_requests == 1)
    await a.send(b"abc")
    await wait_for(lambda: echo_backend.all_received.endswith(b"abc"))
    await b.send(b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n")
    await wait_for(lambda: proxy.express_requests == 2)
    await b.send(b"xyz")
    assert (await b.response()).body == b"POST /b len=3"
    await a.send(b"def")
    assert (await a.response()).body == b"POST /a len=6"
    for c in (a, b):
        await c.send(b"GET /again HTTP/1.1\r\nHost: h\r\n\r\n")
        assert (await c.response()).body == b"GET /again len=0"
    await wait_for(lambda: len(proxy.connections) == 2)
    assert all(conn._lean is None for conn in proxy._live())
    await a.close()
    await b.close()
    assert b"\r\n\r\nabcdef" in echo_backend.all_received
    assert b"\r\n\r\nxyz" in echo_backend.all_received


async def test_close_request_is_half_closed_at_once_and_its_parser_serves_another_connection(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    # Once a `Connection: close` request is answered, the proxy ends its side at once (the
    # client reads the end of the stream right behind the answer) and closes when the client
    # closes (a lingering close: see test_last_request_answered_when_more_arrives_after_it in
    # tests/test_differential.py); the lean parser it used goes back for other connections in
    # a clean state.
    from doproxy.proxy import client as client_module
    from doproxy.proxy.client import DEADLINE_LINGER

    proxy = await start_proxy([echo_backend.port])
    free = len(client_module._LEAN_FREE)
    a = await Client.connect(port_of(proxy))
    await a.send(
        b"POST /last HTTP/1.1\r\nHost: h\r\nConnection: close\r\nContent-Length: 3\r\n\r\n"
    )
    # The head alone takes the express lane, with a lean parser (see above); the body follows.
    await wait_for(lambda: proxy.express_requests == 1)
    await a.send(b"abc")
    r = await a.response()
    assert (r.status, r.body, r.header("connection")) == (200, b"POST /last len=3", b"close")
    # The client sees the end at once; the proxy lingers until the client closes its side.
    assert await a.closed(timeout=2.0)
    (conn,) = proxy.connections
    assert conn.deadline_kind == DEADLINE_LINGER
    await a.close()
    await wait_for(lambda: not proxy.connections, timeout=2.0)
    # It took a parser (a free one, or a new one when none was free) and gave it back.
    assert len(client_module._LEAN_FREE) == max(free, 1)
    # The next connection takes that parser: a keep-alive exchange with a body, then a
    # pipelined request, parse as they would on a new parser.
    b = await Client.connect(port_of(proxy))
    await b.send(b"POST /next HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nxy")
    assert (await b.response()).body == b"POST /next len=2"
    await b.send(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await b.response()).body == b"GET /1 len=0"
    assert (await b.response()).body == b"GET /2 len=0"
    await b.close()
    await a.close()


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
async def test_nothing_after_a_close_request_reaches_a_backend(
    start_proxy: StartProxy, echo_backend: RawBackend, version: bytes
) -> None:
    # A request sent after one that said close (HTTP/1.0 says it by default) is never served,
    # whether it arrives before or after the answer, in the same read or the next.
    proxy = await start_proxy([echo_backend.port])
    close = b"" if version == b"1.0" else b"Connection: close\r\n"
    first = b"GET /first HTTP/" + version + b"\r\nHost: h\r\n" + close + b"\r\n"
    extra = b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
    for writes in ([first + extra], [first, extra]):
        c = await Client.connect(port_of(proxy))
        for data in writes:
            await c.send(data)
        assert (await c.response()).body == b"GET /first len=0"
        assert await c.closed()
        await c.close()
    await wait_for(lambda: not proxy.connections)
    assert b"/smuggled" not in echo_backend.all_received
    assert echo_backend.all_received.count(b"GET /first") == 2


async def test_close_request_lingers_when_the_client_has_started_another(
    start_proxy: StartProxy, backend_factory: Callable[..., Awaitable[RawBackend]]
) -> None:
    # The client said close but has already sent part of another head: more may be on its
    # way, and closing under it would reset the connection. So this close lingers (reads and
    # drops what comes) as any other, and still serves nothing after the close.
    from doproxy.proxy.client import DEADLINE_LINGER

    answer = asyncio.Event()
    backend = await backend_factory(holding(answer))
    proxy = await start_proxy([backend.port])
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(b"GET /last HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        await wait_for(lambda: b"/last" in backend.all_received)
        await c.send(b"GET /next HTTP/1.1\r\nHo")
        await wait_for(lambda: any(conn._in_head for conn in proxy.connections))
        answer.set()
        r = await c.response()
        assert (r.status, r.body, r.header("connection")) == (200, b"ok", b"close")
        await wait_for(
            lambda: any(conn.deadline_kind == DEADLINE_LINGER for conn in proxy.connections)
        )
        await c.send(b"st: h\r\n\r\n")  # read and dropped, not answered
        assert await c.closed()
    finally:
        await c.close()
    await wait_for(lambda: not proxy.connections)
    assert b"/next" not in backend.all_received


def _segments_in(sock: Any) -> int:
    """Segments the kernel has received on this TCP socket (struct tcp_info's tcpi_segs_in,
    at byte 140 since Linux 4.2)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("=I", info, 140)[0])


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="Linux's TCP_QUICKACK")
async def test_a_new_connections_request_is_acknowledged_by_its_answer(
    start_proxy: StartProxy, backend_factory: Callable[..., Awaitable[RawBackend]]
) -> None:
    # As HAProxy on its HTTP listeners: the proxy's kernel does not acknowledge a new
    # connection's first request in a segment of its own (its quick-ACK start); the answer
    # carries the ACK. One segment less per connection, on `Connection: close` traffic.
    got = asyncio.Event()
    answer = asyncio.Event()
    backend = await backend_factory(holding(answer, got))
    proxy = await start_proxy([backend.port])
    for listener in proxy.listening_sockets():
        for s in listener:
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 0
    # A delayed ACK goes out after 40 ms at the least (TCP_ATO_MIN): an observation counts
    # only when the backend had the request well before that. A loaded machine may need a
    # few connections to make one.
    observed = 0
    for _ in range(20):
        got.clear()
        answer.clear()
        c = await Client.connect(port_of(proxy))
        sock = c.writer.get_extra_info("socket")
        before = _segments_in(sock)  # the handshake's
        start = time.monotonic()
        await c.send(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        await asyncio.wait_for(got.wait(), 5)
        segments = _segments_in(sock)
        quick = time.monotonic() - start < 0.02
        answer.set()
        assert (await c.response()).body == b"ok"
        await c.close()
        if quick:
            # The proxy read the request and sent it on: a quick ACK would be here by now.
            assert segments == before, "the request was acknowledged on its own"
            observed += 1
            if observed == 3:
                break
    assert observed == 3, "the machine never let a request through within 20 ms"
