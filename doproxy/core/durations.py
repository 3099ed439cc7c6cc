"""Go-style duration strings ("250ms", "2s", "1h30m"), as the 2015 doproxy config used them."""

from __future__ import annotations

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """Parse a Go duration string into seconds.

    Accepts what Go's time.ParseDuration accepts: an optional sign, then one or more
    number+unit pairs ("1h30m", "1.5s", "300ms"). "0" alone is allowed. Hand-written because
    no maintained Python library speaks Go's exact grammar.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    total = 0.0
    i = 0
    n = len(s)
    if n == 0:
        raise ValueError(f"invalid duration {text!r}")
    while i < n:
        start = i
        while i < n and (s[i].isdigit() or s[i] == "."):
            i += 1
        number = s[start:i]
        if not number or number == "." or number.count(".") > 1:
            raise ValueError(f"invalid duration {text!r}")
        ustart = i
        while i < n and not (s[i].isdigit() or s[i] == "."):
            i += 1
        unit = s[ustart:i]
        if unit not in _UNITS:
            if not unit:
                raise ValueError(f'missing unit in duration {text!r} (e.g. "2s", "250ms")')
            raise ValueError(f"unknown unit {unit!r} in duration {text!r}")
        total += float(number) * _UNITS[unit]
    return sign * total


def format_duration(seconds: float) -> str:
    """Format seconds the way a human (and Go) would write them: 250ms, 2s, 1m30s."""
    if seconds == 0:
        return "0s"
    neg = seconds < 0
    seconds = abs(seconds)
    if seconds < 1:
        out = f"{seconds * 1000:g}ms"
    else:
        h, rem = divmod(seconds, 3600)
        m, s = divmod(rem, 60)
        out = ""
        if h:
            out += f"{int(h)}h"
        if m:
            out += f"{int(m)}m"
        if s or not out:
            out += f"{s:g}s"
    return "-" + out if neg else out
