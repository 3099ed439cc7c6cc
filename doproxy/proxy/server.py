"""The listener: listening sockets, the sweep of deadlines, shutdown.

Theory of operation
-------------------
`ProxyServer` owns the listening sockets and one periodic
sweep (every `SWEEP_INTERVAL`) that enforces every deadline and closes backend connections idle
for longer than `upstream-idle`. One sweep instead of a timer per request keeps per-request work
at a few attribute writes; the price is that timeouts fire up to one interval late.

What its connections share (settings, the pool, the counters, the set of live client
connections) is its base class, state.ProxyState, which sits below client and upstream.
The backend pool (`Pool`) is an immutable snapshot swapped as a whole on reload; each new client
connection takes the snapshot current at accept time, so one request never sees half a reload.

Shutdown: stop accepting, close idle keep-alive connections, let in-flight exchanges finish
(their responses carry `Connection: close`), and abort whatever is left after the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any, Final, cast

from doproxy.core.settings import Settings, parse_bind
from doproxy.proxy.backend import Pool
from doproxy.proxy.client import TEARDOWN_ABORT, ClientConnection
from doproxy.proxy.state import ConnectionTerms, ProxyState

log = logging.getLogger(__name__)

SWEEP_INTERVAL: Final = 0.1
# Linux can turn off a socket's quick ACKs (TCP_QUICKACK); see listen().
_CAN_DELAY_ACKS: Final = hasattr(socket, "TCP_QUICKACK")
# Latency samples the backends keep between two statistics ticks, all together: a cap that
# only matters when nobody collects them (no statistics running).
_MAX_SAMPLES: Final = 200_000


class ProxyServer(ProxyState):
    def __init__(
        self,
        settings: Settings,
        pool: Pool,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(settings, pool, ssl_context is not None)
        self.ssl_context = ssl_context
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None

    # --- listening --------------------------------------------------------------------------

    async def listen(
        self,
        bind: str | None = None,
        *,
        sock: socket.socket | None = None,
        start_serving: bool = True,
    ) -> None:
        """Start accepting on `bind` (doproxy's ":8000" form), by default the config's, or on
        `sock`, a listening socket opened elsewhere (a worker's, handed over by its main
        process or by the doproxy being upgraded). `start_serving=False` binds and holds the
        socket without accepting: the main process of several workers keeps the listeners
        open that way, so a worker that dies loses none (see doproxy.workers)."""
        # Each connection learns its listener's port from here (X-Forwarded-Port), not by
        # asking its socket: known once the listener is bound, before anything is accepted.
        port: list[bytes] = [b""]

        def accepted() -> ClientConnection:
            return ClientConnection(self, port[0])

        if sock is not None:
            server = await self.loop.create_server(
                accepted,
                sock=sock,
                ssl=self.ssl_context,
                backlog=1024,
                start_serving=start_serving,
            )
        else:
            host, number = parse_bind(bind or self.settings.bind)
            server = await self.loop.create_server(
                accepted,
                host=host,
                port=number,
                ssl=self.ssl_context,
                reuse_address=True,
                # Lets a reload open the new listener on the same port before closing the old.
                reuse_port=True,
                backlog=1024,
                start_serving=start_serving,
            )
        bound: Any = getattr(server, "sockets")  # noqa: B009 - see addresses
        # A request's ACK rides on its answer rather than in a segment of its own, as
        # HAProxy does on its HTTP listeners: each accepted connection inherits the
        # listener's delayed-ACK mode, so the kernel does not acknowledge a new
        # connection's first request at once (its quick-ACK start). One segment less per
        # new connection for both ends; with `Connection: close` traffic that was 12
        # segments per request against HAProxy's 11, and the load generator's CPU, not
        # the proxy's, is what limits that benchmark (docs/benchmarks.md, round 5).
        if _CAN_DELAY_ACKS:
            for s in bound:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
        if bound:
            port[0] = str(bound[0].getsockname()[1]).encode()
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep())

    def listening_sockets(self) -> list[list[socket.socket]]:
        """The listening sockets, one list per listener (an address of several families has
        several), for handing them to workers or to a new doproxy."""
        out = []
        for server in self._servers:
            sockets: Any = getattr(server, "sockets")  # noqa: B009 - see addresses
            out.append(list(sockets))
        return out

    def stop_accepting(self) -> None:
        """Close the listeners (another process may keep serving the same sockets)."""
        for server in self._servers:
            server.close()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        out = []
        for server in self._servers:
            # uvloop's servers give a list where typeshed says tuple, and the compiled module
            # checks declared types: read it untyped.
            sockets: Any = getattr(server, "sockets")  # noqa: B009
            for s in sockets:
                name = s.getsockname()
                out.append((name[0], name[1]))
        # Several listeners on one port (one per worker, SO_REUSEPORT) are one address.
        return list(dict.fromkeys(out))

    def _live(self) -> list[ClientConnection]:
        """The live client connections, as a list (closing one removes it from the set)."""
        # ProxyState keeps them as objects: it sits below client.py and cannot name the class.
        return [cast(ClientConnection, c) for c in self.connections]

    def set_pool(self, pool: Pool) -> None:
        self.pool = pool

    def set_settings(self, settings: Settings) -> None:
        """New connections use the new settings; open ones keep theirs until they close."""
        self.settings = settings
        self.terms = ConnectionTerms(settings)
        self.timeouts = settings.timeouts
        self.max_idle = settings.limits.max_idle_per_backend
        self.retry_budget.ratio = settings.retries.budget_percent / 100.0
        self.retry_budget.min_per_second = settings.retries.budget_min_per_second

    async def rebind(
        self,
        bind: str,
        ssl_context: ssl.SSLContext | None,
        *,
        socks: list[socket.socket] | None = None,
        listeners: int = 1,
        start_serving: bool = True,
    ) -> None:
        """Listen on `bind` with `ssl_context` instead: the new listener opens before the old
        ones close, so nothing is refused in between; open connections carry on. `socks`:
        serve these sockets instead of binding (a worker); `listeners`: how many listeners
        to bind on the same port (SO_REUSEPORT, one per worker)."""
        old = self._servers
        self._servers = []
        previous_ctx, previous_tls = self.ssl_context, self.tls
        self.ssl_context, self.tls = ssl_context, ssl_context is not None
        try:
            if socks is not None:
                for sock in socks:
                    await self.listen(sock=sock, start_serving=start_serving)
            else:
                await self.listen(bind, start_serving=start_serving)
                if listeners > 1:
                    # Port 0 picked a port for the first: the others share it.
                    host, _ = parse_bind(bind)
                    port = self.addresses[0][1]
                    for _ in range(listeners - 1):
                        await self.listen(f"{host or ''}:{port}", start_serving=start_serving)
        except BaseException:
            for server in self._servers:
                server.close()
            self._servers = old
            self.ssl_context, self.tls = previous_ctx, previous_tls
            raise
        for server in old:
            server.close()

    # --- deadlines --------------------------------------------------------------------------

    async def _sweep(self) -> None:
        idle_timeout = self.timeouts.upstream_idle
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = self.clock()
            for conn in self._live():
                kind = conn.deadline_kind
                if kind and conn.deadline <= now:
                    conn.on_deadline(kind)
                body = conn.body_deadline
                if body and body <= now and not conn.closed:
                    conn.on_body_deadline(now)
            self.pool.end_ejections(now)
            if now >= self.pool.ramp_due:  # a backend's slow start moved a step
                self.pool.refresh()
            backends = self.pool.backends
            most = _MAX_SAMPLES // max(len(backends), 1)
            for backend in backends:
                samples = backend.samples
                if len(samples) > most:  # nobody collects them (no statistics running)
                    del samples[: len(samples) - most // 2]
                idle = backend.idle
                # LIFO: the oldest idle connections sit at the bottom of the stack.
                while idle and now - idle[0].idle_since > idle_timeout:
                    idle.pop(0).close()

    # --- shutdown ---------------------------------------------------------------------------

    async def shutdown(self, grace: float | None = None, close_idle: bool = True) -> None:
        """Stop accepting, let in-flight exchanges finish within `grace`, then close.

        `close_idle=False` (an upgrade's or a worker's drain) keeps idle keep-alive
        connections open instead of closing them now: closing one races with a request the
        client is sending on it at that moment, which the client sees as a reset. Each one's
        next request is answered with `Connection: close`; what is still idle when the grace
        ends is closed then."""
        grace = self.timeouts.shutdown_grace if grace is None else grace
        self.draining = True
        for server in self._servers:
            server.close()
        # A connection accepted just before the close has its connection_made (which adds
        # it to self.connections) scheduled, not run: let it run, or it would be left out of
        # the wait below and cut when the process exits.
        for _ in range(2):
            await asyncio.sleep(0)
        if close_idle:
            for conn in self._live():
                conn.shutdown()
        if self.connections:
            try:
                async with asyncio.timeout(grace):
                    await self.all_closed.wait()
            except TimeoutError:
                pass
        live = self._live()
        lingering = {conn for conn in live if conn.closed}
        for conn in live:
            conn.shutdown()  # the idle ones close cleanly; the busy ones are aborted below
        busy = [conn for conn in self._live() if not conn.closed or conn in lingering]
        if busy:
            log.warning(
                "%d connection(s) still busy after the grace period: closing them (raise "
                "[timeouts] shutdown-grace to let long requests finish)",
                len(busy),
            )
        for conn in busy:
            conn.teardown(TEARDOWN_ABORT)
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self.dials):
            task.cancel()
        for backend in self.pool.backends:
            while backend.idle:
                backend.idle.pop().close()
        for server in self._servers:
            await server.wait_closed()


def make_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS 1.2 and 1.3 only, with Mozilla's "intermediate" cipher suite list for TLS 1.2."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
        "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
        "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
        "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
    )
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    # ALPN: we speak HTTP/1.1 only, so a client that offers h2 as well settles on http/1.1
    # in the handshake instead of guessing.
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(cert_file, key_file)
    return ctx
