"""Spill-over: when a request leaves the deployment's own replicas for the next tier.

A deployment's ``spec.spillover`` names a tier after its local replicas (a
hosted API, served by an engine with the remote runner) and a rule. Before
the routing policy picks a local replica, the sidecar asks ``target``: the
request goes to the tier when the tier is ready and any part of the rule
holds for every ready local replica at once:

- ``noLocalReady``: no local replica is ready at all;
- ``queueDepthAbove: N``: each has more than N requests waiting, counting
  both its last /load report and this sidecar's own requests beyond its
  ``max_num_seqs`` (fresher than the report);
- ``estimatedWaitSecondsAbove: S``: each reports (in /load) a longer
  estimated queue wait than S.

The tier's engine enforces its spend budget and rate limits; its 429 (budget
spent, limits reached) reaches the client as it is instead of spilling
further or waiting. Every response says which tier served it
(``x-modelfleet-tier``: ``local`` or the tier's name).
"""

from __future__ import annotations

from collections.abc import Sequence

from modelfleet.dataplane.sidecar.peers import Peer
from modelfleet.dataplane.spec import SpilloverRule

LOCAL_TIER = "local"
TIER_HEADER = "x-modelfleet-tier"


def waiting(peer: Peer) -> int:
    """Requests waiting at a replica: its report, or this sidecar's excess over the batch when that is larger."""
    own_excess = peer.outstanding - peer.max_num_seqs if peer.max_num_seqs is not None else 0
    return max(peer.queued, own_excess)


def parse_tier_arg(arg: str) -> tuple[str, str]:
    """``NAME=URL`` from the command line."""
    name, sep, url = arg.partition("=")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise ValueError(f"--tier expects NAME=URL (for example hosted=http://127.0.0.1:9000), got {arg!r}")
    return name, url.rstrip("/")


class Spillover:
    """The tiers after the local replicas (one today) and the rule that sends requests there."""

    def __init__(self, tiers: Sequence[tuple[str, str]], rule: SpilloverRule) -> None:
        self.rule = rule
        self.peers = [Peer(url, healthy=False) for _, url in tiers]
        self._names = {url: name for name, url in tiers}

    def name_of(self, url: str) -> str | None:
        return self._names.get(url)

    def peer(self, url: str) -> Peer | None:
        return next((p for p in self.peers if p.url == url), None)

    def target(self, local: Sequence[Peer]) -> Peer | None:
        """The tier peer this request spills to, or None to stay local."""
        tier = next((p for p in self.peers if p.healthy), None)
        if tier is None:
            return None
        ready = [p for p in local if p.healthy]
        rule = self.rule
        if not ready:
            return tier if rule.no_local_ready else None
        if rule.queue_depth_above is not None and all(waiting(p) > rule.queue_depth_above for p in ready):
            return tier
        bound = rule.estimated_wait_seconds_above
        if bound is not None and all((p.estimated_wait_s or 0.0) > bound for p in ready):
            return tier
        return None
