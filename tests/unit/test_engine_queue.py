"""The engine core's queue bounds: request count and token sum.

These test the core's accounting only, so the runner behind it is a tiny fake
whose sequences run until the test lets them finish: what matters here is who
is admitted, queued or refused, not what a model generates.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from modelfleet.dataplane.engine.core import EngineCore
from modelfleet.dataplane.engine.metrics import EngineMetrics
from modelfleet.dataplane.engine.worker import EngineWorker
from modelfleet.dataplane.protocol import ApiError
from modelfleet.dataplane.runners.base import (
    CHAT,
    COMPLETIONS,
    ExecuteBatch,
    FinishReason,
    RunnerCapabilities,
    RunnerFamily,
    SamplingParams,
    SequenceRequest,
    TokenChunk,
)
from modelfleet.dataplane.spec import EngineSpec


class HeldRunner:
    """Every sequence yields one final chunk once ``release`` is set."""

    capabilities = RunnerCapabilities(RunnerFamily.TOKEN_GENERATOR, frozenset({CHAT, COMPLETIONS}))

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def execute(self, batch: ExecuteBatch) -> AsyncIterator[TokenChunk]:
        await self.release.wait()
        for req in batch.sequences:
            yield TokenChunk(req.request_id, (1,), "x", len(req.prompt_token_ids), 1, FinishReason.LENGTH)


def request(name: str, prompt: int, max_tokens: int) -> SequenceRequest:
    return SequenceRequest(name, tuple(range(prompt)), SamplingParams(max_tokens=max_tokens))


def make_core(**limits: Any) -> tuple[EngineCore, HeldRunner, EngineMetrics]:
    runner = HeldRunner()
    metrics = EngineMetrics()
    core = EngineCore(EngineWorker(runner, metrics), EngineSpec(**limits), metrics)  # type: ignore[arg-type]
    return core, runner, metrics


async def drain(core: EngineCore, req: SequenceRequest) -> list[TokenChunk]:
    return [chunk async for chunk in core.generate(req)]


async def start(core: EngineCore, req: SequenceRequest) -> asyncio.Task[list[TokenChunk]]:
    task = asyncio.create_task(drain(core, req))
    await asyncio.sleep(0)  # let it reach the runner or the queue
    return task


def rejected(metrics: EngineMetrics, reason: str) -> float:
    return metrics.registry.get_sample_value("modelfleet_engine_rejected_total", {"reason": reason}) or 0.0


async def test_token_sum_bounds_the_queue() -> None:
    core, runner, metrics = make_core(max_num_seqs=1, max_queue_len=10, max_queue_tokens=100)
    running = await start(core, request("run", 500, 500))  # a free slot: admitted whatever its size
    first = await start(core, request("q1", 40, 20))
    second = await start(core, request("q2", 20, 20))
    assert core.load()["queued_tokens"] == 100
    with pytest.raises(ApiError) as err:
        await drain(core, request("q3", 1, 1))
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "1"
    assert err.value.code == "overloaded" and "maxQueueTokens" in err.value.message
    assert rejected(metrics, "queue_tokens") == 1
    runner.release.set()
    for task in (running, first, second):
        assert (await task)[-1].finish_reason is FinishReason.LENGTH
    assert core.queued_tokens == 0 and core.running == 0


async def test_request_count_still_bounds_the_queue() -> None:
    core, runner, metrics = make_core(max_num_seqs=1, max_queue_len=1, max_queue_tokens=10_000)
    tasks = [await start(core, request("run", 5, 5)), await start(core, request("q1", 5, 5))]
    with pytest.raises(ApiError) as err:
        await drain(core, request("q2", 5, 5))
    assert err.value.status == 429
    assert rejected(metrics, "queue_len") == 1
    runner.release.set()
    await asyncio.gather(*tasks)


async def test_an_oversize_request_waits_alone_but_not_behind_others() -> None:
    """Larger than maxQueueTokens: queued when nothing else waits (never refused for good), else 429."""
    core, runner, metrics = make_core(max_num_seqs=1, max_queue_len=10, max_queue_tokens=100)
    running = await start(core, request("run", 5, 5))
    big = await start(core, request("big", 150, 50))
    assert core.queued == 1 and core.queued_tokens == 200
    with pytest.raises(ApiError):
        await drain(core, request("another-big", 150, 50))
    with pytest.raises(ApiError):
        await drain(core, request("small", 1, 1))  # the queue is over its bound while big waits
    assert rejected(metrics, "queue_tokens") == 2
    runner.release.set()
    await asyncio.gather(running, big)


async def test_a_client_that_leaves_the_queue_frees_its_tokens() -> None:
    core, runner, _ = make_core(max_num_seqs=1, max_queue_len=10, max_queue_tokens=100)
    running = await start(core, request("run", 5, 5))
    waiting = await start(core, request("q1", 60, 40))
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert core.queued_tokens == 0
    later = await start(core, request("q2", 60, 40))
    runner.release.set()
    await asyncio.gather(running, later)


class OrderRunner:
    """Records the order sequences reach the runner; ``hold`` names one that waits for ``release``."""

    capabilities = RunnerCapabilities(RunnerFamily.TOKEN_GENERATOR, frozenset({CHAT, COMPLETIONS}))

    def __init__(self, hold: str) -> None:
        self.hold = hold
        self.release = asyncio.Event()
        self.order: list[str] = []

    async def execute(self, batch: ExecuteBatch) -> AsyncIterator[TokenChunk]:
        for req in batch.sequences:
            self.order.append(req.request_id)
            if req.request_id == self.hold:
                await self.release.wait()
            yield TokenChunk(req.request_id, (1,), "x", len(req.prompt_token_ids), 1, FinishReason.LENGTH)


def ordered_core(hold: str) -> tuple[EngineCore, OrderRunner]:
    runner = OrderRunner(hold)
    metrics = EngineMetrics()
    core = EngineCore(EngineWorker(runner, metrics), EngineSpec(max_num_seqs=1), metrics)  # type: ignore[arg-type]
    return core, runner


def prioritized(name: str, priority: int) -> SequenceRequest:
    return SequenceRequest(name, (1, 2), SamplingParams(max_tokens=1), priority=priority)


async def test_higher_priority_is_admitted_first() -> None:
    core, runner = ordered_core(hold="busy")
    tasks = [await start(core, prioritized("busy", 0))]
    tasks += [await start(core, prioritized(name, p)) for name, p in (("low", 0), ("high", 5), ("mid", 2))]
    runner.release.set()
    await asyncio.gather(*tasks)
    assert runner.order == ["busy", "high", "mid", "low"]


async def test_ageing_lets_a_long_waiting_low_priority_request_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    import modelfleet.dataplane.engine.core as core_module

    monkeypatch.setattr(core_module, "AGING_SECONDS", 0.05)
    core, runner = ordered_core(hold="busy")
    tasks = [await start(core, prioritized("busy", 0)), await start(core, prioritized("old-low", 0))]
    await asyncio.sleep(0.3)  # old-low has aged about 6 levels
    tasks.append(await start(core, prioritized("new-high", 3)))
    runner.release.set()
    await asyncio.gather(*tasks)
    assert runner.order == ["busy", "old-low", "new-high"]
