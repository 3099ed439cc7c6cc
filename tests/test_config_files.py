"""The 2015 doproxy's own files load unchanged; `doproxy check` reports every problem.

These tests only parse and validate: nothing is ever started on the 2015 files, whose
addresses look real (test traffic may only go to 127.0.0.0/8).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from doproxy.config import load_settings
from doproxy.health import health_target
from doproxy.inventory import load_inventory
from doproxy.proxy.backend import Backend
from tests.conftest import StartProxy, port_of
from tests.support import get, request

GO = Path(__file__).parent / "data" / "go-2015"


def test_the_2015_config_and_inventory_load_unchanged() -> None:
    s = load_settings(GO / "doproxy.toml")
    assert s.bind == ":8000" and s.inventory_file == "inventory.toml"
    assert s.backend.dial_timeout == 2.0 and s.backend.health_check_timeout == 0.25
    assert s.provisioning.upscale_every == 900.0 and s.provisioning.max_health_failures == 180
    assert s.do_provisioner.size == "1gb" and s.do_provisioner.ssh_key_ids == [163420]
    entries = load_inventory(GO / "inventory.toml")
    assert [e.id for e in entries] == [1, 2, 7973923, 7993556]
    # The health-url without a scheme (as written by the 2015 version) is understood.
    target = health_target(Backend(entries[2]), s)
    assert target is not None and (target.host, target.port, target.path) == (
        "10.132.221.249",
        8080,
        "/",
    )


def run_check(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "doproxy", "check", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
    )


def test_check_passes_on_the_2015_files_and_hides_the_token(tmp_path: Path) -> None:
    shutil.copytree(GO, tmp_path, dirs_exist_ok=True)
    r = run_check(cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "4 backend(s)" in r.stdout
    assert "0000000000" not in r.stdout + r.stderr


def test_check_lists_every_problem_of_both_files(tmp_path: Path) -> None:
    shutil.copytree(GO, tmp_path, dirs_exist_ok=True)
    cfg = tmp_path / "doproxy.toml"
    cfg.write_text(
        cfg.read_text()
        .replace('dial-timeout = "2s"', 'dial-timeout = "soon"')
        .replace("max-backends = 2", "max-backends = 0")
        .replace('token =  "00000000000000000000000000"', "token = 12")
    )
    inv = tmp_path / "inventory.toml"
    inv.write_text(inv.read_text().replace("id=2\n", "id=1\n"))
    r = run_check(cwd=tmp_path)
    assert r.returncode == 1
    err = r.stderr
    assert "doproxy.toml:17: backend.dial-timeout" in err
    assert "provisioning.min-backends (1) must not exceed provisioning.max-backends (0)" in err
    assert "do-provisioner.token" in err
    assert "duplicate id 1" in err  # the inventory was checked too
    assert "4 problem(s)" in err


def test_check_reports_a_missing_error_page(tmp_path: Path) -> None:
    (tmp_path / "doproxy.toml").write_text('[error-pages]\n503 = "errors/503.html"\n')
    r = run_check(cwd=tmp_path)
    assert r.returncode == 1
    assert "error-pages.503: cannot read" in r.stderr


async def test_error_pages_are_served(start_proxy: StartProxy, tmp_path: Path) -> None:
    from doproxy.runtime import load_error_pages

    (tmp_path / "503.html").write_text("<h1>We are busy</h1>")
    proxy = await start_proxy([], {"error-pages": {"503": str(tmp_path / "503.html")}})
    proxy.error_pages = load_error_pages(proxy.settings, tmp_path)
    r = await request(port_of(proxy), get())
    assert r.status == 503
    assert r.body == b"<h1>We are busy</h1>"
    assert r.header("content-type") == b"text/html; charset=utf-8"


def test_the_annotated_example_is_valid() -> None:
    example = Path(__file__).parent.parent / "docs" / "doproxy.example.toml"
    s = load_settings(example)
    assert s.retries.attempts == 2 and s.health.fall == 5 and s.limits.max_idle_per_backend == 1024
