"""Scanning request and response heads as text: the data plane's innermost loops.

These run on every request, so they live in the data plane and are compiled with client.py
and upstream.py (setup.py): a call into an interpreted helper costs more than the scan.
Heads are searched as latin-1 text: latin-1 maps bytes to characters one to one, so positions
match, and CPython 3.11's bytes.find and `in` first try the needle as an integer, raising and
swallowing a TypeError on every call, which costs more than the search itself.
"""

from __future__ import annotations

HEAD_SCAN = 8192  # a response head is looked for in this many bytes first


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


def lone_connection(low: str) -> tuple[int, int, str]:
    """The Connection line of a lower-cased head: (start, end, value).

    `start` is the index of the line break before the line and `end` that of its CRLF, or
    (-1, -1, "") when there is none. `value` is "keep-alive" or "close" for a single line with
    just that token, and "" for anything else (other tokens, several Connection lines): those
    heads need the general path, which removes every header Connection names.
    """
    i = low.find("\nconnection:")
    if i < 0:
        return -1, -1, ""
    j = low.find("\r\n", i)
    value = low[i + 12 : j].strip()
    if (value != "keep-alive" and value != "close") or "\nconnection:" in low[j:]:
        value = ""
    return i, j, value


def response_needs_general_path(low: str) -> bool:
    """True when a lower-cased response head has a hop-by-hop header other than Connection.

    One split into lines, then each header's first letter as an integer, and names compared
    only where that letter fits (t, k, u, p, h). This replaces a search of the whole head per
    header name: a response head is ~250 characters, a substring search costs about four
    instructions per character, and five of them cost more than the rest of the response
    path. (Splitting on a single character is a memchr; comparing code points is native
    integer work once compiled.)
    """
    for line in low.split("\n"):
        if not line:
            continue
        c = ord(line[0])
        if c == 116:  # t
            if (
                line.startswith("transfer-encoding:")
                or line.startswith("te:")
                or line.startswith("trailer:")
            ):
                return True
        elif c == 107:  # k
            if line.startswith("keep-alive:"):
                return True
        elif c == 117:  # u
            if line.startswith("upgrade:"):
                return True
        elif c == 112:  # p
            if line.startswith("proxy-connection:"):
                return True
        elif c == 104 and line.startswith("http2-settings:"):  # h
            return True
    return False
