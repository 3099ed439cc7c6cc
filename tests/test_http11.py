"""core/http11: the one-walk head scanners agree with the plain searches they replaced, and the
plans (what goes to the client, and how it is framed) are right without a socket."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from doproxy.core.forwarding import hop_for
from doproxy.core.http11 import (
    BODY_CHUNKED,
    BODY_NONE,
    BODY_RAW,
    BODY_REFUSED,
    GENERAL,
    NOT_EXPRESS,
    NOT_PLAIN,
    PLAIN,
    REWRITE,
    RequestPlan,
    express_response_plan,
    interim_head,
    keep_alive_of,
    plain_request_plan,
    request_plan,
    response_plan,
    scan_request,
    scan_response,
    switches,
    websocket_101,
)
from doproxy.errors import BadRequest, ExpectationFailed, NotImplementedByProxy

NAMES = [
    "content-length",
    "connection",
    "transfer-encoding",
    "te",
    "trailer",
    "keep-alive",
    "upgrade",
    "proxy-connection",
    "http2-settings",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-real-ip",
    "x-real-ipx",
    "forwarded",
    "forwardedx",
    "via",
    "x_forwarded_for",
    "x-a_b",
    "expect",
    "host",
    "server",
    "te-x",
    "trailers-note",
    "upgrade-insecure-requests",
    "content-type",
    "connectionx",
    "keep-alive-ish",
]
VALUES = ["2", " 10 ", "close", "keep-alive", "keep-alive, x", "abc", "", "chunked", "1x", "a_b"]

lines = st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)).map(
    lambda nv: f"{nv[0]}:{nv[1]}"
)


def _head(first: str, fields: list[str]) -> str:
    return "".join(f"{line}\r\n" for line in [first, *fields])  # up to the last CRLF


def reference_connection(low: str) -> tuple[int, int, str]:
    """The Connection line of a lower-cased head by plain searches, as the express lanes
    found it before the one-walk scanner: (the index of the line break before it, that of its
    CRLF, "keep-alive" or "close" when it is the only one and holds just that token, else
    ""), or (-1, -1, "") without one."""
    i = low.find("\nconnection:")
    if i < 0:
        return -1, -1, ""
    j = low.find("\r\n", i)
    value = low[i + 12 : j].strip()
    if (value != "keep-alive" and value != "close") or "\nconnection:" in low[j:]:
        value = ""
    return i, j, value


def reference_response(low: str) -> tuple[bool, int, int, int, str]:
    """The searches express_response used before the one-walk scanner."""
    general = any(
        f"\n{name}:" in low
        for name in (
            "transfer-encoding",
            "te",
            "trailer",
            "keep-alive",
            "upgrade",
            "proxy-connection",
            "http2-settings",
        )
    )
    i = low.find("\ncontent-length:")
    if i < 0:
        length = -1
    else:
        try:
            length = int(low[i + 16 : low.find("\r\n", i)])
        except ValueError:
            length = -2
    start, end, value = reference_connection(low)
    return general, length, start, end, value


def reference_request(low: str) -> int:
    low = low.lstrip("\r\n")
    if "\ntransfer-encoding:" in low or "\nupgrade:" in low:
        return GENERAL
    rewrite = (
        "\nx-forwarded-",
        "\nx-real-ip:",
        "\nforwarded:",
        "\nvia:",
        "\nkeep-alive:",
        "\nproxy-connection:",
        "\nte:",
        "\ntrailer:",
        "\nhttp2-settings:",
        "\nexpect:",
    )
    first, _, rest = low.partition("\r\n")
    underscore = any("_" in line.partition(":")[0] for line in rest.split("\r\n"))
    origin = first.split(" ")[1].startswith("/")
    return REWRITE if any(n in low for n in rewrite) or underscore or not origin else PLAIN


def _same_scan(got: tuple[object, ...], want: tuple[object, ...]) -> bool:
    """A head that needs the general path says so; the rest of its scan means nothing."""
    return got == want if not want[0] else bool(got[0])


@given(st.lists(lines, max_size=8))
def test_scan_response_agrees_with_the_searches(fields: list[str]) -> None:
    low = _head("http/1.1 200 ok", fields)
    assert _same_scan(scan_response(low), reference_response(low))


@given(st.lists(lines, max_size=8), st.randoms(use_true_random=False), st.text(max_size=20))
def test_scan_response_reads_names_in_any_case_and_stops_at_its_limit(
    fields: list[str], rnd: random.Random, body: str
) -> None:
    # Backends write names in any case; the scan lower-cases only what it compares. A body
    # after the head (the express lane scans the head of a whole response) is not looked at.
    low = _head("http/1.1 200 ok", fields)
    mixed = "".join(ch.upper() if rnd.random() < 0.5 else ch for ch in low)
    assert _same_scan(scan_response(mixed + "\r\n" + body, len(mixed)), reference_response(low))


@given(
    st.lists(lines, max_size=8),
    st.sampled_from(["/te:", "/a_b", "*", "http://h/", "http://h_x/"]),
    st.sampled_from(["", "\r\n", "\n"]),
)
def test_request_scan_agrees_with_the_searches(fields: list[str], target: str, before: str) -> None:
    low = before + _head(f"get {target} http/1.1", fields) + "\r\n"
    kind, line_end, start, end, value, host_start, host_end, length = scan_request(
        low.lstrip("\r\n")  # (the caller drops empty lines before the request line)
    )
    assert kind == reference_request(low)
    if kind != GENERAL:
        low = low.lstrip("\r\n")
        assert line_end == low.find("\r\n")
        assert (start, end, value) == reference_connection(low)
        assert length == reference_response(low)[1]
        hosts = low.count("\nhost:")
        i = low.find("\nhost:")
        assert (host_start, host_end) == (
            (-1, -1) if not hosts else (-2, -2) if hosts > 1 else (i, low.find("\r\n", i))
        )


@given(
    st.lists(lines, max_size=8),
    st.sampled_from(["/te:", "/a_b", "*", "http://h/"]),
    st.randoms(use_true_random=False),
)
def test_request_scan_reads_names_in_any_case(
    fields: list[str], target: str, rnd: random.Random
) -> None:
    # Clients write names in any case; the scan compares them as written first, then
    # lower-cased. The same head in any case scans as its lower-case self.
    low = _head(f"get {target} http/1.1", fields) + "\r\n"
    mixed = "".join(ch.upper() if rnd.random() < 0.5 else ch for ch in low)
    assert scan_request(mixed)[0] == scan_request(low)[0]
    assert scan_request(mixed)[2:] == scan_request(low)[2:]


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\nContent-Length: 2\r\n\r\n",
            (PLAIN, 14, 24, 42, "close", 15, 23, 2),
        ),
        ("GET / HTTP/1.1\r\nHost: h\r\nHOST: h\r\n\r\n", (PLAIN, 14, -1, -1, "", -2, -2, -1)),
        (
            "GET / HTTP/1.1\r\nConnection: Keep-Alive\r\n\r\n",
            (PLAIN, 14, 15, 38, "keep-alive", -1, -1, -1),
        ),
        ("GET / HTTP/1.1\r\nX-Real-IP: a\r\n\r\n", (REWRITE, 14, -1, -1, "", -1, -1, -1)),
        ("GET / HTTP/1.1\r\nX-Real-IPs: a\r\n\r\n", (PLAIN, 14, -1, -1, "", -1, -1, -1)),
        (
            "GET / HTTP/1.1\r\nContent-Location: /\r\nHostname: a\r\n\r\n",
            (PLAIN, 14, -1, -1, "", -1, -1, -1),
        ),
        (
            "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            (GENERAL, 14, -1, -1, "", -1, -1, -1),
        ),
        ("GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", (PLAIN, 14, -1, -1, "", -1, -1, -2)),
        ("GET * HTTP/1.1\r\n\r\n", (REWRITE, 14, -1, -1, "", -1, -1, -1)),
    ],
)
def test_request_scan_cases(head: str, expected: tuple[object, ...]) -> None:
    assert scan_request(head) == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (["content-length: 2"], (False, 2, -1, -1, "")),
        (["content-length: 2", "content-length: 3"], (False, 2, -1, -1, "")),
        (["content-length: x"], (False, -2, -1, -1, "")),
        (["connection: close"], (False, -1, 16, 34, "close")),
        (["connection: close", "connection: close"], (False, -1, 16, 34, "")),
        (["connection: keep-alive, x-hop"], (False, -1, 16, 46, "")),
        (["te-x: 1", "trailer: x"], (True, -1, -1, -1, "")),
    ],
)
def test_scan_response_cases(fields: list[str], expected: tuple[object, ...]) -> None:
    low = _head("http/1.1 200 ok", fields)
    assert scan_response(low) == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (["Content-Type: text/plain", "Content-Length: 2"], (False, 2, -1, -1, "")),
        (["Content-Length: 2", "CONTENT-LENGTH: 3"], (False, 2, -1, -1, "")),
        (["Connection: Keep-Alive"], (False, -1, 16, 39, "keep-alive")),
        (["Connection: close", "connection: close"], (False, -1, 16, 34, "")),
        (["Content-Location: /a", "Connection-X: close"], (False, -1, -1, -1, "")),
    ],
)
def test_scan_response_of_names_in_their_usual_capitals(
    fields: list[str], expected: tuple[object, ...]
) -> None:
    # Names as backends usually write them are compared as written, any other case after
    # lower-casing; the ninth letter of a "c" name picks which (Content-Location is not
    # Content-Length, Connection-X is not Connection).
    head = _head("HTTP/1.1 200 OK", fields)
    assert scan_response(head) == expected
    assert scan_response(head) == reference_response(head.lower())


# --- response plans: what goes to the client, decided without sockets -----------------------

OK_2 = b"HTTP/1.1 200 OK\r\nServer: b\r\nContent-Length: 2\r\n\r\nok"


def test_express_plan_passes_a_plain_response_as_it_is() -> None:
    assert express_response_plan(OK_2, True) == (OK_2, 200, 2, True)


def test_express_plan_adds_connection_close_when_the_client_closes() -> None:
    out, status, length, backend_keep = express_response_plan(OK_2, False)
    assert (
        out == b"HTTP/1.1 200 OK\r\nServer: b\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    )
    assert (status, length, backend_keep) == (200, 2, True)


@pytest.mark.parametrize(
    ("line", "keep", "out_line", "backend_keep"),
    [
        (b"Connection: keep-alive\r\n", True, b"Connection: keep-alive\r\n", True),
        (b"Connection: keep-alive\r\n", False, b"Connection: close\r\n", True),
        (b"Connection: close\r\n", True, b"", False),
        (b"Connection: close\r\n", False, b"Connection: close\r\n", False),
    ],
)
def test_express_plan_rewrites_a_lone_connection_line(
    line: bytes, keep: bool, out_line: bytes, backend_keep: bool
) -> None:
    data = b"HTTP/1.1 503 Busy\r\n" + line + b"Content-Length: 0\r\n\r\n"
    out, status, length, backend_keep_alive = express_response_plan(data, keep)
    assert out == b"HTTP/1.1 503 Busy\r\n" + out_line + b"Content-Length: 0\r\n\r\n"
    assert (status, length, backend_keep_alive) == (503, 0, backend_keep)


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok",  # the body continues in a later read
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1",  # bytes after it
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",  # the head is not complete
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close, x\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nServer: b\r\n\r\n",  # close-delimited
    ],
)
def test_express_plan_leaves_the_rest_to_the_general_path(data: bytes) -> None:
    assert express_response_plan(data, True) == NOT_EXPRESS


def _plan(
    head: bytes, version: bytes = b"1.1", is_head: bool = False, keep: bool = True
) -> tuple[bytes, int, bool, bool]:
    status = int(head[9:12])
    return response_plan(status, head, head.decode("latin-1"), version, is_head, keep)


def test_response_plan_keeps_the_head_and_drops_a_lone_connection_line() -> None:
    head = b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n"
    assert _plan(head) == (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", BODY_RAW, False, True)
    assert _plan(head, keep=False) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
        BODY_RAW,
        False,
        False,
    )


def test_response_plan_has_no_body_for_head_and_304() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
    assert _plan(head, is_head=True) == (head + b"\r\n", BODY_NONE, False, True)
    not_modified = b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n"
    assert _plan(not_modified) == (not_modified + b"\r\n", BODY_NONE, False, True)


def test_response_plan_of_a_204_drops_its_content_length() -> None:
    head = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nX: y\r\n"
    assert _plan(head) == (b"HTTP/1.1 204 No Content\r\nX: y\r\n\r\n", BODY_NONE, False, True)


def test_response_plan_reframes_chunked_and_close_delimited_bodies() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x\r\nX: y\r\n"
    out = b"HTTP/1.1 200 OK\r\nX: y\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert _plan(chunked) == (out, BODY_CHUNKED, False, True)
    # Close-delimited: re-encoded as chunked for HTTP/1.1, so the client connection stays.
    assert _plan(b"HTTP/1.1 200 OK\r\nX: y\r\n") == (out, BODY_CHUNKED, True, True)
    # An HTTP/1.0 client knows no chunked: the body ends when the proxy closes.
    assert _plan(b"HTTP/1.0 200 OK\r\nX: y\r\n", version=b"1.0") == (
        b"HTTP/1.1 200 OK\r\nX: y\r\nConnection: close\r\n\r\n",
        BODY_RAW,
        True,
        False,
    )


def test_response_plan_for_an_http10_client_says_keep_alive() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
    assert _plan(head, version=b"1.0") == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n",
        BODY_RAW,
        False,
        True,
    )


def test_response_plan_drops_hop_by_hop_headers_and_those_connection_names() -> None:
    head = (
        b"HTTP/1.1 200 OK\r\nConnection: x-secret, close\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n"
        b"Upgrade: h2c\r\nContent-Length: 2\r\nServer: b\r\n"
    )
    assert _plan(head) == (
        b"HTTP/1.1 200 OK\r\nServer: b\r\nContent-Length: 2\r\n\r\n",
        BODY_RAW,
        False,
        True,
    )


def test_response_plan_refuses_a_coding_it_cannot_relabel() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n"
    assert _plan(head) == (b"gzip, chunked", BODY_REFUSED, False, False)


# --- request plans: what goes to the backend ---------------------------------------------------

HOP = hop_for("x-forwarded", True, False, b"10.0.0.9", b"http", b"8000")


def _request(
    fields: list[tuple[bytes, bytes]],
    url: bytes = b"/a",
    version: bytes = b"1.1",
    trusted: bool = False,
    underscores: bool = False,
) -> RequestPlan:
    return request_plan(b"GET", version, url, fields, HOP, trusted, underscores)


def test_request_plan_of_a_plain_request() -> None:
    plan = _request([(b"Host", b"example.com"), (b"Accept", b"*/*")])
    assert plan.head == (
        b"GET /a HTTP/1.1\r\nAccept: */*\r\nHost: example.com\r\n" + b"example.com".join(HOP.parts)
    )
    assert b"X-Forwarded-For: 10.0.0.9\r\n" in plan.head and plan.head.endswith(b"\r\n\r\n")
    assert (plan.host, plan.valid) == (b"example.com", b"example.com")
    assert not (plan.chunked or plan.websocket or plan.expect_continue or plan.upgrade_body)


def test_request_plan_drops_hop_by_hop_named_and_forged_headers() -> None:
    fields = [
        (b"Host", b"h"),
        (b"Connection", b"x-drop, keep-alive, content-length"),
        (b"X-Drop", b"1"),
        (b"Keep-Alive", b"5"),
        (b"TE", b"trailers"),
        (b"X-Forwarded-For", b"6.6.6.6"),
        (b"X_Forwarded_For", b"6.6.6.6"),
        (b"Content-Length", b"2"),
    ]
    plan = _request(fields)
    assert b"6.6.6.6" not in plan.head and b"X-Drop" not in plan.head
    assert b"Keep-Alive" not in plan.head and b"TE:" not in plan.head
    assert b"Content-Length: 2\r\n" in plan.head  # framing is never dropped by Connection
    # From a trusted proxy its forwarding headers are believed, and appended to.
    trusted = _request(fields, trusted=True)
    assert b"X-Forwarded-For: 6.6.6.6, 10.0.0.9\r\n" in trusted.head
    assert b"X_Forwarded_For" not in trusted.head
    assert b"X_Forwarded_For: 6.6.6.6\r\n" in _request(fields, underscores=True).head


def test_request_plan_of_a_chunked_body() -> None:
    plan = _request([(b"Host", b"h"), (b"Transfer-Encoding", b"chunked")])
    assert plan.chunked and b"Transfer-Encoding: chunked\r\n" in plan.head
    with pytest.raises(NotImplementedByProxy):
        _request([(b"Host", b"h"), (b"Transfer-Encoding", b"gzip, chunked")])
    with pytest.raises(BadRequest):
        _request([(b"Host", b"h"), (b"Transfer-Encoding", b"gzip")])
    with pytest.raises(BadRequest):
        _request([(b"Host", b"h"), (b"Transfer-Encoding", b"chunked")], version=b"1.0")


def test_request_plan_of_an_absolute_form_target() -> None:
    plan = _request([(b"Host", b"other")], url=b"http://h.example/x?y")
    assert plan.head.startswith(b"GET /x?y HTTP/1.1\r\n")
    assert (plan.host, plan.valid) == (b"h.example", b"other")
    assert b"Host: h.example\r\n" in plan.head


def test_request_plan_offers_only_a_websocket_upgrade() -> None:
    ws = [(b"Host", b"h"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    plan = _request(ws)
    assert plan.websocket and b"Connection: upgrade\r\nUpgrade: websocket\r\n" in plan.head
    h2c = _request(h2c_fields())
    assert not h2c.websocket and b"pgrade" not in h2c.head
    body = _request([*h2c_fields(), (b"Content-Length", b"3")])
    assert body.upgrade_body == 3
    with pytest.raises(BadRequest):
        _request([*ws, (b"Content-Length", b"3")])


def h2c_fields() -> list[tuple[bytes, bytes]]:
    return [(b"Host", b"h"), (b"Connection", b"Upgrade"), (b"Upgrade", b"h2c")]


def test_request_plan_expect_and_host_rules() -> None:
    assert _request([(b"Host", b"h"), (b"Expect", b"100-continue")]).expect_continue
    assert not _request([(b"Expect", b"100-continue")], version=b"1.0").expect_continue
    with pytest.raises(ExpectationFailed):
        _request([(b"Host", b"h"), (b"Expect", b"x")])
    with pytest.raises(BadRequest):
        _request([(b"Host", b"h"), (b"Host", b"h")])
    with pytest.raises(BadRequest):
        _request([])  # HTTP/1.1 without Host
    with pytest.raises(BadRequest):
        _request([(b"Host", b"a b")])
    old = _request([], version=b"1.0")
    assert old.host is None and old.head == b"GET /a HTTP/1.1\r\n" + HOP.no_host


def _plain(raw: bytes, host_ok: bytes | None = None) -> tuple[bytes, bytes | None, bool, int]:
    scan = scan_request(raw.decode("latin-1"))
    assert scan[0] == PLAIN
    line_end = scan[1]
    http11 = raw[line_end - 9 : line_end] == b" HTTP/1.1"
    method = raw[: raw.find(b" ")]
    return plain_request_plan(raw, scan, method, http11, HOP.parts, HOP, host_ok)


def test_plain_request_plan_appends_the_forwarding_headers() -> None:
    raw = b"GET /a HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n\r\n"
    assert _plain(raw) == (raw[:-2] + b"h".join(HOP.parts), b"h", True, -1)
    assert _plain(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\n\r\n")[2:] == (True, 12)


def test_plain_request_plan_of_a_lone_connection_line() -> None:
    keep = _plain(b"GET / HTTP/1.1\r\nConnection: keep-alive\r\nHost: h\r\n\r\n")
    assert keep[0].startswith(b"GET / HTTP/1.1\r\nConnection: keep-alive\r\nHost: h")
    assert keep[2] is True
    close = _plain(b"GET / HTTP/1.1\r\nConnection: close\r\nHost: h\r\nContent-Length: 1\r\n\r\n")
    assert close[0].startswith(b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1")
    assert b"close" not in close[0] and close[2:] == (False, 1)
    # Any other Connection line: the general path removes what it names.
    assert _plain(b"GET / HTTP/1.1\r\nConnection: x-a\r\nHost: h\r\n\r\n") == NOT_PLAIN


def test_plain_request_plan_of_http10() -> None:
    head, host, keep, length = _plain(b"GET /x HTTP/1.0\r\nAccept: a\r\n\r\n")
    assert head == b"GET /x HTTP/1.1\r\nAccept: a\r\n" + HOP.no_host
    assert (host, keep, length) == (None, False, -1)
    head, host, keep, _ = _plain(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\nHost: h\r\n\r\n")
    assert head.startswith(b"GET /x HTTP/1.1\r\nConnection: keep-alive\r\nHost: h")
    assert (host, keep) == (b"h", True)


def test_plain_request_plan_host_rules() -> None:
    with pytest.raises(BadRequest):
        _plain(b"GET / HTTP/1.1\r\nHost: h\r\nHost: h\r\n\r\n")
    with pytest.raises(BadRequest):
        _plain(b"GET / HTTP/1.1\r\nAccept: a\r\n\r\n")
    with pytest.raises(BadRequest):
        _plain(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n")
    # A Host already found valid on this connection is not checked again.
    assert _plain(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", host_ok=b"a b")[1] == b"a b"


def test_keep_alive_of_a_request_head() -> None:
    assert keep_alive_of("get / http/1.1\r\nconnection: x, close\r\n", True) is False
    assert keep_alive_of("get / http/1.0\r\nconnection: keep-alive, x\r\n", False) is True
    assert keep_alive_of("get / http/1.0\r\nconnection: x\r\n", False) is False
    assert keep_alive_of("get / http/1.1\r\nhost: h\r\n", True) is True


def test_interim_and_switching_heads() -> None:
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\nKeep-Alive: 5\r\n"
    assert interim_head(hints, hints.decode("latin-1")) == (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
    )
    ws = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\nX: y\r\n"
    )
    assert switches(ws.decode("latin-1").lower())
    assert not switches("http/1.1 101 switching protocols\r\nupgrade: websocket\r\n")
    assert websocket_101(ws) == (
        b"HTTP/1.1 101 Switching Protocols\r\nX: y\r\n"
        b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert websocket_101(ws.replace(b"WebSocket", b"h2c")) == b""
