"""A real sidecar app and Coordinator in front of three tiny aiohttp servers on loopback.

The servers stand in for engines so the routing can be observed, not to fake
a model: each answers /readyz, /load and /v1/chat/completions with a fixed
body carrying its own name, and keeps the set of prompt prefixes it has seen,
a stand-in for the engine's prefix cache (a repeat is a "hit").
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from modelfleet.dataplane.common.headers import PREFIX_KEY_HEADER
from modelfleet.dataplane.engine.prefix_keys import RecentPrefixKeys
from modelfleet.dataplane.sidecar.api import build_app
from modelfleet.dataplane.sidecar.metrics import SidecarMetrics
from modelfleet.dataplane.sidecar.request_key import prompt_prefix
from modelfleet.dataplane.sidecar.routing import make_policy
from modelfleet.dataplane.sidecar.service import Coordinator


@dataclass
class StandIn:
    name: str
    seen: set[str] = field(default_factory=set)
    hits: int = 0
    served: int = 0
    url: str = ""
    runner: web.AppRunner | None = None
    keys: RecentPrefixKeys | None = None  # set: note and report prefix keys in /load, as the engine does
    load_reads: int = 0
    readyz_reads: int = 0

    async def chat(self, request: web.Request) -> web.Response:
        prefix = prompt_prefix(await request.read(), 256) or ""
        if self.keys is not None:
            self.keys.note(request.headers.get(PREFIX_KEY_HEADER))
        self.hits += prefix in self.seen
        self.seen.add(prefix)
        self.served += 1
        return web.json_response({"object": "chat.completion", "served_by": self.name})

    async def readyz(self, request: web.Request) -> web.Response:
        self.readyz_reads += 1
        return web.json_response({"status": "ready"})

    async def load(self, request: web.Request) -> web.Response:
        self.load_reads += 1
        reported = {"prefix_keys": self.keys.report()} if self.keys is not None else {}
        return web.json_response({"running": 0, "queued": 0, "ready": True, **reported})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/load", self.load)
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def start_sidecar(
    policy: str, engines: list[StandIn], **intervals: float
) -> tuple[web.AppRunner, str, Coordinator]:
    intervals.setdefault("health_interval_s", 0.05)
    coord = Coordinator("t", [e.url for e in engines], make_policy(policy), SidecarMetrics(), **intervals)
    runner = web.AppRunner(build_app(coord))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    for _ in range(200):
        if all(p.healthy for p in coord.peers):
            break
        await asyncio.sleep(0.02)
    return runner, url, coord


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Wait for a condition (polled every 10 ms), failing after timeout_s."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"no {what} within {timeout_s} s"
        await asyncio.sleep(0.01)


@pytest.fixture
async def engines() -> AsyncIterator[list[StandIn]]:
    servers = [StandIn(f"engine-{i}") for i in range(3)]
    for s in servers:
        await s.start()
    yield servers
    for s in servers:
        if s.runner is not None:
            await s.stop()


SYSTEM_PROMPTS = [
    f"You are assistant number {i}. " + "Follow the house style guide closely. " * 8 for i in range(5)
]  # not a multiple of 3


def body(system: str, user: str) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}


async def run_workload(sidecar: str) -> list[str]:
    """Five shared system prompts, six questions each, interleaved; returns who served each."""
    served_by = []
    async with aiohttp.ClientSession() as client:
        for q in range(6):
            for system in SYSTEM_PROMPTS:
                async with client.post(sidecar + "/v1/chat/completions", json=body(system, f"question {q}")) as resp:
                    assert resp.status == 200
                    served_by.append(json.loads(await resp.read())["served_by"])
    return served_by


@pytest.mark.parametrize("policy", ["PrefixAffinity", "RoundRobin"])
async def test_prefix_affinity_concentrates_cache_hits(engines, policy):
    runner, sidecar, _ = await start_sidecar(policy, engines)
    try:
        served_by = await run_workload(sidecar)
    finally:
        await runner.cleanup()
    per_prompt = [set(served_by[i :: len(SYSTEM_PROMPTS)]) for i in range(len(SYSTEM_PROMPTS))]
    hits = sum(e.hits for e in engines)
    if policy == "PrefixAffinity":
        assert all(len(s) == 1 for s in per_prompt)  # a repeated prefix always meets the same server
        assert len(set(served_by)) >= 2  # different prefixes spread
        assert hits == 30 - len(SYSTEM_PROMPTS)  # only each prompt's first request misses
    else:
        assert hits == 30 - 3 * len(SYSTEM_PROMPTS)  # turns take every prompt cold to each of the three


async def test_an_engine_that_goes_away_is_ejected_and_its_prefixes_move(engines):
    runner, sidecar, coord = await start_sidecar("PrefixAffinity", engines)
    try:
        async with aiohttp.ClientSession() as client:
            first = await client.post(sidecar + "/v1/chat/completions", json=body(SYSTEM_PROMPTS[0], "q"))
            home = json.loads(await first.read())["served_by"]
            gone = next(e for e in engines if e.name == home)
            await gone.stop()
            gone.runner = None
            # the next request is retried on another engine before a byte is sent; the dead one is ejected
            again = await client.post(sidecar + "/v1/chat/completions", json=body(SYSTEM_PROMPTS[0], "q2"))
            assert again.status == 200
            assert json.loads(await again.read())["served_by"] != home
            assert not coord.peers[coord.replica_index(gone.url)].healthy
            metrics = await (await client.get(sidecar + "/metrics")).text()
    finally:
        await runner.cleanup()
    assert 'modelfleet_sidecar_ejections_total{cause="connect"' in metrics
    assert 'modelfleet_sidecar_retries_total{reason="connect"} 1.0' in metrics
    assert 'policy="PrefixAffinity"' in metrics and 'reason="owner"' in metrics


async def test_two_sidecars_converge_on_one_even_placement_through_the_engines_reports(engines):
    for e in engines:
        e.keys = RecentPrefixKeys()
    runner_a, sidecar_a, coord_a = await start_sidecar("PrefixAffinity", engines)
    runner_b, sidecar_b, coord_b = await start_sidecar("PrefixAffinity", engines)
    by_url = {e.url: e for e in engines}

    def reports_arrived() -> bool:  # both sidecars hold every engine's latest prefix report
        return all(
            len(peer.prefix_keys) == len(by_url[peer.url].keys.report())  # type: ignore[union-attr]
            for coord in (coord_a, coord_b)
            for peer in coord.peers
        )

    served: dict[int, list[str]] = {i: [] for i in range(len(SYSTEM_PROMPTS))}
    try:
        async with aiohttp.ClientSession() as client:
            for q in range(8):
                for i, system in enumerate(SYSTEM_PROMPTS):
                    sidecar = (sidecar_a, sidecar_b)[(q + i) % 2]  # each prompt alternates between the sidecars
                    async with client.post(sidecar + "/v1/chat/completions", json=body(system, f"q{q}")) as resp:
                        assert resp.status == 200
                        served[i].append(json.loads(await resp.read())["served_by"])
                await until(reports_arrived, "prefix reports at both sidecars")  # before the next round
            metrics = await (await client.get(sidecar_b + "/metrics")).text()
    finally:
        await runner_a.cleanup()
        await runner_b.cleanup()
    assert sum(len(e.keys.report()) for e in engines if e.keys is not None) >= len(SYSTEM_PROMPTS)  # headers arrived
    last = {i: s[-4:] for i, s in served.items()}  # once the reports are in, both sidecars agree
    assert all(len(set(s)) == 1 for s in last.values()), last
    per_engine = Counter(s[0] for s in last.values())
    assert max(per_engine.values()) <= 2  # 5 prompts over 3 engines: at most ceil(5 / 3) each
    assert 'reason="shared"' in metrics


async def test_only_the_prefix_home_is_told_the_key_not_a_detour(engines):
    for e in engines:
        e.keys = RecentPrefixKeys()
    runner, sidecar, coord = await start_sidecar("PrefixAffinity", engines)
    try:
        async with aiohttp.ClientSession() as client:
            async with client.post(sidecar + "/v1/chat/completions", json=body(SYSTEM_PROMPTS[0], "q")) as resp:
                home = json.loads(await resp.read())["served_by"]
            for peer in coord.peers:
                peer.max_num_seqs = 1  # the engines' capacity, as their /load would report it
            # home is full: a batch of 1 running and 1 queued (overflowFactor 2)
            coord.peers[next(i for i, e in enumerate(engines) if e.name == home)].outstanding = 2
            async with client.post(sidecar + "/v1/chat/completions", json=body(SYSTEM_PROMPTS[0], "q2")) as resp:
                detour = json.loads(await resp.read())["served_by"]
    finally:
        await runner.cleanup()
    assert detour != home
    reported = {e.name: e.keys.report() for e in engines if e.keys is not None}
    assert len(reported[home]) == 1 and reported[detour] == {}  # the detour must not look like an owner


async def test_load_is_read_between_health_checks(engines):
    runner, _, _ = await start_sidecar("PrefixAffinity", engines, health_interval_s=0.2, load_interval_s=0.02)
    try:
        # each health check reads /load too: reads beyond one per check come from the load rounds between them
        def between_checks() -> list[int]:
            return [e.load_reads - e.readyz_reads for e in engines]

        before = between_checks()
        await until(
            lambda: all(b - a >= 3 for a, b in zip(before, between_checks(), strict=True)),
            "three /load reads between health checks at every engine",
        )
    finally:
        await runner.cleanup()
