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
import trustme
from cryptography import x509

from tests.procs import ProxyProcess, start_proxy_process, write_config
from tests.support import Client, RawBackend, RequestReader, dead_port, get, request, respond
from tests.test_tls import issue, sni_client

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


# --- passive health across workers -------------------------------------------------------------


async def scripted() -> RawBackend:
    """A keep-alive backend answering each request with the status in its `answer` attribute
    (set by the test before each request), counting requests."""

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
    ) -> None:
        rr = RequestReader(reader)
        while await rr.next() is not None:
            backend.requests += 1  # type: ignore[attr-defined]
            status: int = backend.answer  # type: ignore[attr-defined]
            writer.write(respond(status, b"x"))
            await writer.drain()

    b = RawBackend(handler)
    b.requests = 0  # type: ignore[attr-defined]
    b.answer = 500  # type: ignore[attr-defined]
    return await b.start()


async def passive_config(tmp: Path, port: int, failures: int) -> Path:
    """workers = 2 in front of backend b1 at `port`, ejected after `failures` in a row. A pool
    of one is never ejected: b2, disabled, makes it two (so max-ejection-percent 50 lets b1
    go) while every request still goes to b1."""
    cfg = write_config(
        tmp,
        [port, await dead_port()],
        "workers = 2\n"
        f'[passive-health]\nconsecutive-failures = {failures}\nejection-time = "60s"\n'
        "[retries]\nattempts = 0\n",  # so each failure reaches the client, as sent
    )
    inventory = tmp / "inventory.toml"
    inventory.write_text(inventory.read_text() + 'state = "disabled"\n')  # b2, the last table
    return cfg


def connections(total: int) -> Callable[[dict[str, Any]], bool]:
    """Whether the workers report `total` client connections in all."""
    return lambda s: sum(w["connections"] for w in s["workers"]) == total


async def one_on_each_worker(tmp: Path, port: int) -> tuple[list[Client], list[Client]]:
    """Keep-alive connections opened one at a time until each worker serves one, each placed by
    the worker whose connection count rose: those (index = slot), and the spare ones (that
    landed on a worker which had one already), to close at the end."""
    placed: dict[int, Client] = {}
    spare: list[Client] = []
    counts = [w["connections"] for w in (await status(tmp))["workers"]]
    while len(placed) < len(counts):
        c = await Client.connect(port)
        st = await until(tmp, connections(sum(counts) + 1))
        now = [w["connections"] for w in st["workers"]]
        slot = next(i for i, (n, m) in enumerate(zip(now, counts, strict=True)) if n > m)
        counts = now
        if slot in placed:
            spare.append(c)
        else:
            placed[slot] = c
    return [placed[slot] for slot in sorted(placed)], spare


def b1(st: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = next(x for x in st["backends"] if x["name"] == "b1")
    return row


async def exchange(c: Client, tmp: Path, sick: RawBackend, answer: int, n: int) -> bool:
    """One request on `c` that b1 answers with `answer`, its `n`th; True when the main process
    has ejected b1 after it. It waits for the worker's report to count the request in the main
    process: a worker sends its passive-health news at once, on the same channel, so by then
    the main process has taken it in too."""
    sick.answer = answer  # type: ignore[attr-defined]
    await c.send(get())
    assert (await c.response()).status == answer
    assert served(sick) == n
    st = await until(tmp, lambda s: b1(s)["requests"] == n)
    return bool(b1(st)["ejected"])


async def refused_everywhere(clients: list[Client]) -> None:
    """Each connection gets 503 (no backend left): its worker has the ejection too. A request
    may reach b1 before the worker applied the table pushed with it, hence the loop."""
    for c in clients:
        while True:
            await c.send(get())
            status = (await c.response()).status
            if status == 503:
                break
            assert status == 500


async def test_failures_spread_over_both_workers_eject_after_the_configured_count(
    tmp_path: Path,
) -> None:
    sick = await scripted()
    proxy = await start_proxy_process(await passive_config(tmp_path, sick.port, 4))
    clients: list[Client] = []
    try:
        async with asyncio.timeout(60):
            (w0, w1), spare = await one_on_each_worker(tmp_path, proxy.port)
            clients = [w0, w1, *spare]
            # Four failures in a row, two on each worker: no worker saw four of its own.
            for n, c in enumerate([w0, w1, w0, w1], 1):
                assert await exchange(c, tmp_path, sick, 500, n) is (n == 4), n
            await refused_everywhere([w0, w1])
            assert "doproxy_ejections_total 1.0" in await metrics(tmp_path)
    finally:
        for c in clients:
            await c.close()
        await stop(proxy)
        await sick.close()


async def test_a_success_on_any_worker_resets_the_run_of_failures(tmp_path: Path) -> None:
    sick = await scripted()
    proxy = await start_proxy_process(await passive_config(tmp_path, sick.port, 3))
    clients: list[Client] = []
    try:
        async with asyncio.timeout(60):
            (w0, w1), spare = await one_on_each_worker(tmp_path, proxy.port)
            clients = [w0, w1, *spare]
            # Two failures on worker 1, then a success on worker 0, which has seen no failure
            # of b1: the run starts again, on every worker.
            steps = [(w1, 500), (w1, 500), (w0, 200), (w0, 500), (w1, 500)]
            for n, (c, answer) in enumerate(steps, 1):
                assert not await exchange(c, tmp_path, sick, answer, n), n
            # The third failure since the success, the second on worker 0.
            assert await exchange(w0, tmp_path, sick, 500, 6)
            await refused_everywhere([w0, w1])
    finally:
        for c in clients:
            await c.close()
        await stop(proxy)
        await sick.close()


async def test_the_workers_never_eject_more_than_max_ejection_percent(tmp_path: Path) -> None:
    sick = [await scripted(), await scripted()]  # both answer 500
    cfg = write_config(
        tmp_path,
        [b.port for b in sick],
        'workers = 2\n[passive-health]\nconsecutive-failures = 2\nejection-time = "60s"\n'
        "[retries]\nattempts = 0\n",
    )
    proxy = await start_proxy_process(cfg)
    try:
        async with asyncio.timeout(60):
            assert await burst(proxy.port, 30, concurrency=4) == [500] * 30
            st = await until(tmp_path, lambda s: s["listener"]["requests"] == 30)
            assert all(w["requests"] > 0 for w in st["workers"]), st["workers"]
            # Half of a pool of two: one is ejected, the other keeps taking every request.
            assert sorted(x["ejected"] for x in st["backends"]) == [False, True]
            assert "doproxy_ejections_total 1.0" in await metrics(tmp_path)
            kept = next(x["name"] for x in st["backends"] if not x["ejected"])
            assert await burst(proxy.port, 10, concurrency=4) == [500] * 10
            st = await until(tmp_path, lambda s: s["listener"]["requests"] == 40)
            assert [x["name"] for x in st["backends"] if not x["ejected"]] == [kept]
    finally:
        await stop(proxy)
        for b in sick:
            await b.close()


# --- TLS termination in the workers ------------------------------------------------------------

HTTPS = """workers = 2
https = true
tls-cert-file = "default.pem"
tls-key-file = "default.key"

[[tls-certificate]]
cert-file = "a.pem"
key-file = "a.key"
"""


async def tls_get(port: int, ca: trustme.CA, name: str | None) -> int:
    """One request over a new TLS connection with SNI `name` (None: no SNI): the serial number
    of the certificate it was served."""
    c = await Client.connect(port, ssl=sni_client(ca), server_hostname=name or "127.0.0.1")
    try:
        der = c.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        await c.send(get(host=name or "example.test"))
        assert (await c.response()).status == 200
        return int(x509.load_der_x509_certificate(der).serial_number)
    finally:
        await c.close()


async def tls_burst(port: int, ca: trustme.CA, n: int) -> dict[str | None, set[int]]:
    """`n` requests, each on a new TLS connection, half with SNI a.test and half without, 8 at
    a time: the serial numbers served for each name."""
    gate = asyncio.Semaphore(8)
    names = [None if i % 2 else "a.test" for i in range(n)]

    async def one(name: str | None) -> int:
        async with gate:
            return await tls_get(port, ca, name)

    serials = await asyncio.gather(*(one(name) for name in names))
    served: dict[str | None, set[int]] = {}
    for name, serial in zip(names, serials, strict=True):
        served.setdefault(name, set()).add(serial)
    return served


async def test_https_on_both_workers_and_a_reload_renews_the_certificates_of_both(
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    default = issue(ca, tmp_path, "default", "default.test")
    a_cert = issue(ca, tmp_path, "a", "a.test")
    b = await backend()
    proxy = await start_proxy_process(write_config(tmp_path, [b.port], HTTPS))
    try:
        async with asyncio.timeout(60):
            # Each certificate, picked by SNI, by whichever worker the connection lands on.
            assert await tls_burst(proxy.port, ca, 40) == {
                "a.test": {a_cert.serial},
                None: {default.serial},
            }
            st = await until(tmp_path, lambda s: s["listener"]["requests"] == 40)
            assert all(w["requests"] > 0 for w in st["workers"]), st["workers"]
            before = [w["requests"] for w in st["workers"]]
            # Both renewed (each file replaced by rename): a reload hands every worker the new
            # ones, and no connection after it gets an old one, whichever worker takes it.
            default = issue(ca, tmp_path, "default", "default.test")
            a_cert = issue(ca, tmp_path, "a", "a.test")
            proxy.proc.send_signal(signal.SIGHUP)
            await until(
                tmp_path,
                lambda s: (
                    s["config_generation"] == 1 and all(w["generation"] == 1 for w in s["workers"])
                ),
            )
            assert await tls_burst(proxy.port, ca, 40) == {
                "a.test": {a_cert.serial},
                None: {default.serial},
            }
            st = await until(tmp_path, lambda s: s["listener"]["requests"] == 80)
            assert all(w["requests"] > n for w, n in zip(st["workers"], before, strict=True))
            assert served(b) == 80
    finally:
        await stop(proxy)
        await b.close()
