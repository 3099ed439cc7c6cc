"""Malformed and ambiguous requests are answered by the proxy itself and never reach a backend.

Each bad request is sent in one write; the proxy must answer with the right status, close the
connection, and forward nothing: the backend records every byte and every connection it gets.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import StartProxy, port_of
from tests.support import Client, RawBackend, Response, get, request

HOST = "Host: example.test\r\n"

MALFORMED: list[tuple[str, bytes, int]] = [
    (
        "content-length-and-transfer-encoding",
        b"POST / HTTP/1.1\r\n" + HOST.encode() + b"Content-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    (
        "two-content-length-same",
        b"POST / HTTP/1.1\r\n" + HOST.encode() + b"Content-Length: 3\r\n"
        b"Content-Length: 3\r\n\r\nabc",
        400,
    ),
    (
        "two-content-length-different",
        b"POST / HTTP/1.1\r\n" + HOST.encode() + b"Content-Length: 3\r\n"
        b"Content-Length: 5\r\n\r\nabcde",
        400,
    ),
    (
        "content-length-list",
        b"POST / HTTP/1.1\r\n" + HOST.encode() + b"Content-Length: 3, 3\r\n\r\nabc",
        400,
    ),
    (
        "transfer-encoding-gzip",
        b"POST / HTTP/1.1\r\n" + HOST.encode() + b"Transfer-Encoding: gzip\r\n\r\nabc",
        400,
    ),
    (
        "transfer-encoding-chunked-then-gzip",
        b"POST / HTTP/1.1\r\n" + HOST.encode() + b"Transfer-Encoding: chunked, gzip\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (
        "transfer-encoding-gzip-then-chunked",
        b"POST / HTTP/1.1\r\n" + HOST.encode() + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        501,
    ),
    (
        # The same codings as two fields: the list is their concatenation, gzip then chunked.
        "transfer-encoding-gzip-then-chunked-two-fields",
        b"POST / HTTP/1.1\r\n" + HOST.encode() + b"Transfer-Encoding: gzip\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        501,
    ),
    (
        "transfer-encoding-chunked-then-gzip-two-fields",
        b"POST / HTTP/1.1\r\n" + HOST.encode() + b"Transfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (
        "bad-chunk-size",
        b"POST / HTTP/1.1\r\n" + HOST.encode() + b"Transfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (
        "obs-fold",
        b"GET / HTTP/1.1\r\n" + HOST.encode() + b"X-A: one\r\n two\r\n\r\n",
        400,
    ),
    ("nul-in-value", b"GET / HTTP/1.1\r\n" + HOST.encode() + b"X-A: a\x00b\r\n\r\n", 400),
    ("bare-cr-in-value", b"GET / HTTP/1.1\r\n" + HOST.encode() + b"X-A: a\rb\r\n\r\n", 400),
    ("bare-lf-in-value", b"GET / HTTP/1.1\r\n" + HOST.encode() + b"X-A: a\nb\r\n\r\n", 400),
    ("space-in-name", b"GET / HTTP/1.1\r\n" + HOST.encode() + b"X A: b\r\n\r\n", 400),
    ("at-in-name", b"GET / HTTP/1.1\r\n" + HOST.encode() + b"X@A: b\r\n\r\n", 400),
    ("space-before-colon", b"GET / HTTP/1.1\r\n" + HOST.encode() + b"X-A : b\r\n\r\n", 400),
    ("http11-without-host", b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n", 400),
    (
        "two-host-headers",
        b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        400,
    ),
    (
        "transfer-encoding-in-http10",
        b"POST / HTTP/1.0\r\n" + HOST.encode() + b"Transfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (
        "connect",
        b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n",
        405,
    ),
    (
        "expect-unknown",
        b"GET / HTTP/1.1\r\n" + HOST.encode() + b"Expect: something-else\r\n\r\n",
        417,
    ),
    ("http09-request-line", b"GET /\r\n\r\n", 400),
]


async def rejected(port: int, raw: bytes, status: int) -> Response:
    """Send `raw` in one write; the proxy must answer `status` and then close the connection."""
    c = await Client.connect(port)
    try:
        await c.send(raw)
        async with asyncio.timeout(5):
            r = await c.response()
        assert r.status == status, r
        assert r.header("Connection") == b"close"
        assert await c.closed(timeout=2), "the proxy must close the connection after rejecting"
        return r
    finally:
        await c.close()


def assert_nothing_forwarded(backend: RawBackend) -> None:
    assert backend.connections == 0
    assert backend.all_received == b""


@pytest.mark.parametrize(
    ("raw", "status"), [(r, s) for _, r, s in MALFORMED], ids=[n for n, _, _ in MALFORMED]
)
async def test_malformed_request_is_rejected_and_not_forwarded(
    start_proxy: StartProxy, echo_backend: RawBackend, raw: bytes, status: int
) -> None:
    proxy = await start_proxy([echo_backend.port])
    await rejected(port_of(proxy), raw, status)
    assert_nothing_forwarded(echo_backend)


async def test_over_long_headers_get_431(start_proxy: StartProxy, echo_backend: RawBackend) -> None:
    proxy = await start_proxy([echo_backend.port], {"limits": {"max-header-bytes": 2048}})
    raw = get("/", extra="X-Big: " + "a" * 3000 + "\r\n")
    await rejected(port_of(proxy), raw, 431)
    assert_nothing_forwarded(echo_backend)


async def test_over_long_headers_get_431_at_default_limit(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])
    # 40 KiB of headers in many fields, over the default 32 KiB limit.
    extra = "".join(f"X-Field-{i}: {'b' * 1000}\r\n" for i in range(40))
    await rejected(port_of(proxy), get("/", extra=extra), 431)
    assert_nothing_forwarded(echo_backend)


async def test_headers_just_under_the_limit_are_accepted(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    # The counterpart of the 431 tests: the limit is not simply "any big head".
    proxy = await start_proxy([echo_backend.port], {"limits": {"max-header-bytes": 2048}})
    r = await request(port_of(proxy), get("/", extra="X-Big: " + "a" * 1500 + "\r\n"))
    assert r.status == 200
    assert b"X-Big: " + b"a" * 1500 + b"\r\n" in echo_backend.all_received


async def test_over_long_url_gets_414(start_proxy: StartProxy, echo_backend: RawBackend) -> None:
    proxy = await start_proxy([echo_backend.port])
    await rejected(port_of(proxy), get("/" + "u" * 9000), 414)
    assert_nothing_forwarded(echo_backend)


async def test_slow_header_block_over_limit_gets_431(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port], {"limits": {"max-header-bytes": 2048}})
    c = await Client.connect(port_of(proxy))
    try:
        head = b"GET / HTTP/1.1\r\n" + HOST.encode()
        await c.send(head)
        # A slow client: one 412-byte header line per write (each far under the limit), never
        # finishing the head. The pause between writes is the behaviour under test (a trickling
        # client), not a readiness wait. The writes stop as soon as the total passes the limit:
        # writing on after the proxy closed would draw a reset that hides its answer.
        sent = len(head)
        i = 0
        while sent <= 2048:
            line = f"X-Slow-{i:02d}: {'s' * 398}\r\n".encode()
            await c.send(line)
            sent += len(line)
            i += 1
            await asyncio.sleep(0.02)
        assert i > 3  # the limit was crossed over several writes
        async with asyncio.timeout(5):
            r = await c.response()
        assert r.status == 431
        assert await c.closed()
    finally:
        await c.close()
    assert_nothing_forwarded(echo_backend)


async def test_incomplete_head_times_out_with_408(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port], {"timeouts": {"client-header": "0.3s"}})
    loop = asyncio.get_running_loop()
    c = await Client.connect(port_of(proxy))
    try:
        started = loop.time()
        await c.send(b"GET / HTTP/1.1\r\nHost: example.test\r\nX-Half: ")
        async with asyncio.timeout(3):
            r = await c.response()
        elapsed = loop.time() - started
        assert r.status == 408
        assert await c.closed()
    finally:
        await c.close()
    # Not before the configured timeout, and not much after it (the sweep runs every 0.1 s).
    assert 0.25 <= elapsed < 2.0
    assert_nothing_forwarded(echo_backend)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\n" + HOST.encode() + b"X A: b\r\n\r\n",
        b"POST / HTTP/1.1\r\n" + HOST.encode() + b"Content-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ],
    ids=["bad-header-name", "cl-and-te"],
)
async def test_valid_request_after_a_rejected_one_works(
    start_proxy: StartProxy, echo_backend: RawBackend, raw: bytes
) -> None:
    proxy = await start_proxy([echo_backend.port])
    port = port_of(proxy)
    await rejected(port, raw, 400)
    r = await request(port, get("/after", host="app.example"))
    assert r.status == 200
    assert r.body == b"GET /after len=0"
    # The backend saw the good request only.
    assert echo_backend.connections == 1
    assert echo_backend.all_received.startswith(b"GET /after HTTP/1.1\r\n")
    assert b"X A" not in echo_backend.all_received
    assert b"abc" not in echo_backend.all_received
