"""Progressive rollouts against the fake DigitalOcean API: a real runtime whose
[do-provisioner] points at the fake, droplets that serve (the fake runs a demo backend on each
active droplet), every request checked against DigitalOcean's OpenAPI spec. A rollout to a new
image and size replaces both droplets; one the API refuses rolls back with the old pool
untouched; a spec's user data never shows in the API's views or the log."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from doproxy.admin.server import addr_path, rollouts_view
from doproxy.autoscaler import Autoscaler
from doproxy.config import load_settings
from doproxy.inventory import load_inventory
from doproxy.journal import journal_path, overrides_path
from doproxy.loadgen import LoadResult, run_load
from doproxy.provisioning import Spec
from doproxy.rollout import TAG_PREFIX
from doproxy.runtime import Runtime
from doproxy.testing.fake_digitalocean import FakeDigitalOcean
from tests.conftest import wait_for
from tests.test_autoscaler_e2e import TOKEN, free_port, inventory_ids

CONFIG = """bind = "127.0.0.1:0"
watch-config = false
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
enable = true
min-backends = 2
max-backends = 2
interval = "250ms"
drain-timeout = "1s"
canary-weight = 30
canary-time = "1s"
rollout-step-time = "1s"
rollout-min-requests = 0

[do-provisioner]
enable = true
token = "{token}"
api-url = "{url}"
image = "{image}"
size = "{size}"
tags = ["{tag}"]
create-timeout = "20s"
poll-interval = "50ms"
"""

OLD_IMAGE, OLD_SIZE = "debian-12-x64", "s-1vcpu-1gb"
NEW_IMAGE, NEW_SIZE = "ubuntu-24-04-x64", "s-2vcpu-2gb"


@pytest.fixture
async def fake_do() -> AsyncIterator[tuple[FakeDigitalOcean, int]]:
    port = free_port()
    async with FakeDigitalOcean(
        token=TOKEN, active_after=0.3, serve_backends=True, backend_port=port
    ) as fake:
        yield fake, port
        # Every request doproxy sent, and every answer, matched DigitalOcean's spec.
        assert fake.violations == [], fake.summary()
        assert fake.backend_errors == []


@contextlib.asynccontextmanager
async def running(
    tmp: Path, fake: FakeDigitalOcean, port: int
) -> AsyncIterator[tuple[Runtime, Autoscaler]]:
    """A runtime on the fake whose pool of two droplets serves; stopped after."""
    cfg = tmp / "doproxy.toml"
    cfg.write_text(
        CONFIG.format(
            port=port,
            token=TOKEN,
            url=fake.url,
            image=OLD_IMAGE,
            size=OLD_SIZE,
            # Random, not from the test folder's name: two test runs at once (a developer's and
            # make test) shared a tag, and one's teardown destroyed the other's machines.
            tag=f"ro-{uuid.uuid4().hex[:12]}",
        )
    )
    rt = Runtime(load_settings(cfg), [], cfg)
    server = await rt.start()
    try:
        scaler = rt.autoscaler
        assert scaler is not None
        await asyncio.wait_for(scaler.reconciled.wait(), 10)
        await wait_for(lambda: len(server.pool.eligible) == 2, timeout=20)
        yield rt, scaler
    finally:
        await rt.stop()


def eligible(rt: Runtime) -> int:
    assert rt.server is not None
    return len(rt.server.pool.eligible)


def posted(fake: FakeDigitalOcean) -> dict[str, dict[str, Any]]:
    """Every droplet create the fake was sent, by droplet name."""
    return {
        ex.body["name"]: ex.body
        for ex in fake.exchanges
        if ex.method == "POST" and ex.path == "/v2/droplets"
    }


def deleted(fake: FakeDigitalOcean) -> set[int]:
    return {
        int(ex.path.rsplit("/", 1)[1])
        for ex in fake.exchanges
        if ex.method == "DELETE" and ex.path.startswith("/v2/droplets/") and ex.status == 204
    }


async def with_light_load(rt: Runtime, run: Any) -> LoadResult:
    """Run `run()` while two clients send requests through the proxy."""
    assert rt.server is not None
    host, port = rt.server.addresses[0]
    stop = asyncio.Event()
    load = LoadResult()
    task = asyncio.create_task(run_load(host, port, 2, 60.0, stop=stop, result=load))
    try:
        await run()
    finally:
        stop.set()
        await task
    return load


@pytest.mark.timeout(90)
async def test_a_rollout_moves_both_droplets_to_the_new_image_and_size(
    tmp_path: Path, fake_do: tuple[FakeDigitalOcean, int]
) -> None:
    fake, port = fake_do
    async with running(tmp_path, fake, port) as (rt, scaler):
        before = dict(fake.droplets)
        assert len(before) == 2
        assert {d["image"]["slug"] for d in before.values()} == {OLD_IMAGE}
        spec = Spec(image=NEW_IMAGE, size=NEW_SIZE)
        begun: dict[str, Any] = {}

        async def roll() -> None:
            begun.update(await scaler.rollouts.start(spec, "the test"))
            await wait_for(lambda: not scaler.rollouts.active, timeout=60)

        load = await with_light_load(rt, roll)
        ended = scaler.rollouts.history[-1]
        assert ended["id"] == begun["id"]
        assert ended["phase"] == "done", ended
        assert ended["spec"] == {"image": NEW_IMAGE, "size": NEW_SIZE}
        assert [v["window"] for v in ended["verdicts"]] == ["canary", "steps"]
        assert all(v["passed"] for v in ended["verdicts"])
        assert load.failed == 0, load.errors
        assert load.ok > 0

        # Exactly two droplets, both new, of the new image and size, with the rollout's tag.
        tag = TAG_PREFIX + ended["id"]
        now = dict(fake.droplets)
        assert len(now) == 2 and not set(now) & set(before)
        for droplet in now.values():
            assert droplet["image"]["slug"] == NEW_IMAGE
            assert droplet["size_slug"] == NEW_SIZE
            assert tag in droplet["tags"]
            body = posted(fake)[droplet["name"]]
            assert (body["image"], body["size"]) == (NEW_IMAGE, NEW_SIZE)
            assert tag in body["tags"]
        # The old ones were drained and destroyed at DigitalOcean, not just forgotten.
        assert deleted(fake) == set(before)

        # The inventory agrees with the fake, every entry serving and unmarked.
        entries = load_inventory(tmp_path / "inventory.toml")
        assert inventory_ids(tmp_path) == {str(i) for i in now}
        assert all(e.state == "active" and e.canary_weight == 0 for e in entries)
        assert all(tag in e.tags for e in entries)
        await wait_for(lambda: eligible(rt) == 2, timeout=10)

        # New machines are made of the new spec from now on...
        assert scaler.current_spec() == spec
        assert rollouts_view(rt)["spec"] == {"image": NEW_IMAGE, "size": NEW_SIZE}
        assert rollouts_view(rt)["current"] is None

        # ...so the next scale-up makes a droplet of the new image and size (without the
        # rollout's tag: that marks the rollout's own machines).
        await scaler.set_limits({"min-backends": 3, "max-backends": 3})
        await wait_for(lambda: len(fake.droplets) == 3 and eligible(rt) == 3, timeout=20)
        [third] = [d for i, d in fake.droplets.items() if i not in now]
        assert (third["image"]["slug"], third["size_slug"]) == (NEW_IMAGE, NEW_SIZE)
        assert tag not in third["tags"]
        body = posted(fake)[third["name"]]
        assert (body["image"], body["size"]) == (NEW_IMAGE, NEW_SIZE)
        await wait_for(lambda: inventory_ids(tmp_path) == {str(i) for i in fake.droplets}, 10)


@pytest.mark.timeout(90)
async def test_a_rollout_the_api_refuses_rolls_back_with_the_old_droplets_untouched(
    tmp_path: Path, fake_do: tuple[FakeDigitalOcean, int]
) -> None:
    """DigitalOcean answers a create it cannot carry out (an image it does not know) with an
    error; the fake does not know which images exist, so it is told to refuse the next create
    with a 422 (the spec documents no 422 for droplet create, only `default`: the fake's error
    body is checked against that)."""
    fake, port = fake_do
    async with running(tmp_path, fake, port) as (rt, scaler):
        before = json.loads(json.dumps(fake.droplets))
        entries_before = load_inventory(tmp_path / "inventory.toml")
        created = fake.created_count
        fake.fail_next("POST", "/v2/droplets", 422)
        begun = await scaler.rollouts.start(Spec(image="no-such-image-x64"), "the test")
        await wait_for(lambda: not scaler.rollouts.active, timeout=30)

        ended = scaler.rollouts.history[-1]
        assert ended["id"] == begun["id"]
        assert ended["phase"] == "rolled-back", ended
        assert "digitalocean refused the new spec" in ended["reason"], ended["reason"]
        assert "DigitalOcean refused the request (422)" in ended["reason"], ended["reason"]

        # The create was sent with the new image, refused, and nothing else was asked for.
        [refused] = [ex for ex in fake.exchanges if ex.method == "POST" and ex.status == 422]
        assert refused.body["image"] == "no-such-image-x64"
        assert TAG_PREFIX + ended["id"] in refused.body["tags"]
        assert fake.created_count == created
        assert deleted(fake) == set()
        # The old droplets are exactly as they were, and still serve.
        assert json.loads(json.dumps(fake.droplets)) == before
        await wait_for(lambda: eligible(rt) == 2, timeout=10)
        entries = load_inventory(tmp_path / "inventory.toml")
        assert {(e.id, e.state, e.canary_weight) for e in entries} == {
            (e.id, e.state, e.canary_weight) for e in entries_before
        }
        assert scaler.current_spec() is None
        # A rollout's failed create does not back the autoscaler's own creates off.
        assert scaler.create_failures == 0


SECRET = "rollout-secret-" + hashlib.sha256(b"doproxy").hexdigest()[:24]
USER_DATA = f"#cloud-config\nwrite_files:\n  - path: /etc/app.env\n    content: TOKEN={SECRET}\n"


@pytest.mark.timeout(90)
async def test_a_rollouts_user_data_never_shows_in_the_api_or_the_log(
    tmp_path: Path, fake_do: tuple[FakeDigitalOcean, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake, port = fake_do
    async with running(tmp_path, fake, port) as (rt, scaler):
        views: list[str] = []

        def look() -> bool:
            views.append(json.dumps(scaler.rollouts.status()))
            views.append(json.dumps(rollouts_view(rt)))
            return not scaler.rollouts.active

        begun = await scaler.rollouts.start(Spec(image=NEW_IMAGE, user_data=USER_DATA), "the test")
        views.append(json.dumps(begun))
        await wait_for(lambda: scaler.rollouts.status()["current"] is not None, timeout=10)
        await wait_for(look, timeout=60)
        ended = scaler.rollouts.history[-1]
        assert ended["phase"] == "done", ended
        assert any('"current": {' in v for v in views)  # seen while it ran, too
        look()

        # Over HTTP as well: the admin API's views, its event log, its status page.
        url = "http://" + addr_path(rt.inventory_path).read_text().strip()
        async with aiohttp.ClientSession() as session:
            for path in ("/api/rollouts", "/api/autoscaler", "/api/status", "/api/events", "/"):
                async with session.get(url + path) as r:
                    assert r.status == 200, path
                    views.append(await r.text())

        # The user data did go where it belongs: into each new droplet's create.
        creates = [b for b in posted(fake).values() if b["image"] == NEW_IMAGE]
        assert len(creates) == 2 and all(b["user_data"] == USER_DATA for b in creates)
        # Shown as its size and hash only.
        digest = hashlib.sha256(USER_DATA.encode()).hexdigest()[:12]
        shown = f"{len(USER_DATA.encode())} bytes, sha256 {digest}"
        assert ended["spec"] == {"image": NEW_IMAGE, "user_data": shown}
        assert rollouts_view(rt)["spec"] == {"image": NEW_IMAGE, "user_data": shown}
        assert sum(shown in v for v in views) >= 3

    # The journal and the inventory hold the public view only. The overrides keep the spec
    # itself (new machines are made of it, after a restart too), in a file only we can read.
    inventory = tmp_path / "inventory.toml"
    files = [inventory.read_text(), journal_path(inventory).read_text()]
    kept = overrides_path(inventory)
    assert SECRET in kept.read_text()
    assert kept.stat().st_mode & 0o077 == 0
    logged = [caplog.text]
    for record in caplog.records:
        logged += [record.getMessage(), repr(record.args), str(record.exc_info)]
    # The log was captured at DEBUG (the provider's request lines too), so the absence of the
    # user data in it means something.
    assert any(r.name == "doproxy.providers.digitalocean" for r in caplog.records)
    assert any(r.name == "doproxy.rollout" and ": done:" in r.getMessage() for r in caplog.records)
    for text in [*views, *logged, *files]:
        assert SECRET not in text
        assert "write_files" not in text
