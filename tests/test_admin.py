"""The admin listener (issue 11): a real proxy with real backends, its API over real sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import stat
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from doproxy.admin.openapi import SPEC
from doproxy.admin.server import addr_path, token_path
from doproxy.config import load_settings
from doproxy.errors import DoproxyError
from doproxy.inventory import load_inventory
from doproxy.runtime import Runtime
from tests.conftest import wait_for
from tests.support import RawBackend, echo_handler, get, request

pytestmark = pytest.mark.timeout(30)

PROVIDER_TOKEN = "dop_v1_" + "5" * 64  # a secret that must never show


def config(admin: str = 'bind = "127.0.0.1:0"', extra: str = "") -> str:
    return (
        'bind = "127.0.0.1:0"\nwatch-config = false\ninventory-file = "inventory.toml"\n'
        f"{extra}\n[backend]\ndisable-health-check = true\n"
        f'[do-provisioner]\ntoken = "{PROVIDER_TOKEN}"\n'
        f"[admin]\n{admin}\n"
    )


def inventory(*ports: int) -> str:
    return "".join(
        f'[[droplet]]\nid = {p}\nname = "b{p}"\nserver-host = "127.0.0.1:{p}"\n' for p in ports
    )


class Admin:
    """A client of a running server's admin listener, as the CLI finds it (files beside the
    inventory)."""

    def __init__(self, rt: Runtime, session: aiohttp.ClientSession) -> None:
        self.rt = rt
        self.session = session
        inv = rt.inventory_path
        self.url = "http://" + addr_path(inv).read_text().strip()
        found = token_path(inv)
        self.token = found.read_text().strip() if found.exists() else ""

    async def call(
        self, method: str, path: str, token: str | None = "", body: Any = None, **kw: Any
    ) -> tuple[int, Any]:
        headers = dict(kw.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token or self.token}"
        async with self.session.request(
            method, self.url + path, headers=headers, json=body, **kw
        ) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, text


Start = Callable[..., Awaitable[tuple[Runtime, Admin]]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    made: list[Runtime] = []
    session = aiohttp.ClientSession()

    async def _start(config_text: str, inventory_text: str) -> tuple[Runtime, Admin]:
        cfg = tmp_path / "doproxy.toml"
        cfg.write_text(config_text)
        (tmp_path / "inventory.toml").write_text(inventory_text)
        rt = Runtime(load_settings(cfg), load_inventory(tmp_path / "inventory.toml"), cfg)
        await rt.start()
        made.append(rt)
        return rt, Admin(rt, session)

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


async def test_listener_files_status_and_health(
    start: Start, two: tuple[RawBackend, RawBackend], tmp_path: Path
) -> None:
    a, b = two
    rt, admin = await start(config(), inventory(a.port, b.port))
    inv = rt.inventory_path
    # The token beside the inventory is the owner's only (0600); the address names port 0's pick.
    assert stat.S_IMODE(token_path(inv).stat().st_mode) == 0o600
    assert rt.admin is not None and rt.admin.address is not None
    assert admin.url.endswith(f":{rt.admin.address[1]}") and rt.admin.address[1] != 0
    status, body = await admin.call("GET", "/healthz", token=None)
    assert (status, body) == (200, {"status": "serving"})
    assert rt.server is not None
    for _ in range(4):
        r = await request(rt.server.addresses[0][1], get("/x"))
        assert r.status == 200
    status, body = await admin.call("GET", "/api/status", token=None)
    assert status == 200
    rows = {row["id"]: row for row in body["backends"]}
    assert set(rows) == {str(a.port), str(b.port)}
    for port in (a.port, b.port):
        row = rows[str(port)]
        assert row["address"] == f"127.0.0.1:{port}"
        assert (row["state"], row["health"], row["eligible"]) == ("active", "up", True)
        assert row["owner"] == "hand-written"
    assert sum(row["requests"] for row in rows.values()) == 4
    assert body["listener"]["requests"] == 4
    assert body["config_generation"] == 0
    await rt.stop()
    # Stopped: the CLI must not find an address (or a token) that no longer answers.
    assert not addr_path(inv).exists() and not token_path(inv).exists()


@pytest.mark.timeout(30)
async def test_a_canarys_share_is_in_its_backend_row(
    start: Start, two: tuple[RawBackend, RawBackend]
) -> None:
    """A rollout's canary (an inventory entry with canary-weight) says its share in
    /api/status; every other backend says 0. Checked against the OpenAPI document too."""
    from openapi_core import OpenAPI
    from openapi_core.testing import MockRequest, MockResponse

    from doproxy.core.inventory_model import InventoryEntry
    from doproxy.inventory import update_inventory

    a, b = two
    marked = inventory(a.port).replace("\n", "\ncanary-weight = 12.5\n", 1) + inventory(b.port)
    rt, admin = await start(config(), marked)

    async def shares() -> dict[str, Any]:
        status, body = await admin.call("GET", "/api/status", token=None)
        assert status == 200
        req = MockRequest("http://127.0.0.1", "get", "/api/status")
        resp = MockResponse(json.dumps(body).encode(), status_code=status)
        OpenAPI.from_dict(SPEC).validate_response(req, resp)
        return {row["id"]: row["canary_weight"] for row in body["backends"]}

    assert await shares() == {str(a.port): 12.5, str(b.port): 0.0}

    # The rollout unmarks it once the canary passed: 0 again.
    def unmark(entries: list[InventoryEntry]) -> list[InventoryEntry]:
        return [e.model_copy(update={"canary_weight": 0.0}) for e in entries]

    await asyncio.to_thread(update_inventory, rt.inventory_path, unmark)
    assert await rt.apply_inventory()
    assert await shares() == {str(a.port): 0.0, str(b.port): 0.0}


async def test_mutating_needs_the_token_and_wrong_equals_missing(
    start: Start, two: tuple[RawBackend, RawBackend], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    a, b = two
    rt, admin = await start(config(), inventory(a.port, b.port))
    path = f"/api/backends/{a.port}/disable"
    missing = await admin.call("POST", path, token=None)
    wrong = await admin.call("POST", path, token="x" * len(admin.token))
    scheme = await admin.call("POST", path, token=None, headers={"Authorization": admin.token})
    assert missing[0] == wrong[0] == scheme[0] == 401
    assert missing[1] == wrong[1] == scheme[1]
    assert "Bearer" in missing[1]["error"]
    # Nothing happened.
    assert load_inventory(rt.inventory_path)[0].state == "active"
    # Read-only on loopback needs no token; with the right token the change is made.
    assert (await admin.call("GET", "/api/status", token=None))[0] == 200
    status, row = await admin.call("POST", path)
    assert (status, row["state"], row["eligible"]) == (200, "disabled", False)
    # No secret in any log line.
    assert admin.token not in caplog.text and PROVIDER_TOKEN not in caplog.text


async def test_beyond_loopback_every_endpoint_needs_the_token(
    start: Start, two: tuple[RawBackend, RawBackend]
) -> None:
    a, _ = two
    rt, _admin = await start(
        config(admin='bind = "0.0.0.0:0"\ntoken = "s3cret-admin-token"'), inventory(a.port)
    )
    assert rt.admin is not None and rt.admin.address is not None
    port = rt.admin.address[1]
    async with aiohttp.ClientSession() as s:
        for path in ("/api/status", "/metrics", "/api/config", "/api/events", "/"):
            async with s.get(f"http://127.0.0.1:{port}{path}") as r:
                assert r.status == 401, path
        auth = {"Authorization": "Bearer s3cret-admin-token"}
        async with s.get(f"http://127.0.0.1:{port}/api/status", headers=auth) as r:
            assert r.status == 200
        # The page asks a browser for the token as a Basic password; the API does not.
        async with s.get(f"http://127.0.0.1:{port}/") as r:
            assert r.headers["WWW-Authenticate"].startswith("Basic ")
        async with s.get(f"http://127.0.0.1:{port}/api/status") as r:
            assert r.headers["WWW-Authenticate"].startswith("Bearer ")
        basic = {
            "Authorization": "Basic " + base64.b64encode(b"anyone:s3cret-admin-token").decode()
        }
        async with s.get(f"http://127.0.0.1:{port}/", headers=basic) as r:
            assert r.status == 200 and "text/html" in r.headers["Content-Type"]
        async with s.get(f"http://127.0.0.1:{port}/api/events", headers=basic) as r:
            assert r.status == 200
        wrong = {
            "Authorization": "Basic " + base64.b64encode(b"anyone:s3cret-admin-tokeN").decode()
        }
        async with s.get(f"http://127.0.0.1:{port}/api/status", headers=wrong) as r:
            assert r.status == 401
        # A rollout's command is a program to run here: never chosen from afar, token or not.
        url = f"http://127.0.0.1:{port}/api/rollouts"
        async with s.post(url, headers=auth, json={"command": "sh -c 'id'"}) as r:
            assert r.status == 403 and "loopback" in (await r.json())["error"]
    # A configured token is not written anywhere.
    assert not token_path(rt.inventory_path).exists()


async def test_config_is_redacted(start: Start, two: tuple[RawBackend, RawBackend]) -> None:
    a, _ = two
    _rt, admin = await start(
        config(admin='bind = "127.0.0.1:0"\ntoken = "another-secret"'), inventory(a.port)
    )
    admin.token = "another-secret"
    status, body = await admin.call("GET", "/api/config", token=None)
    assert status == 200
    text = json.dumps(body)
    assert PROVIDER_TOKEN not in text and "another-secret" not in text
    assert body["do-provisioner"]["token"] == "<redacted>"
    assert body["admin"]["token"] == "<redacted>"
    assert body["admin"]["bind"] == "127.0.0.1:0"


async def test_drain_enable_disable_weight_change_the_pool_and_the_inventory(
    start: Start, two: tuple[RawBackend, RawBackend]
) -> None:
    a, b = two
    rt, admin = await start(config(), inventory(a.port, b.port))
    assert rt.server is not None
    port = rt.server.addresses[0][1]
    status, row = await admin.call("POST", f"/api/backends/b{a.port}/drain")  # by name
    assert status == 200 and row["state"] in ("draining", "disabled")
    await wait_for(lambda: load_inventory(rt.inventory_path)[0].state == "disabled")
    before = a.connections
    for _ in range(6):
        assert (await request(port, get("/y"))).status == 200
    assert a.connections == before  # no new request reached the drained backend
    # Draining what is not active is refused; enable brings it back.
    assert (await admin.call("POST", f"/api/backends/{a.port}/drain"))[0] == 409
    status, row = await admin.call("POST", f"/api/backends/{a.port}/enable")
    assert (status, row["state"], row["eligible"]) == (200, "active", True)
    status, row = await admin.call("PUT", f"/api/backends/{b.port}/weight", body={"weight": 7})
    assert (status, row["weight"]) == (200, 7)
    assert [e.weight for e in load_inventory(rt.inventory_path)] == [1, 7]
    for bad in ({"weight": -1}, {"weight": "3"}, {"weight": True}, {"w": 1}):
        status, body = await admin.call("PUT", f"/api/backends/{b.port}/weight", body=bad)
        assert status == 400 and "weight" in body["error"]
    status, body = await admin.call("PUT", f"/api/backends/{b.port}/weight", body=[7])
    assert (status, body) == (400, {"error": "the body must be a JSON object"})
    status, body = await admin.call("POST", "/api/backends/nope/disable")
    assert (status, body) == (404, {"error": "no backend nope"})  # the handler's words stay
    status, body = await admin.call("GET", "/api/nothing-here", token=None)
    assert status == 404 and body == {"error": "no such endpoint: GET /api/nothing-here"}
    # Each change is an event.
    _, events = await admin.call("GET", "/api/events", token=None)
    kinds = [e["kind"] for e in events["events"]]
    assert kinds.count("membership") >= 3


async def test_reload_through_the_api_ok_and_failed(
    start: Start, two: tuple[RawBackend, RawBackend], tmp_path: Path
) -> None:
    a, b = two
    rt, admin = await start(config(), inventory(a.port))
    (tmp_path / "inventory.toml").write_text(inventory(a.port, b.port))
    status, body = await admin.call("POST", "/api/reload")
    assert (status, body) == (200, {"reloaded": True, "generation": 1})
    assert len(rt.backends) == 2
    cfg = tmp_path / "doproxy.toml"
    cfg.write_text(cfg.read_text().replace("[backend]\n", "[backend]\nmax-idle = -3\n"))
    status, body = await admin.call("POST", "/api/reload")
    assert status == 422
    assert "max-idle" in body["error"] and "running configuration stays" in body["error"]
    assert len(rt.backends) == 2 and rt.reloads == 1
    _, events = await admin.call("GET", "/api/events?since=0", token=None)
    reloads = [e for e in events["events"] if e["kind"] == "reload"]
    assert [e["data"]["result"] for e in reloads] == ["ok", "failed"]
    assert reloads[1]["level"] == "error"
    # ?since= gives only what is new.
    last = events["last_id"]
    _, later = await admin.call("GET", f"/api/events?since={last}", token=None)
    assert later["events"] == []
    assert (await admin.call("GET", "/api/events?since=x", token=None))[0] == 400


async def test_event_stream_sends_new_events(
    start: Start, two: tuple[RawBackend, RawBackend]
) -> None:
    a, _ = two
    rt, admin = await start(config(), inventory(a.port))
    rt.events.publish("health", "an old one")
    async with admin.session.get(
        admin.url + "/api/events/stream", headers={"Last-Event-ID": "1"}
    ) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        assert (await r.content.readuntil(b"\n\n")) == b"retry: 2000\n\n"
        rt.events.publish("reload", "reloaded", result="ok")
        chunk = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
        lines = chunk.decode().splitlines()
        assert lines[0] == "id: 2" and lines[1] == "event: reload"
        data = json.loads(lines[2].removeprefix("data: "))
        assert data["message"] == "reloaded" and data["data"] == {"result": "ok"}


async def test_a_taken_admin_address_stops_the_start(
    tmp_path: Path, two: tuple[RawBackend, RawBackend]
) -> None:
    a, _ = two
    taken = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = taken.sockets[0].getsockname()[1]
    try:
        cfg = tmp_path / "doproxy.toml"
        cfg.write_text(config(admin=f'bind = "127.0.0.1:{port}"'))
        (tmp_path / "inventory.toml").write_text(inventory(a.port))
        rt = Runtime(load_settings(cfg), load_inventory(tmp_path / "inventory.toml"), cfg)
        with pytest.raises(
            DoproxyError, match=rf"admin listener: cannot listen on 127.0.0.1:{port}"
        ):
            await rt.start()
        # The traffic listener it had opened is closed again, and the inventory lock is free.
        assert rt.server is not None and not any(s.sockets for s in rt.server._servers)
        cfg.write_text(config())
        rt2 = Runtime(load_settings(cfg), [], cfg)
        await rt2.start()
        await rt2.stop()
    finally:
        taken.close()


async def test_autoscaler_off_says_so(start: Start, two: tuple[RawBackend, RawBackend]) -> None:
    a, _ = two
    _rt, admin = await start(config(), inventory(a.port))
    status, body = await admin.call("GET", "/api/autoscaler", token=None)
    assert status == 200 and body["enabled"] is False
    status, body = await admin.call("POST", "/api/autoscaler/pause")
    assert status == 409 and "enable = false" in body["error"]


async def test_answers_match_the_openapi_document(
    start: Start, two: tuple[RawBackend, RawBackend]
) -> None:
    from openapi_core import OpenAPI
    from openapi_core.testing import MockRequest, MockResponse
    from openapi_spec_validator import validate

    validate(SPEC)
    spec = OpenAPI.from_dict(SPEC)
    a, b = two
    rt, admin = await start(config(), inventory(a.port, b.port))
    # Every kind of event is in the document's enum: a rollout's phase change, say.
    rt.events.publish("rollout", "rollout 0a1b2c3d: canary: started", result="canary")
    status, served = await admin.call("GET", "/api/openapi.json", token=None)
    assert status == 200 and served == SPEC
    calls: list[tuple[str, str, str, Any]] = [
        ("GET", "/api/status", "/api/status", None),
        ("GET", "/api/autoscaler", "/api/autoscaler", None),
        ("GET", "/api/events", "/api/events", None),
        ("GET", "/healthz", "/healthz", None),
        ("POST", f"/api/backends/{a.port}/disable", "/api/backends/{id}/{verb}", None),
        ("PUT", f"/api/backends/{a.port}/weight", "/api/backends/{id}/weight", {"weight": 2}),
        ("PUT", f"/api/backends/{a.port}/weight", "/api/backends/{id}/weight", {"weight": -2}),
        ("POST", "/api/backends/zzz/enable", "/api/backends/{id}/{verb}", None),
        ("POST", "/api/reload", "/api/reload", None),
        ("POST", "/api/autoscaler/pause", "/api/autoscaler/{verb}", None),
        ("GET", "/api/rollouts", "/api/rollouts", None),
        ("POST", "/api/rollouts", "/api/rollouts", {"image": "x"}),
        ("POST", "/api/rollouts/abort", "/api/rollouts/abort", None),
    ]
    for method, path, _template, body in calls:
        status, answer = await admin.call(method, path, body=body)
        req = MockRequest(
            "http://127.0.0.1",
            method.lower(),
            path.partition("?")[0],
            data=json.dumps(body) if body is not None else None,
            content_type="application/json",
        )
        resp = MockResponse(json.dumps(answer).encode(), status_code=status)
        spec.validate_response(req, resp)


async def test_autoscaler_pause_and_limits_survive_a_restart(tmp_path: Path) -> None:
    """Paused before it starts, the scaler decides (below min-backends) but creates nothing;
    limits set through the API are validated as the config is and kept across restarts."""
    from doproxy.autoscaler import overrides_path
    from doproxy.machines import open_provider
    from tests.test_autoscaler_e2e import local_config

    tag = f"doproxy-test-{uuid.uuid4().hex[:8]}"
    cfg = local_config(tmp_path, tag)
    inv = tmp_path / "inventory.toml"
    overrides_path(inv).write_text('{"paused": true}\n')
    settings = load_settings(cfg)
    rt = Runtime(settings, [], cfg)
    await rt.start()
    session = aiohttp.ClientSession()
    try:
        admin = Admin(rt, session)

        def paused_decision() -> bool:
            return any(
                e.kind == "scaling" and e.message.endswith("(paused: not acted on)")
                for e in rt.events.ring
            )

        await wait_for(paused_decision, timeout=15)
        assert rt.autoscaler is not None and not rt.autoscaler.creating
        assert [e for e in load_inventory(inv)] == []
        status, body = await admin.call("GET", "/api/autoscaler", token=None)
        assert status == 200
        assert (body["enabled"], body["paused"], body["overrides"]) == (
            True,
            True,
            {"paused": True},
        )
        assert body["decisions"][-1]["action"] == "up" and not body["decisions"][-1]["acted"]
        status, body = await admin.call(
            "PUT", "/api/autoscaler", body={"min-backends": 3, "max-backends": 2}
        )
        assert status == 400 and "min-backends" in body["error"]
        status, body = await admin.call("PUT", "/api/autoscaler", body={"bogus": 1})
        assert status == 400
        status, body = await admin.call("PUT", "/api/autoscaler", body={"max-backends": 2})
        assert status == 200
        assert (body["min-backends"], body["max-backends"]) == (1, 2)
        assert body["config"] == {"min-backends": 1, "max-backends": 3}
        assert body["overrides"] == {"paused": True, "max-backends": 2}
    finally:
        await session.close()
        await rt.stop()
    # A restart keeps both.
    rt = Runtime(load_settings(cfg), [], cfg)
    await rt.start()
    session = aiohttp.ClientSession()
    try:
        admin = Admin(rt, session)
        assert rt.autoscaler is not None
        assert rt.autoscaler.paused and rt.autoscaler.settings.max_backends == 2
        status, body = await admin.call("PUT", "/api/autoscaler", body={"max-backends": None})
        assert status == 200 and body["max-backends"] == 3
        status, body = await admin.call("POST", "/api/autoscaler/resume")
        assert (status, body["paused"]) == (200, False)
        assert json.loads(overrides_path(inv).read_text()) == {
            "paused": False,
            "max-backends": None,
        }
    finally:
        await session.close()
        await rt.stop()
        provider = open_provider(settings, tmp_path)
        for m in await provider.list():
            await provider.destroy(m.id)
        await provider.close()


async def test_metrics_are_served_and_a_scrape_reads_the_counters(
    start: Start, two: tuple[RawBackend, RawBackend]
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    a, b = two
    rt, admin = await start(config(), inventory(a.port, b.port))
    assert rt.server is not None
    for _ in range(6):
        assert (await request(rt.server.addresses[0][1], get("/m"))).status == 200
    async with admin.session.get(admin.url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    total = sum(
        s.value
        for s in families["doproxy_requests"].samples
        if s.name == "doproxy_requests_total" and s.labels["code_class"] == "2xx"
    )
    assert total == 6


async def test_a_loopback_listener_refuses_other_host_names(
    start: Start, two: tuple[RawBackend, RawBackend]
) -> None:
    """DNS rebinding: a page of evil.example resolving to 127.0.0.1 reads nothing."""
    a, _ = two
    _rt, admin = await start(config(), inventory(a.port))
    for host in ("evil.example", "evil.example:8001", "127.0.0.1.evil.example", "10.0.0.1"):
        status, body = await admin.call("GET", "/api/status", token=None, headers={"Host": host})
        assert status == 421 and "loopback" in body["error"], host
    for host in ("localhost", "localhost:8001", "127.0.0.1:9", "[::1]:8001", "127.0.0.2"):
        status, _ = await admin.call("GET", "/healthz", token=None, headers={"Host": host})
        assert status == 200, host


async def test_event_streams_are_bounded(
    start: Start, two: tuple[RawBackend, RawBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    import doproxy.admin.server as admin_server

    monkeypatch.setattr(admin_server, "MAX_STREAMS", 2)
    a, _ = two
    _rt, admin = await start(config(), inventory(a.port))
    opened = [await admin.session.get(admin.url + "/api/events/stream") for _ in range(2)]
    try:
        for r in opened:
            assert r.status == 200
            await r.content.readuntil(b"\n\n")
        status, body = await admin.call("GET", "/api/events/stream", token=None)
        assert status == 503 and "poll /api/events" in body["error"]
    finally:
        for r in opened:
            r.close()


async def test_status_and_metrics_say_what_the_pool_costs(
    start: Start, two: tuple[RawBackend, RawBackend]
) -> None:
    """Without an autoscaler: the prices the inventory recorded; a droplet without one (a 2015
    entry, and no droplet of the configured size seen) is counted as unpriced."""
    from prometheus_client.parser import text_string_to_metric_families

    a, b = two
    text = inventory(a.port, b.port).replace(
        f'server-host = "127.0.0.1:{a.port}"\n',
        f'server-host = "127.0.0.1:{a.port}"\nprice-hourly = 0.03571\n',
    )
    _rt, admin = await start(config(), text)
    status, body = await admin.call("GET", "/api/status", token=None)
    assert status == 200
    assert body["cost"] == {
        "per_hour": 0.03571,
        "machines": 2,
        "unpriced": 1,
        "new_backend": None,
        "max-cost-per-hour": None,
    }
    status, body = await admin.call("GET", "/api/autoscaler", token=None)
    assert body["cost"]["per_hour"] == 0.03571
    async with admin.session.get(admin.url + "/metrics") as r:
        families = {f.name: f for f in text_string_to_metric_families(await r.text())}
    assert families["doproxy_pool_cost_per_hour"].samples[0].value == 0.03571
    assert families["doproxy_pool_unpriced_backends"].samples[0].value == 1
