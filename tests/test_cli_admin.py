"""The CLI's commands for a running server (issue 11): `doproxy status`, `events`, `drain`,
`enable` and `disable`, run as real processes against a real server's admin API.

The server runs in this process (a Runtime on the test's event loop, as in test_admin); the CLI
runs as `python -m doproxy ... --config FILE` in an asyncio subprocess, so the server keeps
serving while the test waits for the command.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from doproxy.admin.server import addr_path, token_path
from doproxy.config import load_settings
from doproxy.inventory import load_inventory
from doproxy.runtime import Runtime
from tests.conftest import wait_for
from tests.support import RawBackend, RequestReader, echo_handler, get, request, respond
from tests.test_admin import PROVIDER_TOKEN, Admin, config, inventory

pytestmark = pytest.mark.timeout(60)


@dataclass
class Run:
    code: int
    out: str
    err: str


def secrets_of(tmp: Path) -> list[str]:
    """Every secret a test setup holds: none may show in any output."""
    found = [PROVIDER_TOKEN]
    for p in tmp.glob("*token*"):
        if text := p.read_text().strip():
            found.append(text)
    return found


async def cli(cfg: Path, *args: str, timeout: float = 30) -> Run:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "doproxy",
        *args,
        "--config",
        str(cfg),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    run = Run(proc.returncode, out.decode(), err.decode())
    for secret in secrets_of(cfg.parent):
        assert secret not in run.out + run.err, "a secret was shown"
    return run


@dataclass
class Server:
    rt: Runtime
    config: Path
    client: Admin | None  # None when the server has no admin listener

    @property
    def admin(self) -> Admin:
        assert self.client is not None
        return self.client

    @property
    def port(self) -> int:
        assert self.rt.server is not None
        return self.rt.server.addresses[0][1]


Start = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    made: list[Runtime] = []
    session = aiohttp.ClientSession()

    async def _start(config_text: str, inventory_text: str | None = None) -> Server:
        cfg = tmp_path / "doproxy.toml"
        cfg.write_text(config_text)
        if inventory_text is not None:
            (tmp_path / "inventory.toml").write_text(inventory_text)
        rt = Runtime(load_settings(cfg), load_inventory(tmp_path / "inventory.toml"), cfg)
        await rt.start()
        made.append(rt)
        return Server(rt, cfg, Admin(rt, session) if rt.admin is not None else None)

    yield _start
    await session.close()
    for rt in made:
        await rt.stop()


@pytest.fixture
async def two() -> AsyncIterator[tuple[RawBackend, RawBackend]]:
    a = await RawBackend(echo_handler).start()
    b = await RawBackend(echo_handler).start()
    yield a, b
    await a.close()
    await b.close()


# --- status -------------------------------------------------------------------------------------

# Fields that move on their own between two looks (a clock, a per-second rate).
MOVING = {"age", "requests_per_second", "latency", "error_rate"}


async def test_status_json_is_the_apis_data(
    start: Start, two: tuple[RawBackend, RawBackend]
) -> None:
    a, b = two
    srv = await start(config(), inventory(a.port, b.port))
    for _ in range(4):
        assert (await request(srv.port, get("/x"))).status == 200
    r = await cli(srv.config, "status", "--output", "json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert set(doc) == {"status", "autoscaler", "events"}
    _, api = await srv.admin.call("GET", "/api/status", token=None)

    def steady(rows: list[dict[str, object]]) -> list[dict[str, object]]:
        return [{k: v for k, v in row.items() if k not in MOVING} for row in rows]

    assert steady(doc["status"]["backends"]) == steady(api["backends"])
    assert [set(row) for row in doc["status"]["backends"]] == [set(row) for row in api["backends"]]
    assert sum(row["requests"] for row in doc["status"]["backends"]) == 4
    _, scaler = await srv.admin.call("GET", "/api/autoscaler", token=None)
    assert doc["autoscaler"] == scaler
    _, events = await srv.admin.call("GET", "/api/events?limit=10", token=None)
    assert doc["events"] == events["events"]


async def test_status_table_shows_backends_autoscaler_and_events(
    start: Start, two: tuple[RawBackend, RawBackend]
) -> None:
    a, b = two
    srv = await start(config(), inventory(a.port, b.port))
    srv.rt.events.publish("health", f"b{b.port} is down: a test said so", "warning")
    await srv.admin.call("POST", f"/api/backends/{b.port}/disable")
    r = await cli(srv.config, "status")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].startswith("doproxy ") and f"pid {os.getpid()}" in lines[0]
    row_a = next(line for line in lines if f"b{a.port} " in line)
    row_b = next(line for line in lines if f"b{b.port} " in line and "127.0.0.1" in line)
    assert " active " in row_a and f"127.0.0.1:{a.port}" in row_a and "hand-written" in row_a
    assert " disabled " in row_b
    assert "autoscaler: off ([provisioning] enable = false)" in r.out
    assert "recent events" in r.out and "a test said so" in r.out
    assert f"b{b.port}: disabled (admin API)" in r.out


async def test_status_without_a_server_says_so(tmp_path: Path) -> None:
    cfg = tmp_path / "doproxy.toml"
    cfg.write_text(config())
    (tmp_path / "inventory.toml").write_text(inventory(9))
    for command in (["status"], ["events"], ["events", "--follow"]):
        r = await cli(cfg, *command)
        assert r.code == 1, command
        assert r.out == ""
        inv = tmp_path / "inventory.toml"
        assert (
            f"no doproxy server is running on inventory {inv} (no inventory.toml.admin.addr)"
            in (r.err)
        )


async def test_an_address_file_left_by_a_dead_server_is_not_used(
    tmp_path: Path, two: tuple[RawBackend, RawBackend]
) -> None:
    """After a kill -9 the address file stays; the port in it may be anyone's by now."""
    a, _ = two
    cfg = tmp_path / "doproxy.toml"
    cfg.write_text(config())
    (tmp_path / "inventory.toml").write_text(inventory(a.port))
    # Something else listens at the address the file names (here: a backend).
    addr_path(tmp_path / "inventory.toml").write_text(f"127.0.0.1:{a.port}\n")
    r = await cli(cfg, "status")
    assert r.code == 1
    assert "did not stop cleanly" in r.err
    assert a.connections == 0


# --- drain, enable, disable -----------------------------------------------------------------


async def test_drain_and_enable_through_the_api(
    start: Start, two: tuple[RawBackend, RawBackend], tmp_path: Path
) -> None:
    """A request in flight holds the drain open; the command waits for it, then says so."""
    release = asyncio.Event()

    async def slow(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
    ) -> None:
        rr = RequestReader(reader)
        while await rr.next() is not None:
            await release.wait()
            writer.write(respond(200, b"slow"))
            await writer.drain()

    a = await RawBackend(slow).start()
    _, b = two
    try:
        srv = await start(config(), inventory(a.port, b.port))
        backend_a = next(x for x in srv.rt.backends if x.key == str(a.port))
        # Only backend a is eligible, so the held request lands there.
        await srv.admin.call("POST", f"/api/backends/{b.port}/disable")
        held = asyncio.ensure_future(request(srv.port, get("/held")))
        await wait_for(lambda: backend_a.in_flight == 1)
        command = asyncio.ensure_future(cli(srv.config, "drain", f"b{a.port}"))  # by name
        await wait_for(lambda: backend_a.entry.state == "draining", timeout=15)
        assert not command.done()  # waiting for the request in flight
        release.set()
        assert (await held).status == 200
        r = await command
        assert r.code == 0, r.err
        assert (
            f"drained b{a.port} ({a.port}) through the running server (pid {os.getpid()}): "
            "no request in flight; it is now disabled"
        ) in r.out
        assert f"draining b{a.port} ({a.port}): 1 request(s) in flight" in r.err
        states = {e.key: e.state for e in load_inventory(srv.rt.inventory_path)}
        assert states[str(a.port)] == "disabled"
        assert srv.rt.server is not None and backend_a not in srv.rt.server.pool.eligible

        # Enable it again, by id.
        r = await cli(srv.config, "enable", str(a.port))
        assert r.code == 0, r.err
        assert f"enabled b{a.port} ({a.port}) through the running server" in r.out
        assert load_inventory(srv.rt.inventory_path)[0].state == "active"
        assert backend_a in srv.rt.server.pool.eligible
        # The API's refusals are the command's errors.
        r = await cli(srv.config, "drain", "nope")
        assert (r.code, r.err.strip()) == (1, "error: no backend nope")
        r = await cli(srv.config, "disable", str(a.port))
        assert r.code == 0 and "it is now disabled" in r.out
        r = await cli(srv.config, "drain", str(a.port))
        assert r.code == 1 and f"b{a.port} is disabled, not active" in r.err
    finally:
        release.set()
        await a.close()


async def test_without_a_server_drain_and_enable_change_the_inventory(tmp_path: Path) -> None:
    cfg = tmp_path / "doproxy.toml"
    cfg.write_text(config())
    inv = tmp_path / "inventory.toml"
    inv.write_text(inventory(7, 8))
    r = await cli(cfg, "drain", "7")
    assert r.code == 0, r.err
    assert "no doproxy server is running" in r.err and "changing the inventory instead" in r.err
    assert "no server running: marked b7 (7) disabled in the inventory" in r.out
    assert [e.state for e in load_inventory(inv)] == ["disabled", "active"]
    r = await cli(cfg, "enable", "b7")  # by name
    assert r.code == 0, r.err
    assert "enabled b7 (7) in the inventory (no server is running); it is now active" in r.out
    r = await cli(cfg, "disable", "8")
    assert r.code == 0, r.err
    assert [e.state for e in load_inventory(inv)] == ["active", "disabled"]
    r = await cli(cfg, "drain", "8")
    assert r.code == 1 and "b8 (8) is disabled, not active" in r.err
    r = await cli(cfg, "enable", "99")
    assert r.code == 1 and "99 is not in the inventory (inventory.toml)" in r.err


async def test_a_server_without_its_admin_listener_finishes_a_drain_from_the_inventory(
    start: Start, two: tuple[RawBackend, RawBackend]
) -> None:
    a, b = two
    srv = await start(config(admin="enable = false"), inventory(a.port, b.port))
    assert srv.rt.admin is None
    r = await cli(srv.config, "drain", str(a.port))
    assert r.code == 0, r.err
    assert f"the doproxy server (pid {os.getpid()})" in r.err and "no admin listener" in r.err
    assert "changing the inventory instead" in r.err
    assert (
        f"drained b{a.port} ({a.port}) through the inventory: the server on it finished the "
        "drain; it is now disabled"
    ) in r.out
    assert [e.state for e in load_inventory(srv.rt.inventory_path)] == ["disabled", "active"]
    backend_a = next(x for x in srv.rt.backends if x.key == str(a.port))
    assert srv.rt.server is not None and backend_a not in srv.rt.server.pool.eligible
    r = await cli(srv.config, "enable", str(a.port))
    assert r.code == 0, r.err
    assert "in the inventory (a running server picks it up from there)" in r.out
    await wait_for(lambda: backend_a in srv.rt.server.pool.eligible)  # type: ignore[union-attr]


async def test_a_wrong_token_is_refused_without_showing_it(
    start: Start, two: tuple[RawBackend, RawBackend], tmp_path: Path
) -> None:
    a, _ = two
    srv = await start(config(), inventory(a.port))
    right = token_path(srv.rt.inventory_path).read_text().strip()
    wrong = "w" * len(right)
    token_path(srv.rt.inventory_path).write_text(wrong + "\n")
    r = await cli(srv.config, "disable", str(a.port))
    assert r.code == 1
    assert f"the admin API refused the token from {token_path(srv.rt.inventory_path)}" in r.err
    assert right not in r.out + r.err and wrong not in r.out + r.err
    assert load_inventory(srv.rt.inventory_path)[0].state == "active"  # nothing changed


async def test_a_configured_token_file_is_used(
    start: Start, two: tuple[RawBackend, RawBackend], tmp_path: Path
) -> None:
    a, _ = two
    (tmp_path / "admin.token").write_text("the-right-admin-token\n")
    srv = await start(
        config(admin='bind = "127.0.0.1:0"\ntoken-file = "admin.token"'), inventory(a.port)
    )
    assert not token_path(srv.rt.inventory_path).exists()
    r = await cli(srv.config, "disable", str(a.port))
    assert r.code == 0, r.err
    assert load_inventory(srv.rt.inventory_path)[0].state == "disabled"
    # The file changed after the server read it: the server's token is still the old one.
    (tmp_path / "admin.token").write_text("a-wrong-admin-token\n")
    r = await cli(srv.config, "enable", str(a.port))
    assert r.code == 1 and "refused the token from [admin] token-file" in r.err
    assert "admin-token" not in r.out + r.err


# --- events ---------------------------------------------------------------------------------


async def test_events_prints_the_ring(start: Start, two: tuple[RawBackend, RawBackend]) -> None:
    a, _ = two
    srv = await start(config(), inventory(a.port))
    first = srv.rt.events.publish("health", "first thing")
    srv.rt.events.publish("reload", "second thing", "error", result="failed")
    r = await cli(srv.config, "events")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[-2].endswith("info     health      first thing")
    assert lines[-1].endswith("error    reload      second thing")
    r = await cli(srv.config, "events", "--since", str(first.id), "--output", "json")
    assert r.code == 0, r.err
    [only] = [json.loads(line) for line in r.out.splitlines()]
    assert only["message"] == "second thing" and only["data"] == {"result": "failed"}


class Follower:
    """`doproxy events --follow` as a process of ours, read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.err = ""

    @classmethod
    async def start(cls, cfg: Path, *args: str) -> Follower:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "doproxy",
            "events",
            "--follow",
            *args,
            "--config",
            str(cfg),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def err_line(self, containing: str, timeout: float = 15) -> str:
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.proc.stderr.readline()).decode()
                self.err += line
                assert line, f"it ended; it said:\n{self.err}"
                if containing in line:
                    return line

    async def out_line(self, timeout: float = 15) -> str:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            return (await self.proc.stdout.readline()).decode()

    async def interrupt(self) -> int:
        """Ctrl-C, as a person stops it; by its pid: it is our process."""
        os.kill(self.proc.pid, signal.SIGINT)
        async with asyncio.timeout(15):
            await self.proc.wait()
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def test_events_follow_prints_new_events_until_interrupted(
    start: Start, two: tuple[RawBackend, RawBackend]
) -> None:
    a, _ = two
    srv = await start(config(), inventory(a.port))
    old = srv.rt.events.publish("health", "before it started")
    follow = await Follower.start(srv.config, "--since", str(old.id))
    try:
        await follow.err_line("following events at http://127.0.0.1:")
        srv.rt.events.publish("membership", "published after it started", backend="b1")
        line = await follow.out_line()
        assert line.rstrip().endswith("membership  published after it started")
        assert await follow.interrupt() == 0
        assert follow.proc.stderr is not None
        rest = (await follow.proc.stderr.read()).decode()
        assert "Traceback" not in rest
    finally:
        await follow.kill()


async def test_events_follow_survives_a_server_restart(
    start: Start, two: tuple[RawBackend, RawBackend]
) -> None:
    a, _ = two
    srv = await start(config(), inventory(a.port))
    for i in range(3):
        srv.rt.events.publish("health", f"old {i}")
    follow = await Follower.start(srv.config, "--output", "json")
    try:
        await follow.err_line("following events")
        for _ in range(3):
            assert json.loads(await follow.out_line())["message"].startswith("old ")
        await srv.rt.stop()
        await follow.err_line("the event stream ended")
        # A new server on the same inventory (a new admin port: port 0), ids from 1 again.
        again = await start(config())
        await follow.err_line("reconnected to http://127.0.0.1:")
        again.rt.events.publish("reload", "from the new server")
        line = json.loads(await follow.out_line())
        assert line["message"] == "from the new server" and line["id"] == 1
        assert await follow.interrupt() == 0
    finally:
        await follow.kill()


async def test_status_shows_a_paused_autoscaler_its_overrides_and_decisions(
    tmp_path: Path,
) -> None:
    """Paused before it starts (as in test_admin), so the scaler decides but creates nothing."""
    import uuid

    from doproxy.autoscaler import overrides_path
    from doproxy.machines import open_provider
    from tests.test_autoscaler_e2e import local_config

    cfg = local_config(tmp_path, f"doproxy-test-{uuid.uuid4().hex[:8]}")
    overrides_path(tmp_path / "inventory.toml").write_text('{"paused": true, "max-backends": 2}\n')
    settings = load_settings(cfg)
    rt = Runtime(settings, [], cfg)
    await rt.start()
    try:
        await wait_for(lambda: any(e.kind == "scaling" for e in rt.events.ring), timeout=15)
        r = await cli(cfg, "status")
        assert r.code == 0, r.err
        assert "backends (0)" in r.out
        assert "paused: decides, does not act" in r.out
        assert "1 .. 2 (override; config 3)" in r.out
        assert "last decisions" in r.out and " up " in r.out
        r = await cli(cfg, "status", "--output", "json")
        assert r.code == 0, r.err
        scaler = json.loads(r.out)["autoscaler"]
        assert (scaler["paused"], scaler["max-backends"]) == (True, 2)
    finally:
        await rt.stop()
        provider = open_provider(settings, tmp_path)
        for m in await provider.list():
            await provider.destroy(m.id)
        await provider.close()
