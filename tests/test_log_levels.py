"""Log levels: scaling is routine (INFO); WARNING and ERROR are for what needs a human."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest

from doproxy.config import load_settings
from doproxy.machines import open_provider
from doproxy.runtime import Runtime
from tests.conftest import wait_for
from tests.test_autoscaler_e2e import local_config, serving

pytestmark = pytest.mark.timeout(60)


async def test_a_scale_up_and_its_machine_coming_up_log_at_info(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="doproxy")
    cfg = local_config(tmp_path, f"doproxy-test-{uuid.uuid4().hex[:8]}")
    settings = load_settings(cfg)
    rt = Runtime(settings, [], cfg)
    await rt.start()
    try:
        scaler = rt.autoscaler
        assert scaler is not None
        await wait_for(lambda: serving(rt) == 1, timeout=20)  # min-backends, created at start
        await wait_for(lambda: "is up at" in caplog.text, timeout=10)
    finally:
        await rt.stop()
        provider = open_provider(settings, tmp_path)
        for m in await provider.list():
            await provider.destroy(m.id)
        await provider.close()
    up = [r for r in caplog.records if "scale up" in r.getMessage()]
    came_up = [r for r in caplog.records if "is up at" in r.getMessage()]
    assert up and came_up
    assert {r.levelno for r in up + came_up} == {logging.INFO}
    loud = [
        r.getMessage()
        for r in caplog.records
        if r.name == "doproxy.autoscaler" and r.levelno >= logging.WARNING
    ]
    assert loud == []
