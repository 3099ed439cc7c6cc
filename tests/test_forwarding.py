"""Targets, Host, forwarding headers, header count and the PROXY protocol, end to end: what
the backend receives (RawBackend records every byte), on both request lanes.

A request in one write takes the express lane; the same request cut inside its head takes the
general path (see test_lanes.py). Every rule must hold on both.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest
from pydantic import ValidationError

from doproxy.core.settings import Settings
from doproxy.proxy.server import ProxyServer
from tests.conftest import StartProxy, port_of, wait_for
from tests.support import Client, RawBackend, Response
from tests.test_forwarding_rules import INVALID_HOSTS

LANES = ["express", "general"]


def _mid_head(proxy: ProxyServer) -> bool:
    return any(conn._in_head for conn in proxy.connections)


async def send(proxy: ProxyServer, raw: bytes, lane: str) -> Response | None:
    """Send one request on a new connection by `lane`; its response, or None when the proxy
    closed the connection without one."""
    c = await Client.connect(port_of(proxy))
    try:
        if lane == "express":
            await c.send(raw)
        else:
            cut = raw.index(b"\r\n", 2) + 3  # inside the head (after the request line)
            await c.send(raw[:cut])
            await wait_for(lambda: _mid_head(proxy))
            await c.send(raw[cut:])
        try:
            return await c.response()
        except (EOFError, ConnectionResetError):
            return None
    finally:
        await c.close()


def head_of(backend: RawBackend) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The request line and header fields (names lower-cased) of the one request received."""
    head = backend.all_received.split(b"\r\n\r\n")[0]
    first, *lines = head.split(b"\r\n")
    fields = []
    for line in lines:
        name, _, value = line.partition(b":")
        fields.append((name.lower(), value.strip()))
    return first, fields


def values(fields: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in fields if n == name]


# --- Targets and Host ---------------------------------------------------------------------


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize(
    ("target", "origin", "host"),
    [
        (b"http://example.com:8080/p?q", b"/p?q", b"example.com:8080"),
        (b"http://example.com", b"/", b"example.com"),
        (b"https://Example.com?x=1", b"/?x=1", b"Example.com"),
    ],
)
async def test_absolute_form_becomes_origin_form(
    lane: str,
    target: bytes,
    origin: bytes,
    host: bytes,
    start_proxy: StartProxy,
    echo_backend: RawBackend,
) -> None:
    proxy = await start_proxy([echo_backend.port])
    raw = b"GET " + target + b" HTTP/1.1\r\nHost: other.test\r\nX-A: 1\r\n\r\n"
    r = await send(proxy, raw, lane)
    assert r is not None and r.status == 200
    first, fields = head_of(echo_backend)
    assert first == b"GET " + origin + b" HTTP/1.1"
    # RFC 9112 3.2.2: the target's authority replaces the Host header.
    assert values(fields, b"host") == [host]
    assert values(fields, b"x-forwarded-host") == [host]
    assert b"other.test" not in echo_backend.all_received


@pytest.mark.parametrize("lane", LANES)
async def test_options_asterisk_passes(
    lane: str, start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])
    r = await send(proxy, b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", lane)
    assert r is not None and r.status == 200
    assert head_of(echo_backend)[0] == b"OPTIONS * HTTP/1.1"


BAD_REQUESTS = [
    b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n",  # HTTP/1.1 without Host
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
    b"GET http://a/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET http://a/ HTTP/1.1\r\nHost:\r\n\r\n",  # empty Host with an authority
    b"GET / HTTP/1.1\r\nHost:\r\n\r\n",  # empty Host, origin-form: invalid too
    b"GET * HTTP/1.1\r\nHost: h\r\n\r\n",  # "*" is for OPTIONS only
    b"GET ftp://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET http://u@h/ HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET http:///p HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET http://h:x/ HTTP/1.1\r\nHost: h\r\n\r\n",
] + [
    # Every Host the validator refuses (tests/test_forwarding_rules.py), end to end; the empty
    # one is above, with and without an authority in the target.
    b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    for host in INVALID_HOSTS
    if host
]


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("raw", BAD_REQUESTS, ids=lambda r: repr(r.split(b"\r\n\r\n")[0]))
async def test_bad_target_or_host_is_400_and_nothing_forwarded(
    lane: str, raw: bytes, start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])
    r = await send(proxy, raw, lane)
    assert r is not None and r.status == 400
    assert echo_backend.all_received == b""


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("host", [b"h", b"[::1]:8080", b"127.0.0.1:80", b"a_b.test", b"h,i"])
async def test_valid_host_passes(
    lane: str, host: bytes, start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])
    r = await send(proxy, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nX-A: 1\r\n\r\n", lane)
    assert r is not None and r.status == 200
    assert values(head_of(echo_backend)[1], b"host") == [host]


async def test_http10_without_host_is_accepted(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])
    for lane in LANES:
        r = await send(proxy, b"GET / HTTP/1.0\r\nX-A: 1\r\n\r\n", lane)
        assert r is not None and r.status == 200
    assert echo_backend.all_received.count(b"Host: 127.0.0.1:") == 2


async def test_leading_empty_lines_are_ignored(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])
    c = await Client.connect(port_of(proxy))
    # First request of a connection, one write: the express lane sees past the CRLF.
    await c.send(b"\r\nGET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await c.response()).body == b"GET /1 len=0"
    assert proxy.express_requests == 1
    # Between keep-alive requests, alone in a write, then the request.
    await c.send(b"\r\n")
    await c.send(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await c.response()).body == b"GET /2 len=0"
    # An empty line alone that looks like the end of a head must not be taken for one.
    await c.send(b"\r\n\r\n")
    await c.send(b"GET /3 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await c.response()).body == b"GET /3 len=0"
    # After a body, pipelined in the same write (a client's stray CRLF after a POST).
    await c.send(
        b"POST /4 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nab\r\n"
        b"GET /5 HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    assert (await c.response()).body == b"POST /4 len=2"
    assert (await c.response()).body == b"GET /5 len=0"
    await c.close()
    sent = echo_backend.all_received
    firsts = [line for line in sent.split(b"\r\n") if line.endswith(b" HTTP/1.1")]
    assert firsts == [
        b"GET /1 HTTP/1.1",
        b"GET /2 HTTP/1.1",
        b"GET /3 HTTP/1.1",
        b"POST /4 HTTP/1.1",
        b"abGET /5 HTTP/1.1",  # "ab" is the body before it
    ]
    assert b"\r\n\r\n\r\n" not in sent  # no empty line reached the backend
    assert not sent.startswith(b"\r\n")


# --- Header count -------------------------------------------------------------------------


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize(("count", "status"), [(5, 200), (6, 431)])
async def test_max_header_count(
    lane: str, count: int, status: int, start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port], {"limits": {"max-header-count": 5}})
    extra = b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(count - 1))
    r = await send(proxy, b"GET / HTTP/1.1\r\nHost: h\r\n" + extra + b"\r\n", lane)
    assert r is not None and r.status == status
    assert (echo_backend.all_received == b"") == (status == 431)


async def test_default_max_header_count_is_100(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(100))  # 101 with Host
    for lane in LANES:
        r = await send(proxy, b"GET / HTTP/1.1\r\nHost: h\r\n" + many + b"\r\n", lane)
        assert r is not None and r.status == 431
    assert echo_backend.all_received == b""


# --- Forwarding headers -------------------------------------------------------------------

SPOOFED = (
    b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n"
    b"X-Forwarded-Port: 666\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6;host=evil\r\n"
    b"X_Forwarded_For: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\n"
)


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("mode", ["x-forwarded", "rfc7239", "both"])
async def test_untrusted_client_cannot_forge_forwarding_headers(
    lane: str, mode: str, start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port], {"forwarded-header": mode})
    raw = b"GET / HTTP/1.1\r\nHost: app.test\r\n" + SPOOFED + b"\r\n"
    r = await send(proxy, raw, lane)
    assert r is not None and r.status == 200
    assert b"6.6.6.6" not in echo_backend.all_received
    assert b"evil" not in echo_backend.all_received
    assert b"666" not in echo_backend.all_received
    _, fields = head_of(echo_backend)
    names = [n for n, _ in fields]
    assert not any(b"_" in n for n in names)
    port = str(port_of(proxy)).encode()
    x = {
        b"x-forwarded-for": [b"127.0.0.1"],
        b"x-forwarded-proto": [b"http"],
        b"x-forwarded-host": [b"app.test"],
        b"x-forwarded-port": [port],
        b"x-real-ip": [b"127.0.0.1"],
    }
    rfc = {b"forwarded": [b'for=127.0.0.1;proto=http;host="app.test"']}
    want = {**(x if mode != "rfc7239" else {}), **(rfc if mode != "x-forwarded" else {})}
    got = {n: values(fields, n) for n in (*x, *rfc) if values(fields, n)}
    assert got == want


@pytest.mark.parametrize("lane", LANES)
async def test_trusted_proxy_headers_are_appended_to(
    lane: str, start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy(
        [echo_backend.port], {"trusted-proxies": ["127.0.0.0/8"], "forwarded-header": "both"}
    )
    raw = (
        b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: 203.0.113.9, 10.0.0.2\r\n"
        b"X-Forwarded-For: 10.0.0.3\r\nX-Real-IP: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n"
        b"Forwarded: for=203.0.113.9;proto=https\r\n\r\n"
    )
    r = await send(proxy, raw, lane)
    assert r is not None and r.status == 200
    _, fields = head_of(echo_backend)
    assert values(fields, b"x-forwarded-for") == [b"203.0.113.9, 10.0.0.2, 10.0.0.3, 127.0.0.1"]
    assert values(fields, b"x-real-ip") == [b"203.0.113.9"]  # kept as sent
    assert values(fields, b"x-forwarded-proto") == [b"https"]  # kept as sent
    assert values(fields, b"x-forwarded-host") == [b"app.test"]  # absent: the proxy's own
    assert values(fields, b"x-forwarded-port") == [str(port_of(proxy)).encode()]
    assert values(fields, b"forwarded") == [
        b'for=203.0.113.9;proto=https, for=127.0.0.1;proto=http;host="app.test"'
    ]


async def test_trusted_list_that_does_not_match_is_untrusted(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port], {"trusted-proxies": ["10.0.0.0/8", "::1"]})
    r = await send(
        proxy, b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n", "express"
    )
    assert r is not None and r.status == 200
    assert values(head_of(echo_backend)[1], b"x-forwarded-for") == [b"127.0.0.1"]


@pytest.mark.parametrize("lane", LANES)
async def test_underscores_allowed_by_setting(
    lane: str, start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port], {"allow-underscores-in-headers": True})
    r = await send(proxy, b"GET / HTTP/1.1\r\nHost: h\r\nX_Custom: 1\r\n\r\n", lane)
    assert r is not None and r.status == 200
    assert values(head_of(echo_backend)[1], b"x_custom") == [b"1"]


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize(
    ("request_head", "via"),
    [
        (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n", b"1.1 doproxy"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nVia: 1.0 corp\r\n\r\n", b"1.0 corp, 1.1 doproxy"),
        (b"GET / HTTP/1.0\r\nHost: h\r\nX-A: 1\r\n\r\n", b"1.0 doproxy"),
        (b"GET / HTTP/1.0\r\nX-A: 1\r\n\r\n", b"1.0 doproxy"),
    ],
)
async def test_via(
    lane: str,
    request_head: bytes,
    via: bytes,
    start_proxy: StartProxy,
    echo_backend: RawBackend,
) -> None:
    proxy = await start_proxy([echo_backend.port], {"via": True})
    r = await send(proxy, request_head, lane)
    assert r is not None and r.status == 200
    assert values(head_of(echo_backend)[1], b"via") == [via]


async def test_via_off_passes_the_clients(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])
    for lane in LANES:
        await send(proxy, b"GET / HTTP/1.1\r\nHost: h\r\nVia: 1.0 corp\r\n\r\n", lane)
    assert echo_backend.all_received.count(b"Via: 1.0 corp\r\n") == 2
    assert b"doproxy" not in echo_backend.all_received


# --- PROXY protocol -----------------------------------------------------------------------

PP: dict[str, Any] = {"proxy-protocol": True, "trusted-proxies": ["127.0.0.1"]}
GET = b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"


def v2(src: str, command: int = 1) -> bytes:
    addr = ipaddress.ip_address(src)
    family = 0x11 if addr.version == 4 else 0x21
    block = addr.packed + addr.packed + (51000).to_bytes(2, "big") + (80).to_bytes(2, "big")
    block += b"\x04\x00\x03abc"  # a TLV, skipped
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    return sig + bytes([0x20 | command, family]) + len(block).to_bytes(2, "big") + block


def _waiting_for_proxy_header(proxy: ProxyServer) -> bool:
    return any(conn._proxy_buf for conn in proxy.connections)


async def _via_proxy_protocol(proxy: ProxyServer, parts: list[bytes]) -> Client:
    c = await Client.connect(port_of(proxy))
    for k, part in enumerate(parts):
        await c.send(part)
        if k < len(parts) - 1:
            await wait_for(lambda: _waiting_for_proxy_header(proxy))  # read on its own
    return c


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 80\r\n", b"203.0.113.7"),
        (b"PROXY TCP6 2001:db8::7 ::1 51000 80\r\n", b"2001:db8::7"),
        (v2("203.0.113.7"), b"203.0.113.7"),
        (v2("2001:db8::7"), b"2001:db8::7"),
        # A client the balancer cannot name: the balancer's address, and the client's
        # headers are not believed.
        (b"PROXY UNKNOWN\r\n", b"127.0.0.1"),
    ],
)
@pytest.mark.parametrize("split", [False, True])
async def test_proxy_protocol_gives_the_client_address(
    header: bytes, client: bytes, split: bool, start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port], {**PP, "forwarded-header": "both"})
    parts = [header[:5], header[5:], GET] if split else [header + GET]
    c = await _via_proxy_protocol(proxy, parts)
    assert (await c.response()).status == 200
    await c.send(GET)  # the header comes once per connection
    assert (await c.response()).status == 200
    await c.close()
    sent = echo_backend.all_received
    assert sent.count(b"X-Forwarded-For: " + client + b"\r\n") == 2
    assert sent.count(b"X-Real-IP: " + client + b"\r\n") == 2
    assert b"6.6.6.6" not in sent  # the client behind the balancer is not trusted
    assert b"PROXY" not in sent and b"QUIT" not in sent
    node = b'"[' + client + b']"' if b":" in client else client
    assert sent.count(b"Forwarded: for=" + node + b";proto=http") == 2


async def test_proxy_local_is_the_trusted_balancer_itself(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    # v2 LOCAL (a health check from the balancer): its own address, and it is trusted.
    proxy = await start_proxy([echo_backend.port], PP)
    c = await _via_proxy_protocol(proxy, [v2("203.0.113.7", command=0) + GET])
    assert (await c.response()).status == 200
    await c.close()
    assert values(head_of(echo_backend)[1], b"x-forwarded-for") == [b"6.6.6.6, 127.0.0.1"]


@pytest.mark.parametrize(
    "data",
    [
        GET,  # missing
        b"PROXY TCP4 203.0.113.7 127.0.0.1 51000\r\n" + GET,
        b"PROXY TCP4 nope 127.0.0.1 51000 80\r\n" + GET,
        b"PROXY " + b"1" * 120 + b"\r\n" + GET,
        v2("203.0.113.7")[:12] + b"\x22\x11\x00\x0c" + bytes(12) + GET,  # bad command
        b"\r\n" + GET,
    ],
)
async def test_bad_or_missing_proxy_header_closes(
    data: bytes, start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port], PP)
    c = await Client.connect(port_of(proxy))
    await c.send(data)
    assert await c.closed()
    assert c.buffered == b""
    await c.close()
    assert echo_backend.all_received == b""


async def test_proxy_header_split_then_bad_closes(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port], PP)
    c = await _via_proxy_protocol(proxy, [b"PROXY TCP4 1.2", b".3.4 x\r\n" + GET])
    assert await c.closed()
    await c.close()
    assert echo_backend.all_received == b""


async def test_untrusted_peers_speak_http_without_proxy_header(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy(
        [echo_backend.port], {"proxy-protocol": True, "trusted-proxies": ["10.0.0.0/8"]}
    )
    r = await send(proxy, GET, "express")
    assert r is not None and r.status == 200
    # And they cannot claim an address with one: it is not HTTP.
    r = await send(proxy, b"PROXY TCP4 203.0.113.7 127.0.0.1 1 80\r\n" + GET, "express")
    assert r is not None and r.status == 400
    assert b"203.0.113.7" not in echo_backend.all_received
    assert values(head_of(echo_backend)[1], b"x-forwarded-for") == [b"127.0.0.1"]


async def test_proxy_protocol_address_drives_hash_balancing(
    start_proxy: StartProxy, backend_factory: Any
) -> None:
    from tests.support import echo_handler

    backends = [await backend_factory(echo_handler) for _ in range(4)]
    proxy = await start_proxy([b.port for b in backends], {**PP, "loadbalancing": {"type": "hash"}})
    for k in range(8):
        c = await _via_proxy_protocol(
            proxy, [b"PROXY TCP4 203.0.113.%d 127.0.0.1 1 80\r\n" % (k % 4) + GET]
        )
        assert (await c.response()).status == 200
        await c.close()
    # Each PROXY client address goes to one backend every time, and the addresses (not the
    # balancer's one address) spread over the backends.
    where = {
        ip: [k for k, b in enumerate(backends) if b"X-Real-IP: " + ip + b"\r\n" in b.all_received]
        for ip in (b"203.0.113.%d" % k for k in range(4))
    }
    assert all(len(ks) == 1 for ks in where.values()), where
    assert len({ks[0] for ks in where.values()}) > 1, where


def test_config_errors() -> None:
    with pytest.raises(ValidationError, match="only without https"):
        Settings.model_validate(
            {
                "https": True,
                "tls-cert-file": "c",
                "tls-key-file": "k",
                "proxy-protocol": True,
                "trusted-proxies": ["10.0.0.1"],
            }
        )
    with pytest.raises(ValidationError, match="needs trusted-proxies"):
        Settings.model_validate({"proxy-protocol": True})
    with pytest.raises(ValidationError, match="trusted-proxies"):
        Settings.model_validate({"trusted-proxies": ["10.0.0.300/8"]})
    with pytest.raises(ValidationError, match="forwarded-header"):
        Settings.model_validate({"forwarded-header": "x-real-ip"})


async def test_malformed_proxy_header_never_blocks_the_loop(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    # A v2 header that announces more than the bound is refused at once, not awaited.
    proxy = await start_proxy([echo_backend.port], PP)
    c = await Client.connect(port_of(proxy))
    await c.send(b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff")
    assert await asyncio.wait_for(c.closed(), 5)
    await c.close()
