"""A backend as the data plane sees it, and the pool: who may take traffic, dialling, ejection.

The idle pool is LIFO: the most recently used connection is the warmest (its TCP window is open
and the backend has not timed it out yet), and the cold ones at the bottom age out through the
idle timeout sweep. A connection goes back onto its backend's idle stack itself
(UpstreamConnection.release): only it knows when it is clean, and that runs on every request,
in the compiled group. This module knows connections only as `Pooled`: it sits below both
sides of an exchange (client and upstream), which are the only modules that refer to each
other. It is compiled with them (doproxy/_compiled.py): every response adds to its backend's
counters, which compiled code reads and writes as native attributes only when Backend is
compiled too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from doproxy.core.balancers import (
    RAMP_STEPS,
    Balancer,
    LeastLatency,
    canary_shares,
    combined,
    ramp_step,
)
from doproxy.core.health import Health, ejection_duration, may_eject
from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import PassiveHealth
from doproxy.core.stats import PeakEwma
from doproxy.errors import BadGateway, ClientError, GatewayTimeout

log = logging.getLogger(__name__)


class Pooled(Protocol):
    """What the pool needs of a backend connection in an idle stack (UpstreamConnection)."""

    closed: bool
    idle_since: float

    def close(self) -> None: ...


PEAK_EWMA_TAU = 10.0  # seconds; how fast a backend that turned fast earns its traffic back


class Backend:
    """Runtime state of one backend. Counters are plain integers, aggregated elsewhere."""

    __slots__ = (
        "connections",
        "ejected_until",
        "ejections",
        "eligible_since",
        "entry",
        "failure_rate",
        "failures",
        "health",
        "host",
        "host_header",
        "idle",
        "in_flight",
        "key",
        "latency",
        "latency_sum",
        "name",
        "passive_failures",
        "port",
        "protocol_errors",
        "requests",
        "responses",
        "samples",
    )

    def __init__(self, entry: InventoryEntry) -> None:
        self.entry = entry
        self.key = entry.key
        self.name = entry.name or entry.server_host
        self.host, self.port = entry.address()
        self.host_header = entry.server_host.encode()
        self.idle: list[Pooled] = []
        self.in_flight = 0
        self.requests = 0
        # Responses sent to clients for this backend, by status class: index status // 100
        # (1..5; a 3-digit status above 599 lands in 6..9, nothing in 0). A list indexed
        # directly costs the request path one index and one increment, and the metrics read
        # it at scrape time (doproxy.metrics).
        self.responses = [0] * 10
        # Each request's latency since the statistics' last tick (doproxy.statistics folds
        # them into this backend's p95 and the pool's): one append per request.
        self.samples: list[float] = []
        self.failures = 0
        self.protocol_errors = 0  # responses that broke HTTP (or bytes that belong to none)
        self.latency_sum = 0.0
        self.connections = 0  # connections ever opened (tests count keep-alive reuse with it)
        # Per-request peak-EWMA latency, kept only when the balancer uses it (leastlatency).
        self.latency = PeakEwma(tau=PEAK_EWMA_TAU)
        self.failure_rate = 0.0
        self.health = Health()  # fed by the health checker; stays UP when nobody checks
        # Passive health: real requests failing in a row, and the ejection they caused. In a
        # worker process (workers = N) the run is kept by the main process: there, not 0 means
        # that the backend's next success is news to send it (ProxyState.backend_ok).
        self.passive_failures = 0
        self.ejected_until = 0.0  # clock time the current ejection ends; 0 when not ejected
        self.ejections = 0
        # Clock time it last became eligible (slow start ramps from it); None while it is not.
        # Kept on the backend, so a reload or an inventory change does not restart a ramp.
        self.eligible_since: float | None = None

    @property
    def weight(self) -> int:
        return self.entry.weight

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, {self.host}:{self.port})"


@dataclass
class Pool:
    """One config snapshot's view of the backends: who is eligible, and who picks among them."""

    backends: list[Backend]
    balancer: Balancer
    eligible: list[Backend] = field(default_factory=list)
    observe_latency: bool = False  # feed each request's latency to Backend.latency
    slow_start: float = 0.0  # seconds; 0 = a backend gets its full share at once
    # True for the pool built at start-up: its backends were not "just added" (HAProxy does
    # not slow-start servers at boot either), so they start at full weight.
    warm: bool = False
    clock: Callable[[], float] = time.monotonic
    # When the next slow-start step is due (the control plane calls refresh() then); inf when
    # no backend is ramping.
    ramp_due: float = float("inf")

    def __post_init__(self) -> None:
        self.refresh()
        self.observe_latency = isinstance(self.balancer, LeastLatency)

    def refresh(self) -> None:
        """Recompute who may take traffic: active in the inventory, healthy, not ejected; note
        when each became eligible, and hand the balancer the list and the slow-start ramp."""
        now = self.clock()
        eligible = []
        for b in self.backends:
            if b.entry.state == "active" and b.health.up and not b.ejected_until:
                eligible.append(b)
                if b.eligible_since is None:
                    b.eligible_since = float("-inf") if self.warm else now
            else:
                b.eligible_since = None
        self.warm = False
        ramp: list[int] | None = None
        due = float("inf")
        ss = self.slow_start
        if ss > 0:
            steps = []
            for b in eligible:
                since = b.eligible_since
                assert since is not None
                step = ramp_step(now - since, ss)
                steps.append(step)
                if step < RAMP_STEPS:
                    due = min(due, since + (step + 1) * ss / RAMP_STEPS)
            if due != float("inf"):
                ramp = steps
        self.ramp_due = due
        self.eligible = eligible
        if any(b.entry.canary_weight for b in eligible):
            # A rollout's canary takes its percent of the traffic (doproxy.rollout).
            ramp = combined(ramp, canary_shares([b.entry.canary_weight for b in eligible]))
        self.balancer.update(eligible, ramp)

    # --- passive health ---------------------------------------------------------------------

    def eject_after_failure(self, backend: Backend, ph: PassiveHealth) -> bool:
        """A real request failed at `backend` (connect failure, reset, timeout or 5xx): count
        it, and eject the backend after `ph.consecutive_failures` in a row, unless that would
        eject more than `ph.max-ejection-percent` of the pool. True when it ejected it."""
        backend.passive_failures += 1
        if (
            not ph.consecutive_failures
            or backend.passive_failures < ph.consecutive_failures
            or backend.ejected_until
        ):
            return False
        ejected = sum(1 for b in self.backends if b.ejected_until)
        if not may_eject(ejected, len(self.backends), ph.max_ejection_percent):
            return False
        duration = ejection_duration(ph.ejection_time, backend.ejections, ph.max_ejection_time)
        backend.ejected_until = self.clock() + duration
        backend.ejections += 1
        backend.passive_failures = 0
        log.warning(
            "backend %s ejected for %.0fs after %d failed requests in a row; check it "
            "(it gets traffic again after that)",
            backend.name,
            duration,
            ph.consecutive_failures,
        )
        self.refresh()
        return True

    def end_ejections(self, now: float) -> None:
        """Give back their traffic to the backends whose ejection is over."""
        ended = False
        for b in self.backends:
            if b.ejected_until and now >= b.ejected_until:
                b.ejected_until = 0.0
                ended = True
                log.info("backend %s returns after its ejection", b.name)
        if ended:
            self.refresh()

    # --- dialling ---------------------------------------------------------------------------

    def dial(
        self,
        backend: Backend,
        timeout: float,
        factory: Callable[[], asyncio.Protocol],
        done: Callable[[asyncio.Protocol | None, ClientError | None], None],
    ) -> asyncio.Task[None]:
        """Open a connection to `backend` with the protocol `factory` makes, within `timeout`;
        then call `done` with the protocol, or with the error to answer (504 for a timeout,
        502 when refused or unreachable)."""
        return asyncio.get_running_loop().create_task(_dial(backend, timeout, factory, done))


async def _dial(
    backend: Backend,
    limit: float,
    factory: Callable[[], asyncio.Protocol],
    done: Callable[[asyncio.Protocol | None, ClientError | None], None],
) -> None:
    err: ClientError | None = None
    proto: asyncio.Protocol | None = None
    try:
        async with asyncio.timeout(limit):
            _, proto = await asyncio.get_running_loop().create_connection(
                factory, backend.host, backend.port
            )
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
    done(proto, err)
