"""Issue 10: ownership, continuous reconciliation, a scaler that never dies, create backoff,
manual actions and the journal, against the fake DigitalOcean API (or a Provider fake)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from doproxy.autoscaler import Autoscaler, backoff
from doproxy.config import load_settings
from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Settings
from doproxy.errors import MachineNotFound
from doproxy.inventory import load_inventory, update_inventory
from doproxy.machines import FileStore, open_provider, owner_tag
from doproxy.provisioning import Machine, Provider, Spec
from doproxy.proxy.backend import Backend
from doproxy.runtime import Runtime
from doproxy.testing.fake_digitalocean import FakeDigitalOcean
from tests.conftest import wait_for
from tests.test_autoscaler_e2e import TOKEN, do_config, free_port, serving

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def fake() -> AsyncIterator[FakeDigitalOcean]:
    port = free_port()
    async with FakeDigitalOcean(
        token=TOKEN, active_after=0.2, serve_backends=True, backend_port=port
    ) as f:
        f.backend_port_for_tests = port  # type: ignore[attr-defined]
        yield f
        assert f.violations == []


def config(folder: Path, fake: FakeDigitalOcean, **changes: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = do_config(folder, fake.url, fake.backend_port_for_tests)  # type: ignore[attr-defined]
    text = cfg.read_text()
    for key, value in changes.items():
        text = text.replace("[provisioning]\n", f"[provisioning]\n{key} = {value}\n", 1)
        text = "\n".join(
            ln
            for ln in text.splitlines()
            if not (ln.startswith(f"{key} = ") and ln != f"{key} = {value}")
        )
    cfg.write_text(text + "\n")
    return cfg


class FakeProxy:
    """What the scaler needs from a running proxy, without a listener."""

    def __init__(self, settings: Settings, folder: Path) -> None:
        self.settings = settings
        self.folder = folder
        self.backends: list[Backend] = []
        self.reloads = 0

    @property
    def inventory_path(self) -> Path:
        return self.folder / "inventory.toml"

    @property
    def store(self) -> FileStore:
        return FileStore(self.inventory_path)

    @property
    def owner(self) -> str:
        return owner_tag(self.inventory_path)

    async def reload(self) -> bool:
        self.reloads += 1
        self.backends = [
            Backend(e) for e in load_inventory(self.inventory_path) if e.state != "provisioning"
        ]
        return True

    async def apply_inventory(self) -> bool:
        return await self.reload()

    def takes_traffic(self, key: str) -> bool:
        return any(b.key == key and b.entry.state == "active" for b in self.backends)

    def traffic(self) -> tuple[int, float]:
        return (0, 0.0)

    def wake_state(self) -> tuple[int, float | None, bool]:
        return 0, None, False

    def wake_failure_handled(self) -> None:
        pass


def posts(fake: FakeDigitalOcean) -> int:
    return sum(1 for x in fake.exchanges if x.method == "POST" and x.path == "/v2/droplets")


# --- 1. ownership ---------------------------------------------------------------------------


async def test_two_installations_sharing_the_tag_never_touch_each_others_droplets(
    tmp_path: Path, fake: FakeDigitalOcean
) -> None:
    a_cfg = config(tmp_path / "a", fake, **{"min-backends": "2"})
    b_cfg = config(tmp_path / "b", fake, orphans='"destroy"')
    a = Runtime(load_settings(a_cfg), [], a_cfg)
    await a.start()
    try:
        await wait_for(lambda: serving(a) == 2, timeout=20)
        theirs = {str(e.id) for e in load_inventory(tmp_path / "a" / "inventory.toml")}
        b = Runtime(load_settings(b_cfg), [], b_cfg)
        await b.start()
        try:
            await wait_for(lambda: serving(b) == 1, timeout=20)
            scaler = b.autoscaler
            assert scaler is not None
            await scaler.reconcile()  # a second pass: still nothing of A's touched
            mine = {str(e.id) for e in load_inventory(tmp_path / "b" / "inventory.toml")}
            assert not mine & theirs
            assert theirs <= {str(i) for i in fake.droplets}, "B destroyed A's droplet"
            assert serving(a) == 2
        finally:
            await b.stop()
    finally:
        await a.stop()
        provider = open_provider(a.settings, tmp_path / "a")
        for m in await provider.list():  # both installations' droplets: the shared tag
            await provider.destroy(m.id)
        await provider.close()
    assert fake.droplets == {}


async def test_a_second_server_on_one_inventory_is_refused(
    tmp_path: Path, fake: FakeDigitalOcean
) -> None:
    cfg = config(tmp_path, fake)
    cfg.write_text(cfg.read_text().replace("enable = true\nmin", "enable = false\nmin"))
    first = Runtime(load_settings(cfg), [], cfg)
    await first.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "doproxy",
            "--config",
            str(cfg),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(20):
                _, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 1
        assert "another doproxy server" in err.decode()
        assert str(tmp_path / "inventory.toml") in err.decode()
        assert str(os.getpid()) in err.decode()
    finally:
        await first.stop()


# --- 3 and 4: continuous reconciliation, entries we did not create ---------------------------


async def test_reconcile_finishes_an_interrupted_destroy_and_keeps_hand_written_entries(
    tmp_path: Path, fake: FakeDigitalOcean, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="doproxy.autoscaler")
    settings = load_settings(config(tmp_path, fake))
    proxy = FakeProxy(settings, tmp_path)
    provider = open_provider(settings, tmp_path)
    try:
        # Ours, marked retiring and disabled: a scale-down stopped before its destroy.
        created = await provider.create("web-half")
        inventory = tmp_path / "inventory.toml"
        half = InventoryEntry(
            id=int(created.id),
            name="web-half",
            server_host="127.0.1.9:1",
            state="disabled",
            retiring=True,
            provider="digitalocean",
            tags=("doproxy", owner_tag(inventory)),
        )
        # The README's hand-written entry: no droplet 1 exists, and it is not ours.
        hand = InventoryEntry(id=1, name="by-hand", server_host="127.0.0.1:9")
        update_inventory(inventory, lambda es: [hand, half])
        scaler = Autoscaler(proxy, provider)
        await scaler.reconcile()
        await wait_for(lambda: not scaler.retiring and int(created.id) not in fake.droplets, 10)
        await scaler.reconcile()
        assert [e.name for e in load_inventory(inventory)] == ["by-hand"]
        assert caplog.text.count("did not create it") == 1  # reported once
        reports = scaler.journal.of_kind("reconcile")
        assert any("by-hand" in r["report"] for r in reports)
    finally:
        await provider.close()


async def test_a_create_refused_by_a_bad_token_leaves_no_intent(
    tmp_path: Path, fake: FakeDigitalOcean
) -> None:
    cfg = config(tmp_path, fake)
    cfg.write_text(cfg.read_text().replace(f'token = "{TOKEN}"', 'token = "dop_v1_wrong"'))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "doproxy",
        "--config",
        str(cfg),
        "create",
        "web-denied",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    assert proc.returncode == 1 and "401" in err.decode()
    assert load_inventory(tmp_path / "inventory.toml") == []


# --- 5. the task never dies -------------------------------------------------------------------


class Broken:
    """A provider whose API answers garbage (as an api-url serving HTML would) for a while."""

    kind = "digitalocean"

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def list(self) -> list[Machine]:
        self.calls += 1
        if self.calls <= self.failures:
            raise ValueError("Expecting value: line 1 column 1 (char 0)")
        return []

    async def get(self, machine_id: str) -> Machine:
        raise MachineNotFound(machine_id)

    async def create(self, name: str, spec: Spec | None = None) -> Machine:
        raise ValueError("html")

    async def destroy(self, machine_id: str) -> None:
        return None

    async def reboot(self, machine_id: str) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_the_scaler_task_survives_unexpected_errors_and_backs_off(
    tmp_path: Path, fake: FakeDigitalOcean, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="doproxy.autoscaler")
    settings = load_settings(config(tmp_path, fake, **{"dry-run": "true"}))
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        await asyncio.sleep(0)

    provider = Broken(failures=10**9)
    p: Provider = provider
    scaler = Autoscaler(FakeProxy(settings, tmp_path), p, sleep=sleep)
    scaler.start()
    try:
        await wait_for(lambda: provider.calls >= 6, timeout=5)
        assert "ValueError" in (scaler.last_error or "")
        provider.failures = 0  # the API answers again
        await wait_for(lambda: scaler.last_error is None, timeout=5)
        assert scaler._task is not None and not scaler._task.done()
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "Expecting value" in errors[0].getMessage()  # once
        assert pauses[:5] == [0.25, 0.5, 1.0, 2.0, 4.0]  # interval 250ms, doubling
    finally:
        await scaler.stop()


# --- 6. create backoff --------------------------------------------------------------------------


async def test_refused_creates_back_off_exponentially(
    tmp_path: Path, fake: FakeDigitalOcean
) -> None:
    settings = load_settings(config(tmp_path, fake, interval='"5s"'))
    fake.fail_next("POST", "/v2/droplets", 422, times=10_000)
    now = [1000.0]
    provider = open_provider(settings, tmp_path)
    scaler = Autoscaler(FakeProxy(settings, tmp_path), provider, clock=lambda: now[0])
    try:
        await scaler.reconcile()
        for _ in range(720):  # one simulated hour at interval 5s, below min-backends all along
            await scaler.tick()
            if scaler.creating:
                await asyncio.gather(*scaler.creating, return_exceptions=True)
            now[0] += 5.0
        # 5, 10, 20, ... 320 s, then every 600 s: 7 + 5 tries, not 720.
        assert 8 <= posts(fake) <= 14, posts(fake)
        assert scaler.create_failures == posts(fake)
        assert load_inventory(tmp_path / "inventory.toml") == []  # every intent dropped
        assert backoff(5.0, 20) == 600.0
    finally:
        await provider.close()


# --- 11. manual actions count as present ---------------------------------------------------------


async def test_a_backend_rebooted_by_hand_counts_as_present(
    tmp_path: Path, fake: FakeDigitalOcean
) -> None:
    settings = load_settings(config(tmp_path, fake, **{"dry-run": "true"}))
    proxy = FakeProxy(settings, tmp_path)
    rebooting = InventoryEntry(
        id=42, name="web-r", server_host="127.0.0.1:9", state="disabled", provider="digitalocean"
    )
    proxy.backends = [Backend(rebooting)]
    scaler = Autoscaler(proxy, open_provider(settings, tmp_path), clock=lambda: 1000.0)
    try:
        decision = await scaler.tick()
        assert decision.action == "none", decision.reason  # no create while it reboots
    finally:
        await scaler.provider.close()


# --- the journal ----------------------------------------------------------------------------------


async def test_the_journal_keeps_decisions_and_state_across_a_restart(
    tmp_path: Path, fake: FakeDigitalOcean
) -> None:
    settings = load_settings(config(tmp_path, fake, **{"dry-run": "true"}))
    proxy = FakeProxy(settings, tmp_path)
    provider = open_provider(settings, tmp_path)
    try:
        first = Autoscaler(proxy, provider, wall=lambda: dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
        await first.tick()
        first._note_state()
        assert [r.action for r in first.history] == ["up"]
        again = Autoscaler(proxy, provider)
        assert [(r.action, r.reason) for r in again.history] == [
            (r.action, r.reason) for r in first.history
        ]
        states = again.journal.of_kind("state")
        assert states and states[-1]["desired"] == 1 and states[-1]["mode"] == "threshold"
        # Bounded: never more than twice the limit of lines in the file.
        for _ in range(3 * again.journal.limit):
            again.journal.add({"at": "x", "kind": "state"})
        lines = (tmp_path / "inventory.toml.journal").read_text().splitlines()
        assert len(lines) < 2 * again.journal.limit
    finally:
        await provider.close()
