"""The engine core of one replica: admission, queueing and backpressure.

The core admits at most ``maxNumSeqs`` sequences into the runner at once; the
rest wait in arrival order (higher priority first), and beyond ``maxQueueLen``
waiting requests a new one is refused with a retriable 429 instead of growing
the queue without bound. Runners that batch internally (torch's step loop,
vLLM, SGLang) see only admitted sequences.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from modelfleet.dataplane.engine.metrics import EngineMetrics
from modelfleet.dataplane.protocol import overloaded
from modelfleet.dataplane.runners.base import ExecuteBatch, ModelRunner, SequenceRequest, TokenChunk
from modelfleet.dataplane.spec import EngineSpec


@dataclass(order=True)
class _Waiter:
    sort_key: tuple[int, int]
    future: asyncio.Future[None] = field(compare=False)


class EngineCore:
    """Queue in front of a runner with a fixed number of decode slots."""

    def __init__(self, runner: ModelRunner, limits: EngineSpec, metrics: EngineMetrics) -> None:
        self.runner = runner
        self.limits = limits
        self.metrics = metrics
        self._running = 0
        self._waiting: list[_Waiter] = []
        self._seq = itertools.count()

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiting if not w.future.done())

    def load(self) -> dict[str, int]:
        return {
            "running": self._running,
            "queued": self.queued,
            "max_num_seqs": self.limits.max_num_seqs,
            "max_queue_len": self.limits.max_queue_len,
        }

    async def _acquire(self, priority: int) -> None:
        if self._running < self.limits.max_num_seqs and not self.queued:
            self._running += 1
            return
        if self.queued >= self.limits.max_queue_len:
            self.metrics.rejected.inc()
            raise overloaded(1, "This replica")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, _Waiter((-priority, next(self._seq)), future))
        self._publish()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # we were handed a slot just as the client left
            raise
        finally:
            self._publish()

    def _release(self) -> None:
        self._running -= 1
        while self._waiting:
            waiter = heapq.heappop(self._waiting)
            if not waiter.future.done():
                self._running += 1
                waiter.future.set_result(None)
                break
        self._publish()

    def _publish(self) -> None:
        self.metrics.queued.set(self.queued)
        self.metrics.running.set(self._running)

    async def generate(self, request: SequenceRequest) -> AsyncIterator[TokenChunk]:
        """Admit the sequence, then stream its chunks from the runner."""
        enqueued = time.perf_counter()
        await self._acquire(request.priority)
        self.metrics.queue_seconds.observe(time.perf_counter() - enqueued)
        self._publish()
        try:
            async for chunk in self.runner.execute(ExecuteBatch((request,))):
                yield chunk
        finally:
            self._release()
