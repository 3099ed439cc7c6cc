"""The pure core, tested without an event loop."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from doproxy.core.balancers import LeastConn, RoundRobin, make_balancer
from doproxy.core.durations import format_duration, parse_duration
from doproxy.core.http11 import chunk, connection_tokens, error_response
from doproxy.core.settings import Settings, parse_bind


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("15m", 900.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("300us", 0.0003),
        ("300µs", 0.0003),
        ("0", 0.0),
        ("-2s", -2.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "2", "2 s", "s", "1.2.3s", "2parsecs", "ms"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**6))
def test_format_then_parse_round_trips(ms: int) -> None:
    assert parse_duration(format_duration(ms / 1000)) == pytest.approx(ms / 1000)


@dataclass
class B:
    name: str
    in_flight: int = 0


def test_round_robin_cycles_and_handles_empty() -> None:
    rr = RoundRobin()
    bs = [B("a"), B("b"), B("c")]
    assert [rr.pick(bs).name for _ in range(6)] == list("abcabc")  # type: ignore[union-attr]
    assert rr.pick([]) is None
    # The list shrinking (a backend went down) never makes it fail or spin.
    assert rr.pick(bs[:1]) is bs[0]


def test_least_conn_prefers_idle_and_rotates_ties() -> None:
    # Two choices: "a" loses every comparison it is drawn into; b and c share the rest.
    lc = LeastConn(random.Random(1))
    bs = [B("a", 3), B("b", 1), B("c", 1)]
    picks = [lc.pick(bs).name for _ in range(300)]  # type: ignore[union-attr]
    assert set(picks) == {"b", "c"}
    assert 120 < picks.count("b") < 180
    assert lc.pick([]) is None


def test_make_balancer() -> None:
    assert isinstance(make_balancer("leastconn"), LeastConn)
    assert isinstance(make_balancer("roundrobin"), RoundRobin)


def test_http_rules() -> None:
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert connection_tokens([b"Keep-Alive, X-A", b" upgrade "]) == {
        b"keep-alive",
        b"x-a",
        b"upgrade",
    }
    r = error_response(503)
    assert r.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Connection: close\r\n" in r
    assert r.endswith(b"\r\n\r\n503 Service Unavailable\n")


def test_bind_forms() -> None:
    assert parse_bind(":8000") == (None, 8000)
    assert parse_bind("127.0.0.1:80") == ("127.0.0.1", 80)
    assert parse_bind("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError):
        parse_bind("8000")


def test_minimal_settings_have_go_defaults() -> None:
    s = Settings()
    assert s.bind == ":8000"
    assert s.backend.dial_timeout == 2.0
    assert s.backend.health_check_timeout == 0.25
    assert s.loadbalancing.type == "roundrobin"
    assert s.provisioning.upscale_latency == 0.5


@pytest.mark.parametrize("key", ["header:", "cookie", "path", "header"])
def test_bad_hash_key_is_refused(key: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="hash-key"):
        Settings.model_validate({"loadbalancing": {"type": "hash", "hash-key": key}})


def test_cookie_value() -> None:
    from doproxy.core.http11 import cookie_value

    assert cookie_value(b"a=1; sid=xyz; b=2", b"sid") == b"xyz"
    assert cookie_value(b"sidx=1", b"sid") is None
