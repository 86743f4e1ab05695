"""Continuous batching through gateway -> sidecar -> engine: 16 concurrent streams from the official
`openai` client each get exactly the greedy output of their prompt run alone, and the engine's load and
metrics endpoints show the paged-KV and prefix-cache state."""

from __future__ import annotations

import asyncio

import openai
import pytest

from modelfleet.dataplane.manifest import load_manifests
from modelfleet.dataplane.spec import InferenceDeploymentSpec
from tests.integration.conftest import MANIFEST, engine_url, get, metric

pytestmark = [pytest.mark.model, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
TOPICS = [
    "the sea", "a cat", "Paris", "winter", "a robot", "bread", "the moon", "a train",
    "rain", "a violin", "mountains", "coffee", "a lighthouse", "autumn", "a bicycle", "the desert",
]  # fmt: skip


def deployment(name: str) -> InferenceDeploymentSpec:
    return next(d.spec for d in load_manifests(MANIFEST) if d.metadata.name == name)


async def stream(client: openai.AsyncOpenAI, topic: str) -> str:
    parts: list[str] = []
    chunks = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"Write one sentence about {topic}."}],
        temperature=0,
        max_tokens=20,
        stream=True,
    )
    async for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


async def test_sixteen_concurrent_streams_each_equal_their_prompt_alone(stack):
    async with openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0) as client:
        together = await asyncio.gather(*(stream(client, t) for t in TOPICS))
        alone = [await stream(client, t) for t in TOPICS]
    assert all(together)
    for topic, a, b in zip(TOPICS, together, alone, strict=True):
        assert a == b, topic


def test_engine_reports_kv_and_prefix_cache_state(stack):
    engine = engine_url(stack, "smollm2")
    client = stack.client()
    system = {"role": "system", "content": "You answer about geography in one short sentence. " * 6}
    before = metric(engine, "modelfleet_engine_prefix_cache_hit_tokens_total")
    steps = metric(engine, "modelfleet_engine_steps_total")
    for question in ("What is the capital of Italy?", "What is the capital of Spain?"):
        reply = client.chat.completions.create(
            model=MODEL, messages=[system, {"role": "user", "content": question}], temperature=0, max_tokens=4
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 4
    assert metric(engine, "modelfleet_engine_prefix_cache_hit_tokens_total") - before >= 48  # the system prompt
    # the replica's whole paged cache, as configured; every block back once the requests are done
    assert metric(engine, 'modelfleet_engine_kv_blocks{tier="local"}') == deployment("smollm2").engine.kv_blocks()
    assert metric(engine, 'modelfleet_engine_kv_blocks_used{tier="local"}') == 0
    # each request took a step per token at least (prefill and first token, then three decode steps)
    assert metric(engine, 'modelfleet_engine_steps_total{tier="local"}') - steps >= 2 * 4
    status, body = get(engine + "/load")
    assert status == 200 and '"kv_usage"' in body and '"prefix_hit_rate"' in body
