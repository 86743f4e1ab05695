"""Per-key limits of the gateway: requests per minute, tokens per minute, concurrent requests.

Both per-minute limits are token buckets: a bucket holds up to one minute's
allowance and refills continuously (``limit / 60`` per second), so a key may
burst its whole minute at once and then runs at the steady rate.

Tokens are charged up front, before the answer exists: an estimate of the
prompt (the request body's bytes / 4) plus the request's ``max_tokens`` (or
``max_completion_tokens``; ``DEFAULT_COMPLETION_ESTIMATE`` when it sets none).
When the answer reports its ``usage``, the difference between the estimate and
``prompt_tokens + completion_tokens`` goes back into the bucket (or is taken
out of it: the level may go below zero, and the next request waits). A
request whose estimate is larger than the whole bucket is admitted only with a
full bucket, so a large ``max_tokens`` is slowed down, never refused forever.

Every check is a few float operations on an injected clock (``time.monotonic``
in the gateway; a fake clock in the tests): no I/O, no lock (one event loop).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

Clock = Callable[[], float]

DEFAULT_COMPLETION_ESTIMATE = 256  # tokens charged for a chat request that sets no max_tokens
BYTES_PER_TOKEN = 4  # the prompt estimate: request body bytes / 4 (English text runs ~4 bytes a token)


class Limit(StrEnum):
    """Which limit refused a request (also the ``reason`` label of the refusal metric)."""

    REQUESTS = "requests_per_minute"
    TOKENS = "tokens_per_minute"
    CONCURRENCY = "max_concurrent"


@dataclass(frozen=True)
class KeyLimits:
    """A key's limits; None: unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None


@dataclass(frozen=True)
class Refusal:
    limit: Limit
    allowed: int  # the configured limit, for the message
    retry_after_s: float

    def retry_after_header(self) -> str:
        """Whole seconds, at least 1 (what Retry-After carries)."""
        return str(max(1, math.ceil(self.retry_after_s)))


class TokenBucket:
    """Holds up to ``per_minute``, refilled at ``per_minute / 60`` a second."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` (at most a full bucket) is there; 0.0: now."""
        self.refill(now)
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def add(self, amount: float) -> None:
        """Credit (positive) or charge (negative) ``amount``; never above the capacity."""
        self.level = min(self.capacity, self.level + amount)

    def resize(self, per_minute: int, now: float) -> None:
        """A reloaded limit: the new size, keeping what was used of the old one."""
        self.refill(now)
        used = self.capacity - self.level
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity - used


class KeyLimiter:
    """The limits of one key and its live state (buckets, requests in flight)."""

    __slots__ = ("clock", "in_flight", "limits", "requests", "tokens")

    def __init__(self, limits: KeyLimits, clock: Clock) -> None:
        self.clock = clock
        self.in_flight = 0
        self.limits = limits
        now = clock()
        self.requests = TokenBucket(limits.requests_per_minute, now) if limits.requests_per_minute else None
        self.tokens = TokenBucket(limits.tokens_per_minute, now) if limits.tokens_per_minute else None

    def update(self, limits: KeyLimits) -> None:
        """New limits from a reloaded key file; what the key used so far still counts."""
        if limits == self.limits:
            return
        now = self.clock()
        self.requests = _resized(self.requests, limits.requests_per_minute, now)
        self.tokens = _resized(self.tokens, limits.tokens_per_minute, now)
        self.limits = limits

    def acquire(self, tokens: int) -> Refusal | None:
        """Admit one request estimated at ``tokens``, or say which limit refuses it (nothing charged then)."""
        limits = self.limits
        if limits.max_concurrent is not None and self.in_flight >= limits.max_concurrent:
            return Refusal(Limit.CONCURRENCY, limits.max_concurrent, 1.0)
        if self.requests is not None or self.tokens is not None:
            now = self.clock()
            if self.requests is not None and (wait := self.requests.wait_s(1, now)) > 0:
                return Refusal(Limit.REQUESTS, int(self.requests.capacity), wait)
            if self.tokens is not None and (wait := self.tokens.wait_s(tokens, now)) > 0:
                return Refusal(Limit.TOKENS, int(self.tokens.capacity), wait)
            if self.requests is not None:
                self.requests.add(-1)
            if self.tokens is not None:
                self.tokens.add(-tokens)
        self.in_flight += 1
        return None

    def correct(self, charged: int, used: int) -> None:
        """The answer's usage is known: give back (or take) the difference to the estimate."""
        if self.tokens is not None:
            self.tokens.add(charged - used)

    def release(self) -> None:
        self.in_flight -= 1


def _resized(bucket: TokenBucket | None, per_minute: int | None, now: float) -> TokenBucket | None:
    if not per_minute:
        return None
    if bucket is None:
        return TokenBucket(per_minute, now)
    bucket.resize(per_minute, now)
    return bucket


def estimate_tokens(body_bytes: int, completion_limit: int | None, samples: bool) -> int:
    """The up-front charge: the prompt from the body size, plus the completion the request allows.

    ``samples``: a chat or text completion (embeddings and rerank generate nothing).
    """
    prompt = body_bytes // BYTES_PER_TOKEN + 1
    if not samples:
        return prompt
    return prompt + (completion_limit if completion_limit is not None else DEFAULT_COMPLETION_ESTIMATE)
