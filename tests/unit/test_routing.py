"""Replica choice policies (pure functions over the peer view)."""

from __future__ import annotations

from collections import Counter

import pytest

from modelfleet.dataplane.sidecar.routing import (
    POLICIES,
    LeastOutstanding,
    Peer,
    RoundRobin,
    RoutingPolicyName,
    make_policy,
)


@pytest.mark.parametrize("name", list(RoutingPolicyName))
def test_every_policy_skips_unhealthy_and_excluded_peers(name):
    policy = make_policy(name)
    peers = [Peer("a", healthy=False), Peer("b"), Peer("c")]
    for _ in range(10):
        assert policy.pick(peers, exclude={"c"}).url == "b"
    assert policy.pick(peers, exclude={"b", "c"}) is None
    assert policy.pick([], exclude=set()) is None


def test_registry_covers_every_name():
    assert set(POLICIES) == set(RoutingPolicyName)


def test_round_robin_cycles():
    peers = [Peer("a"), Peer("b"), Peer("c")]
    rr = RoundRobin()
    assert [rr.pick(peers, set()).url for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_outstanding_prefers_idle_and_spreads_ties():
    peers = [Peer("a", outstanding=3), Peer("b", outstanding=1), Peer("c", outstanding=1)]
    lo = LeastOutstanding()
    picks = Counter(lo.pick(peers, set()).url for _ in range(10))
    assert picks == {"b": 5, "c": 5}
