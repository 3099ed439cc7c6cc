"""core/http11: the one-walk head scanners agree with the plain searches they replaced."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from doproxy.core.http11 import (
    GENERAL,
    PLAIN,
    REWRITE,
    lone_connection,
    request_head_kind,
    scan_response,
)

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
    start, end, value = lone_connection(low)
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


@given(st.lists(lines, max_size=8))
def test_scan_response_agrees_with_the_searches(fields: list[str]) -> None:
    low = _head("http/1.1 200 ok", fields)
    assert scan_response(low) == reference_response(low)


@given(
    st.lists(lines, max_size=8),
    st.sampled_from(["/te:", "/a_b", "*", "http://h/", "http://h_x/"]),
    st.sampled_from(["", "\r\n", "\n"]),
)
def test_request_head_kind_agrees_with_the_searches(
    fields: list[str], target: str, before: str
) -> None:
    low = before + _head(f"get {target} http/1.1", fields) + "\r\n"
    assert request_head_kind(low) == reference_request(low)


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
