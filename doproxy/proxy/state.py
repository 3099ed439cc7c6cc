"""What every connection of one proxy shares: settings, the pool, the counters the metrics read.

`ProxyState` is the part of the listener (server.ProxyServer, which adds listening, the sweep
and shutdown) that client and upstream connections see. It sits below them, so the only
modules of the data plane that refer to each other are client and upstream; it is compiled
with them, so a connection reads a counter or the current pool as a native attribute.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from doproxy.core.forwarding import IPNetwork
from doproxy.core.histogram import REQUEST_BOUNDS
from doproxy.core.http11 import ErrorPage
from doproxy.core.retry import RetryBudget
from doproxy.core.settings import Settings
from doproxy.proxy.backend import Backend, Pool

if TYPE_CHECKING:
    from doproxy.errors import ClientError
    from doproxy.proxy.access import AccessLog


class Waking(Protocol):
    """Scale to zero (doproxy.wake.Waker): what the connections ask of it."""

    def seen(self, head: bytes) -> None:
        """Every request's first try (a real one keeps the pool awake)."""
        ...

    def hold(self, conn: Any, ex: Any) -> ClientError | None:
        """No backend is eligible: hold the exchange (None) or the error to answer now. A
        held exchange is handed back through `conn.wake_done(ex, error or None)`."""
        ...


class ConnectionTerms:
    """What every new client connection takes from the settings, read once per settings.

    A connection used to read these from the pydantic models as it was made: some twenty
    attribute lookups through deep classes, a partition and a lower() per connection, which
    showed with `Connection: close` traffic (a connection per request). Native attributes of
    one object are a fraction of that.
    """

    def __init__(self, settings: Settings) -> None:
        limits = settings.limits
        self.max_url_bytes: int = limits.max_url_bytes
        self.max_header_bytes: int = limits.max_header_bytes
        self.max_response_head: int = limits.max_response_header_bytes
        self.max_header_count: int = limits.max_header_count
        self.max_body: int = limits.max_body_bytes
        self.access_log: bool = settings.access_log
        # hash-key = "header:NAME" / "cookie:NAME": which header to read per request.
        kind, _, name = settings.loadbalancing.hash_key.partition(":")
        self.hash_header: str = (
            "" if kind == "client-ip" else ("cookie" if kind == "cookie" else name.lower())
        )
        self.hash_cookie: bytes = name.encode() if kind == "cookie" else b""
        t = settings.timeouts
        self.t_header: float = t.client_header
        self.t_idle: float = t.keep_alive
        self.t_response: float = t.response_header
        self.t_body: float = t.client_body
        self.t_backend_read: float = t.backend_read
        self.t_client_write: float = t.client_write
        self.t_tunnel: float = t.tunnel_idle
        self.underscores: bool = settings.allow_underscores_in_headers
        self.trusted_nets: tuple[IPNetwork, ...] = settings.trusted_proxies
        self.proxy_protocol: bool = settings.proxy_protocol
        self.forwarded_header: str = settings.forwarded_header
        self.add_x_forwarded_for: bool = settings.add_x_forwarded_for
        self.via: bool = settings.via


class ProxyState:
    def __init__(self, settings: Settings, pool: Pool, tls: bool) -> None:
        self.settings = settings
        self.terms = ConnectionTerms(settings)
        self.timeouts = settings.timeouts
        self.pool = pool
        self.tls = tls
        self.loop = asyncio.get_running_loop()
        # The data plane's clock, for latencies and deadlines. Not loop.time(): uvloop's is
        # cached per loop iteration at millisecond resolution, too coarse to time a request.
        self.clock = time.monotonic
        # The client connections, as objects: their class (client.py) sits above this module.
        self.connections: set[object] = set()
        self.draining = False
        self.error_pages: dict[int, ErrorPage] = {}  # loaded by the runtime from [error-pages]
        # Where access lines go, set by the runtime when access-log is on. Read per line, so
        # a reload that turns the log off or moves it takes effect on open connections too.
        self.access: AccessLog | None = None
        # Set by the runtime when [provisioning] scale-to-zero is on; None costs one test.
        self.waker: Waking | None = None
        self.dials: set[asyncio.Task[None]] = set()  # connects in progress (shutdown cancels)
        self.all_closed = asyncio.Event()
        self.max_idle = settings.limits.max_idle_per_backend
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
        # The bounds as this compiled class's own list: read from core.histogram (not
        # compiled), mypyc unboxed the 14-float tuple and boxed it again for every bisect.
        self._duration_bounds: list[float] = list(REQUEST_BOUNDS)
        # Responses doproxy wrote itself with no backend to blame, by status class (index
        # status // 100): 503 with no backend available, 400/408/413/414/431/501 refusals.
        # A gateway error a backend caused (502, 504) counts under that backend instead.
        self.generated = [0] * 10
        # Passive ejections ever made: a total of the listener, so a backend leaving the pool
        # does not take its ejections out of the count (Backend.ejections does).
        self.ejections = 0
        # Where a worker process (doproxy.worker) sends its passive-health news, each failed
        # request and the first success after one, as (backend, ok): its main process keeps the
        # run of failures for every worker (doproxy.workers) and ejects. None: this process
        # keeps the runs and ejects itself.
        self.passive: Callable[[Backend, bool], None] | None = None
        # How many requests and responses took the express lanes (see client.py).
        self.express_requests = 0
        self.express_responses = 0

    def count_exchange(self, waited: float) -> None:
        """An exchange a backend finished or failed, `waited` seconds after its first dispatch:
        the autoscaler's totals and the metrics' duration histogram."""
        self.exchanges += 1
        self.exchange_time += waited
        # bisect_left by hand, from the lowest bound: most exchanges end in the first few
        # buckets, and a native loop costs a few instructions a step where bisect_left, called
        # from compiled code, costs a boxed float and a generic call.
        bounds = self._duration_bounds
        i = 0
        n = len(bounds)
        while i < n and bounds[i] < waited:
            i += 1
        self.durations[i] += 1

    def connection_closed(self, conn: object) -> None:
        self.connections.discard(conn)
        if self.draining and not self.connections:
            self.all_closed.set()

    def track_dial(self, task: asyncio.Task[None]) -> None:
        """Keep a connect in progress (Pool.dial) until it ends, so shutdown can cancel it."""
        self.dials.add(task)
        task.add_done_callback(self.dials.discard)

    def backend_failed(self, backend: Backend) -> None:
        """A real request failed at `backend` (connect failure, reset, timeout or 5xx)."""
        passive = self.passive
        if passive is not None:
            backend.passive_failures += 1  # nonzero: its next success is news too
            passive(backend, False)
        elif self.pool.eject_after_failure(backend, self.settings.passive_health):
            self.ejections += 1

    def backend_ok(self, backend: Backend) -> None:
        """`backend` answered a real request, after failures (a response calls this only when
        `backend.passive_failures` is not 0, so a healthy backend's responses cost one test):
        the run of failures is over."""
        backend.passive_failures = 0
        passive = self.passive
        if passive is not None:
            passive(backend, True)

    def error_body(self, status: int) -> ErrorPage | None:
        """The configured error page for `status`, if any ([error-pages])."""
        return self.error_pages.get(status)
