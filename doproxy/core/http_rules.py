"""Header forwarding rules: what a proxy must drop, add and re-frame. Pure byte manipulation.

Hop-by-hop headers (RFC 9110 section 7.6.1) describe one connection, not the message, so they are
never forwarded: Connection and every header it names, Keep-Alive, Proxy-Connection, TE, Trailer,
Upgrade (except for a WebSocket tunnel) and Transfer-Encoding (the proxy re-frames the body
itself). Trailers are dropped in both directions: chunked bodies are re-encoded without them,
as nginx does by default, so no field can slip past the header rules at the end of a body.
"""

from __future__ import annotations

from doproxy.core.forwarding import FORWARDING_HEADERS

# Request headers handled specially on the way to a backend (lower-case).
CONNECTION = b"connection"
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",  # only meaningful with Upgrade: h2c, which is never tunnelled
    }
)
# Hop-by-hop plus the ones the proxy rewrites or consumes: Host, Expect, Via (appended to when
# `via` is on) and the forwarding headers (doproxy/core/forwarding.py).
REQUEST_SPECIAL = (
    HOP_BY_HOP
    | {
        b"host",
        b"expect",
        b"via",
    }
    | FORWARDING_HEADERS
)
RESPONSE_SPECIAL = HOP_BY_HOP | {b"content-length"}

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

REASONS: dict[int, bytes] = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    417: b"Expectation Failed",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def connection_tokens(values: list[bytes]) -> set[bytes]:
    """The lower-cased tokens of every Connection header value."""
    out: set[bytes] = set()
    for v in values:
        for tok in v.split(b","):
            t = tok.strip().lower()
            if t:
                out.add(t)
    return out


# Names a Connection header can never remove: they frame the message (Content-Length,
# Transfer-Encoding) or the proxy decides them itself (Host, the Connection/Upgrade pair).
FRAMING_NAMES = frozenset(
    {b"content-length", b"transfer-encoding", b"host", b"connection", b"upgrade"}
)


def connection_named(fields: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The lower-cased header names that the Connection headers among `fields` declare
    hop-by-hop, less the connection options (close, keep-alive) and FRAMING_NAMES."""
    values = [v for n, v in fields if n.lower() == CONNECTION]
    if not values:
        return frozenset()
    return frozenset(connection_tokens(values) - FRAMING_NAMES - {b"close", b"keep-alive"})


def forwarded_fields(fields: list[tuple[bytes, bytes]]) -> list[bytes]:
    """The header lines of a response head that pass to the client: all but hop-by-hop ones,
    those its Connection headers name, and Content-Length (the caller frames the body)."""
    named = connection_named(fields)
    return [
        n + b": " + v + b"\r\n"
        for n, v in fields
        if (low := n.lower()) not in RESPONSE_SPECIAL and low not in named
    ]


def split_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Split a head already validated by llhttp into its first line and (name, value) pairs.

    llhttp has rejected obs-fold, bare CR/LF and bad names by now, so a line split is exact.
    """
    lines = head.split(b"\r\n")
    fields = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            fields.append((name, value.strip(b" \t")))
    return lines[0], fields


ErrorPage = tuple[bytes, bytes]  # (content type, body)


def error_response(
    status: int, page: ErrorPage | None = None, close: bool = True, head: bool = False
) -> bytes:
    """A small complete response the proxy itself answers with (a configured page, or text).
    To a HEAD request (`head`) it has the same headers and no body: a body there would be read
    as the start of the next response."""
    reason = REASONS.get(status, b"Error")
    if page is None:
        page = (b"text/plain; charset=utf-8", str(status).encode() + b" " + reason + b"\n")
    content_type, body = page
    out = (
        b"HTTP/1.1 " + str(status).encode() + b" " + reason + b"\r\n"
        b"Content-Type: " + content_type + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"Cache-Control: no-store\r\n"
    )
    if close:
        out += b"Connection: close\r\n"
    return out + b"\r\n" if head else out + b"\r\n" + body


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def cookie_value(cookie_header: bytes, name: bytes) -> bytes | None:
    """The value of cookie `name` in a Cookie header ("a=1; b=2"), or None."""
    for part in cookie_header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == name:
            return value
    return None
