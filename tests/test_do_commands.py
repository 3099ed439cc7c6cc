"""The machine commands end to end: `doproxy COMMAND` as a subprocess against the fake
DigitalOcean API, whose droplets really serve HTTP on their 127.0.1.N private addresses."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from doproxy.inventory import load_inventory
from doproxy.testing.fake_digitalocean import FakeDigitalOcean
from tests.conftest import wait_for
from tests.procs import start_proxy_process

TOKEN = "dop_v1_secret-test-token-0123456789"

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Setup:
    fake: FakeDigitalOcean
    config: Path
    inventory: Path
    port: int

    def entries(self) -> list[dict[str, object]]:
        if not self.inventory.exists():
            return []
        return list(tomllib.loads(self.inventory.read_text()).get("droplet", []))


@dataclass
class Run:
    code: int
    out: str
    err: str


async def doproxy(setup: Setup, *args: str, token: str = TOKEN, timeout: float = 30) -> Run:
    env = {k: v for k, v in os.environ.items() if k != "DIGITALOCEAN_TOKEN"}
    env["DIGITALOCEAN_TOKEN"] = token
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "doproxy",
        "--config",
        str(setup.config),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def write_config(tmp: Path, url: str, port: int, extra: str = "") -> Path:
    cfg = tmp / "doproxy.toml"
    cfg.write_text(
        f"""bind = "127.0.0.1:0"
watch-config = true
inventory-file = "inventory.toml"

[admin]
bind = "127.0.0.1:0"

[backend]
new-host-port = {port}
new-host-health-path = "/health"

[health]
interval = "200ms"
down-interval = "200ms"
rise = 1

[provisioning]
drain-timeout = "5s"

[do-provisioner]
api-url = "{url}"
hostname-prefix = "web-"
region = "nyc3"
size = "s-1vcpu-1gb"
image = "ubuntu-22-04-x64"
ssh-key-ids = [512189]
create-timeout = "20s"
poll-interval = "50ms"
{extra}
"""
    )
    return cfg


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    port = free_port()
    async with FakeDigitalOcean(
        token=TOKEN, active_after=0.3, action_after=0.3, serve_backends=True, backend_port=port
    ) as fake:
        cfg = write_config(tmp_path, fake.url, port)
        yield Setup(fake, cfg, tmp_path / "inventory.toml", port)
        assert fake.violations == [], "the fake saw requests or gave answers outside the spec"


async def api(setup: Setup, method: str, path: str, body: object = None) -> dict[str, object]:
    """Talk to the fake directly, as another DigitalOcean client (a console user) would."""
    import aiohttp

    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as s,
        s.request(method, setup.fake.url + path, json=body) as r,
    ):
        return dict(await r.json()) if r.status != 204 else {}


async def make_droplet(setup: Setup, name: str, tags: list[str]) -> str:
    body = {"name": name, "region": "nyc3", "size": "s-1vcpu-1gb", "image": "ubuntu-22-04-x64"}
    created = await api(setup, "POST", "/v2/droplets", {**body, "tags": tags})
    droplet_id = str(created["droplet"]["id"])  # type: ignore[index]
    deadline = asyncio.get_running_loop().time() + 5
    while asyncio.get_running_loop().time() < deadline:
        got = await api(setup, "GET", f"/v2/droplets/{droplet_id}")
        if got["droplet"]["status"] == "active":  # type: ignore[index]
            return droplet_id
        await asyncio.sleep(0.05)
    raise AssertionError("droplet did not become active")


async def http_get(host: str, port: int, path: str = "/") -> int:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return int(data.split(b" ", 2)[1])


# --- create, list, add, delete ----------------------------------------------------------------


async def test_create_waits_until_active_and_adds_a_serving_backend(setup: Setup) -> None:
    r = await doproxy(setup, "create", "web-one")
    assert r.code == 0, r.err
    assert "created web-one" in r.out
    assert "waiting for web-one: new" in r.err  # progress while it boots
    [entry] = setup.entries()
    [droplet] = setup.fake.droplets.values()
    assert entry["id"] == droplet["id"] and isinstance(entry["id"], int)  # as the Go files had
    owner = (setup.inventory.parent / "inventory.toml.owner").read_text().strip()
    assert droplet["tags"] == ["doproxy", f"doproxy-owner-{owner}"]  # shared tag, then ours
    assert droplet["name"] == "web-one"
    host = entry["private-ip"]
    assert isinstance(host, str) and host.startswith("127.0.1.")
    assert entry["server-host"] == f"{host}:{setup.port}"
    assert entry["health-url"] == f"http://{host}:{setup.port}/health"
    assert entry["provider"] == "digitalocean"
    assert await http_get(host, setup.port, "/health") == 200  # the droplet really serves
    assert TOKEN not in r.out + r.err


async def test_create_without_a_name_uses_the_hostname_prefix(setup: Setup) -> None:
    r = await doproxy(setup, "create")
    assert r.code == 0, r.err
    [entry] = setup.entries()
    name = str(entry["name"])
    assert name.startswith("web-") and len(name) > len("web-")


async def test_list_shows_tagged_droplets_as_table_json_and_toml(setup: Setup) -> None:
    assert (await doproxy(setup, "create", "web-a")).code == 0
    await make_droplet(setup, "web-b", ["doproxy"])
    await make_droplet(setup, "not-ours", ["other"])
    r = await doproxy(setup, "list")
    assert r.code == 0, r.err
    assert "web-a" in r.out and "web-b" in r.out and "not-ours" not in r.out
    rows = json.loads((await doproxy(setup, "list", "--output", "json")).out)
    assert {row["name"]: row["in_inventory"] for row in rows} == {"web-a": True, "web-b": False}
    toml_out = (await doproxy(setup, "list", "--output", "toml")).out
    droplets = tomllib.loads(toml_out)["droplet"]
    assert sorted(d["name"] for d in droplets) == ["web-a", "web-b"]
    assert all(d["server-host"].endswith(f":{setup.port}") for d in droplets)


async def test_add_adopts_a_running_droplet_and_refuses_duplicates(setup: Setup) -> None:
    droplet_id = await make_droplet(setup, "by-hand", ["doproxy"])
    r = await doproxy(setup, "add", droplet_id)
    assert r.code == 0, r.err
    assert [str(e["id"]) for e in setup.entries()] == [droplet_id]
    again = await doproxy(setup, "add", droplet_id)
    assert again.code == 1 and "already in the inventory" in again.err
    assert len(setup.entries()) == 1


async def test_add_refuses_a_droplet_without_private_ipv4(setup: Setup) -> None:
    droplet_id = await make_droplet(setup, "public-only", ["doproxy"])
    droplet = setup.fake.droplets[int(droplet_id)]
    droplet["networks"]["v4"] = [n for n in droplet["networks"]["v4"] if n["type"] != "private"]
    r = await doproxy(setup, "add", droplet_id)
    assert r.code == 1 and "no private IPv4" in r.err
    assert setup.entries() == []


async def test_add_of_an_unknown_droplet_says_so(setup: Setup) -> None:
    r = await doproxy(setup, "add", "999999")
    assert r.code == 1 and "not found" in r.err
    assert setup.entries() == []


async def test_delete_removes_from_the_inventory_only(setup: Setup) -> None:
    assert (await doproxy(setup, "create", "web-keep")).code == 0
    [entry] = setup.entries()
    r = await doproxy(setup, "delete", str(entry["id"]))
    assert r.code == 0, r.err
    assert setup.entries() == []
    assert entry["id"] in setup.fake.droplets  # still running
    missing = await doproxy(setup, "delete", str(entry["id"]))
    assert missing.code == 1 and "not in the inventory" in missing.err


# --- destroy and reboot ----------------------------------------------------------------------


async def test_destroy_asks_unless_yes(setup: Setup) -> None:
    assert (await doproxy(setup, "create", "web-x")).code == 0
    [entry] = setup.entries()
    refused = await doproxy(setup, "destroy", str(entry["id"]))  # no terminal, no --yes
    assert refused.code == 1 and "--yes" in refused.err
    assert len(setup.entries()) == 1 and len(setup.fake.droplets) == 1
    r = await doproxy(setup, "destroy", str(entry["id"]), "--yes")
    assert r.code == 0, r.err
    assert "drain: no server running" in r.err
    assert setup.entries() == [] and setup.fake.droplets == {}
    host = str(entry["private-ip"])
    with pytest.raises(OSError):
        await http_get(host, setup.port)  # its backend stopped with it


async def test_destroy_drains_through_a_running_server(setup: Setup) -> None:
    assert (await doproxy(setup, "create", "web-1")).code == 0
    assert (await doproxy(setup, "create", "web-2")).code == 0
    first, second = setup.entries()
    proxy = await start_proxy_process(setup.config)
    try:
        r = await doproxy(setup, "destroy", str(first["id"]), "--yes")
        assert r.code == 0, r.err
        assert "drain: drained" in r.err
        assert "drained" in proxy.log.decode()
        # Every request now goes to the survivor.
        for _ in range(4):
            assert await http_get("127.0.0.1", proxy.port, "/who") == 200
        assert [e["name"] for e in setup.entries()] == [second["name"]]
    finally:
        await proxy.stop()


async def test_reboot_drains_reboots_waits_for_health_and_reenables(setup: Setup) -> None:
    assert (await doproxy(setup, "create", "web-r")).code == 0
    [entry] = setup.entries()
    r = await doproxy(setup, "reboot", str(entry["id"]))
    assert r.code == 0, r.err
    assert "rebooted web-r" in r.out
    [after] = setup.entries()
    assert after.get("state", "active") == "active"
    actions = [x for x in setup.fake.exchanges if x.path.endswith("/actions")]
    assert actions and actions[0].method == "POST"
    assert await http_get(str(entry["private-ip"]), setup.port, "/health") == 200


# --- failures ---------------------------------------------------------------------------------


async def test_a_rejected_token_is_named_without_showing_it(setup: Setup) -> None:
    wrong = "dop_v1_wrong-token-abcdef"
    r = await doproxy(setup, "list", token=wrong)
    assert r.code == 1
    assert "DigitalOcean rejected the token (401)" in r.err
    assert wrong not in r.out + r.err and TOKEN not in r.out + r.err


async def test_a_missing_token_says_where_it_looked(setup: Setup) -> None:
    r = await doproxy(setup, "list", token="")
    assert r.code == 1
    assert "DIGITALOCEAN_TOKEN" in r.err and "token" in r.err


async def test_a_refused_create_leaves_the_inventory_as_it_was(setup: Setup) -> None:
    setup.fake.fail_next("POST", "/v2/droplets", 422)
    r = await doproxy(setup, "create", "web-bad")
    assert r.code == 1 and "422" in r.err
    assert setup.entries() == []  # the intent was dropped
    assert setup.fake.droplets == {}


async def test_the_duplicate_trap_makes_one_droplet(setup: Setup) -> None:
    setup.fake.fail_next("POST", "/v2/droplets", 500, after_effect=True)
    r = await doproxy(setup, "create", "web-dup")
    assert r.code == 0, r.err
    assert setup.fake.created_count == 1
    assert [e["name"] for e in setup.entries()] == ["web-dup"]


async def test_rate_limits_are_waited_out(setup: Setup) -> None:
    setup.fake.fail_next("GET", "/v2/droplets", 429, retry_after=1, times=2)
    r = await doproxy(setup, "list", "--output", "json")
    assert r.code == 0, r.err
    assert json.loads(r.out) == []


# --- sanitize and crash safety ------------------------------------------------------------------


def our_tags(setup: Setup) -> list[str]:
    from doproxy.machines import owner_tag

    return ["doproxy", owner_tag(setup.inventory)]


async def test_sanitize_finds_both_kinds_and_apply_fixes_them(setup: Setup) -> None:
    assert (await doproxy(setup, "create", "web-gone")).code == 0
    [gone] = setup.entries()
    await api(setup, "DELETE", f"/v2/droplets/{gone['id']}")  # destroyed in the web console
    orphan = await make_droplet(setup, "web-orphan", our_tags(setup))
    r = await doproxy(setup, "sanitize")
    assert r.code == 0, r.err
    assert "gone:" in r.out and "web-gone" in r.out
    assert "orphan:" in r.out and "web-orphan" in r.out
    assert len(setup.entries()) == 1  # listing changes nothing
    fixed = await doproxy(setup, "sanitize", "apply", "--orphans", "adopt")
    assert fixed.code == 0, fixed.err
    assert [str(e["id"]) for e in setup.entries()] == [orphan]
    clean = await doproxy(setup, "sanitize")
    assert "inventory and provider agree" in clean.out


async def test_sanitize_apply_can_destroy_orphans(setup: Setup) -> None:
    await make_droplet(setup, "web-stray", our_tags(setup))
    r = await doproxy(setup, "sanitize", "apply", "--orphans", "destroy")
    assert r.code == 0, r.err
    assert setup.fake.droplets == {} and setup.entries() == []


async def test_sanitize_leaves_what_another_installation_made(setup: Setup) -> None:
    """Only the shared tag, not our owner tag: reported, never adopted or destroyed; and an
    entry written by hand whose machine is gone is kept."""
    theirs = await make_droplet(setup, "web-theirs", ["doproxy"])
    setup.inventory.write_text(
        '[[droplet]]\nid = 1\nname = "by-hand"\nserver-host = "127.0.0.1:9"\n'
    )
    r = await doproxy(setup, "sanitize", "apply", "--orphans", "destroy")
    assert r.code == 0, r.err
    assert "stranger:" in r.out and "web-theirs" in r.out
    assert "foreign:" in r.out and "by-hand" in r.out
    assert int(theirs) in setup.fake.droplets
    assert [e["name"] for e in setup.entries()] == ["by-hand"]


@pytest.mark.timeout(90)
async def test_kill_9_right_after_the_create_call_leaks_nothing(tmp_path: Path) -> None:
    port = free_port()
    async with FakeDigitalOcean(
        token=TOKEN, active_after=3.0, serve_backends=True, backend_port=port
    ) as fake:
        setup = Setup(
            fake, write_config(tmp_path, fake.url, port), tmp_path / "inventory.toml", port
        )
        env = {**os.environ, "DIGITALOCEAN_TOKEN": TOKEN}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "doproxy",
            "--config",
            str(setup.config),
            "create",
            "web-crash",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
        )
        await wait_for(lambda: fake.created_count == 1, timeout=20)
        proc.send_signal(signal.SIGKILL)  # the POST was answered; nothing after it ran
        await proc.wait()
        [intent] = setup.entries()
        assert intent["state"] == "provisioning" and intent["name"] == "web-crash"
        r = await doproxy(setup, "sanitize")
        assert "creating:" in r.out and "web-crash" in r.out
        fixed = await doproxy(setup, "sanitize", "apply")
        assert fixed.code == 0, fixed.err
        [entry] = setup.entries()
        assert entry.get("state", "active") == "active"
        assert {d["id"] for d in fake.droplets.values()} == {entry["id"]}  # 0 leaked
        assert fake.created_count == 1


async def test_concurrent_cli_and_server_writes_lose_nothing(setup: Setup) -> None:
    """Four creates from the CLI while the server records drains in the same inventory."""
    hand = "".join(
        f'[[droplet]]\nid = "hand-{i}"\nname = "hand-{i}"\n'
        f'server-host = "127.0.0.1:{free_port()}"\n'
        for i in range(6)
    )
    setup.inventory.write_text(hand)
    proxy = await start_proxy_process(setup.config)
    try:
        creates = [doproxy(setup, "create", f"web-c{i}") for i in range(4)]

        async def drain_all() -> None:
            from doproxy.machines import FileStore, set_state

            for i in range(6):
                await set_state(FileStore(setup.inventory), f"hand-{i}", "draining")

        results = await asyncio.gather(*creates, drain_all())
        for r in results[:4]:
            assert isinstance(r, Run) and r.code == 0, r
        # The server turns every draining entry "disabled" (nothing was in flight).
        await wait_for(
            lambda: all(
                e.state == "disabled"
                for e in load_inventory(setup.inventory)
                if str(e.id).startswith("hand-")
            ),
            timeout=15,
        )
        entries = load_inventory(setup.inventory)
        assert sorted(e.name for e in entries if e.name.startswith("web-c")) == [
            f"web-c{i}" for i in range(4)
        ]
        assert len(entries) == 10
    finally:
        await proxy.stop()


async def test_check_never_shows_the_token(tmp_path: Path) -> None:
    secret = "dop_v1_do-not-print-me-42"
    cfg = write_config(tmp_path, "http://127.0.0.1:9", 8080)
    text = cfg.read_text().replace("[do-provisioner]\n", f'[do-provisioner]\ntoken = "{secret}"\n')
    cfg.write_text(text)
    setup = Setup(None, cfg, tmp_path / "inventory.toml", 8080)  # type: ignore[arg-type]
    ok = await doproxy(setup, "check")
    assert ok.code == 0, ok.err
    cfg.write_text(text.replace('region = "nyc3"', "region = 3\nbogus = true"))
    bad = await doproxy(setup, "check")
    assert bad.code == 1 and "do-provisioner.region" in bad.err and "bogus" in bad.err
    for run in (ok, bad):
        assert secret not in run.out + run.err


async def test_destroy_forgets_the_entry_only_after_the_machine_is_gone(setup: Setup) -> None:
    """Issue 10, item 11: drain, destroy, forget, as the scaler does. A destroy the API fails
    leaves the entry (out of rotation, marked retiring), never a forgotten paid machine."""
    assert (await doproxy(setup, "create", "web-d")).code == 0
    [entry] = setup.entries()
    machine_id = str(entry["id"])
    setup.fake.fail_next("DELETE", f"/v2/droplets/{machine_id}", 500, times=5)
    r = await doproxy(setup, "destroy", machine_id, "--yes")
    assert r.code != 0
    assert "stays in the inventory" in r.err
    [kept] = setup.entries()
    assert str(kept["id"]) == machine_id
    assert kept.get("state") in ("draining", "disabled")
    assert len(setup.fake.droplets) == 1  # still there, and still known
    again = await doproxy(setup, "destroy", machine_id, "--yes")
    assert again.code == 0, again.err
    assert setup.entries() == [] and setup.fake.droplets == {}
