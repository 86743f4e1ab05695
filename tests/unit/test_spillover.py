"""Spill-over decisions of the sidecar (sidecar/tiers.py) over plain Peer views."""

from __future__ import annotations

import pytest

from modelfleet.dataplane.sidecar.peers import Peer
from modelfleet.dataplane.sidecar.tiers import Spillover, parse_tier_arg, waiting
from modelfleet.dataplane.spec import SpilloverRule


def spill(rule: SpilloverRule, tier_healthy: bool = True) -> Spillover:
    s = Spillover([("hosted", "http://tier")], rule)
    s.peers[0].healthy = tier_healthy
    return s


def peer(url: str, *, queued: int = 0, outstanding: int = 0, cap: int | None = 4, wait: float | None = None) -> Peer:
    return Peer(url, outstanding=outstanding, queued=queued, max_num_seqs=cap, estimated_wait_s=wait)


def test_no_local_ready_spills_only_when_the_rule_says_so() -> None:
    down = [Peer("http://a", healthy=False)]
    assert spill(SpilloverRule()).target(down) is not None
    assert spill(SpilloverRule(no_local_ready=False)).target(down) is None
    assert spill(SpilloverRule(), tier_healthy=False).target(down) is None  # nowhere to spill


def test_queue_depth_must_hold_for_every_ready_replica() -> None:
    s = spill(SpilloverRule(queue_depth_above=1))
    assert s.target([peer("http://a", queued=2), peer("http://b", queued=1)]) is None  # b still has room
    assert s.target([peer("http://a", queued=2), peer("http://b", queued=3)]) is s.peers[0]
    unhealthy_b = peer("http://b", queued=0)
    unhealthy_b.healthy = False  # not ready: does not hold the request back
    assert s.target([peer("http://a", queued=2), unhealthy_b]) is s.peers[0]


def test_own_requests_beyond_the_batch_count_as_waiting_before_the_engine_reports_them() -> None:
    assert waiting(peer("http://a", queued=0, outstanding=6, cap=4)) == 2
    assert waiting(peer("http://a", queued=3, outstanding=2, cap=4)) == 3
    assert waiting(peer("http://a", queued=0, outstanding=9, cap=None)) == 0  # capacity unknown: the report only
    s = spill(SpilloverRule(queue_depth_above=0))
    assert s.target([peer("http://a", outstanding=4, cap=4)]) is None  # full but nobody waits
    assert s.target([peer("http://a", outstanding=5, cap=4)]) is s.peers[0]


def test_estimated_wait_rule() -> None:
    s = spill(SpilloverRule(queue_depth_above=None, estimated_wait_seconds_above=2.0))
    assert s.target([peer("http://a", wait=3.0), peer("http://b", wait=1.0)]) is None
    assert s.target([peer("http://a", wait=3.0), peer("http://b", wait=2.5)]) is s.peers[0]
    assert s.target([peer("http://a", wait=None)]) is None  # not reported yet: no spill


def test_tier_argument() -> None:
    assert parse_tier_arg("hosted=http://127.0.0.1:9/") == ("hosted", "http://127.0.0.1:9")
    for bad in ("hosted", "=http://x", "hosted=ftp://x"):
        with pytest.raises(ValueError, match="NAME=URL"):
            parse_tier_arg(bad)
