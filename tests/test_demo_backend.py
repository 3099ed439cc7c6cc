"""The demo backend: capacity-limited service, health checks that skip the queue, `__main__`."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time

import pytest

from doproxy.demo_backend import Service, _Job, start_demo_backend
from tests.conftest import wait_for
from tests.support import Client, get, request


async def test_unlimited_by_default_answers_with_its_name() -> None:
    server, port = await start_demo_backend("plain")
    try:
        r = await request(port, get("/hello"))
        assert r.status == 200
        assert r.body == b"plain: GET /hello (0 bytes in)\n"
        r = await request(port, get("/health"))
        assert r.body == b"ok\n"
    finally:
        server.close()


async def test_service_queue_is_fifo() -> None:
    service = Service(capacity=1, service_time=0.001)
    done: list[int] = []
    finished = asyncio.Event()

    def finisher(i: int) -> _Job:
        def finish() -> None:
            done.append(i)
            if len(done) == 5:
                finished.set()

        return _Job(finish)

    for i in range(5):
        service.submit(finisher(i))
    assert service.in_service == 1 and len(service.queue) == 4
    async with asyncio.timeout(5):
        await finished.wait()
    assert done == [0, 1, 2, 3, 4]
    assert service.in_service == 0


async def test_a_cancelled_job_does_not_take_a_worker() -> None:
    service = Service(capacity=1, service_time=0.001)
    done: list[str] = []
    first, gone, last = (_Job(lambda n=n: done.append(n)) for n in ("first", "gone", "last"))
    for job in (first, gone, last):
        service.submit(job)
    gone.cancelled = True  # its client disconnected while it queued
    await wait_for(lambda: len(done) == 2)
    assert done == ["first", "last"]
    assert service.in_service == 0 and not service.queue


async def _timed_get(client: Client, path: str, start: float) -> float:
    await client.send(get(path))
    r = await client.response()
    assert r.status == 200
    return time.monotonic() - start


@pytest.mark.timeout(20)
async def test_latency_rises_with_concurrency() -> None:
    server, port = await start_demo_backend("slow", capacity=2, service_time=0.1)
    clients = [await Client.connect(port) for _ in range(6)]  # connect first: time service only
    try:
        start = time.monotonic()
        latencies = sorted(
            await asyncio.gather(*(_timed_get(c, f"/r{i}", start) for i, c in enumerate(clients)))
        )
    finally:
        for c in clients:
            await c.close()
        server.close()
    # Two in service at a time, 0.1 s each: pairs finish at about 0.1, 0.2 and 0.3 s. The lower
    # bounds are certain (a queued request cannot start before one in service ends); the ratio
    # is generous so a slow machine does not fail it.
    assert latencies[0] >= 0.08
    assert latencies[2] >= 0.18
    assert latencies[4] >= 0.28
    assert latencies[-1] >= 2 * latencies[0]
    assert latencies[1] < latencies[4]


@pytest.mark.timeout(20)
async def test_health_is_not_queued() -> None:
    server, port = await start_demo_backend("busy", capacity=1, service_time=1.0)
    clients = [await Client.connect(port) for _ in range(3)]
    try:
        slow = [asyncio.create_task(_timed_get(c, "/work", time.monotonic())) for c in clients]
        # The health check arrives behind three queued requests and is answered before any.
        r = await request(port, get("/health"))
        assert r.status == 200 and r.body == b"ok\n"
        assert not any(t.done() for t in slow)
        for t in slow:
            t.cancel()
        await asyncio.gather(*slow, return_exceptions=True)
    finally:
        for c in clients:
            await c.close()
        server.close()


async def test_pipelined_responses_keep_request_order() -> None:
    server, port = await start_demo_backend("pipe", capacity=1, service_time=0.05)
    c = await Client.connect(port)
    try:
        last = get("/third", extra="Connection: close\r\n")
        await c.send(get("/first") + get("/health") + last)
        async with asyncio.timeout(10):
            raw = await c.reader.read(-1)  # until the backend closes after the third
        bodies = [b"pipe: GET /first (0 bytes in)\n", b"ok\n", b"pipe: GET /third (0 bytes in)\n"]
        positions = [raw.find(b"\r\n\r\n" + body) for body in bodies]
        assert -1 not in positions, raw
        assert positions == sorted(positions)
        assert raw.count(b"HTTP/1.1 200 OK") == 3
    finally:
        await c.close()
        server.close()


async def test_connection_close_is_honoured() -> None:
    server, port = await start_demo_backend("close", capacity=1, service_time=0.01)
    c = await Client.connect(port)
    try:
        await c.send(get("/x", extra="Connection: close\r\n"))
        r = await c.response()
        assert r.header("connection") == b"close"
        assert await c.closed()
    finally:
        await c.close()
        server.close()


@pytest.mark.timeout(30)
async def test_main_runs_as_a_process_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "doproxy.demo_backend",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--name",
        "proc-1",
        "--capacity",
        "2",
        "--service-time",
        "0.01",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        async with asyncio.timeout(15):
            line = await proc.stderr.readline()
        m = re.search(rb"listening on 127\.0\.0\.1:(\d+)", line)
        assert m, line
        port = int(m.group(1))
        r = await request(port, get("/hi"))
        assert r.status == 200 and r.body == b"proc-1: GET /hi (0 bytes in)\n"
        idle = await Client.connect(port)  # an idle keep-alive client must not hold the exit
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
        await idle.close()
        assert await proc.stdout.read() == b""
        assert await proc.stderr.read() == b""  # one line in all
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_main_rejects_a_negative_capacity() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "doproxy.demo_backend",
        "--capacity",
        "-1",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"negative" in err


@pytest.mark.timeout(30)
async def test_boot_delay_holds_the_listening_socket_back() -> None:
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "doproxy.demo_backend",
        "--boot-delay",
        "0.5",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(15):
            line = await proc.stderr.readline()
        assert b"listening on" in line
        assert time.monotonic() - start >= 0.5
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
