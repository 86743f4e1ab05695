"""The coordinator: keeps a view of the replicas and forwards requests to one.

Health is polled from each replica's /readyz; a replica that refuses a
connection is ejected at once and re-admitted when /readyz answers again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import aiohttp

from modelfleet.dataplane.sidecar.metrics import SidecarMetrics
from modelfleet.dataplane.sidecar.routing import Peer, RoutingPolicy
from modelfleet.dataplane.upstream import Attempt, open_upstream

log = logging.getLogger(__name__)


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
    ) -> None:
        self.deployment = deployment
        self.peers = [Peer(url.rstrip("/"), healthy=False) for url in peer_urls]
        self.policy = policy
        self.metrics = metrics
        self.retry_budget = retry_budget
        self.health_interval_s = health_interval_s
        self.session: aiohttp.ClientSession | None = None
        self._index = {p.url: i for i, p in enumerate(self.peers)}

    def replica_index(self, url: str) -> int:
        return self._index[url]

    def _peer(self, url: str) -> Peer:
        return self.peers[self._index[url]]

    def ready(self) -> bool:
        return any(p.healthy for p in self.peers)

    async def health_loop(self) -> None:
        assert self.session is not None
        while True:
            await asyncio.gather(*(self._check(p) for p in self.peers))
            self.metrics.healthy_peers.set(sum(p.healthy for p in self.peers))
            all_up = all(p.healthy for p in self.peers)
            await asyncio.sleep(self.health_interval_s if all_up else min(self.health_interval_s, 0.5))

    async def _check(self, peer: Peer) -> None:
        assert self.session is not None
        try:
            async with self.session.get(peer.url + "/readyz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                ok = resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        if ok and not peer.healthy:
            log.info("replica %s is ready", peer.url)
        elif not ok and peer.healthy:
            log.warning("replica %s is not ready; ejected", peer.url)
        peer.healthy = ok

    async def forward(self, path: str, body: bytes, headers: dict[str, str]) -> Attempt:
        """Open a response from some replica. The caller calls ``end(url)`` when done."""
        assert self.session is not None
        picked: list[str] = []

        def pick(exclude: set[str]) -> str | None:
            peer = self.policy.pick(self.peers, exclude)
            if peer is None:
                return None
            peer.outstanding += 1
            picked.append(peer.url)
            return peer.url

        def on_retry(url: str, reason: str) -> None:
            self.metrics.retries.labels(reason=reason if reason in {"connect", "429", "503"} else "other").inc()
            peer = self._peer(url)
            peer.outstanding -= 1
            picked.remove(url)
            if reason == "connect":
                peer.healthy = False

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
            for url in picked:
                self._peer(url).outstanding -= 1
            raise
        self.metrics.routed.labels(peer_index=str(self._index[attempt.url])).inc()
        return attempt

    def end(self, url: str) -> None:
        self._peer(url).outstanding -= 1
