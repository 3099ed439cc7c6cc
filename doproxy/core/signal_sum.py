"""The cluster's latency/traffic signal: the sum of what every node publishes (pure).

Each node publishes running totals (exchanges, and the seconds users waited for response
heads) that never go back while it runs. The leader's scaler wants totals for the whole
cluster that never go back either, although nodes come and go: a node that stops publishing
drops out (its lease lapsed), a new one joins, a restarted one starts from zero. So the sum
is kept as increments: for each node seen in two readings in a row, what it added since (a
node whose totals went down restarted: its new totals are what it added); a node seen for the
first time adds nothing yet (its history before is not this scaler's to count).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SignalSum:
    exchanges: int = 0
    wait: float = 0.0
    _last: dict[str, tuple[int, float]] = field(default_factory=dict)

    def update(self, readings: dict[str, tuple[int, float]]) -> tuple[int, float]:
        """Fold in the nodes' latest totals, {node: (exchanges, wait)}; returns the sum."""
        for node, (n, w) in readings.items():
            last = self._last.get(node)
            if last is None:
                continue
            if n < last[0] or w < last[1]:  # restarted: counting from zero again
                self.exchanges += n
                self.wait += w
            else:
                self.exchanges += n - last[0]
                self.wait += w - last[1]
        self._last = dict(readings)
        return self.exchanges, self.wait
