"""Canary and shadow traffic through a real sidecar app on loopback, in front of two tiny aiohttp servers.

The servers stand in for a baseline and a candidate engine so the split, the mirrors and the recorded
observations can be checked exactly: each streams a fixed answer of its own (or the same answer, when
told to agree) in the OpenAI SSE shape.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from modelfleet.dataplane.rollout.gate import evaluate
from modelfleet.dataplane.rollout.observations import GatePolicy, Observation
from modelfleet.dataplane.rollout.plan import RolloutPlan
from modelfleet.dataplane.sidecar.api import build_app
from modelfleet.dataplane.sidecar.metrics import SidecarMetrics
from modelfleet.dataplane.sidecar.rollout import Capture, RolloutTraffic, comparable, fingerprint
from modelfleet.dataplane.sidecar.routing import make_policy
from modelfleet.dataplane.sidecar.service import Coordinator
from modelfleet.dataplane.spec import RolloutStrategy


class Engine:
    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.requests: list[dict[str, object]] = []
        self.url = ""
        self.runner: web.AppRunner | None = None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"body": body, "id": request.headers.get("x-request-id")})
        if not body.get("stream"):
            text = "".join(self.words)
            return web.json_response({"choices": [{"index": 0, "message": {"content": text}}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for word in self.words:
            event = {"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await resp.write(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
        return resp

    async def readyz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    async def start(self) -> Engine:
        app = web.Application()
        app.router.add_get("/readyz", self.readyz)
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def sidecar(baseline: Engine, plan_file: Path, candidate: Engine) -> AsyncIterator[tuple[str, RolloutTraffic]]:
    """A sidecar in front of ``baseline`` reading ``plan_file``; both engines are stopped after."""
    coord = Coordinator("t", [baseline.url], make_policy("RoundRobin"), SidecarMetrics(), health_interval_s=0.05)
    traffic = RolloutTraffic(plan_file, seed=3)
    runner = web.AppRunner(build_app(coord, traffic))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    for _ in range(500):  # a loaded machine may take seconds for the first health check
        if coord.ready():
            break
        await asyncio.sleep(0.02)
    try:
        yield url, traffic
    finally:
        await runner.cleanup()
        await baseline.stop()
        await candidate.stop()


def write_plan(path: Path, candidate: Engine, strategy: RolloutStrategy, weight: int, mirror: int = 100) -> None:
    plan = RolloutPlan(
        id="r1", strategy=strategy, weight=weight, mirror_percent=mirror, candidate_peers=[candidate.url]
    )
    path.write_text(json.dumps(plan.to_wire()))


async def ask(session: aiohttp.ClientSession, url: str, i: int, stream: bool = True) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}], "temperature": 0, "stream": stream}
    async with session.post(url + "/v1/chat/completions", json=body, headers={"x-request-id": f"req-{i}"}) as resp:
        assert resp.status == 200
        raw = await resp.read()
    if not stream:
        return str(json.loads(raw)["choices"][0]["message"]["content"])
    text = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:])["choices"]:
                text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text)


async def settle(traffic: RolloutTraffic) -> None:
    for _ in range(500):
        if not traffic.tasks:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("mirrors still in flight after 10 s")


@pytest.mark.asyncio
async def test_shadow_mirrors_every_request_and_the_client_sees_only_the_baseline(tmp_path: Path) -> None:
    base, cand = await Engine(["Hel", "lo"]).start(), await Engine(["Hel", "lo"]).start()
    plan_file = tmp_path / "plan.json"
    write_plan(plan_file, cand, RolloutStrategy.SHADOW, weight=0)
    async for url, traffic in sidecar(base, plan_file, cand):
        async with aiohttp.ClientSession() as session:
            answers = [await ask(session, url, i, stream=i % 2 == 0) for i in range(6)]
            await settle(traffic)
            async with session.get(url + "/rollout/observations?id=r1") as resp:
                snapshot = await resp.json()
            async with session.get(url + "/rollout/observations?id=other") as resp:
                assert (await resp.json())["baseline"] == []
    assert answers == ["Hello"] * 6
    assert len(base.requests) == 6 and len(cand.requests) == 6
    assert all(r["body"]["stream"] is True for r in cand.requests)  # mirrors stream, to time the first token
    assert {r["id"] for r in cand.requests} == {f"req-{i}" for i in range(6)}
    baseline = [Observation.model_validate(o) for o in snapshot["baseline"]]
    candidate = [Observation.model_validate(o) for o in snapshot["candidate"]]
    assert {o.request_id for o in baseline} == {o.request_id for o in candidate} == {f"req-{i}" for i in range(6)}
    assert all(o.ok and o.output_tokens == [fingerprint("Hello")] for o in baseline + candidate)
    assert all(o.ttft_ms is not None and o.itl_ms is not None for o in candidate)
    report = evaluate(
        GatePolicy(min_matched=6, max_latency_p95_ratio=100, max_ttft_p95_ratio=100, max_itl_p95_ratio=100),
        baseline,
        candidate,
    )
    assert report["decision"] == "promote"


@pytest.mark.asyncio
async def test_canary_splits_by_weight_and_a_different_answer_rolls_back(tmp_path: Path) -> None:
    base, cand = await Engine(["Hel", "lo"]).start(), await Engine(["Good", "bye"]).start()
    plan_file = tmp_path / "plan.json"
    write_plan(plan_file, cand, RolloutStrategy.CANARY, weight=50)
    async for url, traffic in sidecar(base, plan_file, cand):
        async with aiohttp.ClientSession() as session:
            answers = [await ask(session, url, i) for i in range(40)]
            await settle(traffic)
            snapshot = traffic.snapshot("r1")
    served_by_candidate = answers.count("Goodbye")
    assert 10 <= served_by_candidate <= 30 and answers.count("Hello") == 40 - served_by_candidate
    assert len(cand.requests) == served_by_candidate  # only the canary's share; no mirrors to the candidate
    assert len(base.requests) == 40  # its own share plus a mirror of every canary request
    candidate = [Observation.model_validate(o) for o in snapshot["candidate"]]
    baseline = [Observation.model_validate(o) for o in snapshot["baseline"]]
    assert len(candidate) == served_by_candidate and len(baseline) == 40
    report = evaluate(GatePolicy(min_matched=5, max_latency_p95_ratio=100, max_ttft_p95_ratio=100), baseline, candidate)
    assert report["decision"] == "rollback"


@pytest.mark.asyncio
async def test_no_plan_file_means_no_rollout_and_a_removed_plan_ends_it(tmp_path: Path) -> None:
    base, cand = await Engine(["a"]).start(), await Engine(["b"]).start()
    plan_file = tmp_path / "plan.json"
    async for url, traffic in sidecar(base, plan_file, cand):
        async with aiohttp.ClientSession() as session:
            assert await ask(session, url, 0) == "a"
            write_plan(plan_file, cand, RolloutStrategy.CANARY, weight=100, mirror=0)
            traffic.refresh(force=True)
            assert await ask(session, url, 1) == "b"
            plan_file.unlink()
            traffic.refresh(force=True)
            assert await ask(session, url, 2) == "a"
    assert traffic.plan is None and not traffic.observations["baseline"]


def test_capture_reads_sse_json_and_embeddings() -> None:
    streamed = Capture("r", compare=True, streaming=True)
    for part in (b'data: {"choices":[{"index":0,"delta":{"content":"A"}}]}\n\nda', b'ta: {"choices":[{"index":0,'):
        streamed.feed(part)
    streamed.feed(b'"delta":{"content":"B"}}]}\n\ndata: {"choices":[],"usage":{"completion_tokens":2}}\n\n')
    streamed.read_headers({"x-modelfleet-queue-depth": "3", "x-modelfleet-kv-usage": "0.25"})
    obs = streamed.observation({"model_version": "v1", "runtime": "torch", "accelerator": None}, "http://e", "shadow")
    assert obs["output_tokens"] == [fingerprint("AB")] and obs["completion_tokens"] == 2
    assert len(obs["itl_ms"]) == 1 and obs["model_version"] == "v1" and obs["runtime"] == "torch"
    assert "accelerator" not in obs and obs["queue_depth"] == 3 and obs["kv_usage"] == 0.25
    junk = Capture("r", compare=False)
    junk.read_headers({"x-modelfleet-queue-depth": "many", "x-modelfleet-kv-usage": "2.5"})
    assert "queue_depth" not in junk.observation({}, "u", "mirror") and junk.kv_usage is None
    vectors = Capture("r", compare=True)
    vectors.feed(b'{"data":[{"embedding":[0.5,1]},{"embedding":[2]}]}')
    assert vectors.observation({}, "u", "mirror")["output_vector"] == [0.5, 1.0, 2.0]
    failed = Capture("r", compare=True, streaming=True)
    failed.feed(b'data: {"error":{"message":"x"}}\n\n')
    assert failed.observation({}, "u", "mirror")["ok"] is False
    sampled = Capture("r", compare=False)
    sampled.feed(b'{"choices":[{"index":0,"message":{"content":"x"}}]}')
    assert "output_tokens" not in sampled.observation({}, "u", "canary")
    assert comparable({"temperature": 0}) and not comparable({"temperature": 0.7}) and not comparable({})
    assert comparable({"input": "x"})


def test_plan_sides_name_runtime_and_accelerator() -> None:
    from modelfleet.dataplane.rollout.plan import sides
    from modelfleet.dataplane.spec import InferenceDeploymentSpec

    cpu = InferenceDeploymentSpec.model_validate({"model": {"name": "m", "source": {"path": "/w"}}})
    gpu = InferenceDeploymentSpec.model_validate(
        {
            "model": {"name": "m", "source": {"path": "/w"}},
            "runtime": {"device": "cuda"},
            "placement": {"gpuTypes": ["H100"]},
        }
    )
    got = sides(cpu, gpu, "b1", "c1")
    assert got == {
        "baseline_version": "b1",
        "candidate_version": "c1",
        "baseline_runtime": "torch",
        "candidate_runtime": "torch",
        "baseline_accelerator": "cpu",
        "candidate_accelerator": "H100",
    }


@pytest.mark.asyncio
async def test_a_candidate_that_cannot_be_reached_is_an_error_observation_and_the_baseline_serves(
    tmp_path: Path,
) -> None:
    base, cand = await Engine(["fine"]).start(), await Engine(["gone"]).start()
    plan_file = tmp_path / "plan.json"
    write_plan(plan_file, cand, RolloutStrategy.CANARY, weight=100, mirror=0)
    async for url, traffic in sidecar(base, plan_file, cand):
        await cand.stop()  # stopped while the plan still names it (a rollback in progress)
        cand.runner = None
        async with aiohttp.ClientSession() as session:
            assert await ask(session, url, 0) == "fine"
        snapshot = traffic.snapshot("r1")
    (failed,) = snapshot["candidate"]
    assert failed["ok"] is False and failed["request_id"] == "req-0"
    assert Observation.model_validate(failed).replica is None  # the gate reads it: an error, not a dropped row
