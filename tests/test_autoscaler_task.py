"""The autoscaler task's own duties, on real local processes: dry-run, replacement of a dead
backend, and reconciling at start (orphans and entries whose machine is gone)."""

from __future__ import annotations

import logging
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from doproxy.config import load_settings
from doproxy.core.settings import Settings
from doproxy.errors import DoproxyError
from doproxy.inventory import load_inventory
from doproxy.machines import open_provider
from doproxy.provisioning import wait_active
from doproxy.runtime import Runtime
from tests.conftest import wait_for
from tests.test_autoscaler_e2e import local_config, serving

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def tag() -> str:
    return f"doproxy-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def cleanup(tmp_path: Path) -> AsyncIterator[list[Settings]]:
    """Destroy every machine carrying the test's tags when the test ends, whatever happened."""
    used: list[Settings] = []
    yield used
    for settings in used:
        provider = open_provider(settings, tmp_path)
        for m in await provider.list():
            await provider.destroy(m.id)
        await provider.close()


def configure(tmp_path: Path, tag: str, cleanup: list[Settings], **changes: str) -> Path:
    cfg = local_config(tmp_path, tag)
    text = cfg.read_text()
    for key, value in changes.items():
        line = next((ln for ln in text.splitlines() if ln.startswith(f"{key} =")), None)
        if line is None:
            text = text.replace("[provisioning]\n", f"[provisioning]\n{key} = {value}\n")
        else:
            text = text.replace(line, f"{key} = {value}")
    cfg.write_text(text)
    cleanup.append(load_settings(cfg))
    return cfg


async def test_dry_run_decides_and_logs_but_never_acts(
    tmp_path: Path, tag: str, cleanup: list[Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="doproxy.autoscaler")
    cfg = configure(tmp_path, tag, cleanup, **{"min-backends": "2"})
    cfg.write_text(
        cfg.read_text().replace("enable = true\nmin", "enable = true\ndry-run = true\nmin")
    )
    rt = Runtime(load_settings(cfg), [], cfg)
    await rt.start()
    try:
        scaler = rt.autoscaler
        assert scaler is not None
        await wait_for(lambda: any(r.action == "up" for r in scaler.history), timeout=10)
        record = next(r for r in scaler.history if r.action == "up")
        assert not record.acted
        assert "min-backends" in record.reason and "0→2" in record.reason
        assert "(dry-run: not acted on)" in caplog.text
        provider = open_provider(rt.settings, tmp_path)
        assert await provider.list() == []
        await provider.close()
        assert load_inventory(tmp_path / "inventory.toml") == []
    finally:
        await rt.stop()


async def test_local_backends_cost_the_configs_cost_per_hour(
    tmp_path: Path, tag: str, cleanup: list[Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """Dry-run, so nothing starts: the repair to min-backends 2 says what it would cost, and
    the journal keeps it."""
    caplog.set_level(logging.INFO, logger="doproxy.autoscaler")
    cfg = configure(tmp_path, tag, cleanup, **{"min-backends": "2", "dry-run": "true"})
    cfg.write_text(cfg.read_text() + "cost-per-hour = 0.05\n")  # [local-provisioner] is last
    rt = Runtime(load_settings(cfg), [], cfg)
    await rt.start()
    try:
        scaler = rt.autoscaler
        assert scaler is not None
        await wait_for(lambda: any(r.action == "up" for r in scaler.history), timeout=10)
        record = next(r for r in scaler.history if r.action == "up")
        assert (record.cost_before, record.cost_after) == (0.0, 0.1)
        assert "scale up 0→2: below min-backends 2; +$0.10/h ($0.00/h → $0.10/h)" in caplog.text
        assert scaler.cost().new_machine == 0.05
        journal = (tmp_path / "inventory.toml.journal").read_text()
        assert '"cost_after":0.1' in journal
    finally:
        await rt.stop()


async def test_a_backend_that_keeps_failing_is_replaced_new_one_first(
    tmp_path: Path, tag: str, cleanup: list[Settings]
) -> None:
    cfg = configure(tmp_path, tag, cleanup, **{"min-backends": "2", "max-health-failures": "3"})
    rt = Runtime(load_settings(cfg), [], cfg)
    await rt.start()
    try:
        await wait_for(lambda: serving(rt) == 2, timeout=20)
        entries = load_inventory(tmp_path / "inventory.toml")
        victim = entries[0]
        os.kill(victim.pid, signal.SIGKILL)  # the backend dies; its health checks fail
        scaler = rt.autoscaler
        assert scaler is not None

        def replaced() -> bool:
            now = load_inventory(tmp_path / "inventory.toml")
            ids = {str(e.id) for e in now}
            return str(victim.id) not in ids and len(now) == 2 and serving(rt) == 2

        await wait_for(replaced, timeout=25)
        assert any(r.action == "replace" and str(victim.id) in r.reason for r in scaler.history)
        provider = open_provider(rt.settings, tmp_path)
        live = {m.id for m in await provider.list()}
        await provider.close()
        assert live == {str(e.id) for e in load_inventory(tmp_path / "inventory.toml")}
    finally:
        await rt.stop()


async def test_start_reconciles_orphans_and_forgets_dead_machines(
    tmp_path: Path, tag: str, cleanup: list[Settings]
) -> None:
    cfg = configure(tmp_path, tag, cleanup, orphans='"destroy"')
    settings = load_settings(cfg)
    provider = open_provider(settings, tmp_path)
    # An orphan: carries our tags, the inventory does not know it.
    orphan = await provider.create("local-orphan")
    await wait_active(provider, orphan.id, 10, 0.05)
    # A dead machine the inventory still lists.
    dead = await provider.create("local-dead")
    dead = await wait_active(provider, dead.id, 10, 0.05)
    from doproxy.provisioning import entry_for

    (tmp_path / "inventory.toml").write_text("")
    from doproxy.inventory import update_inventory

    update_inventory(
        tmp_path / "inventory.toml", lambda es: [*es, entry_for(dead, settings, "local")]
    )
    await provider.destroy(dead.id)
    rt = Runtime(settings, load_inventory(tmp_path / "inventory.toml"), cfg)
    await rt.start()
    try:
        scaler = rt.autoscaler
        assert scaler is not None
        await wait_for(scaler.reconciled.is_set, timeout=10)
        # The orphan was destroyed (orphans = "destroy"), the dead entry dropped, and
        # min-backends brings one fresh backend.
        await wait_for(lambda: serving(rt) == 1, timeout=20)
        names = {m.name for m in await provider.list()}
        assert "local-orphan" not in names and "local-dead" not in names
        entries = load_inventory(tmp_path / "inventory.toml")
        assert [e.name for e in entries if e.name in ("local-dead", "local-orphan")] == []
        assert len(entries) == 1
    finally:
        await rt.stop()
        await provider.close()


async def test_a_reload_that_turns_scaling_on_without_a_token_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tmp_path / "doproxy.toml"
    base = (
        'bind = "127.0.0.1:0"\nwatch-config = false\ninventory-file = "inventory.toml"\n'
        '[admin]\nbind = "127.0.0.1:0"\n[do-provisioner]\ntoken-file = "no-such-token-file"\n'
    )
    cfg.write_text(base)
    rt = Runtime(load_settings(cfg), [], cfg)
    await rt.start()
    try:
        cfg.write_text(
            base + '[provisioning]\nenable = true\n[loadbalancing]\ntype = "leastconn"\n'
        )
        assert await rt.reload() is False
        assert rt.autoscaler is None
        assert rt.settings.provisioning.enable is False
        assert rt.settings.loadbalancing.type == "roundrobin"  # all or nothing
        assert "no-such-token-file" in caplog.text
    finally:
        await rt.stop()


async def test_a_machine_that_does_not_boot_in_time_is_destroyed_not_leaked(
    tmp_path: Path,
    tag: str,
    cleanup: list[Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="doproxy.autoscaler")
    cfg = configure(tmp_path, tag, cleanup, **{"boot-timeout": '"500ms"'})
    cfg.write_text(
        cfg.read_text().replace(
            'command = "python -m doproxy.demo_backend',
            'command = "python -m doproxy.demo_backend --boot-delay 30',
        )
    )
    rt = Runtime(load_settings(cfg), [], cfg)
    await rt.start()
    try:
        await wait_for(lambda: "did not come up in time" in caplog.text, timeout=15)
        record = next(r for r in caplog.records if "did not come up in time" in r.getMessage())
        name = record.getMessage().split("autoscaler: ")[1].split()[0]
        provider = open_provider(rt.settings, tmp_path)
        assert name not in {m.name for m in await provider.list()}
        await provider.close()
        assert name not in {e.name for e in load_inventory(tmp_path / "inventory.toml")}
    finally:
        await rt.stop()


async def test_scale_down_with_an_invalid_config_never_destroys_a_machine_in_rotation(
    tmp_path: Path, tag: str, cleanup: list[Settings]
) -> None:
    """Issue 10, item 2: the drain of a victim applies to the running pool directly (the
    inventory, never a config reload), so an invalid doproxy.toml at that moment cannot leave
    the victim in rotation; and a machine is destroyed only once it takes no traffic."""
    cfg = configure(tmp_path, tag, cleanup, **{"min-backends": "2", "drain-timeout": '"1s"'})
    rt = Runtime(load_settings(cfg), [], cfg)
    await rt.start()
    try:
        await wait_for(lambda: serving(rt) == 2, timeout=20)
        scaler = rt.autoscaler
        assert scaler is not None
        cfg.write_text(cfg.read_text() + "\nthis is = not [valid toml\n")  # an edit in progress
        victim = str(load_inventory(tmp_path / "inventory.toml")[0].id)
        in_rotation_at_destroy: list[bool] = []
        destroy = scaler.provider.destroy

        async def recording_destroy(machine_id: str) -> None:
            in_rotation_at_destroy.append(rt.takes_traffic(machine_id))
            await destroy(machine_id)

        scaler.provider.destroy = recording_destroy  # type: ignore[method-assign]
        await scaler._retire(victim)
        assert in_rotation_at_destroy == [False]
        assert victim not in {str(e.id) for e in load_inventory(tmp_path / "inventory.toml")}
    finally:
        await rt.stop()


async def test_a_machine_that_still_takes_traffic_is_not_destroyed(
    tmp_path: Path, tag: str, cleanup: list[Settings]
) -> None:
    cfg = configure(tmp_path, tag, cleanup, **{"min-backends": "1", "drain-timeout": '"0s"'})
    rt = Runtime(load_settings(cfg), [], cfg)
    await rt.start()
    try:
        await wait_for(lambda: serving(rt) == 1, timeout=20)
        scaler = rt.autoscaler
        assert scaler is not None
        victim = str(load_inventory(tmp_path / "inventory.toml")[0].id)
        destroyed: list[str] = []
        destroy = scaler.provider.destroy

        async def recording_destroy(machine_id: str) -> None:
            destroyed.append(machine_id)
            await destroy(machine_id)

        async def not_applied() -> bool:
            return False  # the drain never reaches the pool

        scaler.provider.destroy = recording_destroy  # type: ignore[method-assign]
        rt.apply_inventory = not_applied  # type: ignore[method-assign]
        with pytest.raises(DoproxyError, match="still takes traffic"):
            await scaler._retire(victim)
        assert destroyed == []
        assert rt.takes_traffic(victim)
    finally:
        await rt.stop()
