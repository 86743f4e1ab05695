"""The worker's supervision state machine: shared rebuilds, resumes, bounds, backoff.

The runner is a scripted fake: it counts tokens and raises ContextFaultError
where a poisoned CUDA context would, which no CPU can produce. The real
runner and model go through the same path in
tests/integration/test_supervision.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from modelfleet.dataplane.engine.metrics import EngineMetrics
from modelfleet.dataplane.engine.worker import EngineRebuildingError, EngineWorker
from modelfleet.dataplane.runners.base import (
    CHAT,
    COMPLETIONS,
    ContextFaultError,
    ExecuteBatch,
    FinishReason,
    RunnerCapabilities,
    RunnerError,
    RunnerFamily,
    SamplingParams,
    SequenceRequest,
    SessionRebuildCause,
    TokenChunk,
)


class FlakyRunner:
    """Emits tokens 1, 2, ... up to max_tokens; the first ``faults`` times a sequence reaches
    ``fault_after`` tokens, raises ContextFaultError instead (for every sequence then running)."""

    capabilities = RunnerCapabilities(RunnerFamily.TOKEN_GENERATOR, frozenset({CHAT, COMPLETIONS}))

    def __init__(self, faults: int, fault_after: int, rebuild_fails: int = 0) -> None:
        self.faults = faults
        self.fault_after = fault_after
        self.rebuild_fails = rebuild_fails
        self.submitted: list[SequenceRequest] = []
        self.rebuilds = 0

    async def execute(self, batch: ExecuteBatch) -> AsyncIterator[TokenChunk]:
        req = batch.sequences[0]
        self.submitted.append(req)
        n = len(req.resume_token_ids)
        while n < req.sampling.max_tokens:
            await asyncio.sleep(0.001)
            if self.faults and n >= self.fault_after:
                self.faults -= 1
                raise ContextFaultError("CUDA error: an illegal memory access was encountered")
            n += 1
            reason = FinishReason.LENGTH if n == req.sampling.max_tokens else None
            yield TokenChunk(req.request_id, (n,), f"{n} ", len(req.prompt_token_ids), n, reason)

    async def rebuild_session(self, cause: SessionRebuildCause) -> None:
        assert cause is SessionRebuildCause.DEVICE_CONTEXT_POISONED
        self.rebuilds += 1
        await asyncio.sleep(0.05)
        if self.rebuild_fails:
            self.rebuild_fails -= 1
            raise RunnerError("no device")


def worker(runner: FlakyRunner, metrics: EngineMetrics) -> EngineWorker:
    return EngineWorker(runner, metrics, backoff_base_s=0.01, backoff_cap_s=0.04)  # type: ignore[arg-type]


def request(name: str, max_tokens: int = 6) -> SequenceRequest:
    return SequenceRequest(name, (7, 8, 9), SamplingParams(max_tokens=max_tokens, temperature=0))


async def collect(w: EngineWorker, req: SequenceRequest) -> list[TokenChunk]:
    return [chunk async for chunk in w.execute(req)]


def sample(metrics: EngineMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def test_a_fault_mid_decode_resumes_after_the_tokens_handed_out() -> None:
    runner, metrics = FlakyRunner(faults=1, fault_after=3), EngineMetrics()
    chunks = await collect(worker(runner, metrics), request("a"))
    assert [c.token_ids for c in chunks] == [(1,), (2,), (3,), (4,), (5,), (6,)]  # nothing twice, nothing lost
    assert chunks[-1].completion_tokens == 6 and chunks[-1].finish_reason is FinishReason.LENGTH
    assert [r.resume_token_ids for r in runner.submitted] == [(), (1, 2, 3)]
    assert runner.submitted[1].sampling.max_tokens == 6  # the original budget; resumed tokens count toward it
    assert runner.rebuilds == 1
    assert sample(metrics, "modelfleet_engine_context_faults_total") == 1
    assert sample(metrics, "modelfleet_engine_resumed_sequences_total") == 1
    labels = {"cause": "device_context_poisoned", "outcome": "ok"}
    assert sample(metrics, "modelfleet_engine_rebuilds_total", labels) == 1


async def test_sequences_hit_by_one_fault_share_one_rebuild() -> None:
    runner, metrics = FlakyRunner(faults=4, fault_after=2), EngineMetrics()
    w = worker(runner, metrics)
    results = await asyncio.gather(*(collect(w, request(name)) for name in "abcd"))
    assert all([c.token_ids[0] for c in chunks] == [1, 2, 3, 4, 5, 6] for chunks in results)
    assert runner.rebuilds == 1
    assert sample(metrics, "modelfleet_engine_context_faults_total") == 1


async def test_resumes_are_bounded_then_the_error_is_retriable() -> None:
    runner, metrics = FlakyRunner(faults=100, fault_after=2), EngineMetrics()
    w = worker(runner, metrics)
    got: list[TokenChunk] = []
    with pytest.raises(EngineRebuildingError) as err:
        async for chunk in w.execute(request("a")):
            got.append(chunk)
    assert err.value.retry_after_s >= 1
    assert [c.token_ids[0] for c in got] == [1, 2]  # later attempts resumed after token 2 and added nothing
    assert len(runner.submitted) == 1 + w.max_resumes
    assert w.rebuilding  # the last fault's rebuild goes on without the request
    assert w.status()["cause"].startswith("device_context_poisoned")
    assert sample(metrics, "modelfleet_engine_retriable_failures_total") == 1
    assert sample(metrics, "modelfleet_engine_rebuilding") == 1
    runner.faults = 0
    await w.settled()
    assert [c.token_ids[0] for c in await collect(w, request("b"))] == [1, 2, 3, 4, 5, 6]
    assert sample(metrics, "modelfleet_engine_rebuilding") == 0


async def test_faults_in_a_row_back_off_exponentially_up_to_the_cap() -> None:
    runner, metrics = FlakyRunner(faults=100, fault_after=0), EngineMetrics()
    w = worker(runner, metrics)
    backoffs = []
    for _ in range(5):
        with pytest.raises(EngineRebuildingError):
            await collect(w, request("a"))
        backoffs.append(w.status()["backoff_s"])
    assert backoffs[-1] == 0.04 and backoffs == sorted(backoffs)
    await w.close()


async def test_a_failed_rebuild_fails_its_waiters_and_is_retried() -> None:
    runner, metrics = FlakyRunner(faults=1, fault_after=1, rebuild_fails=1), EngineMetrics()
    w = worker(runner, metrics)
    with pytest.raises(EngineRebuildingError):
        await collect(w, request("a"))
    await w.settled()
    assert runner.rebuilds == 2
    failed = {"cause": "device_context_poisoned", "outcome": "failed"}
    assert sample(metrics, "modelfleet_engine_rebuilds_total", failed) == 1
    assert len(await collect(w, request("b"))) == 6


async def test_rebuilds_failing_in_a_row_mark_the_worker_fatal_until_one_works() -> None:
    """A real CUDA fault breaks every later call in the process: then only a restart helps."""
    runner, metrics = FlakyRunner(faults=1, fault_after=1, rebuild_fails=3), EngineMetrics()
    w = worker(runner, metrics)
    with pytest.raises(EngineRebuildingError):
        await collect(w, request("a"))
    while runner.rebuilds < 4:
        assert w.fatal is None or runner.rebuilds >= 3
        await asyncio.sleep(0.005)
    assert w.fatal is not None and "3 session rebuilds failed" in w.fatal
    await w.settled()
    assert w.fatal is None
