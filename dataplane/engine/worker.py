"""Supervision of the runner: two tiers, so a broken device costs seconds, not requests.

Tier 1 is this worker: it owns the runner and outlives its sessions. Tier 2
is the runner's device context (or remote session), which can break as a
whole: after an illegal memory access every CUDA call fails. The runner then
fails all its sequences with ``ContextFaultError``; the worker rebuilds the
session once for all of them and resubmits each sequence.

Mid-decode requests are resumed, not restarted: the worker records the token
ids it handed out and resubmits with ``resume_token_ids``, so the runner
prefills prompt + those tokens and continues. Text already sent is not sent
again. Greedy output is identical to an uninterrupted run; a sampled request
continues with a fresh generator seeded from (seed, tokens so far), so a seeded
request stays reproducible. Resuming is bounded (``max_resumes``); beyond it,
or when the rebuild itself fails, the request ends with a retriable
:class:`EngineRebuildingError` (503 with Retry-After before the first byte,
an SSE error event after it).

Faults close together mean something is wrong beyond one bad kernel: each
fault within ``fault_window_s`` of the last recovery doubles a backoff before
the next rebuild (1 s, 2 s, 4 s, ... up to ``backoff_cap_s``). While
rebuilding or backing off the replica reports not ready, so routers send new
work elsewhere; requests already here wait for the rebuild and are served.

A rebuild in the same process cannot always help: after a real CUDA fault
(checked on an H100: a device-side assert) every later CUDA call in the
process fails too, so reloading the weights fails. After
``max_failed_rebuilds`` failed rebuilds in a row the worker sets ``fatal``
and /healthz fails, so the process is restarted (the pod's liveness probe):
the third tier. The worker keeps trying meanwhile; a success clears it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from modelfleet.dataplane.engine.metrics import EngineMetrics
from modelfleet.dataplane.runners.base import (
    BackendResponse,
    ContextFaultError,
    ExecuteBatch,
    ModelRunner,
    OpenAICall,
    RunnerError,
    SequenceRequest,
    SessionRebuildCause,
    TokenChunk,
    as_backend,
    as_token_generator,
)

log = logging.getLogger(__name__)


class EngineRebuildingError(RunnerError):
    """The request could not be served because the runner is being rebuilt; retry later."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineWorker:
    """Runs sequences on a runner; rebuilds the runner's session after a context fault."""

    def __init__(
        self,
        runner: ModelRunner,
        metrics: EngineMetrics,
        *,
        max_resumes: int = 2,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 16.0,
        fault_window_s: float = 30.0,
        max_failed_rebuilds: int = 3,
    ) -> None:
        self.runner = runner
        self.metrics = metrics
        self.max_resumes = max_resumes
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.fault_window_s = fault_window_s
        self.max_failed_rebuilds = max_failed_rebuilds
        self.fatal: str | None = None  # set when rebuilding in this process keeps failing: restart the process
        self._session = 0  # bumped by each successful rebuild; tells a new fault from a late report of an old one
        self._attempt: asyncio.Future[bool] | None = None  # the rebuild attempt in progress: True when it worked
        self._task: asyncio.Task[None] | None = None
        self._streak = 0  # faults in a row, each within fault_window_s of the last recovery
        self._recovered_at = -math.inf
        self._backoff_s = 0.0
        self._rebuild_s = 1.0  # how long the last rebuild took: a guess for Retry-After
        self.cause: str | None = None

    @property
    def rebuilding(self) -> bool:
        """A rebuild (or the backoff before one) is under way: the replica is not ready."""
        return self._task is not None

    def status(self) -> dict[str, Any]:
        return {"cause": self.cause, "backoff_s": self._backoff_s}

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self._backoff_s + self._rebuild_s))

    async def execute(self, request: SequenceRequest) -> AsyncIterator[TokenChunk]:
        """Stream one sequence's chunks, across rebuilds of the runner's session (a token generator)."""
        runner = as_token_generator(self.runner)
        handed_out = list(request.resume_token_ids)
        resumes = 0
        while True:
            await self._wait_for_rebuild()
            session = self._session
            attempt = replace(request, resume_token_ids=tuple(handed_out))
            try:
                async for chunk in runner.execute(ExecuteBatch((attempt,))):
                    handed_out.extend(chunk.token_ids)
                    yield chunk
                return
            except ContextFaultError as exc:
                self._on_fault(session, exc)
                resumes = self._resubmit(exc.cause, resumes)
            log.info("resuming %s after %d tokens (resume %d)", request.request_id, len(handed_out), resumes)

    async def open(self, call: OpenAICall) -> tuple[BackendResponse, bytes]:
        """A passthrough runner's answer to the call and the first bytes of its body, across rebuilds.

        The backend is asked again after a rebuild as long as none of its answer's bytes were read (a
        backend that died before answering, a rotated credential); after that, a failure is the
        response's own."""
        runner = as_backend(self.runner)
        resumes = 0
        while True:
            await self._wait_for_rebuild()
            session = self._session
            try:
                resp = await runner.open(call)
                try:
                    first = await anext(resp.chunks, b"")
                except BaseException:
                    resp.finish(None)
                    await resp.aclose()
                    raise
                return resp, first
            except ContextFaultError as exc:
                self._on_fault(session, exc)
                resumes = self._resubmit(exc.cause, resumes)
            log.info("sending %s again after the rebuild (attempt %d)", call.request_id, resumes + 1)

    def _resubmit(self, cause: SessionRebuildCause, resumes: int) -> int:
        """After a fault: the count of resubmissions so far plus this one, or EngineRebuildingError past the bound."""
        if resumes >= self.max_resumes:
            self.metrics.retriable_failures.inc()
            what = (
                "The replica's device failed"
                if cause is SessionRebuildCause.DEVICE_CONTEXT_POISONED
                else f"The replica's session broke ({cause.value})"
            )
            raise EngineRebuildingError(
                f"{what} {resumes + 1} times during this request and is being rebuilt.", self.retry_after_s()
            )
        self.metrics.resumed.inc()
        return resumes + 1

    async def _wait_for_rebuild(self) -> None:
        attempt = self._attempt
        if attempt is not None and not await asyncio.shield(attempt):
            self.metrics.retriable_failures.inc()
            raise EngineRebuildingError("The replica's device is being rebuilt.", self.retry_after_s())

    def _on_fault(self, session: int, exc: ContextFaultError) -> None:
        """Start the one rebuild every sequence of this fault waits for."""
        if session != self._session or self._task is not None:
            return  # a late report of a fault whose rebuild has started or finished already
        now = time.monotonic()
        self._streak = self._streak + 1 if now - self._recovered_at < self.fault_window_s else 0
        self._backoff_s = (
            0.0 if self._streak == 0 else min(self.backoff_base_s * 2 ** (self._streak - 1), self.backoff_cap_s)
        )
        self.cause = f"{exc.cause.value}: {exc}"
        self.metrics.context_faults.inc()
        log.error("%s (%s); rebuilding after %.2f s", exc.cause.value, exc, self._backoff_s)
        self.metrics.rebuilding.set(1)
        self._attempt = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._rebuild(exc.cause))

    async def _rebuild(self, cause: SessionRebuildCause) -> None:
        """Back off, rebuild; on failure fail the waiters and try again, backing off further."""
        failures = 0
        try:
            while True:
                attempt = self._attempt
                assert attempt is not None
                await asyncio.sleep(self._backoff_s)
                started = time.monotonic()
                try:
                    await self.runner.rebuild_session(cause)
                except Exception as exc:
                    log.exception("rebuilding the runner's session failed")
                    self.metrics.rebuilds.labels(cause=cause.value, outcome="failed").inc()
                    self.cause = f"rebuild failed: {type(exc).__name__}: {exc}"
                    failures += 1
                    if failures >= self.max_failed_rebuilds:
                        self.fatal = f"{failures} session rebuilds failed in a row; last: {type(exc).__name__}: {exc}"
                        log.error("%s; the process needs a restart", self.fatal)
                    self._backoff_s = min(max(self._backoff_s * 2, self.backoff_base_s), self.backoff_cap_s)
                    self._attempt = asyncio.get_running_loop().create_future()
                    attempt.set_result(False)
                    continue
                self._rebuild_s = time.monotonic() - started
                self.metrics.rebuilds.labels(cause=cause.value, outcome="ok").inc()
                log.warning("runner session rebuilt in %.1f s (%s)", self._rebuild_s, cause.value)
                self._session += 1
                self.fatal = None
                self._recovered_at = time.monotonic()
                self._attempt = None
                self._task = None
                self.cause = None
                attempt.set_result(True)
                return
        except asyncio.CancelledError:
            if self._attempt is not None and not self._attempt.done():
                self._attempt.set_result(False)
            raise
        finally:
            self.metrics.rebuilding.set(0)

    async def settled(self) -> None:
        """Wait until the rebuild under way, if any, has succeeded (it retries until it does)."""
        if self._task is not None:
            await asyncio.wait({self._task})

    async def close(self) -> None:
        """Stop a rebuild in progress (process shutdown)."""
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
