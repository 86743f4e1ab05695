"""The engine core of one replica: admission, queueing and backpressure.

The core admits at most ``maxNumSeqs`` sequences into the runner at once; the
rest wait, taken by priority (the ``x-modelfleet-priority`` header, higher
first) plus one for every ``AGING_SECONDS`` waited, then by arrival, so a
steady stream of high-priority work delays low-priority requests but never
starves them. The runner's own step scheduler applies the same rule, in steps,
to the sequences it holds (dataplane/batching/scheduler.py). The queue is bounded twice:
by requests (``maxQueueLen``) and by tokens (``maxQueueTokens``: each waiting
request counts its prompt plus its max_tokens, what it will cost once
admitted). Beyond either bound a new request is refused with a retriable 429
instead of growing the queue. A single request larger than ``maxQueueTokens``
is not refused for good: it is admitted when nothing else waits (at once if a
slot is free, else it waits alone), and gets a 429 only while others wait, as
any request would. Runners that batch internally (torch's step loop, vLLM,
SGLang) see only admitted sequences, through the worker that supervises them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from modelfleet.dataplane.engine.metrics import EngineMetrics
from modelfleet.dataplane.engine.worker import EngineWorker
from modelfleet.dataplane.protocol import ApiError, overloaded
from modelfleet.dataplane.runners.base import SequenceRequest, TokenChunk
from modelfleet.dataplane.spec import EngineSpec

AGING_SECONDS = 2.0  # a waiting request gains one priority level per this many seconds waited


@dataclass
class _Waiter:
    priority: int
    arrival: float
    seq: int
    future: asyncio.Future[None] = field(repr=False)
    tokens: int = 0

    def rank(self, now: float) -> tuple[int, float, int]:
        """Smallest first: highest effective priority, then earliest arrival."""
        return (-(self.priority + int((now - self.arrival) / AGING_SECONDS)), self.arrival, self.seq)


def queue_cost(request: SequenceRequest) -> int:
    """Tokens a request counts for in the queue: its prompt plus the most it may generate."""
    return len(request.prompt_token_ids) + request.sampling.max_tokens


class EngineCore:
    """Queue in front of a runner with a fixed number of decode slots."""

    def __init__(self, worker: EngineWorker, limits: EngineSpec, metrics: EngineMetrics) -> None:
        self.worker = worker
        self.limits = limits
        self.metrics = metrics
        self._running = 0
        self._waiting: list[_Waiter] = []
        self._seq = itertools.count()
        self._service_s: float | None = None  # moving average of admission-to-end seconds, for the wait estimate

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiting if not w.future.done())

    @property
    def queued_tokens(self) -> int:
        return sum(w.tokens for w in self._waiting if not w.future.done())

    def load(self) -> dict[str, int | float]:
        return {
            "running": self._running,
            "queued": self.queued,
            "queued_tokens": self.queued_tokens,
            "max_num_seqs": self.limits.max_num_seqs,
            "max_queue_len": self.limits.max_queue_len,
            "max_queue_tokens": self.limits.max_queue_tokens,
            "estimated_wait_s": round(self.estimated_wait_s(), 3),
        }

    def estimated_wait_s(self) -> float:
        """How long a request arriving now would wait for a slot: the queue ahead of it, served
        ``maxNumSeqs`` at a time, each taking the recent average time in a slot."""
        if self._service_s is None:
            return 0.0
        ahead = self.queued + (1 if self._running >= self.limits.max_num_seqs else 0)
        return ahead * self._service_s / max(self.limits.max_num_seqs, 1)

    def _refuse(self, tokens: int) -> ApiError | None:
        """Why a request of this many tokens may not join the queue now, or None."""
        queued = self.queued
        if queued >= self.limits.max_queue_len:
            self.metrics.rejected.labels(reason="queue_len").inc()
            return overloaded(1, "This replica")
        queued_tokens = self.queued_tokens
        if queued and queued_tokens + tokens > self.limits.max_queue_tokens:
            self.metrics.rejected.labels(reason="queue_tokens").inc()
            return ApiError(
                429,
                f"This replica's queue holds {queued_tokens} tokens; {tokens} more would pass its "
                f"maxQueueTokens of {self.limits.max_queue_tokens}. Retry after 1 s.",
                type="rate_limit_error",
                code="overloaded",
                headers={"Retry-After": "1"},
            )
        return None

    async def _acquire(self, priority: int, tokens: int) -> None:
        if self._running < self.limits.max_num_seqs and not self.queued:
            self._running += 1
            return
        refusal = self._refuse(tokens)
        if refusal is not None:
            raise refusal
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiter(priority, time.monotonic(), next(self._seq), future, tokens))
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
        self._waiting = [w for w in self._waiting if not w.future.done()]  # drop those whose client left
        if self._waiting:
            now = time.monotonic()
            waiter = min(self._waiting, key=lambda w: w.rank(now))
            self._waiting.remove(waiter)
            self._running += 1
            waiter.future.set_result(None)
        self._publish()

    def _publish(self) -> None:
        self.metrics.queued.set(self.queued)
        self.metrics.queued_tokens.set(self.queued_tokens)
        self.metrics.running.set(self._running)

    async def generate(self, request: SequenceRequest) -> AsyncIterator[TokenChunk]:
        """Admit the sequence, then stream its chunks through the worker."""
        async with self.admitted(request.priority, queue_cost(request)):
            async for chunk in self.worker.execute(request):
                yield chunk

    @contextlib.asynccontextmanager
    async def admitted(self, priority: int, tokens: int) -> AsyncIterator[None]:
        """Hold one of the ``maxNumSeqs`` slots for the block (waiting for it in the queue, or refused with 429).

        ``tokens``: what the request counts for in the queue (its prompt plus the most it may generate; an
        estimate for a passthrough runner's request, whose backend tokenizes)."""
        enqueued = time.perf_counter()
        await self._acquire(priority, tokens)
        self.metrics.queue_seconds.observe(time.perf_counter() - enqueued)
        self._publish()
        admitted = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - admitted
            self._service_s = took if self._service_s is None else 0.8 * self._service_s + 0.2 * took
            self._release()
