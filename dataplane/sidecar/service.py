"""The coordinator: keeps a view of the replicas and forwards requests to one.

Every ``health_interval_s`` (0.5 s while some replica is down) each replica's
/readyz is checked, and a ready one's /load read into its load view
(``peers.py`` says how ejection and re-admission follow from the checks);
between checks, every ``load_interval_s`` (0.25 s), the healthy replicas' /load
is read again: the load view counts every sidecar's requests only through it,
and a stale "full batch" would send requests off their prefix's home until the
next read (a /load is one small GET, about 16 per second per replica with 4
sidecars). A
replica that refuses a connection while a request is forwarded is ejected at
once. Requests that have not streamed a byte are retried on another replica
within the retry budget (``upstream.open_upstream``); the policy sees the
replicas already tried as excluded. A request sent to its prompt prefix's home
carries the prefix key to the engine in the ``x-modelfleet-prefix-key`` header
(hex; not on a detour or failover), and the engine reports the keys it served
in /load (engine/prefix_keys.py): that is how PrefixAffinity's sidecars share
where prefixes live (placement.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import aiohttp

from modelfleet.dataplane.common.headers import PREFIX_KEY_HEADER
from modelfleet.dataplane.sidecar.metrics import SidecarMetrics
from modelfleet.dataplane.sidecar.peers import CheckResult, Peer
from modelfleet.dataplane.sidecar.request_key import request_info
from modelfleet.dataplane.sidecar.routing import PrefixAffinity, RequestInfo, RoutingPolicy
from modelfleet.dataplane.sidecar.tiers import LOCAL_TIER, Spillover
from modelfleet.dataplane.upstream import Attempt, open_upstream

log = logging.getLogger(__name__)

CHECK_TIMEOUT = aiohttp.ClientTimeout(total=2)
HOME_REASONS = frozenset({"owner", "remembered", "shared"})  # PrefixAffinity picks that are the prefix's home


class Coordinator:
    def __init__(
        self,
        deployment: str,
        peer_urls: Sequence[str],
        policy: RoutingPolicy,
        metrics: SidecarMetrics,
        *,
        retry_budget: int = 2,
        health_interval_s: float = 2.0,
        load_interval_s: float = 0.25,
        eject_after: int = 3,
        spillover: Spillover | None = None,
    ) -> None:
        self.deployment = deployment
        self.spillover = spillover
        self.policy = policy
        self.metrics = metrics
        self.retry_budget = retry_budget
        self.health_interval_s = health_interval_s
        self.load_interval_s = load_interval_s
        self.eject_after = eject_after
        self.session: aiohttp.ClientSession | None = None
        self.peers: list[Peer] = []
        self._index: dict[str, int] = {}
        self.set_peers(peer_urls)

    def set_peers(self, peer_urls: Sequence[str]) -> None:
        """Replaces the peer set (peer discovery); known peers keep their state, new ones start not ready."""
        known = {p.url: p for p in self.peers}
        urls = list(dict.fromkeys(url.rstrip("/") for url in peer_urls))
        self.peers = [known.get(url) or Peer(url, healthy=False) for url in urls]
        self._index = {p.url: i for i, p in enumerate(self.peers)}

    def replica_index(self, url: str) -> int:
        return self._index[url]

    def tier_of(self, url: str) -> str:
        """``local`` for the deployment's replicas, else the spill-over tier's name."""
        name = self.spillover.name_of(url) if self.spillover is not None else None
        return name or LOCAL_TIER

    def _peer(self, url: str) -> Peer | None:
        i = self._index.get(url)
        if i is None and self.spillover is not None:
            return self.spillover.peer(url)
        return self.peers[i] if i is not None else None

    def ready(self) -> bool:
        return any(p.healthy for p in self.peers)

    async def health_loop(self) -> None:
        """Health checks, and the /load reads between them, until cancelled."""
        await asyncio.gather(self._check_rounds(), self._load_rounds())

    async def _check_rounds(self) -> None:
        while True:
            await self.check_all()
            all_up = all(p.healthy for p in self.peers)
            await asyncio.sleep(self.health_interval_s if all_up else min(self.health_interval_s, 0.5))

    async def _load_rounds(self) -> None:
        if self.load_interval_s >= self.health_interval_s:
            return  # the health checks read /load often enough
        while True:
            await asyncio.sleep(self.load_interval_s)
            if self.session is not None:
                await asyncio.gather(*(self._poll_load(p) for p in self.peers if p.healthy))

    async def check_all(self) -> None:
        """One round of health checks and load polls over every peer."""
        tiers = self.spillover.peers if self.spillover is not None else []
        await asyncio.gather(*(self._check(p) for p in [*self.peers, *tiers]))
        m = self.metrics
        m.healthy_peers.set(sum(p.healthy for p in self.peers))
        for peer in self.peers:
            index = str(self._index[peer.url])
            m.peer_load.labels(peer_index=index).set(peer.load)
            m.peer_queued.labels(peer_index=index).set(peer.queued)
            if peer.kv_usage is not None:
                m.peer_kv_usage.labels(peer_index=index).set(peer.kv_usage)
        if isinstance(self.policy, PrefixAffinity):
            m.prefix_table_entries.set(len(self.policy.table))

    async def _check(self, peer: Peer) -> None:
        assert self.session is not None
        try:
            async with self.session.get(peer.url + "/readyz", timeout=CHECK_TIMEOUT) as resp:
                result = {200: CheckResult.READY, 503: CheckResult.NOT_READY}.get(resp.status, CheckResult.FAILED)
            if result is CheckResult.READY:
                await self._poll_load(peer)
        except (aiohttp.ClientError, TimeoutError):
            result = CheckResult.FAILED
        self._apply_check(peer, result)

    async def _poll_load(self, peer: Peer) -> None:
        """The engine's load view; a replica without /load (another runtime) keeps routing on outstanding."""
        assert self.session is not None
        try:
            async with self.session.get(peer.url + "/load", timeout=CHECK_TIMEOUT) as resp:
                if resp.status == 200:
                    peer.observe_load(await resp.json())
        except (aiohttp.ClientError, TimeoutError, ValueError):
            pass

    def _apply_check(self, peer: Peer, result: CheckResult) -> None:
        change = peer.observe_check(result, self.eject_after)
        if peer.url not in self._index:  # removed from the peer set while being checked
            return
        index = str(self._index[peer.url])
        if change == "admitted":
            log.info("replica %s is ready", peer.url)
            self.metrics.readmissions.labels(peer_index=index).inc()
        elif change == "ejected":
            cause = "not_ready" if result is CheckResult.NOT_READY else "health_check"
            log.warning("replica %s ejected (%s)", peer.url, cause)
            self.metrics.ejections.labels(peer_index=index, cause=cause).inc()

    def request_info(self, body: bytes, headers: dict[str, str]) -> RequestInfo:
        return request_info(body, headers, self.policy.prefix_chars)

    async def forward(self, path: str, body: bytes, headers: dict[str, str]) -> Attempt:
        """Open a response from some replica. The caller calls ``end(url)`` when done."""
        assert self.session is not None
        info = self.request_info(body, headers)
        picked: list[Peer] = []
        reasons: dict[str, str] = {}
        spill = self.spillover.target(self.peers) if self.spillover is not None else None
        if spill is not None:
            return await self._forward_to_tier(spill, path, body, headers)
        key_hex = info.prefix_key.hex() if info.prefix_key is not None else None
        headers = dict(headers)  # pick() below sets the prefix key per attempt; open_upstream sends this dict

        def pick(exclude: set[str]) -> str | None:
            peer = self.policy.pick(self.peers, info, exclude)
            if peer is None:
                return None
            peer.outstanding += 1
            picked.append(peer)
            reasons[peer.url] = self.policy.last_reason
            # the key goes to the prefix's home only: a detour or failover replica that reported it would
            # look like an owner to every sidecar's shared placement (never sent to a spill-over tier either)
            if key_hex is not None and self.policy.last_reason in HOME_REASONS:
                headers[PREFIX_KEY_HEADER] = key_hex
            else:
                headers.pop(PREFIX_KEY_HEADER, None)
            return peer.url

        def on_retry(url: str, reason: str) -> None:
            self.metrics.retries.labels(reason=reason if reason in {"connect", "429", "503"} else "other").inc()
            peer = next(p for p in picked if p.url == url)
            peer.outstanding -= 1
            picked.remove(peer)
            if reason == "connect" and peer.healthy:
                peer.eject()
                log.warning("replica %s refused a connection; ejected", url)
                if url in self._index:
                    self.metrics.ejections.labels(peer_index=str(self._index[url]), cause="connect").inc()

        try:
            attempt = await open_upstream(
                self.session,
                pick,
                path,
                body,
                headers,
                retry_budget=self.retry_budget,
                on_retry=on_retry,
                what=f"deployment {self.deployment!r}",
            )
        except BaseException:
            for peer in picked:
                peer.outstanding -= 1
            raise
        self.metrics.routed.labels(
            policy=self.policy.name.value,
            peer_index=str(self._index.get(attempt.url, -1)),
            reason=reasons.get(attempt.url, ""),
        ).inc()
        return attempt

    def peer_urls(self) -> set[str]:
        return set(self._index)

    async def forward_to(
        self,
        url: str,
        path: str,
        body: bytes,
        headers: dict[str, str],
        what: str,
        on_retry: Callable[[str, str], None] | None = None,
    ) -> Attempt:
        """One try at a URL outside the peer set (a rollout's candidate, a spill-over tier); its answer, or its
        refusal, reaches the caller as it is. ``on_retry`` hears why the try failed, as open_upstream says it."""
        assert self.session is not None

        def pick(exclude: set[str]) -> str | None:
            return url if url not in exclude else None

        return await open_upstream(
            self.session,
            pick,
            path,
            body,
            headers,
            retry_budget=0,
            on_retry=on_retry or (lambda u, r: None),
            what=what,
        )

    async def _forward_to_tier(self, tier: Peer, path: str, body: bytes, headers: dict[str, str]) -> Attempt:
        """One try at the spill-over tier; its refusal (budget spent, rate limited) reaches the client as it is."""
        name = self.tier_of(tier.url)
        self.metrics.tier_requests.labels(tier=name).inc()
        tier.outstanding += 1

        def on_retry(url: str, reason: str) -> None:
            if reason == "connect":
                tier.eject()

        try:
            return await self.forward_to(tier.url, path, body, headers, f"tier {name!r}", on_retry)
        except BaseException:
            tier.outstanding -= 1  # refused, unreachable, or the client left while waiting
            self.metrics.failures.labels(kind="tier").inc()
            raise

    def end(self, url: str) -> None:
        peer = self._peer(url)
        if peer is not None:
            peer.outstanding -= 1
