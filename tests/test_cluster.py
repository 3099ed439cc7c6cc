"""Cluster mode end to end: real etcd members, real doproxy nodes (subprocesses), the fake
DigitalOcean API. Each node has its own folder (config, local inventory copy, admin files)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from doproxy.cluster.etcd import EtcdClient
from doproxy.cluster.store import EtcdStore
from doproxy.core.inventory_model import InventoryEntry
from doproxy.testing.fake_digitalocean import FakeDigitalOcean
from tests.conftest import wait_for
from tests.etcd import EtcdCluster
from tests.procs import ProxyProcess, start_proxy_process
from tests.support import RawBackend, answering, get, request
from tests.test_status_page import browser  # noqa: F401 (a fixture)

PREFIX = "/doproxy-test/"


@dataclass
class Node:
    name: str
    folder: Path
    proc: ProxyProcess

    @property
    def port(self) -> int:
        return self.proc.port

    def admin(self) -> str:
        return "http://" + (self.folder / "inventory.toml.admin.addr").read_text().strip()

    def token(self) -> str:
        return (self.folder / "inventory.toml.admin.token").read_text().strip()


def node_config(folder: Path, name: str, endpoints: list[str], extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "doproxy.toml"
    quoted = ", ".join(f'"{e}"' for e in endpoints)
    cfg.write_text(
        f"""bind = "127.0.0.1:0"
watch-config = false
inventory-file = "inventory.toml"

[admin]
bind = "127.0.0.1:0"

[backend]
disable-health-check = true

[cluster]
store = "etcd"
endpoints = [{quoted}]
prefix = "{PREFIX}"
node-name = "{name}"
lease-ttl = 2
timeout = "500ms"
{extra}"""
    )
    return cfg


async def start_nodes(
    tmp: Path, endpoints: list[str], n: int = 3, extra: Callable[[int], str] = lambda i: ""
) -> list[Node]:
    nodes = []
    for i in range(n):
        folder = tmp / f"n{i + 1}"
        cfg = node_config(folder, f"n{i + 1}", endpoints, extra(i))
        nodes.append(Node(f"n{i + 1}", folder, await start_proxy_process(cfg)))
    return nodes


async def stop_nodes(nodes: list[Node]) -> None:
    for node in nodes:
        with contextlib.suppress(ProcessLookupError, TimeoutError):
            os.kill(node.proc.pid, signal.SIGCONT)  # a frozen one must hear its SIGTERM
            await node.proc.stop()


async def status(node: Node) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(node.admin() + "/api/status") as r:
        assert r.status == 200, await r.text()
        data: dict[str, Any] = await r.json()
        return data


async def statuses(nodes: list[Node]) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(status(n) for n in nodes)))


async def until(check: Callable[[], Any], timeout: float) -> None:
    """Poll an async condition until it holds (or the timeout ends the test)."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


@pytest.fixture
async def backends() -> AsyncIterator[list[RawBackend]]:
    started = [await RawBackend(answering(200, b"ok")).start() for _ in range(2)]
    yield started
    for b in started:
        await b.close()


def entry(i: int, port: int, **kw: Any) -> InventoryEntry:
    return InventoryEntry(id=i, name=f"b{i}", server_host=f"127.0.0.1:{port}", **kw)


async def push(endpoints: list[str], entries: list[InventoryEntry]) -> EtcdStore:
    store = EtcdStore(EtcdClient(endpoints), PREFIX)
    await store.replace(entries)
    return store


def leaders(sts: list[dict[str, Any]]) -> list[str]:
    return [s["cluster"]["node"] for s in sts if s["cluster"]["leading"]]


async def settled(nodes: list[Node], timeout: float) -> None:
    """Until one node leads, every node reaches etcd and sees every node's signal."""

    async def check() -> bool:
        sts = await statuses(nodes)
        return len(leaders(sts)) == 1 and all(
            s["cluster"]["etcd_up"] and len(s["cluster"]["nodes"]) == len(nodes) for s in sts
        )

    await until(check, timeout)


async def serving(nodes: list[Node], count: int, timeout: float) -> None:
    """Until every node's pool has `count` backends."""

    async def check() -> bool:
        return all(len(s["backends"]) == count for s in await statuses(nodes))

    await until(check, timeout)


async def new_leader(nodes: list[Node], not_: str, timeout: float) -> str:
    """Until one of `nodes` leads, and it is not `not_`; its name."""

    async def check() -> bool:
        found = leaders(await statuses(nodes))
        return len(found) == 1 and found[0] != not_

    await until(check, timeout)
    return leaders(await statuses(nodes))[0]


async def active_backends(store: EtcdStore, count: int, timeout: float) -> None:
    async def check() -> bool:
        return sum(e.state == "active" for e in await store.load()) == count

    await until(check, timeout)


@pytest.mark.timeout(60)
async def test_an_inventory_change_reaches_every_node_within_a_second(
    tmp_path: Path, etcd3: EtcdCluster, backends: list[RawBackend]
) -> None:
    urls = etcd3.client_urls
    store = await push(urls, [entry(1, backends[0].port)])
    nodes = await start_nodes(tmp_path, urls)
    try:
        for n in nodes:  # every node serves the inventory it read from etcd
            r = await request(n.port, get())
            assert r.status == 200 and r.body == b"ok"

        await settled(nodes, 10)

        # A membership change made through the store (as the CLI does) ...
        t0 = time.monotonic()
        await store.update(lambda es: [*es, entry(2, backends[1].port)])
        await serving(nodes, 2, 5)
        assert time.monotonic() - t0 < 1.0

        # ... and one through any node's admin API reach every node within 1 s.
        t0 = time.monotonic()
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                nodes[2].admin() + "/api/backends/1/disable",
                headers={"Authorization": f"Bearer {nodes[2].token()}"},
            ) as r,
        ):
            assert r.status == 200, await r.text()

        async def all_disabled() -> bool:
            sts = await statuses(nodes)
            return all(
                next(b for b in s["backends"] if str(b["id"]) == "1")["state"] == "disabled"
                for s in sts
            )

        await until(all_disabled, 5)
        assert time.monotonic() - t0 < 1.0
        assert [e.state for e in await store.load()] == ["disabled", "active"]
        # Each node keeps a local copy: what a restart serves while etcd is down. It is
        # written when the node's watch delivers the change, which for the node whose API
        # made it can come a moment after its own apply (its status already says so).

        async def copies_disabled() -> bool:
            return all("disabled" in (n.folder / "inventory.toml").read_text() for n in nodes)

        await until(copies_disabled, 2)
        # An invalid inventory in etcd is refused whole: every node keeps its pool.
        await store.client.put(PREFIX + "backends/bad", b'{"server-host": "nonsense"}')
        await store.client.put(PREFIX + "revision", b"x")
        await asyncio.sleep(0.5)  # nothing to wait for: nothing may change
        for s in await statuses(nodes):
            assert len(s["backends"]) == 2
        await store.client.delete(PREFIX + "backends/bad")
    finally:
        await stop_nodes(nodes)
        await store.close()


@pytest.mark.timeout(60)
async def test_one_member_down_changes_nothing_and_all_of_etcd_down_still_serves(
    tmp_path: Path, etcd3: EtcdCluster, backends: list[RawBackend]
) -> None:
    urls = etcd3.client_urls
    store = await push(urls, [entry(1, backends[0].port)])
    nodes = await start_nodes(tmp_path, urls)
    try:
        await settled(nodes, 10)
        await etcd3.stop(0)
        await store.update(lambda es: [*es, entry(2, backends[1].port)])
        await serving(nodes, 2, 5)
        await settled(nodes, 10)

        await etcd3.stop_all()

        async def all_down() -> bool:
            sts = await statuses(nodes)
            return not any(s["cluster"]["etcd_up"] or s["cluster"]["leading"] for s in sts)

        await until(all_down, 15)
        for n in nodes:  # traffic still flows through every node, to both backends
            for _ in range(4):
                r = await request(n.port, get())
                assert r.status == 200 and r.body == b"ok"
        async with aiohttp.ClientSession() as s, s.get(nodes[0].admin() + "/metrics") as r:
            text = await r.text()
        assert "doproxy_cluster_etcd_up 0.0" in text

        # Back again: the nodes reconnect, elect a leader, and changes flow again.
        await etcd3.start_all()
        await settled(nodes, 20)
        await store.update(lambda es: es[:1])
        await serving(nodes, 1, 5)
    finally:
        await stop_nodes(nodes)
        await store.close()


# --- the leader and the provider --------------------------------------------------------------


@pytest.fixture
async def fake_do() -> AsyncIterator[tuple[FakeDigitalOcean, int]]:
    from tests.etcd import free_port

    port = free_port()
    async with FakeDigitalOcean(
        token="dop_v1_n1", active_after=2.0, serve_backends=True, backend_port=port
    ) as fake:
        fake.more_tokens = {"dop_v1_n2", "dop_v1_n3"}
        yield fake, port
        assert fake.violations == []


def calls_by(
    fake: FakeDigitalOcean, node: str, since: int = 0, after: float | None = None
) -> list[str]:
    """The requests the node made (by its token), from exchange `since`, or those that
    arrived after the clock reading `after`."""
    out = []
    for x in fake.exchanges[since:]:
        if after is not None and x.arrived < after:
            continue
        auth = next((v for k, v in x.headers.items() if k.lower() == "authorization"), "")
        if auth == f"Bearer dop_v1_{node}":
            out.append(f"{x.method} {x.path}")
    return out


def provisioning_extra(fake: FakeDigitalOcean, port: int) -> Callable[[int], str]:
    def extra(i: int) -> str:
        return f"""
[provisioning]
enable = true
min-backends = 2
max-backends = 3
interval = "200ms"
reconcile-every = "2s"

[do-provisioner]
enable = true
token = "dop_v1_n{i + 1}"
api-url = "{fake.url}"
create-timeout = "20s"
poll-interval = "50ms"
"""

    return extra


def node_config_new_host(port: int) -> str:
    return f'new-host-port = {port}\nnew-host-health-path = "/health"\n'


async def start_provisioning_nodes(
    tmp: Path,
    urls: list[str],
    fake: FakeDigitalOcean,
    port: int,
    changes: dict[str, str] | None = None,
) -> list[Node]:
    """Three nodes with the DigitalOcean provider; `changes` replaces lines of its config."""
    nodes = []
    for i in range(3):
        folder = tmp / f"n{i + 1}"
        extra = provisioning_extra(fake, port)(i)
        for old, new in (changes or {}).items():
            extra = extra.replace(old, new)
        cfg = node_config(folder, f"n{i + 1}", urls, extra)
        # The new droplets' port and health path belong in [backend].
        cfg.write_text(
            cfg.read_text().replace(
                "disable-health-check = true\n",
                "disable-health-check = true\n" + node_config_new_host(port),
            )
        )
        nodes.append(Node(f"n{i + 1}", folder, await start_proxy_process(cfg)))
    return nodes


@pytest.mark.timeout(90)
async def test_kill_9_of_the_leader_mid_scale_up_provisions_nothing_twice(
    tmp_path: Path, etcd3: EtcdCluster, fake_do: tuple[FakeDigitalOcean, int]
) -> None:
    fake, port = fake_do
    urls = etcd3.client_urls
    store = await push(urls, [])
    nodes = await start_provisioning_nodes(tmp_path, urls, fake, port)
    try:
        await wait_for(lambda: fake.created_count >= 1, timeout=20)
        sts = await statuses(nodes)
        (leader,) = leaders(sts)
        victim = next(n for n in nodes if n.name == leader)
        os.kill(victim.proc.pid, signal.SIGKILL)
        await victim.proc.proc.wait()
        rest = [n for n in nodes if n is not victim]

        async def converged() -> bool:
            entries = await store.load()
            ids = {str(e.id) for e in entries if e.state == "active"}
            return (
                len(ids) == 2
                and not any(e.state == "provisioning" for e in entries)
                and {str(i) for i in fake.droplets} == ids
            )

        await until(converged, 40)
        # Leadership moved (a new leader's session may restart once meanwhile: wait for it).
        await new_leader(rest, leader, 15)
        # 0 duplicates, 0 leaked: exactly the two machines the pool needs were ever created.
        assert fake.created_count == 2, fake.summary()
        assert len(fake.droplets) == 2
        for n in rest:  # every node serves them
            r = await request(n.port, get("/health"))
            assert r.status == 200
    finally:
        await stop_nodes(nodes)
        await store.close()


@pytest.mark.timeout(90)
async def test_a_leader_frozen_past_its_lease_makes_no_provider_call(
    tmp_path: Path, etcd3: EtcdCluster, fake_do: tuple[FakeDigitalOcean, int]
) -> None:
    fake, port = fake_do
    fake.active_after = 60.0  # the leader's create stays "new": it polls it all along
    urls = etcd3.client_urls
    store = await push(urls, [])
    # One create, polled every 200 ms, and no reconcile meanwhile: frozen right after a poll
    # was answered, the leader is in its wait for the next one. (A request already past the
    # last lease check when the process stops goes out when it resumes: DigitalOcean's API has
    # no fencing token, so that window can be made small, not closed; docs/cluster.md.)
    changes = {
        "min-backends = 2": "min-backends = 1",
        'poll-interval = "50ms"': 'poll-interval = "200ms"',
        'reconcile-every = "2s"': 'reconcile-every = "60s"',
    }
    nodes = await start_provisioning_nodes(tmp_path, urls, fake, port, changes)
    try:
        await wait_for(lambda: fake.created_count == 1, timeout=20)
        (leader,) = leaders(await statuses(nodes))
        frozen = next(n for n in nodes if n.name == leader)
        polls = len(calls_by(fake, leader))
        await wait_for(lambda: len(calls_by(fake, leader)) > polls + 1, timeout=10)
        os.kill(frozen.proc.pid, signal.SIGSTOP)
        try:
            rest = [n for n in nodes if n is not frozen]
            # Within the lease TTL (2 s) and a campaign round.
            await new_leader(rest, leader, 15)
            mark = len(fake.exchanges)
        finally:
            resumed = time.monotonic()  # the fake's clock: arrival times compare with it
            os.kill(frozen.proc.pid, signal.SIGCONT)

        # The old leader runs again: the poll of its create was due long ago.
        async def follows() -> bool:
            st = await status(frozen)
            return st["cluster"]["leading"] is False and st["cluster"]["etcd_up"]

        await until(follows, 15)
        await asyncio.sleep(1.0)  # a window in which a stale leader would have acted
        # Nothing it sent after it was resumed (a request sent just before the freeze may be
        # answered, and listed, late).
        assert calls_by(fake, leader, after=resumed) == []
        # The new leader took the create over (it polls it) and made none of its own.
        new = leaders(await statuses(nodes))
        assert len(new) == 1 and calls_by(fake, new[0], since=mark)
        assert fake.created_count == 1
    finally:
        await stop_nodes(nodes)
        await store.close()


@pytest.mark.timeout(60)
async def test_the_status_page_shows_the_nodes_and_the_leader(
    tmp_path: Path,
    etcd: EtcdCluster,
    backends: list[RawBackend],
    browser: Any,  # noqa: F811 (the fixture imported above)
) -> None:
    urls = etcd.client_urls
    store = await push(urls, [entry(1, backends[0].port)])
    nodes = await start_nodes(tmp_path, urls, n=2)
    try:
        await settled(nodes, 10)
        (leader,) = leaders(await statuses(nodes))
        follower = next(n for n in nodes if n.name != leader)
        page = await browser.new_page()
        await page.goto(follower.admin() + "/")
        await page.wait_for_selector("#nodes tbody tr:nth-child(2)", timeout=10_000)
        summary = await page.text_content("#cluster-summary")
        assert f"this node: {follower.name}" in summary and f"leader: {leader}" in summary
        roles = {
            await tr.get_attribute("data-node"): await tr.eval_on_selector(
                "td:nth-child(2)", "td => td.textContent"
            )
            for tr in await page.query_selector_all("#nodes tbody tr")
        }
        assert roles == {leader: "leader", follower.name: "follower"}
    finally:
        await stop_nodes(nodes)
        await store.close()


@pytest.mark.timeout(90)
async def test_the_scalers_pause_and_journal_move_with_the_leadership(
    tmp_path: Path, etcd3: EtcdCluster, fake_do: tuple[FakeDigitalOcean, int]
) -> None:
    fake, port = fake_do
    fake.active_after = 0.2
    urls = etcd3.client_urls
    store = await push(urls, [])
    nodes = await start_provisioning_nodes(tmp_path, urls, fake, port)
    try:
        await active_backends(store, 2, 30)
        (leader,) = leaders(await statuses(nodes))
        first = next(n for n in nodes if n.name == leader)
        follower = next(n for n in nodes if n is not first)

        # Traffic through a follower alone reaches the leader's scaler (the nodes' signals
        # are summed): its observed latency stops being "no request".
        async def leader_sees_it() -> bool:
            for _ in range(5):
                assert (await request(follower.port, get())).status == 200
            async with aiohttp.ClientSession() as s, s.get(first.admin() + "/api/autoscaler") as r:
                return (await r.json())["signal"]["latency"] is not None

        await until(leader_sees_it, 10)
        assert (await status(first))["listener"]["requests"] == 0  # none through the leader
        async with aiohttp.ClientSession() as s:
            # A follower runs no scaler: it says who does.
            async with s.post(
                follower.admin() + "/api/autoscaler/pause",
                headers={"Authorization": f"Bearer {follower.token()}"},
            ) as r:
                assert r.status == 409 and f"the leader is {leader}" in await r.text()
            async with s.post(
                first.admin() + "/api/autoscaler/pause",
                headers={"Authorization": f"Bearer {first.token()}"},
            ) as r:
                assert r.status == 200, await r.text()

        async def kept() -> bool:
            over, _ = await store.client.get(PREFIX + "overrides")
            journal, _ = await store.client.get(PREFIX + "journal/", prefix=True)
            return bool(over) and b'"paused": true' in over[0].value and len(journal) > 0

        await until(kept, 5)
        os.kill(first.proc.pid, signal.SIGKILL)
        await first.proc.proc.wait()
        rest = [n for n in nodes if n is not first]
        new = await new_leader(rest, leader, 15)
        successor = next(n for n in rest if n.name == new)
        async with (
            aiohttp.ClientSession() as s,
            s.get(successor.admin() + "/api/autoscaler") as r,
        ):
            scaler = await r.json()
        # The new leader is paused as the old one was, and shows the old one's decisions.
        assert scaler["enabled"] and scaler["paused"] is True
        assert any(d["action"] == "up" for d in scaler["decisions"]), scaler["decisions"]
    finally:
        await stop_nodes(nodes)
        await store.close()


@pytest.mark.timeout(60)
async def test_an_upgrade_of_the_leader_hands_its_leadership_over(
    tmp_path: Path, etcd: EtcdCluster, backends: list[RawBackend]
) -> None:
    from tests.test_upgrade import Load

    urls = etcd.client_urls
    store = await push(urls, [entry(1, backends[0].port)])
    nodes = await start_nodes(tmp_path, urls, n=2)
    load: Load | None = None
    try:
        await settled(nodes, 10)
        (leader,) = leaders(await statuses(nodes))
        old = next(n for n in nodes if n.name == leader)
        load = Load(old.port)
        load.start()
        await wait_for(lambda: load is not None and load.ok > 50, timeout=10)
        new = await start_proxy_process(old.folder / "doproxy.toml", args=("upgrade",))
        assert new.port == old.port
        assert await old.proc.proc.wait() == 0, old.proc.log.decode()
        successor = Node(old.name, old.folder, new)
        nodes[nodes.index(old)] = successor
        before = load.ok
        await wait_for(lambda: load is not None and load.ok > before + 50, timeout=10)
        await load.stop()
        assert load.failed == [], load.failed[:5]

        await settled(nodes, 10)
        # The new process serves the cluster's inventory and follows its changes.
        await store.update(lambda es: [*es, entry(2, backends[1].port)])
        await serving(nodes, 2, 5)
    finally:
        if load is not None and load.running:
            await load.stop()
        await stop_nodes(nodes)
        await store.close()


@pytest.mark.timeout(30)
async def test_two_nodes_with_one_name_are_told(
    tmp_path: Path, etcd: EtcdCluster, backends: list[RawBackend]
) -> None:
    urls = etcd.client_urls
    store = await push(urls, [entry(1, backends[0].port)])
    nodes = []
    try:
        for i in range(2):
            cfg = node_config(tmp_path / f"n{i}", "same", urls)
            nodes.append(Node("same", cfg.parent, await start_proxy_process(cfg)))
        await wait_for(
            lambda: any(b"also calls itself 'same'" in n.proc.log for n in nodes), timeout=10
        )
    finally:
        await stop_nodes(nodes)
        await store.close()


@pytest.mark.timeout(120)
async def test_a_rollout_goes_on_after_its_leader_is_killed(
    tmp_path: Path, etcd3: EtcdCluster, fake_do: tuple[FakeDigitalOcean, int]
) -> None:
    """The rollout's record is in etcd with the overrides: kill -9 of the leader during the
    canary, and the next leader finishes it (or rolls it back), with one image for the pool
    and no droplet leaked or made twice."""
    fake, port = fake_do
    fake.active_after = 0.2
    urls = etcd3.client_urls
    store = await push(urls, [])
    timing = (
        'interval = "200ms"\ncanary-time = "2s"\nrollout-step-time = "1s"\n'
        "rollout-min-requests = 0\n"
    )
    nodes = await start_provisioning_nodes(
        tmp_path, urls, fake, port, {'interval = "200ms"\n': timing}
    )
    try:
        await active_backends(store, 2, 30)
        (leader,) = leaders(await statuses(nodes))
        first = next(n for n in nodes if n.name == leader)
        follower = next(n for n in nodes if n is not first)
        body = {"image": "ubuntu-24-04-x64"}
        async with aiohttp.ClientSession() as s:
            # Only the leader runs rollouts: a follower names it.
            async with s.post(
                follower.admin() + "/api/rollouts",
                headers={"Authorization": f"Bearer {follower.token()}"},
                json=body,
            ) as r:
                assert r.status == 409 and f"the leader is {leader}" in await r.text()
            async with s.post(
                first.admin() + "/api/rollouts",
                headers={"Authorization": f"Bearer {first.token()}"},
                json=body,
            ) as r:
                assert r.status == 202, await r.text()
                rid = (await r.json())["id"]

            async def canary_made() -> bool:
                async with s.get(first.admin() + "/api/rollouts") as r:
                    cur = (await r.json())["current"]
                return bool(cur) and cur["new"] >= 1

            await until(canary_made, 30)
        os.kill(first.proc.pid, signal.SIGKILL)
        await first.proc.proc.wait()
        rest = [n for n in nodes if n is not first]
        new = await new_leader(rest, leader, 15)
        successor = next(n for n in rest if n.name == new)

        async def ended() -> dict[str, Any] | None:
            async with (
                aiohttp.ClientSession() as s,
                s.get(successor.admin() + "/api/rollouts") as r,
            ):
                view = await r.json()
            if view["current"] is not None:
                return None
            return next((h for h in view["history"] if h["id"] == rid), None)

        await until(ended, 60)
        record = await ended()
        assert record is not None and record["phase"] in ("done", "rolled-back"), record
        await active_backends(store, 2, 30)
        entries = await store.load()
        ids = {str(e.id) for e in entries}
        assert ids == {str(i) for i in fake.droplets}, fake.summary()
        images = {fake.droplets[int(i)]["image"]["slug"] for i in ids}
        assert images == (
            {"ubuntu-24-04-x64"} if record["phase"] == "done" else {"ubuntu-22-04-x64"}
        )
    finally:
        await stop_nodes(nodes)
        await store.close()


@pytest.mark.timeout(30)
async def test_a_leaders_view_is_released_with_its_leadership(etcd: EtcdCluster) -> None:
    """The guarded view a leader wrote through: released when its leadership ends, its
    queued writes are written and its writer task ends; the store it came from goes on."""
    store = await push(etcd.client_urls, [])
    try:
        await store.client.put(PREFIX + "leader", b"n1/token")
        view = store.guarded(PREFIX + "leader", b"n1/token")
        view.write_soon(PREFIX + "overrides", b'{"paused": true}')
        writer = view._writer
        assert writer is not None and not writer.done()
        await view.release()
        assert writer.done() and view._writer is None
        kvs, _ = await store.client.get(PREFIX + "overrides")
        assert kvs and kvs[0].value == b'{"paused": true}'
        assert await store.load() == []  # the client is the store's: still open
    finally:
        await store.close()
