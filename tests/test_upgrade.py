"""Zero-downtime upgrade (docs/deploy.md): `doproxy upgrade` takes the listening sockets and the
control plane over from the running doproxy, which drains and exits.

Under a bounded load of keep-alive and new connections, doproxy is upgraded three times (with
workers = 1 and with workers = 2, and from one to the other): no request fails and no
connection is reset, and the inventory lock and the autoscaler are never held by two
processes at once (each process appends to a trace file when it takes or releases them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.procs import ProxyProcess, start_proxy_process, write_config
from tests.support import Client, RawBackend, answering, get, request
from tests.test_workers import status

pytestmark = pytest.mark.timeout(120)

SCALER = """
[provisioning]
enable = true
dry-run = true
min-backends = 1
max-backends = 2
interval = "200ms"

[local-provisioner]
enable = true
command = "python -m http.server {port} --bind {host}"
"""


class Load:
    """Clients that keep sending until stopped: some on keep-alive connections (reconnecting
    when a response says Connection: close, as HTTP clients do), some on a new connection per
    request. Every failure and every reset is counted."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failed: list[str] = []
        self.running = True
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, keep_alive: int = 4, fresh: int = 2) -> None:
        loop = asyncio.get_running_loop()
        self.tasks += [loop.create_task(self._keep_alive()) for _ in range(keep_alive)]
        self.tasks += [loop.create_task(self._fresh()) for _ in range(fresh)]

    async def stop(self) -> None:
        self.running = False
        await asyncio.gather(*self.tasks)

    async def _keep_alive(self) -> None:
        client: Client | None = None
        while self.running:
            try:
                if client is None:
                    client = await Client.connect(self.port)
                await client.send(get())
                r = await client.response()
            except (OSError, EOFError, ValueError) as e:
                self.failed.append(f"keep-alive: {e!r}")
                if client is not None:
                    await client.close()
                client = None
                continue
            if r.status != 200:
                self.failed.append(f"keep-alive: status {r.status}")
            else:
                self.ok += 1
            if (r.header("connection") or b"").lower() == b"close":
                await client.close()
                client = None
        if client is not None:
            await client.close()

    async def _fresh(self) -> None:
        while self.running:
            try:
                r = await request(self.port, get())
            except (OSError, EOFError, ValueError) as e:
                self.failed.append(f"new connection: {e!r}")
                continue
            if r.status != 200:
                self.failed.append(f"new connection: status {r.status}")
            else:
                self.ok += 1


def check_trace(path: Path) -> list[str]:
    """The trace's lines, after checking that the lock and the scaler were never held by two
    processes at once, and the scaler only by the lock's holder."""
    holder: str | None = None
    scaler: str | None = None
    lines = path.read_text().splitlines()
    for line in lines:
        event, pid = line.split()
        if event == "lock":
            assert holder is None, lines
            holder = pid
        elif event == "unlock":
            assert holder == pid and scaler != pid, lines
            holder = None
        elif event == "scaler-on":
            assert holder == pid and scaler is None, lines
            scaler = pid
        elif event == "scaler-off":
            assert scaler == pid, lines
            scaler = None
    return lines


async def upgrade_three_times(
    tmp: Path, monkeypatch: pytest.MonkeyPatch, workers: list[int]
) -> None:
    trace = tmp / "control.trace"
    monkeypatch.setenv("DOPROXY_TEST_CONTROL_TRACE", str(trace))
    a = await RawBackend(answering(200, b"ok")).start()
    b = await RawBackend(answering(200, b"ok")).start()
    cfg = write_config(tmp, [a.port, b.port], f"workers = {workers[0]}\n{SCALER}")
    procs: list[ProxyProcess] = []
    load: Load | None = None
    try:
        async with asyncio.timeout(100):
            proxy = await start_proxy_process(cfg)
            procs.append(proxy)
            port = proxy.port
            load = Load(port)
            load.start()
            for n in workers[1:]:
                before = load.ok
                while load.ok < before + 50:
                    await asyncio.sleep(0.01)
                text = cfg.read_text()
                cfg.write_text(text.replace(f"workers = {workers[0]}", f"workers = {n}"))
                new = await start_proxy_process(cfg, args=("upgrade",))
                procs.append(new)
                assert new.port == port
                # The old one drains and exits by itself.
                assert await proxy.proc.wait() == 0, proxy.log.decode()
                assert b"handed over, draining" in proxy.log
                st = await status(tmp)
                assert st["pid"] == new.pid
                assert len(st["workers"]) == (n if n > 1 else 0)
                proxy = new
                workers[0] = n
            before = load.ok
            while load.ok < before + 50:
                await asyncio.sleep(0.01)
            await load.stop()
            assert load.failed == [], load.failed[:5]
            assert load.ok > 200
            lines = check_trace(trace)
            pids = [p.pid for p in procs]
            # Each process took the lock and started its scaler once, in order.
            assert [line for line in lines if line.startswith("lock")] == [
                f"lock {pid}" for pid in pids
            ]
            assert [line for line in lines if line.startswith("scaler-on")] == [
                f"scaler-on {pid}" for pid in pids
            ]
    finally:
        if load is not None and load.running:
            await load.stop()
        for p in procs:
            if p.proc.returncode is None:
                await p.stop()
        await a.close()
        await b.close()


async def test_three_upgrades_with_one_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await upgrade_three_times(tmp_path, monkeypatch, [1, 1, 1, 1])


async def test_three_upgrades_with_workers_and_a_changed_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await upgrade_three_times(tmp_path, monkeypatch, [2, 2, 1, 2])


async def successor(tmp: Path, old: int) -> dict[str, Any]:
    """The status of the process that took over from `old`, once its admin listener answers
    (the callers' timeouts bound the wait)."""
    while True:
        with contextlib.suppress(FileNotFoundError, aiohttp.ClientConnectionError):
            st = await status(tmp)
            if st["pid"] != old:
                return st
        await asyncio.sleep(0.05)


async def test_sigusr2_starts_the_successor(tmp_path: Path) -> None:
    a = await RawBackend(answering(200, b"ok")).start()
    proxy = await start_proxy_process(write_config(tmp_path, [a.port]))
    try:
        async with asyncio.timeout(60):
            old = (await status(tmp_path))["pid"]
            assert old == proxy.pid
            proxy.proc.send_signal(signal.SIGUSR2)
            assert await proxy.proc.wait() == 0
            # The old one may exit (nothing to drain) before its successor has taken the
            # lock and opened the admin listener, which is the successor's last step.
            new = (await successor(tmp_path, old))["pid"]
            assert (await request(proxy.port, get())).status == 200
            os.kill(new, signal.SIGTERM)
            while (tmp_path / "inventory.toml.upgrade.sock").exists():
                await asyncio.sleep(0.05)
    finally:
        if proxy.proc.returncode is None:
            await proxy.stop()
        await a.close()


async def test_upgrade_without_a_running_server_says_so(tmp_path: Path) -> None:
    a = await RawBackend(answering(200, b"ok")).start()
    cfg = write_config(tmp_path, [a.port])
    try:
        with pytest.raises(RuntimeError, match="no running doproxy answers"):
            await start_proxy_process(cfg, args=("upgrade",))
    finally:
        await a.close()


async def test_systemd_hears_the_new_main_pid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Type=notify, NotifyAccess=all: each doproxy says READY=1 and MAINPID=itself."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    a = await RawBackend(answering(200, b"ok")).start()
    cfg = write_config(tmp_path, [a.port])
    procs = []
    try:
        async with asyncio.timeout(60):
            loop = asyncio.get_running_loop()

            async def said() -> dict[str, str]:
                text = (await loop.sock_recv(notify, 1024)).decode()
                return dict(line.split("=", 1) for line in text.splitlines())

            procs.append(await start_proxy_process(cfg))
            first = await said()
            assert (first["READY"], first["MAINPID"]) == ("1", str(procs[0].pid))
            procs.append(await start_proxy_process(cfg, args=("upgrade",)))
            second = await said()
            assert (second["READY"], second["MAINPID"]) == ("1", str(procs[1].pid))
            assert await procs[0].proc.wait() == 0
    finally:
        for p in procs:
            if p.proc.returncode is None:
                await p.stop()
        notify.close()
        await a.close()


def test_peer_uid_names_the_process_at_the_other_end() -> None:
    """The upgrade socket refuses a process of another user (beside the file's 0600 mode)."""
    import os

    from doproxy.upgrade import peer_uid

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert peer_uid(a) == os.geteuid()
    finally:
        a.close()
        b.close()
