"""Replica choice: small policy classes behind one interface, and a registry by name.

Every policy sees the same ``Peer`` view (load, health) and a ``RequestInfo``
(the prompt-prefix key and the session id), skips unhealthy and excluded
peers (those a retry already tried), and returns one peer or None. After a
pick, ``last_reason`` says why that peer (a metric label; the sidecar is one
asyncio thread, so nothing interleaves between the pick and the read).

Policies, as the spec names them (``spec.routing.policy``):

- RoundRobin: the eligible peers in turn.
- LeastOutstanding: the lowest ``Peer.load``; ties in turn.
- PowerOfTwo: two distinct random eligible peers, the lower load of the two
  (ties: the first drawn). Seedable for tests.
- PrefixAffinity: a digest of the prompt's first ``prefixChars`` characters
  (the prefix key) picks a home replica, so requests that share a prefix meet
  its KV blocks in one replica's prefix cache, and every sidecar picks the
  same home without a central store. The home of a key, first match wins:
  (1) the shared placement (``placement.py``) when some healthy replica's
  /load reports the key: its owner (the replica that served it most, ties
  to the first clockwise from the key), unless that replica holds more than
  its even share of the reported keys, then the first replica clockwise
  under that share; this overrides what this sidecar remembered; (2) this
  sidecar's table, for a key it placed that no replica reports yet (the
  reports are one poll old) or any more; (3) an unseen key: this
  sidecar's own replica (``--local-peer``, the engine in its pod) while it is
  under its even share, else the first replica clockwise from the key that is
  under the even share with the key counted (with no reports, the ring
  owner), remembered in the table; the
  new keys this sidecar placed in the last 2 s that no report shows yet
  count as placed too, so a burst of new prefixes spreads. Rules (1) and (3)
  read what every sidecar sees, so sidecars converge on reported keys and
  mostly agree on new ones (they differ only by their own pending
  placements, for one /load read). Reasons: "shared",
  "remembered", "owner" (a new key). A request stays on its prefix's home
  unless the home is full: when every eligible replica's load view carries
  its engine's ``max_num_seqs``,
  full means ``load >= f * max_num_seqs`` (f = ``overflowFactor``, default 2:
  a full batch running and as many queued; a detour costs a cold prefill and
  evicts another prefix, a wait at home about one batch turn) and the request
  moves only to a replica with ``load < f * max_num_seqs``; without
  capacities, full means ``load + 1 > ceil(c * (total load + 1) / eligible
  peers)`` (bounded loads, c = ``loadBound``) and it moves only to a replica
  under that bound. Either way the detour is the first such replica clockwise
  from the key, and nobody with room means it stays home. A detour, or a home
  that is just tried ("failover"), does not rewrite the home; a home that is
  unhealthy does not either, but its reports no longer count, so the shared
  placement re-places the keys it reported over the healthy replicas. No
  prompt: LeastOutstanding.
- SessionAffinity: the ``x-session-id`` header hashed onto the same kind of
  ring, strictly: a session stays on its owner whatever the load (its turns
  share the conversation prefix, and every sidecar agrees on the owner) and
  moves clockwise only while the owner is unhealthy or was just tried; it comes
  back once the owner is re-admitted. No header: LeastOutstanding.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from modelfleet.dataplane.sidecar.hashring import HashRing
from modelfleet.dataplane.sidecar.peers import Peer
from modelfleet.dataplane.sidecar.placement import PENDING_S, Placement, shared_placement
from modelfleet.dataplane.sidecar.prefix_table import PrefixTable, prefix_digest
from modelfleet.dataplane.spec import RoutingPolicyName, RoutingSpec

__all__ = [
    "NO_INFO",
    "POLICIES",
    "LeastOutstanding",
    "Peer",
    "PowerOfTwo",
    "PrefixAffinity",
    "RequestInfo",
    "RoundRobin",
    "RoutingPolicy",
    "RoutingPolicyName",
    "SessionAffinity",
    "make_policy",
    "policy_choices",
]


@dataclass(frozen=True)
class RequestInfo:
    """What affinity policies key on; built once per request by the coordinator."""

    prefix_key: bytes | None = None  # 16-byte digest of the prompt's first prefixChars characters
    session_id: str | None = None  # the x-session-id header


NO_INFO = RequestInfo()


class RoutingPolicy(Protocol):
    name: RoutingPolicyName
    prefix_chars: int | None  # how much of the prompt keys this policy; None: it never looks at the prompt
    last_reason: str

    def pick(self, peers: Sequence[Peer], info: RequestInfo, exclude: set[str]) -> Peer | None: ...


def _eligible(peers: Sequence[Peer], exclude: set[str]) -> list[Peer]:
    return [p for p in peers if p.healthy and p.url not in exclude]


class RoundRobin:
    name = RoutingPolicyName.ROUND_ROBIN
    prefix_chars: int | None = None

    def __init__(self) -> None:
        self._counter = itertools.count()
        self.last_reason = "turn"

    def pick(self, peers: Sequence[Peer], info: RequestInfo, exclude: set[str]) -> Peer | None:
        candidates = _eligible(peers, exclude)
        if not candidates:
            return None
        return candidates[next(self._counter) % len(candidates)]


class LeastOutstanding:
    """Lowest load; ties taken in turn so equal replicas share the work evenly."""

    name = RoutingPolicyName.LEAST_OUTSTANDING
    prefix_chars: int | None = None

    def __init__(self) -> None:
        self._counter = itertools.count()
        self.last_reason = "least_loaded"

    def pick(self, peers: Sequence[Peer], info: RequestInfo, exclude: set[str]) -> Peer | None:
        candidates = _eligible(peers, exclude)
        if not candidates:
            return None
        low = min(p.load for p in candidates)
        tied = [p for p in candidates if p.load == low]
        return tied[next(self._counter) % len(tied)]


class PowerOfTwo:
    """Two random choices: nearly the balance of LeastOutstanding, without herding on stale loads."""

    name = RoutingPolicyName.POWER_OF_TWO
    prefix_chars: int | None = None

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        self.last_reason = "sampled"

    def pick(self, peers: Sequence[Peer], info: RequestInfo, exclude: set[str]) -> Peer | None:
        candidates = _eligible(peers, exclude)
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        a, b = self._rng.sample(candidates, 2)
        return a if a.load <= b.load else b


class _RingCache:
    """The ring of the current peer URLs, rebuilt only when that set changes."""

    def __init__(self) -> None:
        self._ring = HashRing(())

    def get(self, peers: Sequence[Peer]) -> HashRing:
        urls = tuple(sorted({p.url for p in peers}))
        if urls != self._ring.urls:
            self._ring = HashRing(urls)
        return self._ring


MAX_PENDING = 4096  # new-key placements remembered until reported (placement.PENDING_S)


def _capacity(peer: Peer) -> int | None:
    """The engine's max_num_seqs when its /load reported it, else None (unknown)."""
    return peer.max_num_seqs


class PrefixAffinity:
    name = RoutingPolicyName.PREFIX_AFFINITY

    def __init__(
        self,
        prefix_chars: int = 256,
        load_bound: float = 1.25,
        table_entries: int = 65_536,
        table_bytes: int = 1 << 25,
        overflow_factor: float = 2.0,
    ) -> None:
        if load_bound < 1.0 or overflow_factor < 1.0:
            raise ValueError("load_bound and overflow_factor must be >= 1")
        self.prefix_chars: int | None = prefix_chars
        self.load_bound = load_bound
        self.overflow_factor = overflow_factor
        self.table = PrefixTable(table_entries, table_bytes)
        self._rings = _RingCache()
        self._fallback = LeastOutstanding()
        self.last_reason = "no_key"
        self._placement = Placement(HashRing(()))
        self._placement_of: tuple[tuple[str, int], ...] | None = None  # the reports it was computed from
        # new keys placed here that no report shows yet (key -> url, when), oldest first, and their count per url
        self._pending: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._pending_per_url: dict[str, int] = {}
        self._pending_checked: Placement | None = None
        self._clock = time.monotonic
        self.local_peer: str | None = None  # the engine in this sidecar's pod: new prefixes go there first

    def placement(self, peers: Sequence[Peer]) -> Placement:
        """The shared placement over the healthy peers' reports, recomputed only when those change."""
        healthy = [p for p in peers if p.healthy]
        of = tuple((p.url, p.keys_version) for p in healthy)
        if of != self._placement_of:
            reports = {p.url: p.prefix_keys for p in healthy}
            self._placement = shared_placement(reports, self._rings.get(peers))
            self._placement_of = of
        return self._placement

    def bound(self, eligible: Sequence[Peer]) -> int:
        """Most load a peer may carry and still take a key (the bounded-loads capacity)."""
        total = sum(p.load for p in eligible)
        return math.ceil(self.load_bound * (total + 1) / len(eligible))

    def pick(self, peers: Sequence[Peer], info: RequestInfo, exclude: set[str]) -> Peer | None:
        eligible = _eligible(peers, exclude)
        key = info.prefix_key
        if not eligible or key is None:
            self.last_reason = "no_key"
            return self._fallback.pick(peers, info, exclude)
        by_url = {p.url: p for p in eligible}
        ring = [by_url[u] for u in self._rings.get(peers).walk(key) if u in by_url]  # eligible, clockwise from key
        has_room = self._room_rule(eligible)
        placement = self.placement(peers)
        home_url = placement.homes.get(key)
        if home_url is not None:  # reported by some replica: every sidecar agrees on this home
            self.last_reason = "shared"
            if self.table.get(key) != home_url:
                self.table.put(key, home_url)
        else:
            home_url = self.table.get(key)
            self.last_reason = "remembered"
            if home_url is None:  # unseen: the first replica clockwise under the even share
                self.last_reason = "owner"
                home_url = self._pending_home(key, placement)
                if home_url is None:
                    home_url = placement.place_new(key, self._pending_per_url, self.local_peer) or ring[0].url
                    self._add_pending(key, home_url)
                self.table.put(key, home_url)
        home = by_url.get(home_url)
        if home is None:
            self.last_reason = "failover"
        if home is not None and has_room(home):
            return home
        detour = next((p for p in ring if p is not home and has_room(p)), None)
        if detour is None:  # nobody has room: queue at home, where the prefix is cached
            return home if home is not None else ring[0]
        if home is not None:
            self.last_reason = "overflow"
        return detour

    def _pending_home(self, key: bytes, placement: Placement) -> str | None:
        """Drops pending placements that expired or that a report now shows; returns ``key``'s, if pending."""
        now = self._clock()
        pending = self._pending
        while pending:
            oldest, (_, at) = next(iter(pending.items()))
            if now - at <= PENDING_S:
                break
            self._drop_pending(oldest)
        if placement is not self._pending_checked:  # new reports: once per placement, not per request
            self._pending_checked = placement
            for reported in [k for k in pending if k in placement.homes]:
                self._drop_pending(reported)
        entry = pending.get(key)
        return entry[0] if entry is not None else None

    def _add_pending(self, key: bytes, url: str) -> None:
        self._pending[key] = (url, self._clock())
        self._pending_per_url[url] = self._pending_per_url.get(url, 0) + 1
        if len(self._pending) > MAX_PENDING:
            self._drop_pending(next(iter(self._pending)))

    def _drop_pending(self, key: bytes) -> None:
        url, _ = self._pending.pop(key)
        left = self._pending_per_url[url] - 1
        if left:
            self._pending_per_url[url] = left
        else:
            del self._pending_per_url[url]

    def _room_rule(self, eligible: Sequence[Peer]) -> Callable[[Peer], bool]:
        """Whether a peer may take one more request: under overflow_factor x its engine's max_num_seqs,
        else (capacities unknown) under the bounded-loads cap."""
        caps = {p.url: _capacity(p) for p in eligible}
        if all(c is not None for c in caps.values()):
            factor = self.overflow_factor
            return lambda p: p.load < factor * (caps[p.url] or 0)
        cap = self.bound(eligible)
        return lambda p: p.load + 1 <= cap


class SessionAffinity:
    name = RoutingPolicyName.SESSION_AFFINITY
    prefix_chars: int | None = None

    def __init__(self) -> None:
        self._rings = _RingCache()
        self._fallback = LeastOutstanding()
        self.last_reason = "no_session"

    def pick(self, peers: Sequence[Peer], info: RequestInfo, exclude: set[str]) -> Peer | None:
        if info.session_id is None:
            self.last_reason = "no_session"
            return self._fallback.pick(peers, info, exclude)
        eligible = {p.url: p for p in _eligible(peers, exclude)}
        key = session_digest(info.session_id)
        for i, url in enumerate(self._rings.get(peers).walk(key)):
            if url in eligible:
                self.last_reason = "owner" if i == 0 else "failover"
                return eligible[url]
        return None


def session_digest(session_id: str) -> bytes:
    """Where a session sits on the ring (kept apart from prompt digests by a tag)."""
    return prefix_digest("session\0" + session_id)


POLICIES: dict[RoutingPolicyName, Callable[[RoutingSpec, int | None], RoutingPolicy]] = {
    RoutingPolicyName.ROUND_ROBIN: lambda spec, seed: RoundRobin(),
    RoutingPolicyName.LEAST_OUTSTANDING: lambda spec, seed: LeastOutstanding(),
    RoutingPolicyName.POWER_OF_TWO: lambda spec, seed: PowerOfTwo(seed),
    RoutingPolicyName.PREFIX_AFFINITY: lambda spec, seed: PrefixAffinity(
        spec.prefix_chars, spec.load_bound, spec.prefix_table_entries, spec.prefix_table_bytes, spec.overflow_factor
    ),
    RoutingPolicyName.SESSION_AFFINITY: lambda spec, seed: SessionAffinity(),
}


def make_policy(choice: RoutingPolicyName | str | RoutingSpec, *, seed: int | None = None) -> RoutingPolicy:
    """A policy from the spec's routing section, or from a name alone (its other fields defaulted).

    A name may be the spec's (``PrefixAffinity``) or the command line's snake_case (``prefix_affinity``).
    """
    spec = choice if isinstance(choice, RoutingSpec) else RoutingSpec(policy=RoutingPolicyName(choice))
    return POLICIES[spec.policy](spec, seed)


def policy_choices() -> list[str]:
    """Every name the command line accepts: the spec's names and their snake_case aliases."""
    snake = [_snake(m.value) for m in RoutingPolicyName]
    return [m.value for m in RoutingPolicyName] + snake


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name))
