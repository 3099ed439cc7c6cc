"""No request or response ever crosses from one exchange to another (docs/http.md).

Each test here failed before the fix it guards:
1. framing is decided once, from the request as received: a client naming Content-Length or
   Transfer-Encoding in Connection cannot strip them, so a body is never read as a request;
2. a backend connection is pooled only at a message boundary, reading, with no byte left over;
3. a bad request pipelined behind good ones is answered after them;
4. a response that cannot be delivered whole is visibly cut.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import StartProxy, port_of, wait_for
from tests.support import Client, RawBackend, RequestReader, get, respond

pytestmark = pytest.mark.timeout(30)


# --- 1. framing ----------------------------------------------------------------------------


def smuggle(framing: bytes, body: bytes, connection: bytes) -> bytes:
    return (
        b"POST /upload HTTP/1.1\r\nHost: example.test\r\n"
        + framing
        + b"Connection: "
        + connection
        + b"\r\n\r\n"
        + body
    )


INNER = b"GET /smuggled HTTP/1.1\r\nHost: example.test\r\n\r\n"
CHUNKED_INNER = b"%x\r\n%b\r\n0\r\n\r\n" % (len(INNER), INNER)


@pytest.mark.parametrize(
    ("framing", "body", "connection"),
    [
        (b"Content-Length: %d\r\n" % len(INNER), INNER, b"content-length"),
        (b"Content-Length: %d\r\n" % len(INNER), INNER, b"keep-alive, Content-Length"),
        (b"Transfer-Encoding: chunked\r\n", CHUNKED_INNER, b"transfer-encoding"),
        (b"Transfer-Encoding: chunked\r\n", CHUNKED_INNER, b"close, transfer-encoding, te"),
        (b"Content-Length: %d\r\n" % len(INNER), INNER, b"host, content-length"),
    ],
    ids=["cl", "cl-with-keep-alive", "te", "te-with-close", "host-and-cl"],
)
async def test_connection_cannot_remove_framing(
    start_proxy: StartProxy,
    backend_factory: object,
    framing: bytes,
    body: bytes,
    connection: bytes,
) -> None:
    seen: list[tuple[bytes, bytes]] = []

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: object
    ) -> None:
        rr = RequestReader(reader)
        while (req := await rr.next()) is not None:
            seen.append((req.url, req.body))
            writer.write(respond(200, b"one"))
            await writer.drain()

    backend = await backend_factory(handler)  # type: ignore[operator]
    proxy = await start_proxy([backend.port])
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(smuggle(framing, body, connection))
        r = await c.response()
        assert r.status == 200
        assert r.body == b"one"
        # The request reached the backend whole, once, with its body; nothing else did.
        assert seen == [(b"/upload", INNER)]
        assert b"/smuggled" not in bytes(backend.all_received).split(b"\r\n\r\n", 1)[0]
    finally:
        await c.close()


async def test_connection_named_ordinary_header_is_still_dropped(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(get("/", extra="Connection: x-secret\r\nX-Secret: 1\r\nX-Kept: 2\r\n"))
        r = await c.response()
        assert r.status == 200
        head = echo_backend.all_received.lower()
        assert b"x-secret" not in head
        assert b"x-kept: 2" in head
    finally:
        await c.close()


# --- 2. backend connections are pooled only when clean -------------------------------------


def scripted(*answers: bytes) -> object:
    """A keep-alive backend that answers the n-th request it gets, on any connection, with
    answers[n] (the last one repeats)."""
    count = [0]

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
    ) -> None:
        rr = RequestReader(reader)
        while await rr.next() is not None:
            writer.write(answers[min(count[0], len(answers) - 1)])
            count[0] += 1
            await writer.drain()

    return handler


STRAY = [
    ("second-response", respond(200, b"first") + respond(200, b"POISON")),
    ("partial-head", respond(200, b"first") + b"HTTP/1.1 200 OK\r\nContent-Le"),
    ("body-after-204", b"HTTP/1.1 204 No Content\r\n\r\nPOISON"),
    ("body-after-304", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 6\r\n\r\nPOISON"),
    ("junk", respond(200, b"first") + b"POISON"),
]


@pytest.mark.parametrize("answer", [a for _, a in STRAY], ids=[n for n, _ in STRAY])
async def test_bytes_after_a_response_never_reach_the_next_exchange(
    start_proxy: StartProxy, backend_factory: object, answer: bytes
) -> None:
    backend = await backend_factory(scripted(answer, respond(200, b"clean")))  # type: ignore[operator]
    proxy = await start_proxy([backend.port], {"retries": {"attempts": 0}})
    port = port_of(proxy)
    c = await Client.connect(port)
    try:
        await c.send(get("/1"))
        first = await c.response()
        assert b"POISON" not in first.body
        # The connection that carried stray bytes is never reused: the next request, from
        # this client or another, gets its own answer from a fresh backend connection.
        for path in ("/2", "/3"):
            other = await Client.connect(port)
            await other.send(get(path))
            r = await other.response()
            await other.close()
            assert r.status == 200
            assert b"POISON" not in r.body
    finally:
        await c.close()
    assert backend.connections >= 2
    b = proxy.pool.backends[0]
    await wait_for(lambda: b.protocol_errors == 1)


async def test_stray_bytes_after_head_response(
    start_proxy: StartProxy, backend_factory: object
) -> None:
    """A body after the head of a response to HEAD is a stray body: the connection closes."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON"
    backend = await backend_factory(scripted(answer, respond(200, b"clean")))  # type: ignore[operator]
    proxy = await start_proxy([backend.port])
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(b"HEAD / HTTP/1.1\r\nHost: example.test\r\n\r\n")
        r = await c.response(head_request=True)
        assert r.status == 200
        await c.send(get("/next"))
        r2 = await c.response()
        assert r2.body == b"clean"
    finally:
        await c.close()
    assert backend.connections == 2


async def test_pipelined_behind_stray_bytes(
    start_proxy: StartProxy, backend_factory: object
) -> None:
    """Pipelined requests: the second must not take the first's poisoned connection."""
    backend = await backend_factory(
        scripted(respond(200, b"first") + respond(200, b"POISON"), respond(200, b"clean"))
    )  # type: ignore[operator]
    proxy = await start_proxy([backend.port])
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(get("/1") + get("/2"))
        r1 = await c.response()
        r2 = await c.response()
        assert (r1.body, r2.body) == (b"first", b"clean")
    finally:
        await c.close()


BIG = 8 * 1024 * 1024


async def big_or_small(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
) -> None:
    rr = RequestReader(reader)
    while (req := await rr.next()) is not None:
        body = b"x" * BIG if req.url == b"/big" else b"small"
        writer.write(respond(200, body))
        await writer.drain()


async def slow_read(c: Client) -> int:
    """Read one response in small pieces with pauses, as a slow client (curl --limit-rate);
    return its body's size."""
    import httptools

    class Sink:
        size = 0
        done = False

        def on_body(self, b: bytes) -> None:
            self.size += len(b)

        def on_message_complete(self) -> None:
            self.done = True

    sink = Sink()
    parser = httptools.HttpResponseParser(sink)
    while not sink.done:
        data = await c.reader.read(64 * 1024)
        if not data:
            break
        parser.feed_data(data)
        await asyncio.sleep(0.002)  # the rate limit itself, not a wait for readiness
    return sink.size


@pytest.mark.parametrize("use_tls", [False, True], ids=["plain", "tls"])
async def test_connection_paused_by_a_slow_reader_is_pooled_reading(
    start_proxy: StartProxy, backend_factory: object, use_tls: bool, tmp_path: object
) -> None:
    """A slow reader of a large response pauses the backend connection for backpressure; when
    the response ends, the connection goes back to the pool reading again, so the next
    request on it is answered (it used to hang until the response-header timeout)."""
    import ssl
    from pathlib import Path

    import trustme

    from doproxy.proxy.server import make_tls_context

    backend = await backend_factory(big_or_small)  # type: ignore[operator]
    server_ctx = client_ctx = None
    if use_tls:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        d = Path(str(tmp_path))
        cert.private_key_and_cert_chain_pem.write_to_path(d / "both.pem")
        server_ctx = make_tls_context(str(d / "both.pem"), str(d / "both.pem"))
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
    proxy = await start_proxy(
        [backend.port], {"timeouts": {"response-header": "2s"}}, ssl_context=server_ctx
    )
    port = port_of(proxy)
    kw = {"ssl": client_ctx, "server_hostname": "127.0.0.1"} if use_tls else {}
    for _ in range(3):
        slow = await Client.connect(port, **kw)
        await slow.send(get("/big"))
        assert await slow_read(slow) == BIG
        await slow.close()
        fresh = await Client.connect(port, **kw)
        await fresh.send(get("/small"))
        r = await asyncio.wait_for(fresh.response(), 10)
        await fresh.close()
        assert (r.status, r.body) == (200, b"small")
    assert all(not up.paused for up in proxy.pool.backends[0].idle)


# --- 3. pipelined requests: in order, a bad one answered last ------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        b"GET /bad HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"POST /bad HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"NOT HTTP\r\n\r\n",
    ],
    ids=["two-hosts", "bad-chunk", "garbage"],
)
async def test_bad_request_after_good_ones_is_answered_after_them(
    start_proxy: StartProxy, echo_backend: RawBackend, bad: bytes
) -> None:
    proxy = await start_proxy([echo_backend.port])
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(get("/1") + get("/2") + bad)
        async with asyncio.timeout(5):
            data = await c.reader.read(1 << 20)
            while not data.endswith(b"400 Bad Request\n"):
                more = await c.reader.read(1 << 20)
                assert more, data
                data += more
        one, two, last = data.find(b"GET /1 "), data.find(b"GET /2 "), data.find(b"HTTP/1.1 400")
        assert 0 < one < two < last
        assert await c.closed()
    finally:
        await c.close()
    assert b"/bad" not in echo_backend.all_received


# --- 4. cuts are visible -------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-part",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nonly-part\r\n",
    ],
    ids=["short-content-length", "chunked-without-end"],
)
async def test_backend_closing_mid_response_is_a_visible_cut(
    start_proxy: StartProxy, backend_factory: object, answer: bytes
) -> None:
    async def cut(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
    ) -> None:
        await RequestReader(reader).next()
        writer.write(answer)
        await writer.drain()
        writer.transport.abort()  # a reset mid-message

    backend = await backend_factory(cut)  # type: ignore[operator]
    proxy = await start_proxy([backend.port])
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(get())
        with pytest.raises((EOFError, ConnectionResetError)):
            await asyncio.wait_for(c.response(), 5)  # never a complete message
    finally:
        await c.close()
