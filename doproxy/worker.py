"""One worker process of `workers = N`: a ProxyServer on the listening sockets its main process
handed it, serving the backend table the main process pushes (see doproxy.workers for the whole
story and the messages).

Run as `python -m doproxy.worker FD [LOG-LEVEL]` by the main process, FD being the worker's end
of the control channel. The worker acts on no file but the access log and the certificates:
the inventory, health checks, the autoscaler and the admin listener stay in the main process.

Signals: SIGINT is ignored (Ctrl-C in a terminal reaches the whole process group; the main
process drains the workers itself), SIGTERM drains as the main process's "drain" does (a
service manager may signal every process of the service), SIGHUP is ignored (the main process
reloads and pushes), SIGUSR1 reopens the access log (logrotate may signal them all). A worker
whose main process went away (its channel ends) drains and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import uvloop

from doproxy import service
from doproxy.core.balancers import make_balancer
from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Settings
from doproxy.errors import DoproxyError
from doproxy.proxy.access import AccessLog, switch
from doproxy.proxy.backend import Backend, Pool
from doproxy.proxy.server import ProxyServer
from doproxy.runtime import (
    CertificateSelector,
    access_log_identity,
    load_certificates,
    open_access_log,
)
from doproxy.workers import (
    _BACKEND_COUNTERS,
    _SERVER_COUNTERS,
    _SERVER_LISTS,
    REPORT_EVERY,
    SAMPLES_PER_REPORT,
    Channel,
    health_state,
    pages_from,
)

# Named, not __name__: run as `python -m doproxy.worker`, this module is __main__.
log = logging.getLogger("doproxy.worker")


class WorkerProcess:
    """The worker's side of the channel: applies what the main process sends, in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.inbox: asyncio.Queue[tuple[dict[str, Any], list[int]]] = asyncio.Queue()
        self.channel = Channel(sock, self._received, self._closed)
        self.server: ProxyServer | None = None
        self.settings: Settings | None = None
        self.base = Path.cwd()
        self.slot = 0
        self.generation = -1
        self.tls: CertificateSelector | None = None
        self.access: AccessLog | None = None
        self.done = asyncio.Event()
        self.draining = False
        # What the last report counted, to send deltas.
        self._sent_server: dict[str, Any] = {}
        self._sent: dict[Backend, tuple[Any, ...]] = {}
        self._reporter: asyncio.Task[None] | None = None
        self._rng = random.Random()
        # Passive-health news not sent yet: [key, host, ok], in order (see _passive).
        self._news: list[list[Any]] = []

    # --- the channel -----------------------------------------------------------------------

    def _received(self, message: dict[str, Any], fds: list[int]) -> None:
        self.inbox.put_nowait((message, fds))

    def _closed(self) -> None:
        # EOF: the main process is gone (or told us to drain and closed): drain, exit.
        self.inbox.put_nowait(({"type": "drain", "close_idle": True}, []))

    async def run(self) -> None:
        while True:
            message, fds = await self.inbox.get()
            kind = message.get("type")
            if kind == "init":
                await self._init(message, fds)
            elif kind == "table":
                await self._table(message, fds)
            elif kind == "failing":
                self._failing(message["backends"])
            elif kind == "drain":
                await self.drain(message.get("grace"), bool(message.get("close_idle", True)))
                return
            else:
                for fd in fds:
                    os.close(fd)

    # --- applying ---------------------------------------------------------------------------

    async def _init(self, message: dict[str, Any], fds: list[int]) -> None:
        self.slot = int(message["slot"])
        self.base = Path(message["base"])
        settings = Settings.model_validate(message["settings"])
        certificates = load_certificates(settings, self.base)
        self.tls = None if certificates is None else CertificateSelector(certificates)
        pool = self._pool(message["table"], settings, None)
        server = ProxyServer(settings, pool, None if self.tls is None else self.tls.context)
        server.error_pages = pages_from(message["error_pages"])
        server.passive = self._passive  # the main process keeps the runs of failures
        self._use_access_log(server, open_access_log(settings, self.base))
        for fd in fds:
            await server.listen(sock=socket.socket(fileno=fd))
        self.server, self.settings = server, settings
        self.generation = int(message["generation"])
        self._sent_server = _server_counters(server)
        self._reporter = asyncio.get_running_loop().create_task(self._report_every())
        self.channel.send({"type": "ready", "pid": os.getpid(), "generation": self.generation})
        service.settle_heap()

    async def _table(self, message: dict[str, Any], fds: list[int]) -> None:
        server = self.server
        if server is None or self.draining:
            for fd in fds:
                os.close(fd)
            return
        settings = self.settings
        assert settings is not None
        if "settings" in message:
            new = Settings.model_validate(message["settings"])
            certificates = load_certificates(new, self.base)
            if fds:
                # New listeners (bind or https changed): the TLS context goes with them.
                self.tls = None if certificates is None else CertificateSelector(certificates)
            elif certificates is not None and self.tls is not None:
                self.tls.certificates = certificates
            server.set_settings(new)
            server.error_pages = pages_from(message["error_pages"])
            if access_log_identity(new, self.base) != access_log_identity(settings, self.base):
                self._use_access_log(server, open_access_log(new, self.base))
            self.settings = settings = new
        if fds:
            await server.rebind(
                settings.bind,
                None if self.tls is None else self.tls.context,
                socks=[socket.socket(fileno=fd) for fd in fds],
            )
        old = server.pool
        pool = self._pool(message["table"], settings, old)
        server.set_pool(pool)
        kept = set(pool.backends)
        for b in old.backends:
            if b not in kept or b.entry.state != "active":
                while b.idle:
                    b.idle.pop().close()
        self.generation = int(message["generation"])
        self.channel.send({"type": "ack", "generation": self.generation})

    def _pool(self, rows: list[dict[str, Any]], settings: Settings, old: Pool | None) -> Pool:
        """The main process's table as this worker's pool, keeping the Backend objects (their
        idle connections, counters and latency) of the backends that stay."""
        known = {(b.key, b.entry.server_host): b for b in old.backends} if old else {}
        backends = []
        for row in rows:
            entry = InventoryEntry.model_validate(row["entry"])
            b = known.get((entry.key, entry.server_host))
            if b is None:
                b = Backend(entry)
            else:
                b.entry = entry
                b.name = entry.name or entry.server_host
            b.health.state = health_state(bool(row["up"]))
            b.ejected_until = float(row["ejected_until"])  # only the main process ejects
            if row["failing"] and not b.passive_failures:
                b.passive_failures = 1  # its next success ends a run: tell it
            since = row["eligible_since"]
            b.eligible_since = None if since is None else float(since)
            backends.append(b)
        kind = settings.loadbalancing.type
        balancer = old.balancer if old is not None and old.balancer.name == kind else None
        pool = Pool(
            backends=backends,
            balancer=balancer or make_balancer(kind),
            slow_start=settings.loadbalancing.slow_start,
        )
        if balancer is not None:
            pool.refresh()
        return pool

    def _use_access_log(self, server: ProxyServer, access: AccessLog | None) -> None:
        """Make `access` the running access log; flush and close the one it replaces."""
        switch((self, server), access)

    def reopen_logs(self) -> None:
        if self.access is not None and self.access.path is not None:
            self.access.reopen()

    # --- passive health -----------------------------------------------------------------------

    def _passive(self, backend: Backend, ok: bool) -> None:
        """ProxyServer.passive: a request failed at `backend` (ok false) or it answered one
        after failures (ok true). Sent at the end of this event-loop iteration, the news of
        the iteration in one message, in order (doproxy.workers, Fleet._passive)."""
        settings = self.settings
        if settings is not None and not settings.passive_health.consecutive_failures:
            return  # passive health is off: nobody keeps runs
        if not self._news:
            asyncio.get_running_loop().call_soon(self._send_news)
        self._news.append([backend.key, backend.entry.server_host, ok])

    def _send_news(self) -> None:
        if self._news:
            self.channel.send({"type": "passive", "events": self._news})
            self._news = []

    def _failing(self, keys: list[list[str]]) -> None:
        """A run of failures opened at these backends on another worker: this worker's next
        success at one of them ends it, and is news for the main process."""
        server = self.server
        if server is None or self.draining:
            return
        wanted = {(key, host) for key, host in keys}
        for b in server.pool.backends:
            if (b.key, b.entry.server_host) in wanted and not b.passive_failures:
                b.passive_failures = 1

    # --- reporting --------------------------------------------------------------------------

    async def _report_every(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY)
            self.report()

    def report(self) -> None:
        server = self.server
        if server is None:
            return
        # News first: what a report counts never reaches the main process before it.
        self._send_news()
        now = _server_counters(server)
        sent = self._sent_server
        counters: dict[str, Any] = {name: now[name] - sent[name] for name in _SERVER_COUNTERS}
        for name in _SERVER_LISTS:
            counters[name] = [a - b for a, b in zip(now[name], sent[name], strict=True)]
        self._sent_server = now
        rows = []
        seen: dict[Backend, tuple[Any, ...]] = {}
        for b in server.pool.backends:
            totals = tuple(getattr(b, name) for name in _BACKEND_COUNTERS)
            responses = tuple(b.responses)
            before = self._sent.get(b)
            if before is None:
                # First report of a new Backend object: all it counted is new.
                before = (0,) * len(totals) + ((0,) * len(responses),)
            deltas = [a - z for a, z in zip(totals, before[: len(totals)], strict=True)]
            new_responses = [a - z for a, z in zip(responses, before[-1], strict=True)]
            samples = b.samples
            b.samples = []
            if len(samples) > SAMPLES_PER_REPORT:
                samples = self._rng.sample(samples, SAMPLES_PER_REPORT)
            seen[b] = (*totals, responses)
            rows.append([b.key, b.entry.server_host, deltas, new_responses, b.in_flight, samples])
        self._sent = seen
        self.channel.send(
            {
                "type": "report",
                "generation": self.generation,
                "server": counters,
                "connections": len(server.connections),
                "backends": rows,
            }
        )

    # --- draining ---------------------------------------------------------------------------

    async def drain(self, grace: float | None, close_idle: bool) -> None:
        if self.draining:
            return
        self.draining = True
        server = self.server
        if server is not None:
            log.info("worker %d draining (pid %d)", self.slot, os.getpid())
            await server.shutdown(grace, close_idle=close_idle)
            if self._reporter is not None:
                self._reporter.cancel()
            self.report()  # the last counts, before the channel closes
            self._use_access_log(server, None)
        await self._flush_channel()
        self.done.set()

    async def _flush_channel(self, within: float = 2.0) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while self.channel._out and not self.channel.closed:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)


def _server_counters(server: ProxyServer) -> dict[str, Any]:
    out: dict[str, Any] = {name: getattr(server, name) for name in _SERVER_COUNTERS}
    for name in _SERVER_LISTS:
        out[name] = list(getattr(server, name))
    return out


async def serve(fd: int) -> None:
    worker = WorkerProcess(socket.socket(fileno=fd))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(
        signal.SIGTERM, lambda: worker.inbox.put_nowait(({"type": "drain"}, []))
    )
    loop.add_signal_handler(signal.SIGUSR1, worker.reopen_logs)
    await worker.run()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    fd = int(args[0])
    level = args[1] if len(args) > 1 else "INFO"
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s worker-{os.getpid()} %(name)s: %(message)s",
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        uvloop.run(serve(fd))
    except DoproxyError as e:
        log.error("worker cannot serve: %s", e)
        sys.exit(1)


if __name__ == "__main__":
    main()
