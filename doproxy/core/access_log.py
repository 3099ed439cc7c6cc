"""Access log lines: the combined and JSON formats, and escaping that hostile input cannot break.

Pure: the caller passes the wall-clock time in; nothing here reads a clock or writes anything
(doproxy/proxy/access.py writes the lines).

Combined (Apache/nginx "combined", plus the two fields nginx users most often append):

    $remote_addr - - [$time_local] "$request" $status $body_bytes_sent "$http_referer"
        "$http_user_agent" $request_time $upstream_addr

Every byte a client chose (the request target, Referer, User-Agent) is escaped as nginx does
it: `"`, `\\`, control bytes (below 0x20, and 0x7F) and every byte from 0x80 up become `\\xHH`,
so the line stays one line of printable ASCII whatever was sent, and quotes cannot end a field
early. An absent header, a missing backend or an unknown request is `-`.

JSON: one object per line, from `json.JSONEncoder` with ASCII output, so a newline, a quote or a
non-ASCII character in a value arrives escaped (`\\n`, `\\"`, `\\u00e9`) and the line cannot
break. Header bytes and the target are read as UTF-8; a byte that is not valid UTF-8 shows as
the four characters `\\xHH` inside the string.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Final

# What nginx escapes in log variables (ngx_http_log_escape): '"', '\\', controls and 0x7F up.
_ESCAPES: Final = {c: f"\\x{c:02X}" for c in (*range(0x20), 0x22, 0x5C, *range(0x7F, 0x100))}

# Fixed English month names, as the Common Log Format has them whatever the locale.
_MONTHS: Final = (
    "Jan",
    "Feb",
    "Mar",
    "Apr",
    "May",
    "Jun",
    "Jul",
    "Aug",
    "Sep",
    "Oct",
    "Nov",
    "Dec",
)

# One compact encoder, made once (json.dumps with arguments builds a new one per call).
_JSON: Final = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))


def escape(value: bytes) -> str:
    """`value` as nginx writes a variable into a log line: printable ASCII other than `"` and
    `\\` as it is, every other byte as `\\xHH`."""
    text = value.decode("latin-1")  # one byte, one character: nothing can fail to decode
    # The common case (a plain URL or User-Agent) needs no copy through the table.
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return text.translate(_ESCAPES)


def text(value: bytes) -> str:
    """Bytes a client sent, as a string for JSON: UTF-8, undecodable bytes as `\\xHH`."""
    return value.decode("utf-8", "backslashreplace")


class Timestamps:
    """The local time of a log line in both formats, formatted once per second.

    A busy proxy writes thousands of lines a second; formatting a date is the dearest part of
    a line, and it changes only once a second (the JSON form's milliseconds are added per line).
    """

    def __init__(self) -> None:
        self._second = -1
        self._clf = ""
        self._iso = ""  # up to the seconds
        self._offset = ""  # "+02:00"

    def _at(self, second: int) -> None:
        local = datetime.fromtimestamp(second).astimezone()
        delta = local.utcoffset()
        minutes = int(delta.total_seconds()) // 60 if delta is not None else 0
        sign = "-" if minutes < 0 else "+"
        hours, minutes = divmod(abs(minutes), 60)
        self._second = second
        self._clf = (
            f"{local.day:02d}/{_MONTHS[local.month - 1]}/{local.year}:"
            f"{local.hour:02d}:{local.minute:02d}:{local.second:02d} {sign}{hours:02d}{minutes:02d}"
        )
        self._iso = local.strftime("%Y-%m-%dT%H:%M:%S")
        self._offset = f"{sign}{hours:02d}:{minutes:02d}"

    def clf(self, now: float) -> str:
        """`10/Oct/2000:13:55:36 -0700` (nginx's $time_local)."""
        second = int(now)
        if second != self._second:
            self._at(second)
        return self._clf

    def iso(self, now: float) -> str:
        """`2000-10-10T13:55:36.123-07:00` (ISO 8601, local time with its offset)."""
        second = int(now)
        if second != self._second:
            self._at(second)
        # (Milliseconds from now * 1000: now - second would turn .418 into .417999...)
        return f"{self._iso}.{int(now * 1000) % 1000:03d}{self._offset}"


def combined(
    when: str,
    client: bytes,
    method: bytes,
    target: bytes,
    version: bytes,
    status: int,
    sent: int,
    referer: bytes | None,
    user_agent: bytes | None,
    duration: float,
    backend: str | None,
) -> str:
    """One line in the combined format (no line break): `when` is Timestamps.clf's."""
    # No method: refused before its request line was understood.
    request = f"{escape(method)} {escape(target)} HTTP/{escape(version)}" if method else "-"
    return (
        f"{escape(client)} - - [{when}] "
        f'"{request}" {status} {sent} '
        f'"{"-" if referer is None else escape(referer)}" '
        f'"{"-" if user_agent is None else escape(user_agent)}" '
        f"{duration:.3f} {backend or '-'}"
    )


def as_json(
    when: str,
    client: bytes,
    method: bytes,
    target: bytes,
    version: bytes,
    status: int,
    sent: int,
    referer: bytes | None,
    user_agent: bytes | None,
    duration: float,
    backend: str | None,
    retries: int,
) -> str:
    """One line of JSON (no line break): `when` is Timestamps.iso's."""
    return _JSON.encode(
        {
            "time": when,
            "client": text(client),
            "method": text(method) if method else None,
            "target": text(target) if method else None,
            "protocol": f"HTTP/{text(version)}" if method else None,
            "status": status,
            "bytes": sent,
            "referer": None if referer is None else text(referer),
            "user_agent": None if user_agent is None else text(user_agent),
            "duration": round(duration, 6),
            "backend": backend,
            "retries": retries,
        }
    )
