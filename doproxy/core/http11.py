"""HTTP/1.1 as the proxy speaks it: rules over bytes and text, no I/O. Pure, and compiled.

Three kinds of rules live here, all run on every request and compiled with the data plane
(doproxy/_compiled.py): a call from compiled code into an interpreted helper costs more than
the work these do.

Head scanning: the express lanes' innermost loops. Heads are searched as latin-1 text: latin-1
maps bytes to characters one to one, so positions match, and CPython 3.11's bytes.find and `in`
first try the needle as an integer, raising and swallowing a TypeError on every call, which
costs more than the search itself.

Header forwarding: what a proxy must drop, add and re-frame. Hop-by-hop headers (RFC 9110
section 7.6.1) describe one connection, not the message, so they are never forwarded:
Connection and every header it names, Keep-Alive, Proxy-Connection, TE, Trailer, Upgrade
(except for a WebSocket tunnel) and Transfer-Encoding (the proxy re-frames the body itself).
Trailers are dropped in both directions: chunked bodies are re-encoded without them, as nginx
does by default, so no field can slip past the header rules at the end of a body.

Plans: the rules that decide what a message becomes return it as a small plan, and the
connection applies it; nothing here writes into an exchange or a socket, so each is tested
with bytes alone (tests/test_http11.py). A request the rules refuse raises the ClientError
its client gets. plain_request_plan (the express lane) and request_plan (the general path):
the head a backend gets and how the request's body and connection go on;
express_response_plan: the bytes the client gets for a whole response read at once;
response_plan: the head, the body's framing and keep-alive; interim_head and websocket_101:
what a client gets of a 1xx.
"""

from __future__ import annotations

from typing import Final

from doproxy.core.forwarding import FORWARDING_HEADERS, Hop, origin_form, valid_host
from doproxy.errors import BadRequest, ExpectationFailed, NotImplementedByProxy

HEAD_SCAN: Final = 8192  # a response head is looked for in this many bytes first


def head_text(buf: bytes) -> tuple[str, int]:
    """The start of `buf` as latin-1 text, and where its head ends (the blank line), or -1.

    Heads are searched as text: latin-1 maps bytes to characters one to one, so positions
    match, and CPython 3.11's bytes.find and `in` first try the needle as an integer, raising
    and swallowing a TypeError on every call, which costs more than the search itself.
    Only the first HEAD_SCAN bytes are decoded; a longer head is found with bytes.find.
    """
    text = buf[:HEAD_SCAN].decode("latin-1") if len(buf) > HEAD_SCAN else buf.decode("latin-1")
    end = text.find("\r\n\r\n")
    if end < 0 and len(buf) > HEAD_SCAN:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            text = buf[: end + 4].decode("latin-1")
    return text, end


def connection_options(low: str) -> set[str]:
    """Every token of every Connection line of a lower-cased head."""
    tokens: set[str] = set()
    start = 0
    while (i := low.find("\nconnection:", start)) >= 0:
        j = low.find("\r\n", i)
        if j < 0:
            j = len(low)  # the last line of a head given without its final CRLF
        tokens.update(t.strip() for t in low[i + 12 : j].split(","))
        start = j
    return tokens


# What the header names of a request head ask of the express lane (scan_request).
PLAIN: Final = 0  # nothing to rewrite but Host, a lone Connection and the forwarding headers
REWRITE: Final = 1  # hop-by-hop or forwarding headers to drop: build the head header by header
GENERAL: Final = 2  # Transfer-Encoding or Upgrade: the general path, with llhttp's callbacks


# What a header line is, for the express lanes (hop_by_hop). Final: the compiled code uses
# the values inline instead of looking the names up in the module on every request.
NOT_HOP: Final = 0
FRAMING: Final = 1  # Transfer-Encoding or Upgrade: the message is framed or tunnelled differently
HOP: Final = 2  # TE, Trailer, Keep-Alive, Proxy-Connection, HTTP2-Settings: dropped when forwarded


def hop_by_hop(line: str) -> int:
    """Is this lower-cased header line a hop-by-hop header other than Connection? Its first
    letter as an integer picks the names worth comparing (see scan_response)."""
    c = ord(line[0])
    if c == 116:  # t
        if line.startswith("transfer-encoding:"):
            return FRAMING
        if line.startswith("te:") or line.startswith("trailer:"):
            return HOP
    elif c == 117:  # u
        if line.startswith("upgrade:"):
            return FRAMING
    elif c == 107:  # k
        if line.startswith("keep-alive:"):
            return HOP
    elif c == 112:  # p
        if line.startswith("proxy-connection:"):
            return HOP
    elif c == 104 and line.startswith("http2-settings:"):  # h
        return HOP
    return NOT_HOP


# What a walk over the header lines of a head finds (_scan_fields): (its kind: PLAIN,
# REWRITE or GENERAL; its Content-Length, -1 without one and -2 when it is not a number; its
# Connection line: the index of the line break before the first one, that of its CRLF, and
# "keep-alive" or "close" when it is the only Connection line and holds just that token,
# else ""; a request's Host line: the index of the line break before it and that of its
# CRLF, (-1, -1) without one and (-2, -2) for more than one). A plain tuple: compiled, it is
# returned in registers.
_Fields = tuple[int, int, int, int, str, int, int]


def _scan_fields(head: str, pos: int, limit: int, request: bool) -> _Fields:
    """Walk the header lines of `head` (latin-1 text in any case) from `pos`, the first one,
    up to `limit`: the one walk behind scan_request and scan_response.

    Each line is found with one search for its line break (a memchr), and its name's first
    letter, lower-cased as an integer, picks the names worth comparing; only those are sliced
    and compared, as written first and lower-cased only when that fails (peers write
    `Content-Length:` and `Connection:` in these capitals, and lower-casing a slice costs more
    than comparing it). This replaced lower-casing the whole head, splitting it into a string
    per line and a search of the whole head per header name (a head is a few hundred
    characters, most of its lines are names no rule cares about, and those were about half of
    the express lanes' own instructions).

    REWRITE: a hop-by-hop header other than Connection, and for a `request`: a header that
    says who the client is (X-Forwarded-*, X-Real-IP, Forwarded), that the proxy appends to
    (Via), Expect, or a header name with an underscore. GENERAL: Transfer-Encoding or Upgrade;
    the walk stops there and the rest of the tuple means nothing.
    """
    kind = PLAIN
    # Header names with an underscore: looked for line by line only when the headers hold one
    # at all (one memchr instead of two searches per line).
    underscore = request and head.find("_", pos, limit) >= 0
    length = -1
    host_start = host_end = -1
    start = end = -1
    value = ""
    connections = 0
    while pos < limit:
        eol = head.find("\n", pos, limit)
        if eol < 0:
            eol = limit
        if eol - pos <= 1:  # the blank line (or a bare line break, which llhttp refuses)
            pos = eol + 1
            continue
        # ASCII letters differ from their capitals by the 32 bit alone, so `| 32` lower-cases
        # a letter and maps nothing else onto one.
        c = ord(head[pos]) | 32
        if c == 99 and eol - pos >= 11:  # c: Content-Length or Connection?
            # The ninth letter tells "content-Length" from "connectiOn" and from the other
            # "content-*" names.
            d = ord(head[pos + 8]) | 32
            if d == 108:  # l
                name = head[pos : pos + 15]
                if (name == "Content-Length:" or name.lower() == "content-length:") and (
                    length == -1
                ):
                    try:
                        length = int(head[pos + 15 : eol])
                    except ValueError:
                        length = -2
            elif (
                d == 111
                and (  # o
                    (name := head[pos : pos + 11]) == "Connection:" or name.lower() == "connection:"
                )
            ):
                connections += 1
                if connections == 1:
                    start, end = pos - 1, eol - 1
                    value = head[pos + 11 : eol].strip()
                    if value != "keep-alive" and value != "close":
                        value = value.lower()
        elif (
            request
            and c == 104  # h
            and eol - pos >= 5
            and ((name := head[pos : pos + 5]) == "Host:" or name.lower() == "host:")
        ):
            if host_start == -1:
                host_start, host_end = pos - 1, eol - 1
            else:
                host_start = host_end = -2
        elif c == 116 or c == 117 or c == 107 or c == 112 or c == 104:  # t, u, k, p, h
            # (The longest name hop_by_hop compares is "transfer-encoding:", 18 letters.)
            hop = hop_by_hop(head[pos : min(pos + 18, eol)].lower())
            if hop == FRAMING:
                return GENERAL, -1, -1, -1, "", -1, -1
            if hop == HOP:
                kind = REWRITE
        elif (
            request and (c == 120 or c == 102 or c == 101 or c == 118) and _names_client(head, pos)
        ):
            kind = REWRITE
        if underscore:
            colon = head.find(":", pos, eol)
            if head.find("_", pos, colon if colon >= 0 else eol) >= 0:
                kind = REWRITE  # an underscore in the name (only the name is searched)
        pos = eol + 1
    if connections != 1 or (value != "keep-alive" and value != "close"):
        value = ""
    return kind, length, start, end, value, host_start, host_end


def _names_client(head: str, pos: int) -> bool:
    """Is the line at `pos`, whose name starts with x, f, e or v, one the proxy rewrites:
    X-Forwarded-*, X-Real-IP, Forwarded (who the client is), Via (appended to), Expect?"""
    low = head[pos : pos + 12].lower()
    return (
        low == "x-forwarded-"
        or low.startswith("x-real-ip:")
        or low.startswith("forwarded:")
        or low.startswith("expect:")
        or low.startswith("via:")
    )


# What scan_request finds in a request head, in one walk: (its kind, as _scan_fields; where
# its request line ends; its Connection line, Host line and Content-Length, as _scan_fields).
RequestScan = tuple[int, int, int, int, str, int, int, int]


def scan_request(head: str) -> RequestScan:
    """Everything the express lane needs from a request head (latin-1 text in any case,
    starting at its request line), in one walk over its lines (_scan_fields).

    The kind is also REWRITE for a target that is not origin-form (absolute-form, `*`). The
    positions are exact once llhttp has validated the head (a name can only follow a line
    break); before that, only the kind is used, to pick the lane.
    """
    n = len(head)
    line_end = head.find("\r\n")
    if line_end < 0:
        line_end = n
    kind, length, start, end, value, host_start, host_end = _scan_fields(
        head, line_end + 2, n, True
    )
    # The request line: origin-form targets start with "/" after the method.
    sp = head.find(" ", 0, line_end)
    if kind == PLAIN and (sp < 0 or sp + 1 >= line_end or ord(head[sp + 1]) != 47):
        kind = REWRITE
    return kind, line_end, start, end, value, host_start, host_end, length


def scan_response(head: str, limit: int = -1) -> tuple[bool, int, int, int, str]:
    """Everything the express response lane needs from a response head, in one walk over its
    lines (_scan_fields): (needs the general path, Content-Length, Connection line). `head`
    is latin-1 text in any case, looked at up to `limit` (the end of its last header line;
    -1: all of it). "Needs the general path": a hop-by-hop header other than Connection; the
    rest of the tuple then means nothing.
    """
    if limit < 0:
        limit = len(head)
    pos = head.find("\n", 0, limit) + 1  # the first header line: the status line is skipped
    if pos == 0:
        return False, -1, -1, -1, ""
    kind, length, start, end, value, _, _ = _scan_fields(head, pos, limit, False)
    return kind != PLAIN, length, start, end, value


# --- header forwarding rules ---------------------------------------------------------------

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
    status: int,
    page: ErrorPage | None = None,
    close: bool = True,
    head: bool = False,
    retry_after: int = 0,
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
    if retry_after:
        out += b"Retry-After: " + str(retry_after).encode() + b"\r\n"
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


# --- response plans: what the proxy sends the client, decided from the backend's head ------

# How a response body goes to the client (the framing of a ResponsePlan). Final: the compiled
# code uses the values inline.
BODY_RAW: Final = 0  # the bytes as they are (Content-Length, or close-delimited for HTTP/1.0)
BODY_CHUNKED: Final = 1  # re-encoded as chunked
BODY_NONE: Final = 2  # no body (HEAD, 204, 304)
BODY_REFUSED: Final = 3  # a Transfer-Encoding the proxy cannot relabel: answer 502 instead

_CLOSE_LINE: Final = b"Connection: close\r\n"

# A response plan: (head bytes to send the client, with its blank line; how the body is
# framed, BODY_*; whether the body ends only when the backend closes; whether the client's
# connection stays open). A plain tuple: compiled, it is returned in registers, not allocated.
ResponsePlan = tuple[bytes, int, bool, bool]
# An express response plan: (the bytes to send the client, head and body; the status; the
# Content-Length; whether the backend keeps its connection open). Status 0: not for the express
# lane (the general path decides).
ExpressPlan = tuple[bytes, int, int, bool]
NOT_EXPRESS: Final[ExpressPlan] = (b"", 0, 0, False)


def express_response_plan(data: bytes, keep: bool) -> ExpressPlan:
    """The express lane for responses: `data` is one read from the backend; is it exactly one
    whole HTTP/1.1 Content-Length response, with nothing hop-by-hop but a lone Connection line?
    Then it goes to the client as it is when its Connection line already says what the proxy
    does with the client connection (`keep`: the common case, no copy), else with that line
    dropped or replaced. Decided from the raw bytes before llhttp validates them (the caller
    does, and sends nothing that llhttp refuses).

    1xx, 204 and 304 are not for the express lane: they have no body, whatever their
    Content-Length says, so bytes after their head are stray.
    """
    text, end = head_text(data)
    if end < 0 or not text.startswith("HTTP/1.1 "):
        return NOT_EXPRESS
    # The status from its three digits, as native integers (int() of a slice costs more than
    # the rest of this check); anything else is llhttp's to refuse, on the general path. The
    # text is long enough: "HTTP/1.1 " and the blank line are in it.
    d0 = ord(text[9]) - 48
    d1 = ord(text[10]) - 48
    d2 = ord(text[11]) - 48
    if not (0 <= d0 <= 9 and 0 <= d1 <= 9 and 0 <= d2 <= 9):
        return NOT_EXPRESS
    status = d0 * 100 + d1 * 10 + d2
    if status < 200 or status == 204 or status == 304:
        return NOT_EXPRESS
    general, length, i, j, value = scan_response(text, end + 2)
    if general or length < 0 or len(data) != end + 4 + length:
        return NOT_EXPRESS  # (a bad Content-Length: llhttp will say what is wrong with it)
    backend_keep_alive = True
    if i >= 0:
        if not value:
            return NOT_EXPRESS
        backend_keep_alive = value == "keep-alive"
        if backend_keep_alive == keep:
            out = data
        elif keep:
            out = data[: i + 1] + data[j + 2 :]
        else:
            out = data[: i + 1] + _CLOSE_LINE + data[j + 2 :]
    else:
        out = data if keep else data[: end + 2] + _CLOSE_LINE + data[end + 2 :]
    return out, status, length, backend_keep_alive


def response_plan(
    status: int, head: bytes, text: str, version: bytes, is_head: bool, keep: bool
) -> ResponsePlan:
    """The plan for a final response whose head llhttp has validated: `head` its raw bytes
    without the blank line, `text` the same decoded as latin-1, `version` the client's HTTP
    version, `is_head` whether it answers HEAD, `keep` whether the client's connection may stay
    open. With BODY_REFUSED, the plan's head is the Transfer-Encoding that was refused.

    The common case keeps the backend's head and drops only a lone Connection line: an
    HTTP/1.1 exchange with Content-Length (or no body) whose only hop-by-hop header is
    "Connection: keep-alive/close". Everything else is rebuilt header by header.
    """
    if version == b"1.1" and text.startswith("HTTP/1.1 "):
        general, length, i, j, value = scan_response(text)
        if not general:
            no_body = is_head or status == 304
            if no_body or (status != 204 and length != -1):
                if value:
                    head = head[: i + 1] + head[j + 2 :]
                    i = -1
                if i < 0:
                    return (
                        head + (b"\r\n" if keep else b"Connection: close\r\n\r\n"),
                        BODY_NONE if no_body else BODY_RAW,
                        False,
                        keep,
                    )
    return _response_plan_general(status, head, version, is_head, keep)


def _response_plan_general(
    status: int, head: bytes, version: bytes, is_head: bool, keep: bool
) -> ResponsePlan:
    first, fields = split_head(head)
    parts = first.split(b" ", 2)
    reason = parts[2] if len(parts) > 2 else b""
    # HTTP/1.1 in the status line whatever the client's version (RFC 9110 2.5), as nginx
    # and HAProxy do; the framing below is what an HTTP/1.0 client understands.
    lines = [b"HTTP/1.1 ", str(status).encode(), b" ", reason, b"\r\n"]
    lines += forwarded_fields(fields)
    length: bytes | None = None
    te: bytes | None = None
    for name, value in fields:
        lname = name.lower()
        if lname == b"content-length":
            length = value
        elif lname == b"transfer-encoding":
            te = value if te is None else te + b", " + value
    chunked = te is not None
    if te is not None and te.replace(b" ", b"").lower() != b"chunked":
        # A coding other than chunked cannot be relabelled (the client would decode the
        # wrong thing) and llhttp reads such a body until close: refuse it, as nginx does.
        return te, BODY_REFUSED, False, False
    until_close = False
    if is_head or status == 204 or status == 304:
        body = BODY_NONE
        if length is not None and status != 204:
            lines.append(b"Content-Length: " + length + b"\r\n")
    elif length is not None and not chunked:
        body = BODY_RAW
        lines.append(b"Content-Length: " + length + b"\r\n")
    elif version == b"1.1":
        until_close = not chunked
        body = BODY_CHUNKED
        lines.append(b"Transfer-Encoding: chunked\r\n")
    else:
        until_close = not chunked
        body = BODY_RAW  # HTTP/1.0 client: the body ends when the proxy closes
        keep = False
    if not keep:
        lines.append(b"Connection: close\r\n\r\n")
    elif version == b"1.0":
        lines.append(b"Connection: keep-alive\r\n\r\n")
    else:
        lines.append(b"\r\n")
    return b"".join(lines), body, until_close, keep


def interim_head(head: bytes, text: str) -> bytes:
    """What an HTTP/1.1 client gets of an interim response such as 103 Early Hints (not 100,
    which the proxy answers itself, nor 101): its status line and the headers that pass under
    the same hop-by-hop rules as a final response's, with the blank line."""
    _, fields = split_head(head)
    return b"".join([head[: text.find("\r\n") + 2], *forwarded_fields(fields), b"\r\n"])


def switches(low: str) -> bool:
    """Does a lower-cased 101 head carry Upgrade and Connection: upgrade (so llhttp switches)?"""
    return "\nupgrade:" in low and "upgrade" in connection_options(low)


def websocket_101(head: bytes) -> bytes:
    """The 101 the client gets when a backend agrees to a WebSocket upgrade (its head without
    the blank line), or b"" when that 101 switches to anything but websocket: the tunnel opens
    only to the protocol the client asked for."""
    low = head.lower()
    i = low.find(b"\nupgrade:")
    if i < 0 or low[i + 9 : low.find(b"\r\n", i)].strip() != b"websocket":
        return b""
    out = [b"HTTP/1.1 101 Switching Protocols\r\n"]
    out += forwarded_fields(split_head(head)[1])
    out.append(b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    return b"".join(out)


# --- request plans: what goes to the backend, decided from the client's head ---------------


def keep_alive_of(low: str, default: bool) -> bool:
    """Does the client's connection stay open, by the Connection tokens of a lower-cased
    request head (close wins over keep-alive), else by its version's `default`?"""
    tokens = connection_options(low)
    if "close" in tokens:
        return False
    return True if "keep-alive" in tokens else default


# The express lane's plan for a plain request head (plain_request_plan): (the head for the
# backend, or b"" when the head needs the general path after all; the Host it names, None for
# an HTTP/1.0 request without one; whether the client's connection stays open; the
# Content-Length, -1 when there is none). A plain tuple: compiled, it is returned in registers.
PlainPlan = tuple[bytes, bytes | None, bool, int]
NOT_PLAIN: Final[PlainPlan] = (b"", None, False, -1)


def plain_request_plan(
    data: bytes,
    scan: RequestScan,
    method: bytes,
    http11: bool,
    parts: tuple[bytes, ...],
    hop: Hop,
    host_ok: bytes | None = None,
) -> PlainPlan:
    """The express lane's request head: `data`, one whole head that llhttp has validated
    (every line, token names, one valid Content-Length), `scan` what scan_request found in it
    (kind PLAIN: its names ask for nothing but Host, a lone Connection line and the forwarding
    headers), `http11` whether it is HTTP/1.1 (else 1.0), `parts` hop.parts (the connection
    keeps them as its own, compiled, attribute), `host_ok` a Host value already found valid.

    The head is rewritten as raw bytes: a lone "Connection: keep-alive" stays (it is true of
    the backend connection too), a lone "Connection: close" goes (only the client's
    connection closes), and the forwarding headers are appended, the Host value put where they
    name it. Any other Connection line: NOT_PLAIN, the general path removes what it names.
    """
    _, line_end, i, j, value, host_start, host_end, length = scan
    head = data[:-2]  # without the blank line
    keep_alive = http11
    if i >= 0:
        if not value:
            return NOT_PLAIN
        keep_alive = value == "keep-alive"
    host: bytes | None = None
    if host_start == -2:
        raise BadRequest("more than one Host header")
    if host_start >= 0:
        host = head[host_start + 6 : host_end].strip(b" \t")
        # A keep-alive client repeats its Host: it is checked once.
        if host != host_ok and not valid_host(host):
            raise BadRequest("invalid Host")
        tail = host.join(parts if http11 else hop.parts_10)
    elif http11:
        raise BadRequest("HTTP/1.1 request without Host")
    else:
        tail = hop.no_host
    if i >= 0 and not keep_alive:  # a lone Connection: close
        head = head[: i + 1] + head[j + 2 :]
    if http11:
        out = head + tail
    else:
        url = head[len(method) + 1 : head.rfind(b" ", 0, line_end)]
        out = method + b" " + url + b" HTTP/1.1" + head[line_end:] + tail
    return out, host, keep_alive, length


class RequestPlan:
    """What the general path makes of a parsed request head (request_plan): the head to send
    the backend (`head`, origin-form, HTTP/1.1, ending with its blank line), the Host it names
    (`host`, None for an HTTP/1.0 request without one), the Host header found valid (`valid`,
    for the caller's cache), and how the body and the connection go on: `chunked` (the body is
    chunked), `websocket` (a WebSocket upgrade is offered to the backend), `expect_continue`
    (the client waits for 100 Continue), `upgrade_body` (the Content-Length of a request with
    Upgrade, whose body llhttp does not read)."""

    def __init__(
        self,
        head: bytes,
        host: bytes | None,
        valid: bytes | None,
        chunked: bool,
        websocket: bool,
        expect_continue: bool,
        upgrade_body: int,
    ) -> None:
        self.head = head
        self.host = host
        self.valid = valid
        self.chunked = chunked
        self.websocket = websocket
        self.expect_continue = expect_continue
        self.upgrade_body = upgrade_body


def request_plan(
    method: bytes,
    version: bytes,
    url: bytes,
    fields: list[tuple[bytes, bytes]],
    hop: Hop,
    trusted: bool,
    underscores: bool,
    host_ok: bytes | None = None,
) -> RequestPlan:
    """The general path: apply every header rule to a parsed request (its method, HTTP
    version, target and header fields). `hop` is what the proxy adds for this client,
    `trusted` whether its forwarding headers are believed, `underscores` whether header names
    with an underscore pass, and `host_ok` a Host value already found valid (not checked
    again). Raises the ClientError the client gets for a request the rules refuse."""
    lines: list[bytes] = []
    host: bytes | None = None
    te: bytes | None = None
    upgrade: bytes | None = None
    via: bytes | None = None
    expect_continue = False
    # Forwarding headers a trusted proxy sent (lower-case name -> values joined); from
    # anyone else they are dropped, so a client cannot forge who it is.
    sent: dict[bytes, bytes] | None = None
    # Headers named by Connection are hop-by-hop too (RFC 9110 7.6.1), but the request is
    # framed once, from what was received: a name that carries framing (Content-Length,
    # Transfer-Encoding) or that the proxy decides itself (Host, Upgrade, Connection) is
    # never dropped because a client named it. Known before the walk, so a dropped line is
    # never written in the first place.
    named = connection_named(fields)
    for name, value in fields:
        lname = name.lower()
        if lname not in REQUEST_SPECIAL:
            if named and lname in named:
                continue
            if 95 in name and not underscores:
                # "_": X_Forwarded_For is X-Forwarded-For to a CGI or WSGI backend, so
                # such names could forge what the rules above remove (nginx drops them).
                continue
            lines.append(name + b": " + value + b"\r\n")
            continue
        if lname == b"host":
            if host is not None:
                raise BadRequest("more than one Host header")
            host = value
        elif lname in FORWARDING_HEADERS:
            if trusted:
                if sent is None:
                    sent = {}
                seen = sent.get(lname)
                sent[lname] = value if seen is None else seen + b", " + value
        elif lname == b"via":
            via = value if via is None else via + b", " + value
        elif lname == b"transfer-encoding":
            te = value if te is None else te + b", " + value
        elif lname == b"upgrade":
            upgrade = value
        elif lname == b"expect":
            if value.lower() == b"100-continue":
                expect_continue = version == b"1.1"
            else:
                raise ExpectationFailed("only Expect: 100-continue is supported")
        # Keep-Alive, Proxy-Connection, TE, Trailer and HTTP2-Settings are dropped.
    if host is None:
        if version == b"1.1":
            raise BadRequest("HTTP/1.1 request without Host")
    elif host != host_ok and not valid_host(host):
        raise BadRequest("invalid Host")
    valid = host
    if url[:1] != b"/" and not (url == b"*" and method == b"OPTIONS"):
        # Absolute-form (RFC 9112 3.2.2): the target's authority replaces Host, and the
        # backend gets origin-form, which every server understands.
        try:
            url, host = origin_form(url)
        except ValueError as e:
            raise BadRequest(str(e)) from None
    chunked = False
    if te is not None:
        if version != b"1.1":
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip() for c in te.lower().split(b",")]
        if codings[-1] != b"chunked":
            # RFC 9112 6.3: the body length cannot be known; 400 and close.
            raise BadRequest("Transfer-Encoding does not end in chunked")
        if len(codings) > 1:
            raise NotImplementedByProxy(f"Transfer-Encoding {te.decode('latin-1')!r}")
        chunked = True
        lines.append(b"Transfer-Encoding: chunked\r\n")
    websocket = False
    upgrade_body = 0
    if upgrade is not None:
        # llhttp treats an upgrade request as ending with its head; a body after it is the
        # caller's to read, for Content-Length only.
        for name, value in fields:
            if name.lower() == b"content-length":
                upgrade_body = int(value)
        # Offered to the backend only as RFC 9110 7.8 and RFC 6455 have it: websocket,
        # named in Connection, in HTTP/1.1. Any other Upgrade is dropped (hop-by-hop).
        websocket = (
            upgrade.strip().lower() == b"websocket"
            and version == b"1.1"
            and b"upgrade" in connection_tokens([v for n, v in fields if n.lower() == CONNECTION])
        )
        if chunked or (websocket and upgrade_body > 0):
            raise BadRequest("a request body with Upgrade is not supported")
        if websocket:
            lines.append(b"Connection: upgrade\r\nUpgrade: websocket\r\n")
    if host is not None:
        lines.append(b"Host: " + host + b"\r\n")
    if sent is None and via is None:
        # What the express lane adds, from the same pieces.
        if host is not None:
            lines.append(host.join(hop.parts if version == b"1.1" else hop.parts_10))
        else:
            lines.append(hop.no_host)
    else:
        lines.append(hop.headers(host, version, sent, via))
        lines.append(b"\r\n")
    head = method + b" " + url + b" HTTP/1.1\r\n" + b"".join(lines)
    return RequestPlan(head, host, valid, chunked, websocket, expect_continue, upgrade_body)
