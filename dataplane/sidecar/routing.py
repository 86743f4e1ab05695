"""Replica choice: a small policy protocol and a registry keyed by name.

Each policy sees the same ``Peer`` view (outstanding requests this sidecar has
sent, health) and returns one peer or None. More policies (power of two,
prefix affinity, session affinity) plug in here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


@dataclass
class Peer:
    """One engine replica as this sidecar sees it."""

    url: str
    outstanding: int = 0
    healthy: bool = True


class RoutingPolicyName(StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_OUTSTANDING = "least_outstanding"


class RoutingPolicy(Protocol):
    def pick(self, peers: Sequence[Peer], exclude: set[str]) -> Peer | None: ...


class RoundRobin:
    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, peers: Sequence[Peer], exclude: set[str]) -> Peer | None:
        candidates = [p for p in peers if p.healthy and p.url not in exclude]
        if not candidates:
            return None
        return candidates[next(self._counter) % len(candidates)]


class LeastOutstanding:
    """Fewest requests in flight; ties broken round-robin so load spreads evenly."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, peers: Sequence[Peer], exclude: set[str]) -> Peer | None:
        candidates = [p for p in peers if p.healthy and p.url not in exclude]
        if not candidates:
            return None
        low = min(p.outstanding for p in candidates)
        tied = [p for p in candidates if p.outstanding == low]
        return tied[next(self._counter) % len(tied)]


POLICIES: dict[RoutingPolicyName, Callable[[], RoutingPolicy]] = {
    RoutingPolicyName.ROUND_ROBIN: RoundRobin,
    RoutingPolicyName.LEAST_OUTSTANDING: LeastOutstanding,
}


def make_policy(name: RoutingPolicyName) -> RoutingPolicy:
    return POLICIES[name]()
