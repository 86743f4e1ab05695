"""Rate limits and spend budgets of a remote runner: plain data, an injectable clock, no I/O.

``TokenBucket`` refills continuously at ``per_minute / 60`` a second up to
``per_minute`` (a full minute's allowance may burst). A request takes what it
needs at once and may drive the level below zero (a long prompt's tokens);
later requests then wait until it is positive again. That keeps a single
request larger than the whole allowance from waiting forever. A caller that
must wait takes before it sleeps (a reservation): the level then already
counts it, and the next caller's ``wait_s`` queues it behind, so waiters that
arrive together are admitted one refill apart.

``SpendLedger`` adds up estimated USD per clock hour and per UTC day. A
budget is spent once the window's total reaches it; the request that crosses
the line is already under way and is not cut off, so a window may overshoot by
at most one request's cost.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


class TokenBucket:
    """A per-minute allowance with continuous refill."""

    def __init__(self, per_minute: int, clock: Clock = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._level = self.capacity
        self._at = clock()

    def level(self) -> float:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._at) * self.rate)
        self._at = now
        return self._level

    def wait_s(self, amount: float) -> float:
        """Seconds until ``amount`` may be taken: 0 when the level is positive and covers it or the bucket is full."""
        level = self.level()
        need = min(amount, self.capacity)  # more than a full bucket: wait for a full bucket, then overdraw
        if level >= need:
            return 0.0
        return (need - level) / self.rate

    def take(self, amount: float) -> None:
        self.level()
        self._level -= amount

    def give_back(self, amount: float) -> None:
        """Return an over-estimate (the refill cap still applies)."""
        self._level = min(self.capacity, self.level() + amount)


@dataclass(frozen=True)
class BudgetRefusal:
    window: str  # "hour" | "day"
    limit_usd: float
    spent_usd: float
    resets_in_s: int


class SpendLedger:
    """Estimated spend per clock hour and UTC day against optional limits."""

    def __init__(self, per_hour: float | None, per_day: float | None, clock: Clock = time.time) -> None:
        self.per_hour = per_hour
        self.per_day = per_day
        self._clock = clock
        self._hour = (-1, 0.0)  # (hour index since the epoch, USD)
        self._day = (-1, 0.0)

    def _windows(self) -> tuple[float, float, float]:
        now = self._clock()
        hour, day = int(now // 3600), int(now // 86400)
        if self._hour[0] != hour:
            self._hour = (hour, 0.0)
        if self._day[0] != day:
            self._day = (day, 0.0)
        return now, self._hour[1], self._day[1]

    def spent(self) -> tuple[float, float]:
        """USD spent this hour and this day."""
        _, hour, day = self._windows()
        return hour, day

    def refusal(self) -> BudgetRefusal | None:
        """Why nothing more may be spent now, or None."""
        now, hour, day = self._windows()
        if self.per_day is not None and day >= self.per_day:
            return BudgetRefusal("day", self.per_day, day, int(86400 - now % 86400) + 1)
        if self.per_hour is not None and hour >= self.per_hour:
            return BudgetRefusal("hour", self.per_hour, hour, int(3600 - now % 3600) + 1)
        return None

    def with_limits(self, per_hour: float | None, per_day: float | None) -> SpendLedger:
        """The same spend so far against new limits (the spec changed)."""
        ledger = SpendLedger(per_hour, per_day, self._clock)
        ledger._hour, ledger._day = self._hour, self._day
        return ledger

    def add(self, usd: float) -> None:
        self._windows()
        self._hour = (self._hour[0], self._hour[1] + usd)
        self._day = (self._day[0], self._day[1] + usd)
