"""Active health checks: probe each backend's health URL and keep the pool's eligible list.

Theory of operation
-------------------
One task per checked backend loops: wait (interval, or down-interval while the backend is down,
with jitter so checks do not march in step), probe, and fold the result into the backend's
rise/fall state machine (doproxy.core.health). A transition is logged once and reported to the
sink, which rebuilds the list of backends the balancer may pick from; the checker never touches
the balancer itself. A probe never blocks the data plane: it is an ordinary asyncio connection
(a bare Protocol, no streams: checking 200 backends every second must stay cheap).

Each backend's checks share one keep-alive connection, as Envoy's health checks do by default:
a check is then one write and one read instead of a connect, an accept and a close, which were
most of what 200 backends checked every second cost (HAProxy opens a connection per check). The
connection is dropped (and the next check connects again) whenever it cannot be trusted to be
at a response boundary: a timeout, a parse error, bytes nobody asked for, a response that ends
with the connection or asks to close it. A kept connection that the backend had closed while
idle (its keep-alive timeout) is not a failed check: the check is sent again once on a new
connection, within the same timeout.

A backend that is new to the checker is probed at once rather than after a full interval, and a
failure of that very first probe takes it out at once: a fresh backend has not earned the
benefit of the doubt that `fall` gives a proven one.

A backend is checked when health checks are enabled and it has a health URL: its inventory
`health-url` (the 2015 files sometimes omit the scheme, "10.0.0.1:8080/"), or
`new-host-health-path` on its `server-host`. Otherwise it is always eligible, as in the Go
version.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

from doproxy.core.health import State
from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Settings
from doproxy.proxy.backend import Backend

log = logging.getLogger(__name__)

_MAX_BODY = 64 * 1024  # bytes of a health response read for body-match


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str
    https: bool
    host_header: str


def health_target(backend: Backend, settings: Settings) -> Target | None:
    """Where to probe a backend, or None when it is not checked."""
    if settings.backend.disable_health_check:
        return None
    return probe_target(backend.entry, settings)


def probe_target(entry: InventoryEntry, settings: Settings) -> Target | None:
    """Where a backend answers its health check (None: a health-url without a host)."""
    url = entry.health_url.strip()
    if url:
        if "://" not in url:
            url = "http://" + url
        parts = urlsplit(url)
        if not parts.hostname:
            return None
        https = parts.scheme == "https"
        port = parts.port or (443 if https else 80)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return Target(parts.hostname, port, path, https, parts.netloc)
    path = settings.health.path or settings.backend.new_host_health_path or "/"
    host, port = entry.address()
    return Target(host, port, path, settings.backend.new_host_health_https, entry.server_host)


_insecure_ssl: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    """Health checks go to our own backends, often by IP with self-signed certificates. One
    context for every probe: making one per probe cost more than the probe."""
    global _insecure_ssl
    if _insecure_ssl is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        _insecure_ssl = ctx
    return _insecure_ssl


class _Kept(asyncio.Protocol):
    """A backend's health-check connection, kept between checks (see the module docstring)."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.body = bytearray()
        self.error: httptools.HttpParserError | None = None
        self.status = 0  # the status of the response to the last request
        self.done = False  # that response was parsed whole
        self.heard = False  # any byte of it arrived
        self.keep = False  # ... and the connection may carry the next check

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.WriteTransport: no isinstance.
        self.transport = cast(asyncio.WriteTransport, transport)

    def ask(self, request: bytes, waiter: asyncio.Future[None]) -> None:
        self.waiter = waiter
        self.parser = httptools.HttpResponseParser(self)
        self.body = bytearray()
        self.error = None
        self.status = 0
        self.done = self.heard = self.keep = False
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.done:
            self.close()  # bytes nobody asked for: this connection is not at a boundary
            return
        self.heard = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if not self.done:  # bytes after a whole response only cost the connection
                self.error = e
            self.close()
        if self.done:
            self._wake()

    def eof_received(self) -> bool:
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.done:  # a second response in the same read: nobody asked for it
            self.keep = False
            raise httptools.HttpParserError("a second response to one request")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if len(self.body) < _MAX_BODY:
            self.body += body[: _MAX_BODY - len(self.body)]

    def on_message_complete(self) -> None:
        self.done = True
        self.keep = self.parser.should_keep_alive()


class Checker:
    """One backend's checks, over a connection kept between them."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.request = (
            f"GET {target.path} HTTP/1.1\r\nHost: {target.host_header}\r\n"
            "User-Agent: doproxy-health\r\n\r\n"
        ).encode()
        self.conn: _Kept | None = None
        self.connections = 0  # opened so far (tests count reuse with it)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    async def check(self, within: float, expect: tuple[int, ...], body_match: str) -> str:
        """One health check, bounded by `within` seconds: "" when it passes, else what was
        wrong, in words for the log."""
        loop = asyncio.get_running_loop()
        target = self.target
        try:
            async with asyncio.timeout(within):
                while True:
                    conn = self.conn
                    fresh = conn is None or conn.closed
                    if conn is None or conn.closed:
                        _, conn = await loop.create_connection(
                            _Kept,
                            target.host,
                            target.port,
                            ssl=_ssl_context() if target.https else None,
                        )
                        self.conn = conn
                        self.connections += 1
                    waiter = loop.create_future()
                    conn.ask(self.request, waiter)
                    await waiter
                    if not conn.done and not conn.heard and not fresh and conn.error is None:
                        # The backend had closed the kept connection while it idled (its
                        # keep-alive timeout): not an answer. Once more, on a new connection.
                        self.close()
                        continue
                    break
        except TimeoutError:
            self.close()  # a late answer must not be read as the next check's
            return f"no answer within {within:g}s"
        except OSError as e:
            self.close()
            return f"cannot connect: {e.strerror or e}"
        if not conn.done or not conn.keep:
            self.close()
        if conn.error is not None:
            return f"invalid response: {conn.error}"
        # As before: a response cut short after its head still has a status (a body without a
        # length ends at the close, which the parser is never told about).
        status = conn.status
        if not status:
            return "connection closed without a response"
        passed = status in expect if expect else status < 500
        if not passed:
            return f"status {status}"
        if body_match and body_match.encode() not in bytes(conn.body):
            return f"body does not contain {body_match!r}"
        return ""


async def probe(target: Target, within: float, expect: tuple[int, ...], body_match: str) -> str:
    """One health check on a connection of its own (`doproxy check`'s), bounded by `within`
    seconds. Returns "" when it passes, else what was wrong, in words for the log.
    """
    checker = Checker(target)
    try:
        return await checker.check(within, expect, body_match)
    finally:
        checker.close()


Sink = Callable[[Backend, State], None]


class HealthChecker:
    def __init__(
        self,
        settings: Settings,
        sink: Sink,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.rng = rng or random.Random()
        # The time of each check, kept on the health state (the autoscaler's clock too).
        self.clock = clock
        self._tasks: dict[Backend, asyncio.Task[None]] = {}

    def watch(self, backends: list[Backend]) -> None:
        """Check exactly these backends: start new ones (probed at once), stop removed ones."""
        wanted = set(backends)
        for b in list(self._tasks):
            if b not in wanted:
                self._tasks.pop(b).cancel()
        for b in backends:
            if b in self._tasks:
                continue
            target = health_target(b, self.settings)
            if target is None:
                continue
            b.health.rise = self.settings.health.rise
            b.health.fall = self.settings.health.fall
            self._tasks[b] = asyncio.get_running_loop().create_task(
                self._run(b, target), name=f"health {b.name}"
            )

    async def _run(self, backend: Backend, target: Target) -> None:
        checker = Checker(target)
        try:
            await self._loop(backend, checker)
        finally:
            checker.close()

    async def _loop(self, backend: Backend, checker: Checker) -> None:
        h = self.settings.health
        timeout = h.timeout if h.timeout is not None else self.settings.backend.health_check_timeout
        health = backend.health
        first = True
        while True:
            problem = await checker.check(timeout, h.expect_status, h.body_match)
            now = self.clock()
            if first and problem and health.up:
                health.record(False, now)
                health.state = State.DOWN  # a new backend that fails its first check is out
                changed: State | None = State.DOWN
            else:
                changed = health.record(not problem, now)
            first = False
            if problem:
                health.problem = problem
            if changed is not None:
                if changed is State.DOWN:
                    log.warning(
                        "backend %s is down: %s; no traffic until it passes [health] rise "
                        "checks in a row: check the backend",
                        backend.name,
                        problem,
                    )
                else:
                    log.info("backend %s is up again", backend.name)
                self.sink(backend, changed)
            base = h.interval if health.up else h.down_interval
            await asyncio.sleep(base * (1.0 + h.jitter * (2.0 * self.rng.random() - 1.0)))

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
