"""Ejection and re-admission of replicas, and the load view from /load."""

from __future__ import annotations

from modelfleet.dataplane.sidecar.peers import CheckResult, Peer


def test_failed_checks_eject_only_after_n_in_a_row():
    peer = Peer("a")
    assert peer.observe_check(CheckResult.FAILED, eject_after=3) is None
    assert peer.observe_check(CheckResult.FAILED, eject_after=3) is None
    assert peer.observe_check(CheckResult.READY, eject_after=3) is None  # the run is broken
    assert peer.observe_check(CheckResult.FAILED, eject_after=3) is None
    assert peer.observe_check(CheckResult.FAILED, eject_after=3) is None
    assert peer.healthy
    assert peer.observe_check(CheckResult.FAILED, eject_after=3) == "ejected"
    assert not peer.healthy
    assert peer.observe_check(CheckResult.FAILED, eject_after=3) is None  # reported once


def test_not_ready_ejects_at_once_and_one_pass_readmits():
    peer = Peer("a", running=3, queued=2)
    assert peer.observe_check(CheckResult.NOT_READY, eject_after=3) == "ejected"
    assert (peer.healthy, peer.load) == (False, 0)  # the engine's numbers are stale now
    assert peer.observe_check(CheckResult.READY, eject_after=3) == "admitted"
    assert peer.healthy and peer.failures_in_a_row == 0


def test_a_new_peer_is_admitted_by_its_first_passing_check():
    peer = Peer("a", healthy=False)
    assert peer.observe_check(CheckResult.FAILED, eject_after=1) is None
    assert peer.observe_check(CheckResult.READY, eject_after=1) == "admitted"


def test_load_view_takes_the_engines_numbers_without_double_counting():
    peer = Peer("a", outstanding=2)
    peer.observe_load(
        {"running": 4, "queued": 3, "queued_tokens": 900, "kv_usage": 0.5, "prefix_hit_rate": 0.25, "ready": True}
    )
    assert (peer.running, peer.queued, peer.queued_tokens, peer.kv_usage, peer.prefix_hit_rate) == (
        4,
        3,
        900,
        0.5,
        0.25,
    )
    assert peer.load == 7  # the engine's 7 already include this sidecar's 2
    peer.outstanding = 9  # a burst since the last poll
    assert peer.load == 9


def test_malformed_load_fields_are_ignored():
    peer = Peer("a", running=1)
    peer.observe_load({"running": -1, "queued": "many", "kv_usage": 7.0, "queued_tokens": True})
    assert (peer.running, peer.queued, peer.kv_usage, peer.queued_tokens) == (1, 0, None, 0)
    peer.observe_load(["not", "a", "dict"])
    assert peer.running == 1


def test_load_view_learns_the_engines_capacity():
    peer = Peer("http://a")
    assert peer.max_num_seqs is None  # unknown until the engine says
    peer.observe_load({"running": 1, "queued": 0, "max_num_seqs": 4})
    assert peer.max_num_seqs == 4
    peer.observe_load({"running": 1, "max_num_seqs": "lots"})  # malformed: keep what we knew
    assert peer.max_num_seqs == 4
