"""Replica choice policies: one behaviour test per policy, over real Peer views."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from modelfleet.dataplane.sidecar.hashring import HashRing
from modelfleet.dataplane.sidecar.prefix_table import prefix_digest
from modelfleet.dataplane.sidecar.routing import (
    NO_INFO,
    POLICIES,
    LeastOutstanding,
    Peer,
    PowerOfTwo,
    PrefixAffinity,
    RequestInfo,
    RoundRobin,
    RoutingPolicyName,
    SessionAffinity,
    make_policy,
    policy_choices,
)
from modelfleet.dataplane.spec import RoutingSpec


def key(text: str) -> RequestInfo:
    return RequestInfo(prefix_key=prefix_digest(text))


def session(sid: str) -> RequestInfo:
    return RequestInfo(session_id=sid)


INFOS = [NO_INFO, key("You are a helpful assistant."), session("s-1")]


@pytest.mark.parametrize("info", INFOS, ids=["no_info", "prefix", "session"])
@pytest.mark.parametrize("name", list(RoutingPolicyName))
def test_every_policy_skips_unhealthy_and_excluded_peers(name, info):
    policy = make_policy(name, seed=1)
    peers = [Peer("a", healthy=False), Peer("b"), Peer("c")]
    for _ in range(10):
        assert policy.pick(peers, info, exclude={"c"}).url == "b"
    assert policy.pick(peers, info, exclude={"b", "c"}) is None
    assert policy.pick([], info, exclude=set()) is None


def test_registry_covers_every_name_and_the_cli_spellings():
    assert set(POLICIES) == set(RoutingPolicyName)
    for choice in policy_choices():
        assert make_policy(choice).name is RoutingPolicyName(choice)
    assert make_policy("least_outstanding").name is RoutingPolicyName.LEAST_OUTSTANDING
    assert make_policy("round_robin").name is RoutingPolicyName.ROUND_ROBIN


def test_make_policy_takes_the_spec_fields():
    policy = make_policy(RoutingSpec(policy="PrefixAffinity", prefix_chars=64, load_bound=2.0, prefix_table_entries=10))
    assert isinstance(policy, PrefixAffinity)
    assert (policy.prefix_chars, policy.load_bound, policy.table.capacity) == (64, 2.0, 10)


def test_round_robin_cycles():
    peers = [Peer("a"), Peer("b"), Peer("c")]
    rr = RoundRobin()
    assert [rr.pick(peers, NO_INFO, set()).url for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_outstanding_prefers_idle_and_spreads_ties():
    peers = [Peer("a", outstanding=3), Peer("b", outstanding=1), Peer("c", outstanding=1)]
    lo = LeastOutstanding()
    picks = Counter(lo.pick(peers, NO_INFO, set()).url for _ in range(10))
    assert picks == {"b": 5, "c": 5}


def test_least_outstanding_counts_the_engines_queue_from_other_sidecars():
    # a has nothing from this sidecar but 4 queued at the engine (other sidecars' requests)
    peers = [Peer("a", outstanding=0, queued=4), Peer("b", outstanding=2, running=2)]
    assert LeastOutstanding().pick(peers, NO_INFO, set()).url == "b"


def test_power_of_two_never_picks_the_busier_of_its_two():
    peers = [Peer(f"p{i}", outstanding=i) for i in range(6)]
    p2c = PowerOfTwo(seed=7)
    picks = Counter(p2c.pick(peers, NO_INFO, set()).url for _ in range(3000))
    assert "p5" not in picks  # the busiest loses every pair it is drawn in
    # p_i wins only against busier peers: its share falls with its load
    shares = [picks[f"p{i}"] for i in range(5)]
    assert shares == sorted(shares, reverse=True)
    assert all(s > 0 for s in shares)


def test_power_of_two_is_reproducible_with_a_seed():
    peers = [Peer(f"p{i}") for i in range(8)]
    a, b = PowerOfTwo(seed=3), PowerOfTwo(seed=3)
    assert [a.pick(peers, NO_INFO, set()).url for _ in range(50)] == [
        b.pick(peers, NO_INFO, set()).url for _ in range(50)
    ]


def test_prefix_affinity_sends_a_prefix_to_one_peer_and_spreads_different_ones():
    peers = [Peer("a"), Peer("b"), Peer("c")]
    policy = PrefixAffinity()
    first = policy.pick(peers, key("system prompt 1"), set())
    assert policy.last_reason == "owner"
    for _ in range(20):
        assert policy.pick(peers, key("system prompt 1"), set()) is first
        assert policy.last_reason == "remembered"
    spread = Counter(policy.pick(peers, key(f"prompt {i}"), set()).url for i in range(3000))
    assert set(spread) == {"a", "b", "c"}
    assert min(spread.values()) > 3000 / 3 * 0.7  # virtual nodes keep the shares near a third


def test_prefix_affinity_bounded_load_moves_a_hot_key_to_the_next_peer():
    peers = [Peer("a"), Peer("b"), Peer("c")]
    policy = PrefixAffinity(load_bound=1.25, table_entries=0)  # the ring alone
    hot = key("hot prefix")
    ring = HashRing(p.url for p in peers)
    owner, second, _ = ring.walk(hot.prefix_key)
    by_url = {p.url: p for p in peers}
    by_url[owner].outstanding = 6  # bound = ceil(1.25 * (6 + 1) / 3) = 3: the owner is over it
    assert policy.pick(peers, hot, set()).url == second
    assert policy.last_reason == "overflow"
    by_url[owner].outstanding = 1  # bound = ceil(1.25 * 2 / 3) = 1: 1 + 1 > 1, still over
    assert policy.pick(peers, hot, set()).url == second
    by_url[owner].outstanding = 0
    assert policy.pick(peers, hot, set()).url == owner


def test_prefix_affinity_never_lets_a_peer_pass_the_bound():
    """Every key is hot: the load stays within c of the average, as bounded loads promise."""
    peers = [Peer(f"p{i}") for i in range(4)]
    policy = PrefixAffinity(load_bound=1.25)
    hot = key("the same prompt every time")
    for n in range(1, 101):
        policy.pick(peers, hot, set()).outstanding += 1
        assert max(p.outstanding for p in peers) <= math.ceil(1.25 * n / 4)


def test_prefix_affinity_a_detour_does_not_move_the_prefix_home():
    peers = [Peer("a"), Peer("b"), Peer("c")]
    policy = PrefixAffinity()
    k = key("conversation")
    home = policy.pick(peers, k, set())
    home.outstanding = 10
    assert policy.pick(peers, k, set()) is not home
    home.outstanding = 0
    assert policy.pick(peers, k, set()) is home


def test_removing_a_peer_only_remaps_its_keys():
    keys = [prefix_digest(f"prefix {i}") for i in range(2000)]
    before = HashRing(["a", "b", "c", "d"])
    after = HashRing(["a", "b", "d"])
    moved = [k for k in keys if before.owner(k) != after.owner(k)]
    assert moved and all(before.owner(k) == "c" for k in moved)
    assert len(moved) == sum(before.owner(k) == "c" for k in keys)


def test_prefix_affinity_keys_of_a_failed_peer_go_elsewhere_and_return():
    peers = [Peer("a"), Peer("b"), Peer("c")]
    policy = PrefixAffinity()
    homes = {i: policy.pick(peers, key(f"p{i}"), set()).url for i in range(300)}
    peers[2].healthy = False
    for i, home in homes.items():
        now = policy.pick(peers, key(f"p{i}"), set()).url
        assert now == home if home != "c" else now != "c"
    peers[2].healthy = True
    assert {i: policy.pick(peers, key(f"p{i}"), set()).url for i in range(300)} == homes


def test_prefix_affinity_table_keeps_prefixes_home_when_a_peer_joins():
    peers = [Peer("a"), Peer("b")]
    policy = PrefixAffinity()
    homes = {i: policy.pick(peers, key(f"p{i}"), set()).url for i in range(300)}
    peers.append(Peer("c"))
    assert {i: policy.pick(peers, key(f"p{i}"), set()).url for i in range(300)} == homes
    fresh = Counter(policy.pick(peers, key(f"new {i}"), set()).url for i in range(300))
    assert fresh["c"] > 50  # new prefixes do reach the new peer


def test_prefix_affinity_without_a_prompt_falls_back_to_least_outstanding():
    peers = [Peer("a", outstanding=2), Peer("b")]
    policy = PrefixAffinity()
    assert policy.pick(peers, NO_INFO, set()).url == "b"
    assert policy.last_reason == "no_key"


def test_session_affinity_sticks_and_falls_back_while_the_peer_is_unhealthy():
    peers = [Peer("a"), Peer("b"), Peer("c")]
    policy = SessionAffinity()
    home = policy.pick(peers, session("user-42"), set())
    home.outstanding = 50  # strict: load does not move a session
    for _ in range(10):
        assert policy.pick(peers, session("user-42"), set()) is home
    home.healthy = False
    other = policy.pick(peers, session("user-42"), set())
    assert other is not home and policy.last_reason == "failover"
    assert policy.pick(peers, session("user-42"), set()) is other  # the fallback is stable too
    home.healthy = True
    assert policy.pick(peers, session("user-42"), set()) is home
    spread = Counter(policy.pick(peers, session(f"u{i}"), set()).url for i in range(600))
    assert set(spread) == {"a", "b", "c"}


def test_session_affinity_without_a_session_falls_back_to_least_outstanding():
    peers = [Peer("a", outstanding=1), Peer("b")]
    policy = SessionAffinity()
    assert policy.pick(peers, NO_INFO, set()).url == "b"
    assert policy.last_reason == "no_session"


def with_capacity(peers: list[Peer], cap: int) -> list[Peer]:
    for p in peers:
        setattr(p, "max_num_seqs", cap)  # noqa: B010  the engine's /load field, when the load view carries it
    return peers


def test_prefix_affinity_keeps_the_home_until_its_engine_is_full():
    peers = with_capacity([Peer("a"), Peer("b"), Peer("c")], 4)
    policy = PrefixAffinity(load_bound=1.25, overflow_factor=1.0)  # full at one batch
    k = key("tenant")
    home = policy.pick(peers, k, set())
    home.outstanding = 3  # far over the bounded-load cap ceil(1.25 * 4 / 3) = 2, but the engine has a free slot
    assert policy.pick(peers, k, set()) is home
    assert policy.last_reason == "remembered"
    home.outstanding = 4  # full: the request would queue, and another engine has room
    detour = policy.pick(peers, k, set())
    assert detour is not home and policy.last_reason == "overflow"
    assert policy.table.get(k.prefix_key) == home.url  # the detour does not move the home
    for p in peers:
        p.outstanding = 4  # everyone full: queue at home, where the prefix is cached
    assert policy.pick(peers, k, set()) is home
    home.outstanding = 2
    assert policy.pick(peers, k, set()) is home


def test_prefix_affinity_by_default_queues_a_batch_at_home_before_a_cold_detour():
    peers = with_capacity([Peer("a"), Peer("b"), Peer("c")], 4)
    policy = PrefixAffinity()  # overflowFactor 2: full at a running batch plus a queued one
    k = key("tenant")
    home = policy.pick(peers, k, set())
    home.outstanding = 7  # a batch running, 3 waiting: still home
    assert policy.pick(peers, k, set()) is home
    home.outstanding = 8
    assert policy.pick(peers, k, set()) is not home and policy.last_reason == "overflow"


def test_prefix_affinity_without_capacities_keeps_the_bounded_load_rule():
    peers = [Peer("a"), Peer("b"), Peer("c")]
    policy = PrefixAffinity(load_bound=1.25)
    k = key("tenant")
    home = policy.pick(peers, k, set())
    home.outstanding = 2  # bound = ceil(1.25 * 3 / 3) = 2: 2 + 1 > 2
    assert policy.pick(peers, k, set()) is not home
    assert policy.last_reason == "overflow"
    home.outstanding = 1  # bound = ceil(1.25 * 2 / 3) = 1: still over
    assert policy.pick(peers, k, set()) is not home
    home.outstanding = 0
    assert policy.pick(peers, k, set()) is home


def test_prefix_affinity_without_a_table_is_the_ring_owner():
    peers = [Peer(f"p{i}") for i in range(4)]
    policy = PrefixAffinity(table_entries=0)
    now = iter(range(0, 10_000, 5))  # new keys 5 s apart: no earlier placement is still pending
    policy._clock = lambda: float(next(now))
    ring = HashRing(p.url for p in peers)
    for i in range(200):
        k = key(f"tenant {i}")
        assert policy.pick(peers, k, set()).url == ring.owner(k.prefix_key)
        assert policy.last_reason == "owner"
    assert len(policy.table) == 0
