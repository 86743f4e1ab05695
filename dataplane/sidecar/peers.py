"""One engine replica as a sidecar sees it: its load view and its health.

The load view joins two sources. ``outstanding`` is this sidecar's own
accounting, exact and current. ``running`` and ``queued`` come from the
engine's /load, polled with the health checks: they include the requests of
every other sidecar, but are up to one poll interval old. ``load`` takes the
larger of the two instead of their sum, because the engine's numbers already
count this sidecar's requests.

The same /load carries the prompt-prefix keys the engine served recently
(``prefix_keys``: hex digest -> requests; engine/prefix_keys.py bounds it):
every sidecar reads every replica's, which is how PrefixAffinity's sidecars
agree on where a prefix lives (placement.py). ``keys_version`` changes
whenever that map does, so the policy recomputes placements only then.

Health: a replica whose /readyz says 503 (loading, draining, rebuilding) is
not ready on its own word and leaves at once; other failures (timeouts,
refused connections, errors) eject it only after ``eject_after`` in a row, so
one lost probe does not move traffic. One passing check re-admits it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

MAX_REPORTED_KEYS = 1024  # read at most this many prefix keys from one /load (the engine sends 256 at most)
_versions = itertools.count(1)


class CheckResult(StrEnum):
    """What one health check found."""

    READY = "ready"
    NOT_READY = "not_ready"  # the engine answered 503: loading, draining or rebuilding
    FAILED = "failed"  # no answer, a refused connection, or an unexpected status


@dataclass
class Peer:
    """One engine replica and what this sidecar knows of it."""

    url: str
    outstanding: int = 0
    healthy: bool = True
    running: int = 0
    queued: int = 0
    queued_tokens: int = 0
    kv_usage: float | None = None
    prefix_hit_rate: float | None = None
    max_num_seqs: int | None = None  # the engine's batch capacity, from /load (None: not reported yet)
    estimated_wait_s: float | None = None  # the engine's estimate of a new request's queue wait, from /load
    failures_in_a_row: int = 0
    prefix_keys: dict[bytes, int] = field(default_factory=dict)  # digest -> requests served, from /load
    keys_version: int = 0  # changes whenever prefix_keys does

    @property
    def load(self) -> int:
        """Requests in flight at the replica, as well as this sidecar can tell."""
        return max(self.outstanding, self.running + self.queued)

    def observe_load(self, body: Any) -> None:
        """Takes the fields of an engine's /load answer; unknown or malformed fields are ignored."""
        if not isinstance(body, dict):
            return
        self.running = _count(body.get("running"), self.running)
        self.queued = _count(body.get("queued"), self.queued)
        self.queued_tokens = _count(body.get("queued_tokens"), self.queued_tokens)
        self.kv_usage = _fraction(body.get("kv_usage"), self.kv_usage)
        self.prefix_hit_rate = _fraction(body.get("prefix_hit_rate"), self.prefix_hit_rate)
        self.max_num_seqs = _count(body.get("max_num_seqs"), self.max_num_seqs or 0) or None
        wait = body.get("estimated_wait_s")
        if isinstance(wait, int | float) and not isinstance(wait, bool) and wait >= 0:
            self.estimated_wait_s = float(wait)
        if "prefix_keys" in body:
            self.set_prefix_keys(_prefix_keys(body["prefix_keys"]))

    def set_prefix_keys(self, keys: dict[bytes, int]) -> None:
        if keys != self.prefix_keys:
            self.prefix_keys = keys
            self.keys_version = next(_versions)

    def observe_check(self, result: CheckResult, eject_after: int) -> str | None:
        """Applies one health check; returns "admitted" or "ejected" when that changed, else None."""
        if result is CheckResult.READY:
            self.failures_in_a_row = 0
            if not self.healthy:
                self.healthy = True
                return "admitted"
            return None
        self.failures_in_a_row += 1
        eject = result is CheckResult.NOT_READY or self.failures_in_a_row >= eject_after
        if eject and self.healthy:
            self.eject()
            return "ejected"
        return None

    def eject(self) -> None:
        """Stops routing here until a health check passes; the engine's numbers are stale from now on."""
        self.healthy = False
        self.running = 0
        self.queued = 0
        self.queued_tokens = 0
        self.set_prefix_keys({})  # a restarted engine's cache is empty; a live one says so again when re-admitted


def _count(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _prefix_keys(value: object) -> dict[bytes, int]:
    """``{hex digest: requests}`` from /load; malformed entries are skipped."""
    if not isinstance(value, dict):
        return {}
    keys: dict[bytes, int] = {}
    for hex_key, count in itertools.islice(value.items(), MAX_REPORTED_KEYS):
        n = _count(count, 0)
        if not isinstance(hex_key, str) or len(hex_key) != 32 or n == 0:
            continue
        try:
            keys[bytes.fromhex(hex_key)] = n
        except ValueError:
            continue
    return keys


def _fraction(value: object, default: float | None) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    return float(value) if ok else default  # type: ignore[arg-type]
