"""The retry budget: retries may add at most a fraction of the traffic, so they cannot
multiply an outage. Pure: time comes in as an argument.

Every request deposits `ratio` of a token (up to a cap); every retry withdraws a whole one.
A minimum rate keeps a quiet proxy able to retry: tokens also accrue at `min_per_second`.
With ratio 0.2, retries can be at most about 20 % of recent requests, plus the minimum.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RetryBudget:
    ratio: float = 0.2
    min_per_second: float = 10.0
    cap: float = 100.0
    tokens: float = 0.0
    stamp: float | None = None

    def deposit(self) -> None:
        """One request was made."""
        t = self.tokens + self.ratio
        self.tokens = t if t < self.cap else self.cap

    def withdraw(self, now: float) -> bool:
        """May one more retry be made now? Takes the token when it may."""
        if self.stamp is not None:
            self.tokens = min(
                self.tokens + self.min_per_second * max(now - self.stamp, 0.0), self.cap
            )
        else:
            self.tokens = min(self.tokens + self.min_per_second, self.cap)
        self.stamp = now
        if self.tokens >= 1.0 - 1e-9:  # 5 deposits of 0.2 make a token, despite rounding
            self.tokens -= 1.0
            return True
        return False
