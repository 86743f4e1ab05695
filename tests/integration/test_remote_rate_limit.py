"""The remote runner's declared rate limit holds under concurrency: N requests that wait together are
admitted one refill apart, never together.

The runner is the real one, in-process, calling ``FakeProvider`` (a real HTTP
server on loopback standing in for a hosted provider, which cannot be reached
from here); the provider records when each request arrives.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest

from modelfleet.dataplane.runners.base import OpenAICall
from modelfleet.dataplane.runners.remote import RemoteRunner
from modelfleet.dataplane.spec import InferenceDeploymentSpec
from tests.integration.provider import FakeProvider

PER_MINUTE = 60  # a burst of 60, then one a second
WAITERS = 3  # requests beyond the burst, all waiting at once
SLACK_S = 0.05  # clock reads on two sides of a loopback hop


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    p = FakeProvider(keys={"sk-rate"}).start()
    yield p
    p.stop()


def runner_for(provider: FakeProvider) -> RemoteRunner:
    return RemoteRunner(
        InferenceDeploymentSpec.model_validate(
            {
                "model": {"name": "rated-chat", "source": {"runtimeManaged": True}},
                "runtime": {
                    "kind": "remote",
                    "remote": {
                        "baseUrl": provider.url,
                        "apiKey": {"env": "RATE_TEST_KEY"},
                        "rateLimits": {"requestsPerMinute": PER_MINUTE, "maxWaitSeconds": 30},
                    },
                },
            }
        )
    )


async def call(runner: RemoteRunner, i: int) -> str:
    body = {"model": "rated-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    resp = await runner.open(OpenAICall(f"r{i}", "/v1/chat/completions", json.dumps(body).encode(), False, 3, 8))
    try:
        answer = json.loads(b"".join([chunk async for chunk in resp.chunks]))
    finally:
        resp.finish(None)
        await resp.aclose()
    return str(answer["choices"][0]["message"]["content"])


async def test_concurrent_waiters_are_admitted_at_the_declared_rate(
    provider: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RATE_TEST_KEY", "sk-rate")
    runner = runner_for(provider)
    await runner.load_weights(None, runner.spec.model.source)
    try:
        started = time.monotonic()
        replies = await asyncio.gather(*(call(runner, i) for i in range(PER_MINUTE + WAITERS)))
    finally:
        await runner.close()
    assert all(replies)
    arrivals = sorted(r["at"] - started for r in provider.requests)
    assert len(arrivals) == PER_MINUTE + WAITERS
    rate = PER_MINUTE / 60
    # by any time t at most a full bucket plus t's refill may have been admitted: the k-th request beyond the
    # burst arrives no earlier than k refill intervals after the start
    for k in range(1, WAITERS + 1):
        assert arrivals[PER_MINUTE + k - 1] >= k / rate - SLACK_S, (k, arrivals[PER_MINUTE:])
    assert runner.stats["rate_limit_wait_s"] >= sum(range(1, WAITERS + 1)) / rate - SLACK_S
