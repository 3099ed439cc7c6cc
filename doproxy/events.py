"""What happened to the pool, for people: a bounded ring of events with ids.

Health transitions, ejections, reloads (ok or failed, with the error), scaling decisions,
reconcile reports and membership changes are published here by the parts that cause them. The
admin API serves the ring (`GET /api/events?since=ID`) and streams it (`/api/events/stream`,
Server-Sent Events); the status page marks them on its time axis. Ids grow by one per event and
never repeat within a run, so a client that remembers the last id it saw asks for what is new,
and one that fell behind the ring's size learns it from the first id it gets.

The ring is memory only: the autoscaler's own journal (doproxy.journal) is what survives a
restart. Counts per kind and outcome are kept beside the ring for the metrics (a count is not
lost when its event leaves the ring).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal[
    "health", "ejection", "reload", "scaling", "reconcile", "membership", "autoscaler", "rollout"
]
Level = Literal["info", "warning", "error"]


@dataclass(frozen=True)
class Event:
    id: int
    time: float  # seconds since the epoch
    kind: Kind
    message: str  # one line for a person, e.g. "web-1 is down: connection refused"
    level: Level = "info"
    data: dict[str, Any] = field(default_factory=dict)  # for programs: backend, result, ...

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time,
            "kind": self.kind,
            "level": self.level,
            "message": self.message,
            **({"data": self.data} if self.data else {}),
        }


class EventLog:
    def __init__(self, size: int = 1000, clock: Callable[[], float] = time.time) -> None:
        self.ring: deque[Event] = deque(maxlen=max(size, 1))
        self.clock = clock
        self.last_id = 0
        # (kind, outcome) -> events ever published; outcome is data["result"] or "".
        self.counts: Counter[tuple[str, str]] = Counter()
        self._waiters: set[asyncio.Future[None]] = set()

    def publish(self, kind: Kind, message: str, level: Level = "info", **data: Any) -> Event:
        self.last_id += 1
        event = Event(self.last_id, self.clock(), kind, message, level, data)
        self.ring.append(event)
        self.counts[kind, str(data.get("result", ""))] += 1
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()
        return event

    def since(self, after: int, limit: int | None = None) -> list[Event]:
        """The events with an id above `after`, oldest first (at most `limit`, the newest)."""
        out = [e for e in self.ring if e.id > after]
        return out[-limit:] if limit else out

    async def wait(self, after: int) -> list[Event]:
        """The events after `after`; waits for one when there is none (bound it with
        asyncio.timeout: a timeout returns nothing new)."""
        found = self.since(after)
        if found:
            return found
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)
        return self.since(after)
