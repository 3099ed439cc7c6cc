"""The listener and everything shared by all client connections of one proxy.

Theory of operation
-------------------
`ProxyServer` owns the listening sockets, the set of live client connections, and one periodic
sweep (every `SWEEP_INTERVAL`) that enforces every deadline and closes backend connections idle
for longer than `upstream-idle`. One sweep instead of a timer per request keeps per-request work
at a few attribute writes; the price is that timeouts fire up to one interval late.

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
import time
from typing import TYPE_CHECKING, Any, Final

from doproxy.core.health import ejection_duration, may_eject
from doproxy.core.histogram import REQUEST_BOUNDS
from doproxy.core.http_rules import ErrorPage
from doproxy.core.retry import RetryBudget
from doproxy.core.settings import Settings, parse_bind
from doproxy.errors import BadGateway, ClientError, GatewayTimeout
from doproxy.proxy.backend import Backend, Pool
from doproxy.proxy.client import ClientConnection, Exchange, flush_writes
from doproxy.proxy.upstream import UpstreamConnection

if TYPE_CHECKING:
    from doproxy.proxy.access import AccessLog

log = logging.getLogger(__name__)

SWEEP_INTERVAL: Final = 0.1
# Latency samples the backends keep between two statistics ticks, all together: a cap that
# only matters when nobody collects them (no statistics running).
_MAX_SAMPLES: Final = 200_000


class ProxyServer:
    def __init__(
        self,
        settings: Settings,
        pool: Pool,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.timeouts = settings.timeouts
        self.pool = pool
        self.ssl_context = ssl_context
        self.tls = ssl_context is not None
        self.loop = asyncio.get_running_loop()
        # The data plane's clock, for latencies and deadlines. Not loop.time(): uvloop's is
        # cached per loop iteration at millisecond resolution, too coarse to time a request.
        self.clock = time.monotonic
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self.error_pages: dict[int, ErrorPage] = {}  # loaded by the runtime from [error-pages]
        # Where access lines go, set by the runtime when access-log is on. Read per line, so
        # a reload that turns the log off or moves it takes effect on open connections too.
        self.access: AccessLog | None = None
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._dials: set[asyncio.Task[None]] = set()
        self._all_closed = asyncio.Event()
        self._max_idle = settings.limits.max_idle_per_backend
        retries = settings.retries
        self.retry_budget = RetryBudget(
            ratio=retries.budget_percent / 100.0, min_per_second=retries.budget_min_per_second
        )
        self.retried = 0  # requests redispatched to another backend
        # What the autoscaler reads: exchanges finished or failed by a backend, and the time
        # users waited for their response heads. Totals of the listener, so a backend leaving
        # the pool (or a reload) never makes them go back.
        self.exchanges = 0
        self.exchange_time = 0.0
        # The same exchanges' durations in fixed buckets (core.histogram.REQUEST_BOUNDS, +Inf
        # last): its count is `exchanges` and its sum `exchange_time`, so each exchange adds
        # one bisect and one increment (doproxy.metrics reads them as a histogram).
        self.durations = [0] * (len(REQUEST_BOUNDS) + 1)
        # Responses doproxy wrote itself with no backend to blame, by status class (index
        # status // 100): 503 with no backend available, 400/408/413/414/431/501 refusals.
        # A gateway error a backend caused (502, 504) counts under that backend instead.
        self.generated = [0] * 10
        # Passive ejections ever made: a total of the listener, so a backend leaving the pool
        # does not take its ejections out of the count (Backend.ejections does).
        self.ejections = 0
        # How many requests and responses took the express lanes (see client.py).
        self.express_requests = 0
        self.express_responses = 0

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
        if sock is not None:
            server = await self.loop.create_server(
                self._new_connection,
                sock=sock,
                ssl=self.ssl_context,
                backlog=1024,
                start_serving=start_serving,
            )
        else:
            host, port = parse_bind(bind or self.settings.bind)
            server = await self.loop.create_server(
                self._new_connection,
                host=host,
                port=port,
                ssl=self.ssl_context,
                reuse_address=True,
                # Lets a reload open the new listener on the same port before closing the old.
                reuse_port=True,
                backlog=1024,
                start_serving=start_serving,
            )
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

    def _new_connection(self) -> ClientConnection:
        return ClientConnection(self)

    def connection_closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if self.draining and not self.connections:
            self._all_closed.set()

    def set_pool(self, pool: Pool) -> None:
        self.pool = pool

    def set_settings(self, settings: Settings) -> None:
        """New connections use the new settings; open ones keep theirs until they close."""
        self.settings = settings
        self.timeouts = settings.timeouts
        self._max_idle = settings.limits.max_idle_per_backend
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

    # --- upstream connections ---------------------------------------------------------------

    def dial(self, backend: Backend, client: ClientConnection, ex: Exchange) -> None:
        task = self.loop.create_task(self._dial(backend, client, ex))
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)

    async def _dial(self, backend: Backend, client: ClientConnection, ex: Exchange) -> None:
        err: ClientError | None = None
        up: UpstreamConnection | None = None
        try:
            async with asyncio.timeout(self.settings.backend.dial_timeout):
                _, proto = await self.loop.create_connection(
                    lambda: UpstreamConnection(backend), backend.host, backend.port
                )
            up = proto
        except TimeoutError:
            log.warning(
                "backend %s: connect timed out; check that it is up and reachable, or raise "
                "[backend] dial-timeout",
                backend,
            )
            err = GatewayTimeout("backend connect timed out")
        except OSError as e:
            log.warning(
                "backend %s: cannot connect: %s; check that it runs and listens at its server-host",
                backend,
                e.strerror or e,
            )
            err = BadGateway("backend unreachable")
        client.dial_done(ex, up, err)

    def release(self, up: UpstreamConnection, now: float | None = None) -> None:
        """Return a healthy keep-alive connection to its backend's idle pool (LIFO), once it is
        clean: called from inside the parser, the pooling waits until the parser has seen
        every byte of the read (see upstream.py)."""
        if up.closed:
            return
        if up.feeding:
            up.release_to = self
            return
        up.reset_for_reuse()
        idle = up.backend.idle
        if len(idle) >= self._max_idle:
            up.close()
            return
        up.idle_since = self.clock() if now is None else now
        idle.append(up)

    # --- passive health ---------------------------------------------------------------------

    def backend_failed(self, backend: Backend) -> None:
        """A real request failed at `backend` (connect failure, reset, timeout or 5xx)."""
        backend.passive_failures += 1
        ph = self.settings.passive_health
        if (
            ph.consecutive_failures
            and backend.passive_failures >= ph.consecutive_failures
            and not backend.ejected_until
        ):
            pool = self.pool
            ejected = sum(1 for b in pool.backends if b.ejected_until)
            if not may_eject(ejected, len(pool.backends), ph.max_ejection_percent):
                return
            duration = ejection_duration(ph.ejection_time, backend.ejections, ph.max_ejection_time)
            backend.ejected_until = self.clock() + duration
            backend.ejections += 1
            self.ejections += 1
            backend.passive_failures = 0
            log.warning(
                "backend %s ejected for %.0fs after %d failed requests in a row; check it "
                "(it gets traffic again after that)",
                backend.name,
                duration,
                ph.consecutive_failures,
            )
            pool.refresh()

    def _end_ejections(self, now: float) -> None:
        pool = self.pool
        ended = False
        for b in pool.backends:
            if b.ejected_until and now >= b.ejected_until:
                b.ejected_until = 0.0
                ended = True
                log.info("backend %s returns after its ejection", b.name)
        if ended:
            pool.refresh()

    # --- deadlines --------------------------------------------------------------------------

    async def _sweep(self) -> None:
        idle_timeout = self.timeouts.upstream_idle
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = self.clock()
            for conn in list(self.connections):
                kind = conn.deadline_kind
                if kind and conn.deadline <= now:
                    conn.on_deadline(kind)
                body = conn.body_deadline
                if body and body <= now and not conn.closed:
                    conn.on_body_deadline(now)
            self._end_ejections(now)
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
            for conn in list(self.connections):
                conn.shutdown()
        if self.connections:
            try:
                async with asyncio.timeout(grace):
                    await self._all_closed.wait()
            except TimeoutError:
                pass
        lingering = {conn for conn in self.connections if conn.closed}
        for conn in list(self.connections):
            conn.shutdown()  # the idle ones close cleanly; the busy ones are aborted below
        busy = [conn for conn in self.connections if not conn.closed or conn in lingering]
        if busy:
            log.warning(
                "%d connection(s) still busy after the grace period: closing them (raise "
                "[timeouts] shutdown-grace to let long requests finish)",
                len(busy),
            )
        for conn in busy:
            if conn.transport is not None:
                flush_writes()
                conn.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._dials):
            task.cancel()
        for backend in self.pool.backends:
            while backend.idle:
                backend.idle.pop().close()
        for server in self._servers:
            await server.wait_closed()

    def error_body(self, status: int) -> ErrorPage | None:
        """The configured error page for `status`, if any ([error-pages])."""
        return self.error_pages.get(status)


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
