"""Scale to zero, the pure part: which requests wake a sleeping pool, and the waiting page.

A request whose path starts with one of the `wake-ignore` entries that start with "/", or whose
User-Agent contains (case-insensitively) one of the others, neither wakes the pool nor keeps it
awake: uptime checkers and health probes would otherwise keep a pool that nobody uses running,
the most common complaint about scale to zero (Sablier's users). Everything here reads the
request head as received (validated by llhttp); nothing does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from doproxy.core.http11 import split_head


@dataclass(frozen=True)
class WakeRules:
    paths: tuple[bytes, ...] = ()
    agents: tuple[bytes, ...] = ()  # lower-case

    @classmethod
    def of(cls, entries: tuple[str, ...]) -> WakeRules:
        return cls(
            paths=tuple(e.encode() for e in entries if e.startswith("/")),
            agents=tuple(e.lower().encode() for e in entries if not e.startswith("/")),
        )


def _field(fields: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    for n, v in fields:
        if n.lower() == name:
            return v
    return b""


def ignored(head: bytes, rules: WakeRules) -> bool:
    """Does this request neither wake the pool nor keep it awake?"""
    if not rules.paths and not rules.agents:
        return False
    line, fields = split_head(head)
    parts = line.split(b" ")
    target = parts[1] if len(parts) > 1 else b""
    if b"://" in target[:10]:  # absolute form: the path starts after the authority
        slash = target.find(b"/", target.find(b"://") + 3)
        target = target[slash:] if slash >= 0 else b"/"
    if any(target.startswith(p) for p in rules.paths):
        return True
    if rules.agents:
        agent = _field(fields, b"user-agent").lower()
        return any(a in agent for a in rules.agents)
    return False


def wants_html(head: bytes) -> bool:
    """A browser navigating: a GET whose Accept names text/html."""
    line, fields = split_head(head)
    return line.startswith(b"GET ") and b"text/html" in _field(fields, b"accept").lower()


def waiting_page(refresh: int) -> tuple[bytes, bytes]:
    """The page a browser gets while the pool wakes: it reloads itself every `refresh` s."""
    body = (
        b"<!doctype html><meta charset=utf-8><meta http-equiv=refresh content=%d>"
        b"<title>Starting</title><style>body{font:16px system-ui,sans-serif;margin:20vh auto;"
        b"max-width:32em;text-align:center;color:#333}</style>"
        b"<h1>Starting up</h1><p>This site was asleep and is starting. This page reloads "
        b"itself; it usually takes under a minute.</p>" % refresh
    )
    return b"text/html; charset=utf-8", body
