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
