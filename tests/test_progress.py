"""The progress line of long waits (a machine booting, a drain): live on a terminal, plain
lines elsewhere."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from doproxy.commands import Waiting

pytestmark = pytest.mark.timeout(10)


def test_waiting_plain_lines_off_a_terminal() -> None:
    buf = io.StringIO()
    with Waiting(Console(file=buf, force_terminal=False), "waiting for web-1") as w:
        w.update("new", 0.2)
        w.update("new", 3.0)  # the same status within 10 s: no line
        w.update("new", 10.5)  # ... but every 10 s one
        w.update("active", 11.0)
    assert buf.getvalue().splitlines() == [
        "  waiting for web-1: new (0s)",
        "  waiting for web-1: new (10s)",
        "  waiting for web-1: active (11s)",
    ]


def test_waiting_is_one_live_line_on_a_terminal() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=80)
    with Waiting(console, "draining b1 (1)") as w:
        w.update("", 1.0, "3 request(s) in flight")
        w.update("", 2.0, "0 request(s) in flight")
    text = buf.getvalue()
    assert "\x1b[" in text  # drawn in place with control codes
    # What stays after the live line is gone: the last state, once.
    assert text.count("  draining b1 (1): 0 request(s) in flight (2s)") == 1
