"""Where prompt prefixes live, computed identically by every sidecar from the engines' reports.

Each engine reports in /load the prefix keys it served recently and how many
requests each brought (engine/prefix_keys.py). Every sidecar polls every
replica, so all of them hold the same reports, up to one poll interval apart,
and this module turns them into the same placement without a central store:

1. Owner of a reported key: the replica that served it most; a tie goes to
   the tied replica first clockwise from the key on the hash ring.
2. Even shares: with K distinct keys over N replicas a replica keeps at most
   ``key_cap(K, N)`` = ceil(K/N) + floor(KEY_SLACK * K/N) keys (exactly even
   while K/N < 4, e.g. 8 tenants over 4 replicas -> 2 each; some slack for
   many keys, where hashing alone is already close to even, so that keys
   coming and going do not shuffle the rest). Keys are taken in digest order;
   each stays with its owner while the owner is under the cap.
3. A key whose owner is full goes to the first replica clockwise from the
   key that is under the cap (there always is one).

An unseen key (reported by nobody) goes to this sidecar's own replica (the
engine in its pod; ``--local-peer``) while that replica is under its even
share, counted as if every sidecar placed as many new keys on its own replica
as this one did (so the burst of new prefixes a cold start brings, spread
over the sidecars by the gateway, lands one replica per sidecar), else to
the first replica clockwise from it that is under ``key_cap(K + 1, N)``, where K and the per-replica counts
also include the keys this sidecar placed in the last ``PENDING_S`` seconds
that no report shows yet (the reports lag by one /load read): with no reports
and nothing pending, its ring owner. Every sidecar reads the same reports, so
sidecars that meet the same new prefix choose the same replica unless their
own pending placements differ; the pending ones spread a burst of new
prefixes that one sidecar meets before the next read. Once a replica reports
the key, everyone keeps it there.
A key moved by rule 3 stays where it went: its old replica keeps reporting it
(with the older, larger count) until the key ages out there, and while it
does the same rules send the key to the same new replica.

Only healthy replicas count, and their reports only: an ejected replica's
keys are placed again over the others; when it comes back, its own report
(empty after a restart, still listing its keys if it only missed checks)
decides whether they return.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from modelfleet.dataplane.sidecar.hashring import HashRing

KEY_SLACK = 0.25
PENDING_S = 2.0  # own placements count until a report shows them, at most this long


def key_cap(keys: int, replicas: int) -> int:
    """The most keys one replica keeps when ``keys`` are spread over ``replicas``."""
    even = keys / replicas
    return math.ceil(even) + math.floor(KEY_SLACK * even)


@dataclass
class Placement:
    """Homes of the reported keys, and how many keys each replica holds."""

    ring: HashRing
    homes: dict[bytes, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # every healthy replica, 0 included

    def place_new(self, key: bytes, pending: Mapping[str, int] | None = None, local: str | None = None) -> str | None:
        """Where an unseen key goes: this sidecar's own replica (``local``) while it is under its share,
        else the first replica clockwise from the key under the cap with that key counted.

        ``pending``: keys this sidecar placed that no report shows yet, per replica; they count as placed.
        The local replica's share assumes every other sidecar is placing as many new keys on its own
        replica as this one is (the gateway spreads requests evenly over the sidecars), so a burst of
        new prefixes that arrives before any report spreads one replica per sidecar.
        """
        if not self.counts:
            return None
        pending = pending or {}
        held = {u: n + pending.get(u, 0) for u, n in self.counts.items()}
        placed_here = sum(pending.get(u, 0) for u in held)
        if local is not None and local in held:
            expected = len(self.homes) + placed_here * len(held) + 1
            if held[local] < key_cap(expected, len(held)):
                return local
        cap = key_cap(len(self.homes) + placed_here + 1, len(held))
        return next((u for u in self.ring.walk(key) if held.get(u, cap) < cap), None)


def shared_placement(reports: Mapping[str, Mapping[bytes, int]], ring: HashRing) -> Placement:
    """The placement every sidecar computes from the same reports (healthy replica URL -> its keys)."""
    placement = Placement(ring, counts=dict.fromkeys(reports, 0))
    reporters: dict[bytes, list[tuple[str, int]]] = {}
    for url, keys in reports.items():
        for key, served in keys.items():
            reporters.setdefault(key, []).append((url, served))
    if not reporters:
        return placement
    cap = key_cap(len(reporters), len(reports))
    counts, homes = placement.counts, placement.homes
    moved: list[bytes] = []
    for key in sorted(reporters):
        owner = _owner(key, reporters[key], ring)
        if counts[owner] < cap:
            homes[key] = owner
            counts[owner] += 1
        else:
            moved.append(key)
    for key in moved:
        found = next((u for u in ring.walk(key) if counts.get(u, cap) < cap), None)
        # None only when a reporting replica is missing from the ring: then the emptiest one
        url = found if found is not None else min(counts, key=lambda u: (counts[u], u))
        homes[key] = url
        counts[url] += 1
    return placement


def _owner(key: bytes, reporters: list[tuple[str, int]], ring: HashRing) -> str:
    if len(reporters) == 1:
        return reporters[0][0]
    most = max(served for _, served in reporters)
    tied = {url for url, served in reporters if served == most}
    if len(tied) == 1:
        return next(iter(tied))
    return next((u for u in ring.walk(key) if u in tied), min(tied))
