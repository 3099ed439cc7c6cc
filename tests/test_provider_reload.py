"""A reload applies `[do-provisioner]` changes (a rotated token, tags, ...) to the running
scaler, validated first and all-or-nothing; against the fake DigitalOcean API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from doproxy.config import load_settings
from doproxy.provisioning import Machine, Spec
from doproxy.runtime import Runtime, SwappableProvider
from doproxy.testing.fake_digitalocean import FakeDigitalOcean
from tests.conftest import wait_for
from tests.test_autoscaler_e2e import free_port, serving

pytestmark = pytest.mark.timeout(60)

OLD, NEW = "dop_v1_old-token", "dop_v1_new-token"


def write_config(tmp: Path, url: str, port: int, tags: str = '["doproxy"]') -> Path:
    cfg = tmp / "doproxy.toml"
    cfg.write_text(
        f"""bind = "127.0.0.1:0"
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
min-backends = 1
max-backends = 1
interval = "250ms"

[do-provisioner]
enable = true
token-file = "token.txt"
tags = {tags}
api-url = "{url}"
create-timeout = "20s"
poll-interval = "50ms"
"""
    )
    return cfg


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[FakeDigitalOcean, Runtime, Path]]:
    port = free_port()
    async with FakeDigitalOcean(token=OLD, serve_backends=True, backend_port=port) as fake:
        (tmp_path / "token.txt").write_text(OLD + "\n")
        cfg = write_config(tmp_path, fake.url, port)
        rt = Runtime(load_settings(cfg), [], cfg)
        await rt.start()
        try:
            await wait_for(lambda: serving(rt) == 1, timeout=20)
            yield fake, rt, cfg
        finally:
            await rt.stop()
        assert fake.violations == []


def last_auth(fake: FakeDigitalOcean) -> str:
    headers = fake.exchanges[-1].headers
    return next(v for k, v in headers.items() if k.lower() == "authorization")


async def test_a_rotated_token_file_is_used_from_the_next_call_on(
    tmp_path: Path, running: tuple[FakeDigitalOcean, Runtime, Path]
) -> None:
    fake, rt, _ = running
    assert rt.provider is not None and rt.autoscaler is not None
    scaler = rt.autoscaler
    before = rt.provider.current
    # The token is rotated: DigitalOcean accepts only the new one from now on.
    (tmp_path / "token.txt").write_text(NEW + "\n")
    fake.set_token(NEW)
    assert await rt.reload()
    assert rt.autoscaler is scaler, "the scaler keeps running (its timers and cooldowns too)"
    assert rt.provider.current is not before
    assert len(await rt.provider.list()) == 1
    assert last_auth(fake) == f"Bearer {NEW}"
    # The scaler's own calls go through it: a reconcile now is answered, not refused (401).
    assert scaler.provider is rt.provider
    seen = len(fake.exchanges)
    await scaler.reconcile()
    assert [e.status for e in fake.exchanges[seen:]] == [200]
    assert last_auth(fake) == f"Bearer {NEW}"


async def test_an_unchanged_provider_is_kept(
    running: tuple[FakeDigitalOcean, Runtime, Path],
) -> None:
    _, rt, _ = running
    assert rt.provider is not None
    before = rt.provider.current
    assert await rt.reload()
    assert rt.provider.current is before


async def test_changed_tags_apply_on_reload(
    tmp_path: Path, running: tuple[FakeDigitalOcean, Runtime, Path]
) -> None:
    fake, rt, cfg = running
    assert rt.provider is not None
    port = load_settings(cfg).backend.new_host_port
    write_config(tmp_path, fake.url, port, tags='["doproxy", "blue"]')
    assert await rt.reload()
    await rt.provider.list()
    listed = [e for e in fake.exchanges if e.method == "GET" and e.path == "/v2/droplets"]
    assert listed[-1].query.get("tag_name") == "doproxy"
    assert rt.settings.do_provisioner.tags == ("doproxy", "blue")
    # Its droplet lacks the new tag: it is no longer one of ours.
    assert await rt.provider.list() == []


@pytest.mark.parametrize("bad", ["missing", "empty"])
async def test_a_bad_new_token_file_fails_the_reload_and_the_old_provider_works_on(
    tmp_path: Path, running: tuple[FakeDigitalOcean, Runtime, Path], bad: str
) -> None:
    fake, rt, cfg = running
    assert rt.provider is not None
    before, settings = rt.provider.current, rt.settings
    text = cfg.read_text()
    if bad == "missing":
        cfg.write_text(text.replace('token-file = "token.txt"', 'token-file = "gone.txt"'))
    else:
        (tmp_path / "token.txt").write_text("\n")
    # Other changes in the same reload are not applied either (all-or-nothing).
    cfg.write_text(cfg.read_text().replace("max-backends = 1", "max-backends = 2"))
    assert not await rt.reload()
    assert rt.settings is settings and rt.provider.current is before
    assert len(await rt.provider.list()) == 1
    assert last_auth(fake) == f"Bearer {OLD}"


class Held:
    """A provider whose list() waits until released; it records being closed."""

    kind = "digitalocean"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.closed = False

    async def list(self) -> list[Machine]:
        self.started.set()
        await self.release.wait()
        return []

    async def get(self, machine_id: str) -> Machine:
        raise NotImplementedError

    async def create(self, name: str, spec: Spec | None = None) -> Machine:
        raise NotImplementedError

    async def destroy(self, machine_id: str) -> None:
        raise NotImplementedError

    async def reboot(self, machine_id: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        self.closed = True


async def test_the_old_provider_is_closed_once_its_last_call_returns() -> None:
    old, new = Held(), Held()
    p = SwappableProvider(old)
    call = asyncio.create_task(p.list())
    await old.started.wait()
    await p.swap(new)
    assert not old.closed, "a call in flight keeps its provider open"
    new.release.set()
    assert await p.list() == []  # new calls go to the new provider
    assert new.started.is_set() and not old.closed
    old.release.set()
    assert await call == []
    assert old.closed and not new.closed
    idle = Held()
    await p.swap(idle)  # nothing in flight on `new`: closed at once
    assert new.closed
