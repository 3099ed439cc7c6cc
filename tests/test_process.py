"""doproxy as a user runs it: the CLI, a 2015-style config, signals and graceful shutdown."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from doproxy import __version__
from tests.procs import start_proxy_process, write_config
from tests.support import Client, RequestReader, get, request, respond


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "doproxy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def test_version_and_help() -> None:
    r = run_cli("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"doproxy {__version__}"
    r = run_cli("--help")
    assert r.returncode == 0
    assert "--config" in r.stdout
    assert "demo" in r.stdout


GO_CONFIG = """\
bind = ":8000"                      # Address to bind the incoming port to
https = false                       # Use TLS
tls-cert-file = "cert.file"         # Certificate file for TLS
tls-key-file = "key.file"           # Key file for TLS
add-x-forwarded-for = true
watch-config = true
inventory-file = "inventory.toml"

[loadbalancing]
type = "roundrobin"

[backend]
latency-average-seconds = 30
dial-timeout = "2s"
health-check-timeout = "250ms"
new-host-port = 8080
new-host-health-path = "/"

[do-provisioner]
enable = false
token =  "{{env "DO_TOKEN"}}"
ssh-key-ids = [163420]
hostname-prefix = "auto-nginx-"
region = "nyc3"
size = "1gb"
image = "ubuntu-14-04-x64"
user-data = "sample-userdata.sh"
backups = false

[provisioning]
enable = true
min-backends = 1
max-backends = 2
downscale-latency = "150ms"
downscale-time = "15m"
downscale-every = "1h"
upscale-latency = "500ms"
upscale-time = "3m"
upscale-every = "15m"
max-health-failures = 180
"""

GO_INVENTORY = """\
[[droplet]]
id=1
name="auto-nginx 1"
public-ip=""
private-ip="192.168.0.1"
server-host="192.168.0.1:8080"
health-url="http://192.168.0.1:8080/index.html"
started-time=0001-01-01T00:00:00Z
[[droplet]]
id=7993556
name="auto-nginxA3GWw3uZv6"
public-ip="45.55.229.160"
private-ip="10.132.169.170"
server-host="10.132.169.170:8080"
health-url="http://10.132.169.170:8080/"
started-time=2015-10-02T12:08:29Z
"""


def test_check_accepts_the_2015_files(tmp_path: Path) -> None:
    (tmp_path / "doproxy.toml").write_text(GO_CONFIG)
    (tmp_path / "inventory.toml").write_text(GO_INVENTORY)
    r = run_cli("check", cwd=tmp_path, env={"DO_TOKEN": "secret-token-value"})
    assert r.returncode == 0, r.stderr
    assert "2 backend(s)" in r.stdout
    assert "secret-token-value" not in r.stdout + r.stderr


def test_check_names_key_and_line(tmp_path: Path) -> None:
    bad = GO_CONFIG.replace('dial-timeout = "2s"', 'dial-timeout = "2 parsecs"').replace(
        "max-backends = 2", "max-backends = 0"
    )
    (tmp_path / "doproxy.toml").write_text(bad)
    r = run_cli("check", cwd=tmp_path, env={"DO_TOKEN": "x"})
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    dial = [ln for ln in lines if "backend.dial-timeout" in ln]
    assert dial and "doproxy.toml:14" in dial[0], r.stderr
    assert any(
        "min-backends (1) must not exceed provisioning.max-backends (0)" in ln for ln in lines
    ), r.stderr


def test_unset_env_variable_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "doproxy.toml").write_text(GO_CONFIG)
    env = {k: v for k, v in os.environ.items() if k != "DO_TOKEN"}
    r = subprocess.run(
        [sys.executable, "-m", "doproxy", "check"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 1
    assert "DO_TOKEN" in r.stderr
    assert "doproxy.toml:21:" in r.stderr  # the line of the template


async def test_serves_and_shuts_down_gracefully(tmp_path: Path) -> None:
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rr = RequestReader(reader)
        while (req := await rr.next()) is not None:
            if req.url == b"/slow":
                arrived.set()
                await release.wait()
            writer.write(respond(200, b"done " + req.url))
            await writer.drain()

    server = await asyncio.start_server(slow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = await start_proxy_process(write_config(tmp_path, [port]))
    try:
        idle = await Client.connect(proxy.port)
        await idle.send(get("/fast"))
        assert (await idle.response()).body == b"done /fast"
        busy = await Client.connect(proxy.port)
        await busy.send(get("/slow"))
        async with asyncio.timeout(5):
            await arrived.wait()
        proxy.proc.terminate()  # SIGTERM while a request is in flight
        # The idle keep-alive connection is closed at once; new connections are refused.
        assert await idle.closed(timeout=5)
        with pytest.raises(OSError):
            async with asyncio.timeout(5):
                while True:
                    c = await Client.connect(proxy.port)  # may race the close: retry
                    await c.close()
        # The in-flight request still completes, told the connection closes.
        release.set()
        r = await busy.response()
        assert (r.status, r.body) == (200, b"done /slow")
        assert r.header("connection") == b"close"
        assert await busy.closed()
        async with asyncio.timeout(10):
            assert await proxy.proc.wait() == 0
    finally:
        await proxy.stop()
        server.close()


def test_bad_config_fails_to_start_with_clear_error(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, [], extra='[loadbalancing]\ntype = "fastest"\n')
    r = run_cli("--config", str(cfg))
    assert r.returncode == 1
    assert "loadbalancing.type" in r.stderr
    assert "doproxy.toml:5" in r.stderr


@pytest.mark.timeout(60)
async def test_demo_autoscales_local_backends_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make run` runs `doproxy demo`: the proxy with autoscaling local demo backends (min 1)."""
    import random

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the demo makes its folder

    base = random.randrange(20000, 32700)  # below the ephemeral ports, see test_autoscaler_e2e
    ports = f"{base}-{base + 20}"
    proxy = await start_proxy_process(
        None, args=("demo", "--bind", "127.0.0.1:0", "--ports", ports)
    )
    try:
        # min-backends = 1: the autoscaler starts one backend process at once.
        async with asyncio.timeout(20):
            while True:
                r = await request(proxy.port, get("/hello"))
                if r.status == 200:
                    break
                assert r.status == 503  # until the first backend passes its health check
                await asyncio.sleep(0.1)
        name = r.body.split(b":")[0]
        assert name.startswith(b"local-")
        log = proxy.log.decode()
        assert "autoscaler on (local, 1-4 backends" in log
        # Its status page: on loopback, on a port of its own choosing when the proxy's is 0
        # (8001 would collide with another demo or a server).
        found = re.search(r"admin listener on (http://127\.0\.0\.1:(\d+)/)", log)
        assert found is not None and found.group(2) != "8001"
        async with aiohttp.ClientSession() as s, s.get(found.group(1)) as page:
            assert page.status == 200
            assert "<title>doproxy status</title>" in await page.text()
        (folder,) = tmp_path.glob("doproxy-demo-*")  # noqa: ASYNC240 - a local folder
        assert (folder / "inventory.toml").exists()
        assert await proxy.stop() == 0
        # Its folder (config, inventory, journal, admin token) goes with it.
        assert not folder.exists()
        # The demo destroys its backends when it stops: nothing answers on their ports.
        for port in range(base, base + 21):
            with pytest.raises(OSError):
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
    finally:
        await proxy.stop()


@pytest.mark.timeout(120)
async def test_demo_rollouts_rolls_a_slower_release_back_and_completes_a_good_one() -> None:
    """`doproxy demo --rollouts`: under steady load, a slower release is rolled back by itself,
    then a good one replaces both machines (what it logs; tests/test_rollouts.py counts the
    failed requests of such rollouts)."""
    import random

    base = random.randrange(20000, 32700)
    ports = f"{base}-{base + 20}"
    proxy = await start_proxy_process(
        None, args=("demo", "--rollouts", "--bind", "127.0.0.1:0", "--ports", ports)
    )
    try:
        async with asyncio.timeout(100):
            while "done: every machine runs the new spec" not in proxy.log.decode():
                assert proxy.proc.returncode is None, proxy.log.decode()
                await asyncio.sleep(0.2)
        log = proxy.log.decode()
        slower = log.index("rolled-back: canary failed")
        assert "max-latency-ratio" in log[slower : slower + 300]
        assert log.index("done: every machine runs the new spec (2)") > slower
        assert await proxy.stop() == 0
    finally:
        await proxy.stop()


async def test_sighup_reloads_the_inventory(tmp_path: Path) -> None:
    async def named(name: bytes) -> tuple[asyncio.Server, int]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            rr = RequestReader(reader)
            while await rr.next() is not None:
                writer.write(respond(200, name))
                await writer.drain()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        return srv, srv.sockets[0].getsockname()[1]

    s1, p1 = await named(b"one")
    s2, p2 = await named(b"two")
    proxy = await start_proxy_process(write_config(tmp_path, [p1]))  # watch-config = false
    try:
        c = await Client.connect(proxy.port)
        await c.send(get())
        assert (await c.response()).body == b"one"
        write_config(tmp_path, [p2])  # the inventory now lists only the second backend
        proxy.proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(10):
            while b"reloaded" not in proxy.log:
                await asyncio.sleep(0.05)
        # The open keep-alive connection's next request goes to the new pool.
        await c.send(get())
        assert (await c.response()).body == b"two"
        await c.close()
    finally:
        await proxy.stop()
        s1.close()
        s2.close()
