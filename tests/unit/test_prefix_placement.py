"""Shared prefix placement: sidecars that read the same engine reports agree, and spread prefixes evenly."""

from __future__ import annotations

import random
from collections import Counter

from modelfleet.dataplane.sidecar.hashring import HashRing
from modelfleet.dataplane.sidecar.peers import Peer
from modelfleet.dataplane.sidecar.placement import key_cap, shared_placement
from modelfleet.dataplane.sidecar.prefix_table import prefix_digest
from modelfleet.dataplane.sidecar.routing import PrefixAffinity, RequestInfo

URLS = [f"http://127.0.0.1:{port}" for port in (40001, 40002, 40003, 40004)]


def info(k: bytes) -> RequestInfo:
    return RequestInfo(prefix_key=k)


def tenants(n: int, tag: str = "tenant") -> list[bytes]:
    return [prefix_digest(f"{tag} {i}") for i in range(n)]


def view(reports: dict[str, dict[bytes, int]]) -> list[Peer]:
    """One sidecar's peer list after a /load poll that returned ``reports``."""
    peers = [Peer(url, max_num_seqs=4) for url in URLS]
    for p in peers:
        p.set_prefix_keys(dict(reports.get(p.url, {})))
    return peers


def uneven_keys(n: int = 8) -> list[bytes]:
    """``n`` keys whose ring owners are as uneven as the benchmark's (one replica gets 3 or more)."""
    ring = HashRing(URLS)
    for attempt in range(100):
        keys = tenants(n, f"t{attempt}")
        if max(Counter(ring.owner(k) for k in keys).values()) >= 3:
            return keys
    raise AssertionError("no uneven key set found")


def test_key_cap_is_exactly_even_for_few_keys_with_slack_for_many() -> None:
    assert key_cap(8, 4) == 2
    assert key_cap(9, 4) == 3
    assert key_cap(1, 4) == 1
    assert key_cap(1000, 4) == 250 + 62


def test_reported_ring_placement_is_rebalanced_to_two_each_moving_only_the_excess() -> None:
    keys = uneven_keys()
    ring = HashRing(URLS)
    reports: dict[str, dict[bytes, int]] = {u: {} for u in URLS}
    for k in keys:  # what the first round leaves: every key on its ring owner
        reports[ring.owner(k) or ""][k] = 3
    placement = shared_placement(reports, ring)
    assert sorted(placement.counts.values()) == [2, 2, 2, 2]
    moved = [k for k in keys if placement.homes[k] != ring.owner(k)]
    excess = sum(max(0, len(r) - 2) for r in reports.values())
    assert len(moved) == excess  # keys of replicas within their share stay put


def test_two_sidecars_with_the_same_reports_agree_on_every_home_whatever_they_remembered() -> None:
    rng = random.Random(5)
    keys = tenants(40)
    reports: dict[str, dict[bytes, int]] = {u: {} for u in URLS}
    for k in keys[:30]:  # 30 reported, some by two replicas (detours, moves), with counts that tie or not
        for url in rng.sample(URLS, rng.choice((1, 1, 2))):
            reports[url][k] = rng.choice((1, 2, 5))
    a, b = PrefixAffinity(), PrefixAffinity()
    for k in keys[:30]:  # each sidecar remembers some other home for every reported key
        a.table.put(k, rng.choice(URLS))
        b.table.put(k, rng.choice(URLS))
    peers_a, peers_b = view(reports), view(reports)
    homes_a = {k: a.pick(peers_a, info(k), set()).url for k in keys}
    homes_b = {k: b.pick(peers_b, info(k), set()).url for k in keys}
    assert homes_a == homes_b  # reported keys by the shared placement, the 10 unseen by the same rule
    assert all(a.table.get(k) == homes_a[k] for k in keys)  # the reports overrode the stale entries
    assert max(Counter(homes_a[k] for k in keys[:30]).values()) <= key_cap(30, 4)


def test_reported_ownership_overrides_a_stale_table_entry_deterministically() -> None:
    k = tenants(1)[0]
    ring = HashRing(URLS)
    first, second, third, _ = ring.walk(k)
    policy = PrefixAffinity()
    policy.table.put(k, third)  # this sidecar placed it on `third` long ago
    assert policy.pick(view({}), info(k), set()).url == third
    assert policy.last_reason == "remembered"
    # two replicas report it equally: the one first clockwise from the key wins, on every sidecar
    reports = {second: {k: 2}, first: {k: 2}}
    assert policy.pick(view(reports), info(k), set()).url == first
    assert policy.last_reason == "shared" and policy.table.get(k) == first
    assert PrefixAffinity().pick(view(reports), info(k), set()).url == first
    # the one that served it most owns it, whatever the ring says
    reports = {first: {k: 1}, second: {k: 4}}
    assert policy.pick(view(reports), info(k), set()).url == second
    assert PrefixAffinity().pick(view(reports), info(k), set()).url == second


def test_unseen_keys_spread_two_each_as_the_engines_report_them() -> None:
    """8 new tenants arriving one at a time at different sidecars, a /load poll between: 2 per replica."""
    keys = uneven_keys()
    reports: dict[str, dict[bytes, int]] = {u: {} for u in URLS}
    sidecars = [PrefixAffinity() for _ in range(4)]
    for i, k in enumerate(keys):
        home = sidecars[i % 4].pick(view(reports), info(k), set()).url
        assert sidecars[i % 4].last_reason == "owner"
        reports[home][k] = 1  # the engine served it; every sidecar reads that at its next poll
    assert sorted(len(r) for r in reports.values()) == [2, 2, 2, 2]
    for sidecar in sidecars:  # and every sidecar sends each tenant to that same replica
        for k in keys:
            assert sidecar.pick(view(reports), info(k), set()).url == next(u for u in URLS if k in reports[u])
            assert sidecar.last_reason == "shared"


def test_sidecars_meeting_new_keys_before_any_report_agree_then_converge_evenly() -> None:
    """The benchmark's first round: 8 tenants at once over 4 sidecars, nothing reported yet."""
    keys = uneven_keys()
    sidecars = [PrefixAffinity() for _ in range(4)]
    first = [{k: s.pick(view({}), info(k), set()).url for k in keys} for s in sidecars]
    assert all(f == first[0] for f in first)  # no reports: everyone uses the ring, so they agree
    reports: dict[str, dict[bytes, int]] = {u: {} for u in URLS}
    for k, url in first[0].items():
        reports[url][k] = 1
    after = [{k: s.pick(view(reports), info(k), set()).url for k in keys} for s in sidecars]
    assert all(a == after[0] for a in after)
    assert sorted(Counter(after[0].values()).values()) == [2, 2, 2, 2]
    # the moved keys are now served at their new homes too; the old replicas still report them with
    # their older counts for a while: the placement does not change while both report
    for k, url in after[0].items():
        reports[url][k] = reports[url].get(k, 0) + 1
    again = {k: sidecars[0].pick(view(reports), info(k), set()).url for k in keys}
    assert again == after[0]
    for k, url in after[0].items():  # and once the new homes served it more, still the same
        reports[url][k] += 10
    assert {k: sidecars[1].pick(view(reports), info(k), set()).url for k in keys} == after[0]


def test_a_full_home_still_overflows_and_an_unhealthy_one_fails_over() -> None:
    k = tenants(1)[0]
    reports = {URLS[3]: {k: 5}}
    policy = PrefixAffinity()
    peers = view(reports)
    home = policy.pick(peers, info(k), set())
    assert home.url == URLS[3]  # the reporter, wherever the ring would put the key
    home.outstanding = 8  # a full batch running and one queued (overflowFactor 2): detour, home unchanged
    assert policy.pick(peers, info(k), set()) is not home and policy.last_reason == "overflow"
    home.outstanding = 0
    assert policy.pick(peers, info(k), set()) is home
    assert policy.pick(peers, info(k), {home.url}) is not home  # just tried: failover
    assert policy.pick(peers, info(k), set()) is home
    home.eject()  # its reports no longer count: the key is placed again over the healthy replicas
    other = policy.pick(peers, info(k), set())
    assert other is not home and other.healthy


def test_peer_reads_the_reported_keys_and_ignores_malformed_ones() -> None:
    peer = Peer("a")
    k = tenants(1)[0]
    peer.observe_load({"running": 0, "prefix_keys": {k.hex(): 3, "zz" * 16: 1, "ab": 2, k.hex()[::-1]: -1}})
    assert peer.prefix_keys == {k: 3}
    version = peer.keys_version
    peer.observe_load({"running": 1, "prefix_keys": {k.hex(): 3}})
    assert peer.keys_version == version  # unchanged map, unchanged version: no recomputation
    peer.observe_load({"running": 1})  # an engine that does not report keys keeps what we knew
    assert peer.prefix_keys == {k: 3}
    peer.observe_load({"prefix_keys": "nonsense"})
    assert peer.prefix_keys == {} and peer.keys_version != version


def test_one_sidecars_burst_of_new_keys_spreads_two_each_before_any_report() -> None:
    """Its own placements count until the engines report them: 8 new tenants at once -> 2 per replica."""
    keys = uneven_keys()
    policy = PrefixAffinity(table_entries=0)  # no table: the pending placements alone keep a key put
    homes = {k: policy.pick(view({}), info(k), set()).url for k in keys}
    assert sorted(Counter(homes.values()).values()) == [2, 2, 2, 2]
    assert {k: policy.pick(view({}), info(k), set()).url for k in keys} == homes  # stable while pending
    reports: dict[str, dict[bytes, int]] = {u: {} for u in URLS}
    for k, url in homes.items():
        reports[url][k] = 1
    assert {k: policy.pick(view(reports), info(k), set()).url for k in keys} == homes  # reported: the same homes
    assert policy.last_reason == "shared"
    newcomer = tenants(1, "newcomer")[0]
    policy.pick(view(reports), info(newcomer), set())  # the next new key prunes what the reports now show
    assert list(policy._pending) == [newcomer]


def test_pending_placements_expire() -> None:
    clock = [0.0]
    policy = PrefixAffinity()
    policy._clock = lambda: clock[0]
    first, second = tenants(2, "expiring")
    policy.pick(view({}), info(first), set())
    assert policy._pending_per_url
    clock[0] = 10.0  # long past PENDING_S with no report: the engine may have dropped it; stop counting it
    policy.pick(view({}), info(second), set())
    assert list(policy._pending) == [second] and sum(policy._pending_per_url.values()) == 1


def test_a_cold_burst_spread_over_the_sidecars_lands_two_per_replica_through_locality() -> None:
    """The benchmark's first round as the gateway delivers it: 8 new tenants, 2 to each of 4 sidecars, before
    any engine reports. Each sidecar puts its new prefixes on its own pod's engine, so the burst is even
    without the sidecars talking to each other (the ring alone gives uneven_keys() 3 or more on one)."""
    keys = uneven_keys()
    sidecars = [PrefixAffinity() for _ in URLS]
    for sidecar, own in zip(sidecars, URLS, strict=True):
        sidecar.local_peer = own
    homes = {k: sidecars[i // 2].pick(view({}), info(k), set()).url for i, k in enumerate(keys)}
    assert sorted(Counter(homes.values()).values()) == [2, 2, 2, 2]
    assert all(homes[k] == URLS[i // 2] for i, k in enumerate(keys))
    reports: dict[str, dict[bytes, int]] = {u: {} for u in URLS}
    for k, url in homes.items():
        reports[url][k] = 1
    for sidecar in sidecars:  # once reported, every sidecar routes every tenant to the same home
        assert {k: sidecar.pick(view(reports), info(k), set()).url for k in keys} == homes


def test_locality_yields_to_the_even_share_once_the_local_replica_holds_its_part() -> None:
    """With reports in, a new key goes local only while the local replica is under the share."""
    keys = tenants(9, "held")
    reports: dict[str, dict[bytes, int]] = {u: {} for u in URLS}
    for i, k in enumerate(keys):  # 3 of 9 on URLS[0] (its full share: key_cap(10, 4) = 3), 3 each on 1 and 2
        reports[URLS[i // 3]][k] = 1
    policy = PrefixAffinity()
    policy.local_peer = URLS[0]
    newcomer = tenants(1, "fresh")[0]
    home = policy.pick(view(reports), info(newcomer), set())
    assert home is not None and home.url != URLS[0]
    unloaded = PrefixAffinity()
    unloaded.local_peer = URLS[3]
    assert unloaded.pick(view(reports), info(newcomer), set()).url == URLS[3]  # holds none: under its share
