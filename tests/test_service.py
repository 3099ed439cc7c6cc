"""doproxy under systemd: the sd_notify messages (doproxy/service.py, deploy/doproxy.service).

The service manager's end is played by a real unix datagram socket in tmp_path, and doproxy is
the real CLI in a subprocess with NOTIFY_SOCKET pointing at it.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from doproxy import service
from tests.procs import ProxyProcess, write_config
from tests.support import Client, RequestReader, get, respond

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[socket.socket]:
    """The service manager's notification socket, at tmp_path/notify."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    yield sock
    sock.close()


async def message(sock: socket.socket, timeout: float = 10.0) -> dict[str, str]:
    """The next datagram doproxy sent, as its assignments."""
    async with asyncio.timeout(timeout):
        data = await asyncio.get_running_loop().sock_recv(sock, 4096)
    return dict(line.split("=", 1) for line in data.decode().splitlines())


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert service.notify("READY=1") is False


def test_sends_to_a_socket_path(
    manager: socket.socket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    assert service.notify("READY=1\nSTATUS=serving")
    manager.setblocking(True)
    manager.settimeout(5)
    assert manager.recv(4096) == b"READY=1\nSTATUS=serving"


def test_sends_to_the_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"doproxy-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)  # what systemd's "@name" means
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        before = time.monotonic_ns() // 1000
        assert service.reloading()
        fields = dict(ln.split("=", 1) for ln in sock.recv(4096).decode().splitlines())
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000


def test_a_missing_socket_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert service.notify("READY=1") is False
    assert "cannot notify the service manager" in caplog.text


async def start_under_manager(config: Path, notify: Path) -> ProxyProcess:
    """Start `doproxy --config FILE` as systemd would: NOTIFY_SOCKET set; no waiting here."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "doproxy",
        "--config",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NOTIFY_SOCKET": str(notify)},
    )
    pp = ProxyProcess(proc, 0, bytearray())
    asyncio.get_running_loop().create_task(pp._pump())
    return pp


async def test_ready_reloading_and_stopping(manager: socket.socket, tmp_path: Path) -> None:
    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rr = RequestReader(reader)
        while await rr.next() is not None:
            writer.write(respond(200, b"hello"))
            await writer.drain()

    backend = await asyncio.start_server(hello, "127.0.0.1", 0)
    config = write_config(tmp_path, [backend.sockets[0].getsockname()[1]])
    proxy = await start_under_manager(config, tmp_path / "notify")
    try:
        # READY=1 is the first word, and it comes once the port accepts: the port it names
        # takes a connection at once (no retry), and the request is proxied.
        ready = await message(manager, timeout=20)
        assert ready["READY"] == "1", ready
        m = re.fullmatch(r"serving on 127\.0\.0\.1:(\d+)", ready["STATUS"])
        assert m, ready
        client = await Client.connect(int(m[1]))
        await client.send(get())
        assert (await client.response()).body == b"hello"

        # SIGHUP: RELOADING=1, stamped with the monotonic time the reload began, then READY=1.
        before = time.monotonic_ns() // 1000
        proxy.proc.send_signal(signal.SIGHUP)
        reloading = await message(manager)
        assert reloading["RELOADING"] == "1", reloading
        assert before <= int(reloading["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
        assert await message(manager) == {"READY": "1", "STATUS": ready["STATUS"]}

        # A reload that fails still ends with READY=1 (the unit keeps running), and says so.
        config.write_text(config.read_text() + '\n[loadbalancing]\ntype = "fastest"\n')
        proxy.proc.send_signal(signal.SIGHUP)
        assert (await message(manager))["RELOADING"] == "1"
        after_failure = await message(manager)
        assert after_failure["READY"] == "1"
        assert "the last reload failed" in after_failure["STATUS"], after_failure

        # SIGTERM: STOPPING=1, then in-flight requests finish and it exits cleanly.
        proxy.proc.send_signal(signal.SIGTERM)
        assert (await message(manager))["STOPPING"] == "1"
        async with asyncio.timeout(10):
            assert await proxy.proc.wait() == 0
        await client.close()
    finally:
        await proxy.stop()
        backend.close()


def test_settle_heap_freezes_what_start_up_made() -> None:
    """After start-up the heap moves to the permanent generation, which full collections
    never walk again (and what start-up left as garbage is freed first)."""
    import gc

    from doproxy.service import settle_heap

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    import weakref

    before = gc.get_freeze_count()
    garbage = weakref.ref(Cycle())  # a cycle nobody holds: freed by a collection only
    try:
        settle_heap()
        assert gc.get_freeze_count() > before
        assert garbage() is None
    finally:
        gc.unfreeze()
