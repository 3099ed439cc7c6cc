"""The pure rules of doproxy/core/forwarding.py: Host, absolute-form, Forwarded, PROXY headers."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from doproxy.core.forwarding import (
    PROXY_BAD,
    PROXY_MORE,
    PROXY_V2_MAX,
    Hop,
    forwarded_node,
    is_trusted,
    origin_form,
    parse_networks,
    parse_proxy_header,
    valid_host,
)

VALID_HOSTS = [
    b"h",
    b"example.com",
    b"example.com:8080",
    b"127.0.0.1",
    b"127.0.0.1:80",
    b"[::1]",
    b"[2001:db8::1]:443",
    b"a_b.test",  # "_" is unreserved
    b"%41bc",
    b"xn--e1afmkfd.test",
    b"%41:80",
    b"h:0",
    b"[::1]:65535",
]
INVALID_HOSTS = [
    b"",
    b"a b",
    b"user@h",
    b"h/p",
    b"h:x",
    b"h:",
    b"h:123456",
    b":80",
    b"h:80:80",
    b"[::1",
    b"[zz]",
    b"[::1]x",
    b"[::1]:",
    b"[fe80::1%25eth0]",
    b"%zz",
    b"%4",
    b'a"b',
    b"a\\b",
    b"h?x",
    b"h#x",
    b"\xc3\xa9.test",
    b"h:8a",
    b"[::1]:8a",
    b"[::1]:123456",
    b"%4:80",
    b"h\x00",
    b"h\x7f",
    b"\xff",
]


@pytest.mark.parametrize("host", VALID_HOSTS)
def test_valid_hosts(host: bytes) -> None:
    assert valid_host(host)


@pytest.mark.parametrize("host", INVALID_HOSTS)
def test_invalid_hosts(host: bytes) -> None:
    assert not valid_host(host)


def reference_valid_host(value: bytes) -> bool:
    """valid_host as it was written before its byte-table loop (partition and translate)."""
    reg_name = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=%"
    if not value:
        return False
    if value[0] == 91:
        end = value.find(b"]")
        if end < 0 or 37 in value[:end]:
            return False
        try:
            ipaddress.IPv6Address(value[1:end].decode("ascii"))
        except ValueError:
            return False
        rest = value[end + 1 :]
        if not rest:
            return True
        if rest[0] != 58:
            return False
        port = rest[1:]
    else:
        host, colon, port = value.partition(b":")
        if not host or host.translate(None, reg_name):
            return False
        i = host.find(b"%")
        while i >= 0:
            pair = host[i + 1 : i + 3]
            if len(pair) != 2 or pair.translate(None, b"0123456789abcdefABCDEF"):
                return False
            i = host.find(b"%", i + 3)
        if not colon:
            return True
    return 0 < len(port) <= 5 and not port.translate(None, b"0123456789")


@given(
    st.binary(max_size=24)
    | st.lists(st.sampled_from(list(b"aZ09-.%:[]f1@ _\xff")), max_size=16).map(bytes)
)
def test_valid_host_agrees_with_the_partition_rules(value: bytes) -> None:
    assert valid_host(value) == reference_valid_host(value)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"http://example.com:8080/p?q", (b"/p?q", b"example.com:8080")),
        (b"http://example.com", (b"/", b"example.com")),
        (b"HTTPS://example.com?q=1", (b"/?q=1", b"example.com")),
        (b"http://[::1]:81/x", (b"/x", b"[::1]:81")),
    ],
)
def test_origin_form(target: bytes, expected: tuple[bytes, bytes]) -> None:
    assert origin_form(target) == expected


@pytest.mark.parametrize(
    "target",
    [b"ftp://h/", b"http:///p", b"http://u@h/", b"http://h:x/", b"h/p", b"//h/p", b"http://h/#f"],
)
def test_origin_form_refuses(target: bytes) -> None:
    with pytest.raises(ValueError):
        origin_form(target)


def test_trusted_networks() -> None:
    nets = parse_networks(["127.0.0.0/8", "10.1.2.3", "2001:db8::/32", "192.168.1.7/16"])
    assert nets[1] == ipaddress.ip_network("10.1.2.3/32")
    assert nets[3] == ipaddress.ip_network("192.168.0.0/16")  # host bits ignored
    assert is_trusted("127.9.9.9", nets)
    assert is_trusted("::ffff:127.0.0.1", nets)  # a dual-stack listener's IPv4 client
    assert is_trusted("2001:db8::5", nets)
    assert not is_trusted("10.1.2.4", nets)
    assert not is_trusted("", nets)
    assert not is_trusted("127.0.0.1", ())


def test_forwarded_node() -> None:
    assert forwarded_node(b"192.0.2.1") == b"192.0.2.1"
    assert forwarded_node(b"2001:db8::1") == b'"[2001:db8::1]"'
    assert forwarded_node(b"") == b"unknown"


def _lines(block: bytes) -> list[bytes]:
    return [line for line in block.split(b"\r\n") if line]


def test_hop_headers_by_mode() -> None:
    x = Hop("x-forwarded", True, False, b"192.0.2.1", b"http", b"8000")
    assert _lines(x.headers(b"h")) == [
        b"X-Forwarded-For: 192.0.2.1",
        b"X-Forwarded-Proto: http",
        b"X-Forwarded-Host: h",
        b"X-Forwarded-Port: 8000",
        b"X-Real-IP: 192.0.2.1",
    ]
    rfc = Hop("rfc7239", True, False, b"2001:db8::1", b"https", b"443")
    assert _lines(rfc.headers(b"h:1")) == [b'Forwarded: for="[2001:db8::1]";proto=https;host="h:1"']
    both = Hop("both", False, True, b"192.0.2.1", b"http", b"80")
    got = _lines(both.headers(b"h", b"1.0", via=b"1.1 corp"))
    assert b'Forwarded: for=192.0.2.1;proto=http;host="h"' in got
    assert b"Via: 1.1 corp, 1.0 doproxy" in got
    assert not any(line.startswith(b"X-Forwarded-For") for line in got)  # add-x-forwarded-for


def test_hop_appends_to_a_trusted_proxy() -> None:
    hop = Hop("both", True, False, b"192.0.2.1", b"http", b"80")
    sent = {
        b"x-forwarded-for": b"203.0.113.9",
        b"x-real-ip": b"203.0.113.9",
        b"x-forwarded-proto": b"https",
        b"forwarded": b"for=203.0.113.9",
    }
    got = _lines(hop.headers(b"h", sent=sent))
    assert b"X-Forwarded-For: 203.0.113.9, 192.0.2.1" in got
    assert b"X-Real-IP: 203.0.113.9" in got
    assert b"X-Forwarded-Proto: https" in got
    assert b"X-Forwarded-Host: h" in got  # absent: the proxy's own
    assert b'Forwarded: for=203.0.113.9, for=192.0.2.1;proto=http;host="h"' in got
    # A family the proxy does not emit passes from a trusted proxy as sent.
    rfc = Hop("rfc7239", True, False, b"192.0.2.1", b"http", b"80")
    got = _lines(rfc.headers(b"h", sent=sent))
    assert b"X-Forwarded-For: 203.0.113.9" in got
    assert b"X-Forwarded-Host: h" not in got


def test_express_parts_match_the_headers() -> None:
    hop = Hop("both", True, True, b"192.0.2.1", b"http", b"80")
    assert b"example.test".join(hop.parts) == hop.headers(b"example.test") + b"\r\n"
    assert b"h".join(hop.parts_10) == hop.headers(b"h", b"1.0") + b"\r\n"
    assert hop.no_host == hop.headers(None, b"1.0") + b"\r\n"


V1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 80\r\n"


def v2(command: int = 1, family: int = 0x11, block: bytes | None = None) -> bytes:
    if block is None:
        block = bytes([203, 0, 113, 7, 192, 0, 2, 1]) + (51000).to_bytes(2, "big") + b"\x00P"
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    return sig + bytes([0x20 | command, family]) + len(block).to_bytes(2, "big") + block


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (V1, "203.0.113.7"),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443\r\n", "2001:db8::7"),
        (b"PROXY UNKNOWN\r\n", ""),
        (b"PROXY UNKNOWN ::1 ::2 1 2\r\n", ""),
        (v2(), "203.0.113.7"),
        (v2(block=v2().removeprefix(v2()[:16]) + b"\x04\x00\x02ab"), "203.0.113.7"),  # a TLV
        (
            v2(family=0x21, block=ipaddress.IPv6Address("2001:db8::7").packed + bytes(20)),
            "2001:db8::7",
        ),
        (v2(command=0), None),  # LOCAL
        (v2(family=0x00, block=b""), ""),  # UNSPEC
    ],
)
def test_proxy_headers(header: bytes, client: str | None) -> None:
    assert parse_proxy_header(header + b"GET /") == (len(header), client)
    # Any prefix is incomplete, never wrong: a header may arrive over several reads.
    for cut in range(1, len(header)):
        assert parse_proxy_header(header[:cut]) == (PROXY_MORE, "")


@pytest.mark.parametrize(
    "header",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51000\r\n",
        b"PROXY TCP4 2001:db8::7 192.0.2.1 1 2\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 051000 80\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 70000 80\r\n",
        b"PROXY TCP4  203.0.113.7 192.0.2.1 1 80\r\n",
        b"PROXY TCP5 203.0.113.7 192.0.2.1 1 80\r\n",
        b"proxy TCP4 203.0.113.7 192.0.2.1 1 80\r\n",
        b"PROXY " + b"x" * 200,  # no CRLF within 107 bytes
        v2(command=2),
        v2(family=0x11, block=b"\x01\x02"),  # address block too short
        v2()[:12] + b"\x11\x11" + v2()[14:],  # version 1 in a v2 header
        v2()[:14] + (PROXY_V2_MAX).to_bytes(2, "big"),  # longer than the bound
        b"\r\n\r\nGET",
    ],
)
def test_bad_proxy_headers(header: bytes) -> None:
    assert parse_proxy_header(header)[0] == PROXY_BAD
