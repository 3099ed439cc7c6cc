"""Who the client is, and what the proxy tells the backend about it. Pure byte rules.

Three things live here, all decided from bytes and addresses, never from a socket:

- **Host and the request target** (RFC 9110 7.2, RFC 9112 3.2): a Host value must be
  uri-host [":" port]; an absolute-form target is turned into origin-form and its authority
  becomes the Host.
- **Forwarding headers** (X-Forwarded-*, X-Real-IP, RFC 7239 Forwarded, Via): what the proxy
  adds for one client connection (`Hop`). A client that is not a trusted proxy cannot forge any
  of them: the caller drops what such a client sent, and hands the values a trusted proxy sent
  to `Hop.headers`, which appends to them.
- **The PROXY protocol** (HAProxy's v1 text and v2 binary header, `parse_proxy_header`): the
  client address a trusted load balancer passes in front of the HTTP bytes.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from typing import Final

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The request headers that say who the client is. From an untrusted peer every one of them is
# removed; from a trusted proxy they are appended to (or kept).
FORWARDING_HEADERS: Final = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-real-ip",
        b"forwarded",
    }
)

MODES: Final = ("x-forwarded", "rfc7239", "both")

# --- Host and the request target ---------------------------------------------------------

# reg-name = *( unreserved / pct-encoded / sub-delims ) (RFC 3986 3.2.2); '%' is checked
# separately for its two hex digits.
_REG_NAME: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=%"
_HEX: Final = b"0123456789abcdefABCDEF"
_DIGITS: Final = b"0123456789"
_REG_NAME_BYTE: Final = bytes(1 if c in _REG_NAME else 0 for c in range(256))


def valid_host(value: bytes) -> bool:
    """Is `value` a valid Host field value: uri-host [":" port], not empty?

    uri-host is a reg-name (which covers IPv4 addresses), or an IPv6 address in brackets
    (IPvFuture and zone identifiers are refused). The port is 1 to 5 digits. An empty Host is
    refused too: RFC 9110 7.2 allows it only for a target without an authority, and a reverse
    proxy has nowhere to route such a request but its default, which hides client bugs.

    A reg-name is checked byte by byte against a table: compiled, that is a native loop, where
    partition and translate (which builds a 256-byte table per call) cost about 3,700
    instructions, paid once per new client connection.
    """
    n = len(value)
    if not n:
        return False
    if value[0] == 91:  # "[": IP-literal
        return _valid_ip_literal(value)
    colon = n
    pct = False
    for i in range(n):
        c = value[i]
        if c == 58:  # ":"
            colon = i
            break
        if not _REG_NAME_BYTE[c]:
            return False
        if c == 37:  # "%"
            pct = True
    if colon == 0 or (pct and not _pct_ok(value[:colon])):
        return False
    return colon == n or _valid_port(value, colon + 1)


def _valid_ip_literal(value: bytes) -> bool:
    end = value.find(b"]")
    if end < 0 or 37 in value[:end]:  # "%": a zone identifier (ipaddress takes them)
        return False
    try:
        ipaddress.IPv6Address(value[1:end].decode("ascii"))
    except ValueError:
        return False
    if end + 1 == len(value):
        return True
    return value[end + 1] == 58 and _valid_port(value, end + 2)  # ":"


def _valid_port(value: bytes, start: int) -> bool:
    """Is value[start:] 1 to 5 digits?"""
    n = len(value)
    if not 0 < n - start <= 5:
        return False
    for i in range(start, n):
        c = value[i]
        if c < 48 or c > 57:
            return False
    return True


def _pct_ok(host: bytes) -> bool:
    """Every '%' in a reg-name starts a pct-encoded byte (two hex digits)."""
    i = host.find(b"%")
    while i >= 0:
        pair = host[i + 1 : i + 3]
        if len(pair) != 2 or pair.translate(None, _HEX):
            return False
        i = host.find(b"%", i + 3)
    return True


def origin_form(target: bytes) -> tuple[bytes, bytes]:
    """Split an absolute-form request target into (origin-form target, authority).

    `http://example.com:8080/p?q` gives (`/p?q`, `example.com:8080`); an empty path becomes
    `/` (RFC 9112 3.2.1). Only the http and https schemes are accepted, and the authority
    must be a valid Host (userinfo, "user@host", is refused: RFC 9110 4.2.4). Raises
    ValueError otherwise.
    """
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise ValueError("request target is neither origin-form nor an http(s) absolute URI")
    end = len(rest)
    for stop in (b"/", b"?", b"#"):
        i = rest.find(stop)
        if 0 <= i < end:
            end = i
    authority, path = rest[:end], rest[end:]
    if not valid_host(authority):
        raise ValueError("invalid authority in the request target")
    if b"#" in path:
        raise ValueError("a fragment in the request target")
    if not path.startswith(b"/"):
        path = b"/" + path  # "" -> "/", "?q" -> "/?q"
    return path, authority


# --- Trusted proxies ----------------------------------------------------------------------


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs or plain addresses (a /32 or /128) as networks; host bits are ignored."""
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values)


def is_trusted(ip: str, networks: tuple[IPNetwork, ...]) -> bool:
    """Is the address `ip` inside one of `networks`? An IPv4-mapped IPv6 address (a
    dual-stack listener's view of an IPv4 client) counts as its IPv4 address."""
    if not networks or not ip:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


# --- Forwarding headers -------------------------------------------------------------------


def forwarded_node(ip: bytes) -> bytes:
    """An address as an RFC 7239 node: IPv6 quoted in brackets, "unknown" when none."""
    if not ip:
        return b"unknown"
    if 58 in ip:  # ":": IPv6
        return b'"[' + ip + b']"'
    return ip


_PLACEHOLDER: Final = b"\x00"  # never in a validated Host, an address, a proto or a port


class Hop:
    """What the proxy states about one client connection. Immutable; `hop_for` shares one per
    (settings, client, listener) among connections.

    `mode` is the forwarded-header setting: "x-forwarded" emits X-Forwarded-For (unless
    `add_xff` is false), -Proto, -Host, -Port and X-Real-IP; "rfc7239" emits Forwarded;
    "both" emits all of them. `via` adds the proxy to Via.

    The express lane uses `parts` (and `parts_10` for HTTP/1.0): the headers of a request that
    sent none of its own, with the blank line that ends the head, cut where the Host value
    goes, so `host.join(parts)` is the tail of the head; `no_host` is the tail of an HTTP/1.0
    head without Host.
    """

    __slots__ = (
        "add_xff",
        "client",
        "element",
        "mode",
        "no_host",
        "parts",
        "parts_10",
        "port",
        "proto",
        "rfc",
        "via",
        "x",
    )

    def __init__(
        self, mode: str, add_xff: bool, via: bool, client: bytes, proto: bytes, port: bytes
    ) -> None:
        self.mode = mode
        self.x = mode != "rfc7239"
        self.rfc = mode != "x-forwarded"
        self.add_xff = add_xff
        self.via = via
        self.client = client
        self.proto = proto
        self.port = port
        self.element = b"for=" + forwarded_node(client) + b";proto=" + proto
        self.parts = self._express_parts(b"1.1")
        self.parts_10 = self._express_parts(b"1.0") if via else self.parts
        self.no_host = self.headers(None, b"1.0") + b"\r\n"

    def with_client(self, client: bytes) -> Hop:
        """The same settings for another client address (from a PROXY header)."""
        return hop_for(self.mode, self.add_xff, self.via, client, self.proto, self.port)

    def headers(
        self,
        host: bytes | None,
        version: bytes = b"1.1",
        sent: dict[bytes, bytes] | None = None,
        via: bytes | None = None,
    ) -> bytes:
        """The forwarding header lines (each with its CRLF) for one request.

        `sent` holds the forwarding headers a trusted proxy sent (lower-case name -> value,
        repeated headers joined with ", "), None for an untrusted client (whose were removed).
        A family the proxy does not emit (by `mode`) passes from a trusted proxy as sent.
        `via` is the Via value the request came with, if any.
        """
        out: list[bytes] = []
        if sent is None:
            sent = {}
        client = self.client
        xff = sent.get(b"x-forwarded-for")
        if self.x and self.add_xff:
            out.append(b"X-Forwarded-For: " + (client if xff is None else xff + b", " + client))
        elif xff is not None:
            out.append(b"X-Forwarded-For: " + xff)
        for name, own in (
            (b"X-Forwarded-Proto", self.proto),
            (b"X-Forwarded-Host", host),
            (b"X-Forwarded-Port", self.port),
            (b"X-Real-IP", client),
        ):
            value = sent.get(name.lower())
            if value is None and self.x:
                value = own
            if value is not None:
                out.append(name + b": " + value)
        fwd = sent.get(b"forwarded")
        if self.rfc:
            element = self.element if host is None else self.element + b';host="' + host + b'"'
            out.append(b"Forwarded: " + (element if fwd is None else fwd + b", " + element))
        elif fwd is not None:
            out.append(b"Forwarded: " + fwd)
        if self.via:
            mine = version + b" doproxy"
            out.append(b"Via: " + (mine if via is None else via + b", " + mine))
        elif via is not None:
            out.append(b"Via: " + via)
        out.append(b"")
        return b"\r\n".join(out)

    def _express_parts(self, version: bytes) -> tuple[bytes, ...]:
        return tuple((self.headers(_PLACEHOLDER, version) + b"\r\n").split(_PLACEHOLDER))


@functools.lru_cache(maxsize=4096)
def hop_for(mode: str, add_xff: bool, via: bool, client: bytes, proto: bytes, port: bytes) -> Hop:
    """One shared Hop per distinct arguments: building one costs more than a connection's
    setup should, and a client usually opens many connections."""
    return Hop(mode, add_xff, via, client, proto, port)


# --- PROXY protocol -----------------------------------------------------------------------

PROXY_V1_MAX: Final = 107  # the longest v1 line, CRLF included (the spec's bound)
PROXY_V2_MAX: Final = 16 + 4096  # the fixed part and an address block with TLVs up to 4 KiB
_V1_PREFIX: Final = b"PROXY "
_V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"

PROXY_MORE: Final = 0  # the header is not complete yet
PROXY_BAD: Final = -1  # not a valid PROXY header


def parse_proxy_header(buf: bytes) -> tuple[int, str | None]:
    """Parse a PROXY protocol header (v1 or v2) at the start of `buf`.

    Returns (n, client): n > 0 is the header's length in bytes and `client` the source
    address it carries; "" when the balancer relays a client it cannot name (v1 UNKNOWN, v2
    PROXY with an address family other than TCP over IPv4/IPv6), None for v2 LOCAL (the
    balancer's own connection, e.g. a health check). PROXY_MORE when `buf` is a valid
    beginning but too short; PROXY_BAD when it cannot be one. A v1 header is at most 107
    bytes, a v2 header at most PROXY_V2_MAX, so a caller buffers at most that much.
    """
    if buf[:1] == b"P":
        if not _V1_PREFIX.startswith(buf[:6]):
            return PROXY_BAD, ""
        end = buf.find(b"\r\n", 0, PROXY_V1_MAX)
        if end < 0:
            return (PROXY_MORE if len(buf) < PROXY_V1_MAX else PROXY_BAD), ""
        client = _proxy_v1(buf[6:end])
        return (end + 2, client) if client is not None else (PROXY_BAD, "")
    if buf[:1] == b"\r":
        if not _V2_SIGNATURE.startswith(buf[:12]):
            return PROXY_BAD, ""
        if len(buf) < 16:
            return PROXY_MORE, ""
        length = int.from_bytes(buf[14:16], "big")
        if 16 + length > PROXY_V2_MAX:
            return PROXY_BAD, ""
        if len(buf) < 16 + length:
            return PROXY_MORE, ""
        found = _proxy_v2(buf[12], buf[13], buf[16 : 16 + length])
        if isinstance(found, bool):
            return PROXY_BAD, ""
        return 16 + length, found
    return PROXY_BAD, ""


def _proxy_v1(line: bytes) -> str | None:
    """The source address of a v1 line after "PROXY ", "" for UNKNOWN, None when invalid."""
    parts = line.split(b" ")
    if parts[0] == b"UNKNOWN":
        return ""  # whatever follows is to be ignored (the spec)
    if len(parts) != 5 or parts[0] not in (b"TCP4", b"TCP6"):
        return None
    cls = ipaddress.IPv4Address if parts[0] == b"TCP4" else ipaddress.IPv6Address
    try:
        src = cls(parts[1].decode("ascii"))
        cls(parts[2].decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None
    for port in parts[3:]:
        # Decimal, no sign, no leading zero (the spec), at most 65535.
        if port.translate(None, _DIGITS) or not 0 < len(port) <= 5 or int(port) > 65535:
            return None
        if len(port) > 1 and port[0] == 48:
            return None
    return str(src)


def _proxy_v2(ver_cmd: int, family: int, block: bytes) -> str | bool | None:
    """The source address of a v2 header's address block (TLVs after it are skipped), None
    for LOCAL, False when invalid."""
    if ver_cmd >> 4 != 2:
        return False
    command = ver_cmd & 0x0F
    if command == 0:  # LOCAL: the balancer's own connection (a health check)
        return None
    if command != 1:  # PROXY
        return False
    if family == 0x11:  # TCP over IPv4
        if len(block) < 12:
            return False
        return str(ipaddress.IPv4Address(block[:4]))
    if family == 0x21:  # TCP over IPv6
        if len(block) < 36:
            return False
        return str(ipaddress.IPv6Address(block[:16]))
    return ""  # UNSPEC, UDP or UNIX: no TCP client address to use (the spec: ignore it)
