"""Scale to zero: holding requests while a sleeping pool wakes (docs/scale-to-zero.md).

Theory of operation
-------------------
With `[provisioning] scale-to-zero = true` the autoscaler retires every backend once no real
request came for `idle-after` (doproxy.core.autoscale: "sleep"). Requests are "real" unless
`wake-ignore` names them (doproxy.core.wake): uptime checkers must not keep a pool awake.

A request that finds no eligible backend is offered to the waker (`hold`) instead of getting
503 at once. The waker

- answers an ignored request 503 with Retry-After (it may not wake the pool);
- answers a browser's page navigation with a small page that reloads itself, when `wake-page`
  is on, and asks for a wake;
- answers 503 with Retry-After when `wake-queue` requests are already held;
- otherwise holds it: the client connection reads nothing more meanwhile (as while dialling),
  and the scaler is poked so its next decision ("wake": one machine, however many wait) comes
  at once instead of at its next interval.

Every 50 ms while requests are held it looks at the pool: once a backend is eligible (it
passed its health check), every held request is handed back to its connection, oldest first,
and goes its normal way. A request held for `wake-timeout` gets 503; the waker then reports the
wake as failed, and the scaler destroys the backend that did not become healthy (it is not
kept running, costing money, for nobody).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from doproxy.core.settings import Settings
from doproxy.core.wake import WakeRules, ignored, waiting_page, wants_html
from doproxy.errors import ClientError, ServiceUnavailable

if TYPE_CHECKING:
    from doproxy.proxy.backend import Backend, Pool

log = logging.getLogger(__name__)

SWEEP = 0.05  # seconds between looks at the pool while requests are held
PAGE_REFRESH = 5  # seconds: how often the waiting page reloads itself


class Waker:
    def __init__(
        self,
        settings: Settings,
        pool: Callable[[], Pool],
        poke: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.poke = poke  # asks the scaler for a decision now
        self.clock = clock
        self.configure(settings)
        self.last_real = clock()  # a pool starts awake: idle-after counts from the start
        self.held: list[tuple[Any, Any, float]] = []  # (connection, exchange, deadline)
        self.wanted_at: float | None = None  # a wake asked for without a held request
        self.failed_at: float | None = None  # a wake that ended with no healthy backend
        self.woken = 0  # held requests handed on to a backend
        self.timed_out = 0  # held requests answered 503 at wake-timeout
        self._sweeper: asyncio.Task[None] | None = None

    def configure(self, settings: Settings) -> None:
        self.settings = settings.provisioning
        self.rules = WakeRules.of(self.settings.wake_ignore)
        # A new backend counts as up until a check fails; a woken pool waits for a *passed*
        # check (unless checks are off), so held requests never meet a backend still booting.
        self.checked = not settings.backend.disable_health_check

    # --- called by the data plane ------------------------------------------------------------

    def seen(self, head: bytes) -> None:
        """Every request's first try: a real one keeps the pool awake."""
        if not ignored(head, self.rules):
            self.last_real = self.clock()

    def hold(self, conn: Any, ex: Any) -> ClientError | None:
        """No backend is eligible for `ex`: hold it (None), or the error to answer now."""
        s = self.settings
        awake = any(b.entry.state == "active" for b in self.pool().backends)
        if awake and not self.held and self.wanted_at is None:
            # Awake, with every backend in rotation down or ejected: an outage, not a sleep.
            # It is answered as without scale to zero (holding would only delay the 503, and a
            # "failed wake" would destroy machines that may recover). Backends only draining
            # or disabled (the pool going to sleep) do not make it awake: that request wakes it.
            return ServiceUnavailable("no backend available")
        if ignored(ex.head, self.rules):
            return ServiceUnavailable("asleep (wake-ignore)", retry_after=PAGE_REFRESH)
        now = self.clock()
        self.last_real = now
        if s.wake_page and wants_html(ex.head):
            self._want(now)
            return ServiceUnavailable(
                "waking (wake-page)", retry_after=PAGE_REFRESH, page=waiting_page(PAGE_REFRESH)
            )
        # Clients that went away while held leave no place taken (nor a reason to wake).
        self.held = [h for h in self.held if not h[0].closed]
        if len(self.held) >= s.wake_queue:
            return ServiceUnavailable(
                "waking, and wake-queue requests already wait", retry_after=PAGE_REFRESH
            )
        self.held.append((conn, ex, now + s.wake_timeout))
        self._want(now)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return None

    def _want(self, now: float) -> None:
        if self.wanted_at is None:
            log.info("scale to zero: a request arrived with no backend serving; waking the pool")
        self.wanted_at = now
        self.poke()

    # --- what the scaler reads ---------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Requests that want the pool awake now: those held, or 1 for a recent page view."""
        if self.held:
            return len(self.held)
        at = self.wanted_at
        return 1 if at is not None and self.clock() - at < self.settings.wake_timeout else 0

    def quiet_for(self) -> float:
        """Seconds since the last real request."""
        return max(self.clock() - self.last_real, 0.0)

    # --- handing held requests on ------------------------------------------------------------

    def ready(self, b: Backend) -> bool:
        return not self.checked or b.health.passes > 0

    async def _sweep(self) -> None:
        while self.held:
            await asyncio.sleep(SWEEP)
            self.release()

    def release(self) -> None:
        """Hand held requests on once a backend is eligible; 503 those whose time is up."""
        self.held = [h for h in self.held if not h[0].closed]
        if not self.held:
            return
        if any(self.ready(b) for b in self.pool().eligible):
            held, self.held = self.held, []
            self.wanted_at = None
            self.failed_at = None
            log.info("scale to zero: the pool is awake; %d held request(s) go on", len(held))
            for conn, ex, _ in held:
                self.woken += 1
                conn.wake_done(ex, None)
            return
        now = self.clock()
        late = [h for h in self.held if h[2] <= now]
        if not late:
            return
        self.held = [h for h in self.held if h[2] > now]
        self.failed_at = now
        if not self.held:
            self.wanted_at = None
        log.warning(
            "scale to zero: no backend became healthy within wake-timeout (%gs); %d held "
            "request(s) answered 503, and the backend that did not come up is destroyed. Check "
            "that new machines boot and pass their health check in time",
            self.settings.wake_timeout,
            len(late),
        )
        for conn, ex, _ in late:
            self.timed_out += 1
            conn.wake_done(
                ex,
                ServiceUnavailable(
                    "no backend became healthy within wake-timeout", retry_after=PAGE_REFRESH
                ),
            )

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        held, self.held = self.held, []
        for conn, ex, _ in held:
            conn.wake_done(ex, ServiceUnavailable("shutting down"))
