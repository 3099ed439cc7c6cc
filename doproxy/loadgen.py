"""A small, bounded load generator: N keep-alive clients sending GETs for a fixed time.

It drives `doproxy demo --load` and the autoscaler's end-to-end tests. It is no wrk: it exists
so that a user (or a test) can watch the pool scale without installing anything, and it counts
every failed request, which is what a scale-down under load must keep at zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    ok: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the first few failures, for messages

    def fail(self, why: str) -> None:
        self.failed += 1
        if len(self.errors) < 10:
            self.errors.append(why)


async def _one_client(
    host: str, port: int, path: str, until: float, result: LoadResult, stop: asyncio.Event
) -> None:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        while time.monotonic() < until and not stop.is_set():
            start = time.monotonic()
            try:
                if writer is None or reader is None:
                    reader, writer = await asyncio.open_connection(host, port)
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = 0
                close = False
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                    elif name.strip().lower() == b"connection" and b"close" in value.lower():
                        close = True
                if length:
                    await reader.readexactly(length)
                if status >= 500:
                    result.fail(f"HTTP {status}")
                    await asyncio.sleep(0.05)  # as a browser would not retry at once
                else:
                    result.ok += 1
                    result.latencies.append(time.monotonic() - start)
                if close:
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
                result.fail(f"{type(e).__name__}: {e}")
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.05)  # back off from a refused connection
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def run_load(
    host: str,
    port: int,
    concurrency: int,
    seconds: float,
    path: str = "/",
    stop: asyncio.Event | None = None,
    result: LoadResult | None = None,
) -> LoadResult:
    """`concurrency` clients send requests back to back for `seconds` (or until `stop`)."""
    result = result or LoadResult()
    until = time.monotonic() + seconds
    stop = stop or asyncio.Event()
    await asyncio.gather(
        *(_one_client(host, port, path, until, result, stop) for _ in range(concurrency))
    )
    return result
