"""A backend as the data plane sees it: where to connect, its idle connection pool, its counters.

The idle pool is LIFO: the most recently used connection is the warmest (its TCP window is open
and the backend has not timed it out yet), and the cold ones at the bottom age out through the
idle timeout sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from doproxy.core.balancers import LeastConn, RoundRobin
from doproxy.core.inventory_model import InventoryEntry

if TYPE_CHECKING:
    from doproxy.proxy.upstream import UpstreamConnection


class Backend:
    """Runtime state of one backend. Counters are plain integers, aggregated elsewhere."""

    __slots__ = (
        "connections",
        "entry",
        "failures",
        "host",
        "host_header",
        "idle",
        "in_flight",
        "key",
        "latency_sum",
        "name",
        "port",
        "requests",
    )

    def __init__(self, entry: InventoryEntry) -> None:
        self.entry = entry
        self.key = entry.key
        self.name = entry.name or entry.server_host
        self.host, self.port = entry.address()
        self.host_header = entry.server_host.encode()
        self.idle: list[UpstreamConnection] = []
        self.in_flight = 0
        self.requests = 0
        self.failures = 0
        self.latency_sum = 0.0
        self.connections = 0  # connections ever opened (tests count keep-alive reuse with it)

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, {self.host}:{self.port})"


@dataclass
class Pool:
    """One config snapshot's view of the backends: who is eligible, and who picks among them."""

    backends: list[Backend]
    balancer: RoundRobin | LeastConn
    eligible: list[Backend] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.eligible:
            self.eligible = [b for b in self.backends if b.entry.state == "active"]
