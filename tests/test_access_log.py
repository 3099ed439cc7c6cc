"""The access log (docs/configuration.md, "Access log"): its two formats, escaping hostile
input, the file and its reopening on SIGUSR1, and reloads that change it.

Real proxies in front of real backends on 127.0.0.1; the lines are read from the file the
running proxy writes (or from its standard output).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path

import pytest

from doproxy.config import load_settings
from doproxy.core.access_log import Timestamps, as_json, combined, escape
from doproxy.errors import ConfigError
from doproxy.inventory import load_inventory
from doproxy.runtime import Runtime
from tests.conftest import wait_for
from tests.support import Client, RawBackend, dead_port, echo_handler, get, request, silent
from tests.test_config_files import run_check
from tests.test_reload import config, inventory

pytestmark = pytest.mark.timeout(30)

MakeRuntime = Callable[..., Awaitable[Runtime]]

# The combined format as documented, every field pinned down.
COMBINED = re.compile(
    r"(?P<client>\S+) - - \[(?P<time>\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4})\] "
    r'"(?P<request>[^"]*)" (?P<status>\d{3}) (?P<bytes>\d+) '
    r'"(?P<referer>[^"]*)" "(?P<user_agent>[^"]*)" (?P<duration>\d+\.\d{3}) (?P<backend>\S+)'
)


@pytest.fixture
async def make_runtime(tmp_path: Path) -> AsyncIterator[MakeRuntime]:
    made: list[Runtime] = []

    async def _make(extra: str, *ports: int) -> Runtime:
        cfg = tmp_path / "doproxy.toml"
        cfg.write_text(config(extra=extra, watch=False))
        (tmp_path / "inventory.toml").write_text(inventory(*ports))
        rt = Runtime(load_settings(cfg), load_inventory(tmp_path / "inventory.toml"), cfg)
        await rt.start()
        made.append(rt)
        return rt

    yield _make
    for rt in made:
        await rt.stop()


@pytest.fixture
async def backend(backend_factory: Callable[..., Awaitable[RawBackend]]) -> RawBackend:
    return await backend_factory(echo_handler)


def port_of(rt: Runtime) -> int:
    assert rt.server is not None
    return rt.server.addresses[0][1]


def lines(rt: Runtime, path: Path) -> list[str]:
    """The lines in the access log file, after flushing what the proxy buffered."""
    assert rt.access is not None
    rt.access.flush()
    return path.read_text().splitlines() if path.exists() else []


async def test_combined_line_for_a_get_with_referer_and_user_agent(
    make_runtime: MakeRuntime, backend: RawBackend, tmp_path: Path
) -> None:
    rt = await make_runtime('access-log = true\naccess-log-file = "access.log"', backend.port)
    extra = "Referer: http://ref.example/from?q=1\r\nUser-Agent: curl/8.0 (test; x)\r\n"
    r = await request(port_of(rt), get("/a?b=1", extra=extra))
    assert r.status == 200
    (line,) = lines(rt, tmp_path / "access.log")
    m = COMBINED.fullmatch(line)
    assert m, line
    assert m["client"] == "127.0.0.1"
    assert m["request"] == "GET /a?b=1 HTTP/1.1"
    assert m["status"] == "200"
    assert m["bytes"] == str(len(r.body))  # the body handed to the client
    assert m["referer"] == "http://ref.example/from?q=1"
    assert m["user_agent"] == "curl/8.0 (test; x)"
    assert float(m["duration"]) < 5
    assert m["backend"] == f"127.0.0.1:{backend.port}"
    # The time is now, in local time with its offset, as the Common Log Format writes it.
    when = datetime.strptime(m["time"], "%d/%b/%Y:%H:%M:%S %z")
    assert abs(when.timestamp() - time.time()) < 60


async def test_combined_lines_for_a_chunked_response_and_no_referer_or_agent(
    make_runtime: MakeRuntime,
    backend_factory: Callable[..., Awaitable[RawBackend]],
    tmp_path: Path,
) -> None:
    async def chunked(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
    ) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            await writer.drain()

    b = await backend_factory(chunked)
    rt = await make_runtime('access-log = true\naccess-log-file = "access.log"', b.port)
    c = await Client.connect(port_of(rt))
    await c.send(get("/stream"))
    assert (await c.response()).body == b"hello world"
    await c.send(get("/no-headers"))
    await c.response()
    await c.close()
    # The general path (a chunked response) counts the body bytes as they pass.
    first, second = (COMBINED.fullmatch(x) for x in lines(rt, tmp_path / "access.log"))
    assert first and second
    assert (first["request"], first["status"], first["bytes"]) == (
        "GET /stream HTTP/1.1",
        "200",
        "11",
    )
    assert (second["referer"], second["user_agent"]) == ("-", "-")


async def test_errors_are_logged_with_the_backend_that_failed(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    dead = await dead_port()
    rt = await make_runtime(
        'access-log = true\naccess-log-file = "access.log"\n[retries]\nattempts = 0', dead
    )
    r = await request(port_of(rt), b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx")
    assert r.status == 502
    (line,) = lines(rt, tmp_path / "access.log")
    m = COMBINED.fullmatch(line)
    assert m, line
    assert (m["request"], m["status"], m["bytes"]) == ("POST /p HTTP/1.1", "502", str(len(r.body)))
    assert m["backend"] == f"127.0.0.1:{dead}"


async def test_no_backend_at_all_is_a_503_with_no_backend_address(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    rt = await make_runtime('access-log = true\naccess-log-file = "access.log"')
    assert (await request(port_of(rt), get("/none"))).status == 503
    (line,) = lines(rt, tmp_path / "access.log")
    m = COMBINED.fullmatch(line)
    assert m and (m["status"], m["backend"]) == ("503", "-")


async def test_json_lines_parse_with_named_fields(
    make_runtime: MakeRuntime, backend: RawBackend, tmp_path: Path
) -> None:
    rt = await make_runtime(
        'access-log = true\naccess-log-format = "json"\naccess-log-file = "access.log"',
        backend.port,
    )
    extra = 'Referer: http://ref.example/\r\nUser-Agent: agent "quoted" \\ back\r\n'
    r = await request(port_of(rt), get("/j?x=%20y", extra=extra))
    old = await request(port_of(rt), b"GET /h HTTP/1.0\r\n\r\n")
    assert old.status == 200
    first, second = (json.loads(x) for x in lines(rt, tmp_path / "access.log"))
    assert set(first) == {
        "time",
        "client",
        "method",
        "target",
        "protocol",
        "status",
        "bytes",
        "referer",
        "user_agent",
        "duration",
        "backend",
        "retries",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", first["time"])
    assert first["client"] == "127.0.0.1"
    assert (first["method"], first["target"], first["protocol"]) == ("GET", "/j?x=%20y", "HTTP/1.1")
    assert (first["status"], first["bytes"]) == (200, len(r.body))
    assert first["referer"] == "http://ref.example/"
    assert first["user_agent"] == 'agent "quoted" \\ back'
    assert isinstance(first["duration"], float) and 0 <= first["duration"] < 5
    assert first["backend"] == f"127.0.0.1:{backend.port}"
    assert first["retries"] == 0
    # HTTP/1.0 without Host, Referer or User-Agent (null).
    assert (second["target"], second["protocol"], second["bytes"]) == (
        "/h",
        "HTTP/1.0",
        len(old.body),
    )
    assert second["referer"] is None and second["user_agent"] is None


# What a client may send to break the log: quotes to end a field early and write fields of its
# own, backslashes (to fake an escape), tabs, bytes that are not UTF-8, UTF-8 that Python counts
# as line breaks (U+2028, U+0085). llhttp lets these through in header values; in the target
# it allows only printable ASCII, quotes and backslashes included.
HOSTILE_VALUES = [
    b'x" 200 0 "-" "-" 0.000 - forged',
    b"back\\slash \\x22 \\\\",
    b"tab\there",
    b"latin \xe9\xff\xfe not utf-8",
    "caf\u00e9 \u2028 \u0085".encode(),
    b'"',
]
HOSTILE_TARGETS = [b'/t?q="forged"', b"/t\\x22\\", b'/t?a="b"&c=\\', b"/t?%0A%0D%22"]
# Control bytes and line breaks never pass the parser: refused with 400, never forwarded.
UNPARSABLE = [b"del\x7fhere", b"\x01\x1b[31mred", b"line\rbreak", b"x\nGET /forged HTTP/1.1"]


@pytest.mark.parametrize("fmt", ["combined", "json"])
async def test_hostile_input_cannot_break_or_forge_a_line(
    make_runtime: MakeRuntime, backend: RawBackend, tmp_path: Path, fmt: str
) -> None:
    rt = await make_runtime(
        f'access-log = true\naccess-log-format = "{fmt}"\naccess-log-file = "access.log"',
        backend.port,
    )
    sent = [(b"/ok", v) for v in HOSTILE_VALUES + UNPARSABLE] + [
        (t, b"ok") for t in HOSTILE_TARGETS
    ]
    statuses = []
    for target, value in sent:
        raw = (
            b"GET " + target + b" HTTP/1.1\r\nHost: h\r\nReferer: " + value + b"\r\n"
            b"User-Agent: " + value + b"\r\n\r\n"
        )
        statuses.append((await asyncio.wait_for(request(port_of(rt), raw), 5)).status)
    assert statuses == [200] * len(HOSTILE_VALUES) + [400] * len(UNPARSABLE) + [200] * len(
        HOSTILE_TARGETS
    )
    got = lines(rt, tmp_path / "access.log")
    for line in got:
        assert line.isascii() and line.isprintable(), line
    if fmt == "combined":
        matches = [COMBINED.fullmatch(line) for line in got]
        assert all(matches), got
        ok = [m for m in matches if m is not None and m["status"] == "200"]
        assert len(ok) == len(HOSTILE_VALUES) + len(HOSTILE_TARGETS)
        # Each field holds what was sent, escaped; none was ended early by a quote.
        assert ok[0]["user_agent"] == "x\\x22 200 0 \\x22-\\x22 \\x22-\\x22 0.000 - forged"
        assert ok[1]["referer"] == "back\\x5Cslash \\x5Cx22 \\x5C\\x5C"
        assert ok[2]["user_agent"] == "tab\\x09here"
        assert ok[3]["user_agent"] == "latin \\xE9\\xFF\\xFE not utf-8"
        assert ok[4]["user_agent"] == "caf\\xC3\\xA9 \\xE2\\x80\\xA8 \\xC2\\x85"
        requests = [m["request"] for m in ok[len(HOSTILE_VALUES) :]]
        assert requests == [
            "GET /t?q=\\x22forged\\x22 HTTP/1.1",
            "GET /t\\x5Cx22\\x5C HTTP/1.1",
            "GET /t?a=\\x22b\\x22&c=\\x5C HTTP/1.1",
            "GET /t?%0A%0D%22 HTTP/1.1",
        ]
    else:
        entries = [json.loads(line) for line in got]
        ok = [e for e in entries if e["status"] == 200]
        assert len(ok) == len(HOSTILE_VALUES) + len(HOSTILE_TARGETS)
        # What was sent comes back intact where it is UTF-8, and visibly escaped where not.
        assert [e["user_agent"] for e in ok[: len(HOSTILE_VALUES)]] == [
            'x" 200 0 "-" "-" 0.000 - forged',
            "back\\slash \\x22 \\\\",
            "tab\there",
            "latin \\xe9\\xff\\xfe not utf-8",
            "caf\u00e9 \u2028 \u0085",
            '"',
        ]
        assert [e["target"] for e in ok[len(HOSTILE_VALUES) :]] == [
            t.decode() for t in HOSTILE_TARGETS
        ]
    assert "/forged" not in "".join(got)  # the request smuggled into a header value


def test_escaping_covers_every_byte_and_is_reversible() -> None:
    every = bytes(range(256))
    out = escape(every)
    assert out.isascii() and out.isprintable() and '"' not in out
    assert out.count("\\") == len(re.findall(r"\\x[0-9A-F]{2}", out))
    assert re.sub(r"\\x([0-9A-F]{2})", lambda m: chr(int(m[1], 16)), out).encode("latin-1") == every
    assert escape(b"/plain?a=1&b=two words") == "/plain?a=1&b=two words"
    when = Timestamps().clf(0.0)
    line = combined(when, b"::1", b"GET", every, b"1.1", 200, 0, every, every, 0.0, None)
    assert "\n" not in line and COMBINED.fullmatch(line)
    record = as_json(when, b"::1", b"GET", every, b"1.1", 200, 0, every, every, 0.0, None, 0)
    assert record.isascii() and record.isprintable()
    assert json.loads(record)["target"].startswith("\x00\x01")  # controls come back as sent


async def test_standard_output_when_no_file_is_named(
    make_runtime: MakeRuntime, backend: RawBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    rt = await make_runtime("access-log = true", backend.port)
    await request(port_of(rt), get("/out"))
    assert rt.access is not None
    rt.access.flush()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and COMBINED.fullmatch(out[0]), out
    assert '"GET /out HTTP/1.1" 200' in out[0]


async def test_access_lines_stay_out_of_the_error_log(
    make_runtime: MakeRuntime,
    backend: RawBackend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    rt = await make_runtime('access-log = true\naccess-log-file = "access.log"', backend.port)
    await request(port_of(rt), get("/quiet"))
    logging.getLogger("doproxy.access").info("from elsewhere %s", "\nsecond")
    got = lines(rt, tmp_path / "access.log")
    assert len(got) == 2 and got[1] == "from elsewhere \\x0Asecond"
    assert not [r for r in caplog.records if "/quiet" in r.getMessage()]
    assert not [r for r in caplog.records if r.name == "doproxy.access"]


async def test_off_costs_a_bool_test_and_writes_nothing(
    make_runtime: MakeRuntime, backend: RawBackend, tmp_path: Path
) -> None:
    rt = await make_runtime("", backend.port)
    assert rt.access is None
    assert rt.server is not None and rt.server.access is None
    await request(port_of(rt), get())
    assert not (tmp_path / "access.log").exists()


async def test_lines_reach_the_file_within_about_a_second_and_sigusr1_reopens_it(
    make_runtime: MakeRuntime, backend: RawBackend, tmp_path: Path
) -> None:
    """logrotate's way: rename the file, then `kill -USR1`; new lines go to a new file at the
    configured path, and nothing buffered is lost from the old one."""
    path = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    rt = await make_runtime('access-log = true\naccess-log-file = "access.log"', backend.port)
    await request(port_of(rt), get("/before"))
    # No explicit flush: the writer's own timer gets the line out (tail -f sees it).
    await wait_for(lambda: path.exists() and "/before" in path.read_text(), timeout=5)
    await request(port_of(rt), get("/buffered"))  # still in the buffer when the file moves
    os.rename(path, rotated)
    os.kill(os.getpid(), signal.SIGUSR1)
    await wait_for(path.exists)
    await request(port_of(rt), get("/after"))
    await wait_for(lambda: "/after" in path.read_text(), timeout=5)
    old = rotated.read_text().splitlines()
    new = path.read_text().splitlines()
    assert ['"GET /before' in old[0], '"GET /buffered' in old[1], len(old)] == [True, True, 2]
    assert len(new) == 1 and '"GET /after HTTP/1.1" 200' in new[0]


async def test_reopen_failure_keeps_the_old_file(
    make_runtime: MakeRuntime,
    backend: RawBackend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    rt = await make_runtime('access-log = true\naccess-log-file = "logs/access.log"', backend.port)
    os.rename(logs, tmp_path / "logs.old")  # the folder is gone: the path cannot be reopened
    rt.reopen_logs()  # what SIGUSR1 calls
    assert "cannot reopen" in caplog.text and "send SIGUSR1 again" in caplog.text
    await request(port_of(rt), get("/still"))
    assert rt.access is not None
    rt.access.flush()
    assert "/still" in (tmp_path / "logs.old" / "access.log").read_text()


async def test_a_reload_switches_the_format_for_open_connections_too(
    make_runtime: MakeRuntime, backend: RawBackend, tmp_path: Path
) -> None:
    rt = await make_runtime('access-log = true\naccess-log-file = "access.log"', backend.port)
    first = rt.access
    c = await Client.connect(port_of(rt))
    await c.send(get("/one"))
    await c.response()
    (tmp_path / "doproxy.toml").write_text(
        config(
            extra='access-log = true\naccess-log-format = "json"\naccess-log-file = "access.log"',
            watch=False,
        )
    )
    os.kill(os.getpid(), signal.SIGHUP)
    await wait_for(lambda: rt.reloads == 1)
    assert rt.access is not first and rt.access is not None
    await c.send(get("/two"))  # the same keep-alive connection, opened before the reload
    await c.response()
    await c.close()
    one, two = lines(rt, tmp_path / "access.log")
    assert COMBINED.fullmatch(one) and "/one" in one
    assert json.loads(two)["target"] == "/two"


async def test_a_reload_that_keeps_the_access_log_keeps_its_file_open(
    make_runtime: MakeRuntime, backend: RawBackend, tmp_path: Path
) -> None:
    extra = 'access-log = true\naccess-log-file = "access.log"'
    rt = await make_runtime(extra, backend.port)
    first = rt.access
    (tmp_path / "doproxy.toml").write_text(config(extra=extra + "\nvia = true", watch=False))
    assert await rt.reload()
    assert rt.access is first


async def test_a_reload_turning_the_log_off_stops_it_at_once(
    make_runtime: MakeRuntime, backend: RawBackend, tmp_path: Path
) -> None:
    rt = await make_runtime('access-log = true\naccess-log-file = "access.log"', backend.port)
    c = await Client.connect(port_of(rt))
    await c.send(get("/on"))
    await c.response()
    (tmp_path / "doproxy.toml").write_text(config(watch=False))
    assert await rt.reload()
    assert rt.access is None
    await c.send(get("/off"))
    await c.response()
    await c.close()
    # Everything before the reload was flushed when the old writer closed.
    text = (tmp_path / "access.log").read_text()
    assert "/on" in text and "/off" not in text


async def test_an_unwritable_file_fails_the_reload_and_the_old_log_keeps_going(
    make_runtime: MakeRuntime,
    backend: RawBackend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rt = await make_runtime('access-log = true\naccess-log-file = "access.log"', backend.port)
    first = rt.access
    # A folder that does not exist (an unwritable one is writable to root, who runs CI).
    (tmp_path / "doproxy.toml").write_text(
        config(
            extra='access-log = true\naccess-log-file = "missing/access.log"\nvia = true',
            watch=False,
        )
    )
    assert not await rt.reload()
    assert "access-log-file: cannot open for appending" in caplog.text
    assert "keeping the running configuration" in caplog.text
    assert rt.access is first and rt.reloads == 0
    assert rt.server is not None and not rt.server.settings.via  # nothing of it applied
    assert (await request(port_of(rt), get("/kept"))).status == 200
    assert "/kept" in lines(rt, tmp_path / "access.log")[0]
    assert not (tmp_path / "missing").exists()


async def test_an_unwritable_file_at_start_is_a_config_error(
    backend: RawBackend, tmp_path: Path
) -> None:
    cfg = tmp_path / "doproxy.toml"
    cfg.write_text(config(extra='access-log = true\naccess-log-file = "."', watch=False))
    (tmp_path / "inventory.toml").write_text(inventory(backend.port))
    rt = Runtime(load_settings(cfg), load_inventory(tmp_path / "inventory.toml"), cfg)
    try:
        with pytest.raises(ConfigError, match="access-log-file: cannot open for appending"):
            await rt.start()
        assert rt.server is None
    finally:
        await rt.stop()  # lets go of the inventory's server lock


@pytest.mark.parametrize(
    ("name", "says"),
    [("missing/access.log", "its folder does not exist"), (".", "is a folder")],
)
def test_check_reports_an_access_log_file_it_could_not_open(
    tmp_path: Path, name: str, says: str
) -> None:
    """`doproxy check` says so before a server fails to start, and creates nothing."""
    (tmp_path / "doproxy.toml").write_text(f'access-log = true\naccess-log-file = "{name}"\n')
    r = run_check(cwd=tmp_path)
    assert r.returncode == 1
    assert f"access-log-file: {says}" in r.stderr
    assert not (tmp_path / "missing").exists()
    (tmp_path / "doproxy.toml").write_text('access-log = true\naccess-log-file = "ok.log"\n')
    assert run_check(cwd=tmp_path).returncode == 0
    assert not (tmp_path / "ok.log").exists()


async def test_refused_requests_are_logged_and_a_silent_connection_is_not(
    make_runtime: MakeRuntime, backend: RawBackend, tmp_path: Path
) -> None:
    rt = await make_runtime(
        'access-log = true\naccess-log-file = "access.log"\n'
        '[limits]\nmax-body-bytes = 10\n[timeouts]\nclient-header = "0.5s"',
        backend.port,
    )
    quiet = await Client.connect(port_of(rt))  # sends nothing: a 408, but no request
    partial = await Client.connect(port_of(rt))
    await partial.send(b"GET /slow HTTP/1.1\r\nHost: h\r\n")  # a head that never ends
    assert await quiet.closed() and await partial.closed()
    await quiet.close()
    await partial.close()
    assert (await request(port_of(rt), b"NOT HTTP AT ALL\r\n\r\n")).status == 400
    big = b"POST /big HTTP/1.1\r\nHost: h\r\nUser-Agent: up\r\nContent-Length: 100\r\n\r\n"
    assert (await request(port_of(rt), big)).status == 413
    got = [COMBINED.fullmatch(x) for x in lines(rt, tmp_path / "access.log")]
    assert all(got)
    assert [(m["request"], m["status"], m["backend"]) for m in got if m] == [
        ("-", "408", "-"),  # the partial head; the quiet connection has no line
        ("-", "400", "-"),
        ("POST /big HTTP/1.1", "413", "-"),  # refused from its head: its request line shows
    ]
    assert [m["user_agent"] for m in got if m][2] == "up"


async def test_a_client_that_leaves_before_the_answer_is_a_499(
    make_runtime: MakeRuntime,
    backend_factory: Callable[..., Awaitable[RawBackend]],
    tmp_path: Path,
) -> None:
    b = await backend_factory(silent)
    rt = await make_runtime('access-log = true\naccess-log-file = "access.log"', b.port)
    c = await Client.connect(port_of(rt))
    await c.send(get("/waiting"))
    await wait_for(lambda: bool(b.all_received))  # the request reached the backend
    # Gone for good, with a reset (a client that only half-closes still gets its answer).
    sock = c.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.writer.transport.abort()
    await wait_for(lambda: bool(lines(rt, tmp_path / "access.log")))
    (line,) = lines(rt, tmp_path / "access.log")
    m = COMBINED.fullmatch(line)
    assert m, line
    assert (m["request"], m["status"], m["bytes"]) == ("GET /waiting HTTP/1.1", "499", "0")
    assert m["backend"] == f"127.0.0.1:{b.port}"


async def test_a_websocket_tunnel_is_logged_when_it_closes(
    make_runtime: MakeRuntime,
    backend_factory: Callable[..., Awaitable[RawBackend]],
    tmp_path: Path,
) -> None:
    async def upgrade(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        while data := await reader.read(65536):  # a raw echo stands in for frames
            writer.write(data)
            await writer.drain()

    b = await backend_factory(upgrade)
    rt = await make_runtime(
        'access-log = true\naccess-log-format = "json"\naccess-log-file = "access.log"', b.port
    )
    c = await Client.connect(port_of(rt))
    await c.send(
        b"GET /chat HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await c.reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    for message in (b"ping", b"longer message"):
        await c.send(message)
        assert await c.reader.readexactly(len(message)) == message
    assert not lines(rt, tmp_path / "access.log")  # open: nothing to log yet
    await c.close()
    await wait_for(lambda: bool(lines(rt, tmp_path / "access.log")))
    (entry,) = (json.loads(x) for x in lines(rt, tmp_path / "access.log"))
    assert (entry["target"], entry["status"], entry["bytes"]) == ("/chat", 101, 18)
