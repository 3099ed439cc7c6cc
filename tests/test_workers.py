"""`workers = 2`: two data-plane processes behind one control plane (docs/workers.md).

Each test runs doproxy as a real process with real worker processes, in front of real backends
on 127.0.0.1 that count what reaches them, and reads the running server through its admin API.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.procs import ProxyProcess, start_proxy_process, write_config
from tests.support import RawBackend, RequestReader, get, request, respond

pytestmark = pytest.mark.timeout(90)


def counting(delay: float = 0.0) -> Callable[..., Any]:
    """A keep-alive backend answering 200 "ok" (after `delay`), counting requests in
    backend.requests."""

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
    ) -> None:
        rr = RequestReader(reader)
        while await rr.next() is not None:
            backend.requests += 1  # type: ignore[attr-defined]
            if delay:
                await asyncio.sleep(delay)
            writer.write(respond(200, b"ok"))
            await writer.drain()

    return handler


async def backend(delay: float = 0.0) -> RawBackend:
    b = RawBackend(counting(delay))
    b.requests = 0  # type: ignore[attr-defined]
    return await b.start()


def served(b: RawBackend) -> int:
    return int(b.requests)  # type: ignore[attr-defined]


async def status(tmp: Path) -> dict[str, Any]:
    addr = (tmp / "inventory.toml.admin.addr").read_text().strip()
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://{addr}/api/status") as r,
    ):
        assert r.status == 200
        data: dict[str, Any] = await r.json()
        return data


async def metrics(tmp: Path) -> str:
    addr = (tmp / "inventory.toml.admin.addr").read_text().strip()
    async with aiohttp.ClientSession() as s, s.get(f"http://{addr}/metrics") as r:
        return await r.text()


async def until(tmp: Path, ok: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll /api/status until `ok` holds (the callers' timeouts bound it)."""
    while True:
        st = await status(tmp)
        if ok(st):
            return st
        await asyncio.sleep(0.05)


async def burst(port: int, n: int, concurrency: int = 16) -> list[int]:
    """`n` requests, each on a new connection, `concurrency` at a time: their statuses."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> int:
        async with gate:
            return (await request(port, get())).status

    return list(await asyncio.gather(*(one() for _ in range(n))))


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")  # a zombie has exited
    except FileNotFoundError:
        return True


async def stop(proxy: ProxyProcess) -> None:
    if proxy.proc.returncode is None:
        await proxy.stop()


async def test_requests_land_on_both_workers_and_the_sums_are_what_backends_saw(
    tmp_path: Path,
) -> None:
    a, b = await backend(), await backend()
    proxy = await start_proxy_process(write_config(tmp_path, [a.port, b.port], "workers = 2\n"))
    try:
        async with asyncio.timeout(60):
            st = await status(tmp_path)
            assert len(st["workers"]) == 2
            assert all(w["alive"] and w["pid"] != proxy.pid for w in st["workers"])
            # New connections are spread over the workers' listeners by the kernel.
            assert await burst(proxy.port, 200) == [200] * 200
            st = await until(tmp_path, lambda s: s["listener"]["requests"] == 200)
            assert all(w["requests"] > 0 for w in st["workers"]), st["workers"]
            assert sum(w["requests"] for w in st["workers"]) == 200
            # What the main process shows is the sum of the workers: what the backends saw.
            assert served(a) + served(b) == 200
            by_name = {x["name"]: x["requests"] for x in st["backends"]}
            assert by_name == {"b1": served(a), "b2": served(b)}
            text = await metrics(tmp_path)
            assert f'doproxy_requests_total{{backend="b1",code_class="2xx"}} {served(a)}.0' in text
            assert f'doproxy_requests_total{{backend="b2",code_class="2xx"}} {served(b)}.0' in text
            assert "doproxy_request_duration_seconds_count 200.0" in text
            assert st["listener"]["requests_per_second"] is not None
    finally:
        await stop(proxy)
        await a.close()
        await b.close()


async def test_sigterm_drains_every_worker(tmp_path: Path) -> None:
    slow = await backend(delay=1.0)
    proxy = await start_proxy_process(write_config(tmp_path, [slow.port], "workers = 2\n"))
    try:
        async with asyncio.timeout(60):
            pids = [w["pid"] for w in (await status(tmp_path))["workers"]]
            # Requests in flight on both workers when SIGTERM arrives: they all finish.
            pending = asyncio.gather(*(request(proxy.port, get()) for _ in range(8)))
            while served(slow) < 8:
                await asyncio.sleep(0.01)
            proxy.proc.send_signal(signal.SIGTERM)
            assert [r.status for r in await pending] == [200] * 8
            assert await proxy.proc.wait() == 0
            while not all(gone(pid) for pid in pids):
                await asyncio.sleep(0.05)
    finally:
        await stop(proxy)
        await slow.close()


async def test_a_reload_switches_both_workers(tmp_path: Path) -> None:
    old, new = await backend(), await backend()
    cfg = write_config(tmp_path, [old.port], "workers = 2\n")
    proxy = await start_proxy_process(cfg)
    try:
        async with asyncio.timeout(60):
            assert await burst(proxy.port, 20) == [200] * 20
            assert served(old) == 20
            (tmp_path / "inventory.toml").write_text(
                f'[[droplet]]\nid = 2\nname = "b2"\nserver-host = "127.0.0.1:{new.port}"\n'
            )
            proxy.proc.send_signal(signal.SIGHUP)
            # The reload returns once every worker took the new generation; then no request
            # reaches the old backend, whichever worker it lands on.
            st = await until(
                tmp_path,
                lambda s: (
                    s["config_generation"] == 1 and all(w["generation"] == 1 for w in s["workers"])
                ),
            )
            before = [w["requests"] for w in st["workers"]]
            assert await burst(proxy.port, 100) == [200] * 100
            assert served(old) == 20 and served(new) == 100
            st = await until(tmp_path, lambda s: s["listener"]["requests"] == 120)
            assert all(w["requests"] > n for w, n in zip(st["workers"], before, strict=True))
    finally:
        await stop(proxy)
        await old.close()
        await new.close()


async def test_a_killed_worker_is_replaced_and_no_connection_is_refused(tmp_path: Path) -> None:
    a = await backend()
    proxy = await start_proxy_process(write_config(tmp_path, [a.port], "workers = 2\n"))
    refused = 0
    failed = 0
    ok = 0
    running = True

    async def client_loop() -> None:
        nonlocal refused, failed, ok
        while running:
            try:
                r = await request(proxy.port, get())
            except ConnectionRefusedError:
                refused += 1
            except (OSError, EOFError):
                failed += 1  # a connection the killed worker had accepted
            else:
                assert r.status == 200
                ok += 1

    try:
        async with asyncio.timeout(60):
            st = await status(tmp_path)
            victim = st["workers"][0]["pid"]
            loops = [asyncio.get_running_loop().create_task(client_loop()) for _ in range(4)]
            while ok < 50:
                await asyncio.sleep(0.01)
            os.kill(victim, signal.SIGKILL)
            st = await until(
                tmp_path,
                lambda s: (
                    s["workers"][0]["restarts"] == 1
                    and s["workers"][0]["alive"]
                    and s["workers"][0]["pid"] != victim
                ),
            )
            # The replacement serves: its requests are counted under its slot.
            served_before = st["workers"][0]["requests"]
            await until(tmp_path, lambda s: s["workers"][0]["requests"] > served_before + 20)
            running = False
            await asyncio.gather(*loops)
            assert refused == 0
            assert failed <= 4  # at most the loops' connections open on the killed worker
            assert b"worker 0 (pid %d) exited with signal SIGKILL" % victim in proxy.log
    finally:
        running = False
        await stop(proxy)
        await a.close()


async def test_a_reload_that_moves_the_listener_moves_every_worker(tmp_path: Path) -> None:
    a = await backend()
    cfg = write_config(tmp_path, [a.port], "workers = 2\n")
    proxy = await start_proxy_process(cfg)
    try:
        async with asyncio.timeout(60):
            spare = socket.socket()
            spare.bind(("127.0.0.1", 0))
            port = spare.getsockname()[1]
            spare.close()  # free again: the reload binds it
            cfg.write_text(
                cfg.read_text().replace('bind = "127.0.0.1:0"', f'bind = "127.0.0.1:{port}"', 1)
            )
            proxy.proc.send_signal(signal.SIGHUP)
            st = await until(
                tmp_path,
                lambda s: all(w["generation"] == 1 for w in s["workers"]),
            )
            assert st["listener"]["addresses"] == [f"127.0.0.1:{port}"]
            before = [w["requests"] for w in st["workers"]]
            assert await burst(port, 100) == [200] * 100
            st = await until(tmp_path, lambda s: s["listener"]["requests"] == 100)
            assert all(w["requests"] > n for w, n in zip(st["workers"], before, strict=True))
            with pytest.raises(ConnectionRefusedError):
                await request(proxy.port, get())  # the old listener is closed everywhere
    finally:
        await stop(proxy)
        await a.close()
