"""The remote runner: a hosted OpenAI-compatible API as a runtime.

A runner of the ``openai_passthrough`` family: ``open`` sends the body the
engine hands it (the client's, with the provider's model name: docs/openai-api.md)
for any endpoint the provider serves (chat, completions, embeddings, rerank),
and the provider's answer goes back to the client byte for byte. Around the
call, in order:

1. Budget: a spent hourly or daily budget (``SpendLedger``) refuses with 429
   ``budget_exhausted`` and the seconds until the window turns.
2. Rate limits: token buckets for requests and tokens per minute. A request
   waits for them up to ``rateLimits.maxWaitSeconds``, else 429
   ``rate_limited``; what it waits for is reserved first, so concurrent
   waiters queue one behind another at the declared rate. The token bucket
   is charged the prompt estimate and max_tokens up front; the difference
   from the upstream's usage is given back.
3. The call, retried with jittered exponential backoff (0.5 s doubling, capped
   at 8 s, at least the upstream's Retry-After) on connection failures,
   timeouts before the first event, 429 and 5xx, at most ``maxRetries``
   times, and only while nothing has reached the client. 401 and 403 raise a
   ``ContextFaultError`` with cause remote_auth_failure: the engine worker
   calls ``rebuild_session``, which reads the credential again, and resubmits,
   so a rotated Secret heals without a restart. Other answers (4xx, and the
   last 429/5xx when the retries are spent) reach the client with the
   provider's status and body.
4. Cost: the usage the engine read from the answer (``BackendResponse.finish``)
   times the declared prices, added to the ledger and the ``cost_usd`` counter
   (``runtime_stats``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from modelfleet.dataplane import tracing
from modelfleet.dataplane.runners.base import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    RERANK,
    BackendResponse,
    ContextFaultError,
    DeviceContext,
    OpenAICall,
    RunnerCapabilities,
    RunnerError,
    RunnerFamily,
    RuntimeKind,
    SessionRebuildCause,
    TransportKind,
    UpstreamError,
    Usage,
    WeightSource,
)
from modelfleet.dataplane.runners.limits import SpendLedger, TokenBucket
from modelfleet.dataplane.runners.openai_stream import StreamBrokenError, body_chunks
from modelfleet.dataplane.spec import REMOTE_SECRETS_DIR, InferenceDeploymentSpec, RemoteSpec

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 8.0


class CredentialError(RunnerError):
    """The API key cannot be read from where the spec says."""


def secrets_dir() -> str:
    """Where Secrets named by apiKey.secret are mounted (MODELFLEET_SECRETS_DIR overrides, for tests)."""
    return os.environ.get("MODELFLEET_SECRETS_DIR", REMOTE_SECRETS_DIR)


def read_credential(remote: RemoteSpec) -> str | None:
    ref = remote.api_key
    if ref is None:
        return None
    if ref.secret is not None:
        path = ref.secret.mounted_path(secrets_dir())
        try:
            key = Path(path).read_text().strip()
        except OSError:
            raise CredentialError(
                f"runtime.remote.apiKey.secret: {ref.secret.name}/{ref.secret.key} is not mounted at {path} "
                "(the operator mounts it in a cluster; locally use apiKey.file or apiKey.env)"
            ) from None
        where = f"Secret {ref.secret.name} key {ref.secret.key}"
    elif ref.file is not None:
        try:
            key = Path(ref.file).read_text().strip()
        except OSError as exc:
            raise CredentialError(f"runtime.remote.apiKey.file: cannot read {ref.file} ({exc.strerror})") from None
        where = f"file {ref.file}"
    else:
        assert ref.env is not None
        key = os.environ.get(ref.env, "").strip()
        where = f"environment variable {ref.env}"
    if not key:
        raise CredentialError(f"runtime.remote.apiKey: {where} is empty or unset")
    return key


def backoff_s(attempt: int, retry_after: str | None, rng: random.Random) -> float:
    """Full-jitter exponential backoff, never shorter than the upstream's Retry-After (seconds form)."""
    delay = rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))
    if retry_after is not None:
        with contextlib.suppress(ValueError):  # an HTTP-date: keep the backoff
            delay = max(delay, float(retry_after))
    return delay


class RemoteRunner:
    runtime_kind = RuntimeKind.REMOTE
    transport_kind = TransportKind.HTTP
    gil_pinned = False
    # the provider is the OpenAI server: the engine relays the client's request and its answer (docs/openai-api.md)
    capabilities = RunnerCapabilities(
        family=RunnerFamily.OPENAI_PASSTHROUGH, endpoints=frozenset({CHAT, COMPLETIONS, EMBEDDINGS, RERANK})
    )

    def __init__(self, spec: InferenceDeploymentSpec, *, seed: int | None = None) -> None:
        self._configure(spec)
        self.progress = "not started"
        self._session: aiohttp.ClientSession | None = None
        self._key: str | None = None
        self._rng = random.Random(seed)
        self.stats: dict[str, float] = {
            "cost_usd": 0.0,
            "upstream_requests": 0,
            "upstream_retries": 0,
            "upstream_errors": 0,
            "rate_limit_wait_s": 0.0,
            "rate_limited": 0,
            "budget_refusals": 0,
            "spend_hour_usd": 0.0,
            "spend_day_usd": 0.0,
        }

    def _configure(self, spec: InferenceDeploymentSpec) -> None:
        remote = spec.runtime.remote
        if remote is None:
            raise RunnerError("runtime.remote: required with runtime kind remote")
        self.spec = spec
        self.remote = remote
        self.model = remote.model or spec.model.name
        self.base_url = remote.base_url.rstrip("/")
        limits = remote.rate_limits
        self._requests = TokenBucket(limits.requests_per_minute) if limits.requests_per_minute else None
        self._tokens = TokenBucket(limits.tokens_per_minute) if limits.tokens_per_minute else None
        self.ledger = SpendLedger(remote.budget.usd_per_hour, remote.budget.usd_per_day)

    # ---- lifecycle --------------------------------------------------------------------------------------------
    async def load_weights(self, ctx: DeviceContext | None, source: WeightSource) -> None:
        self._key = read_credential(self.remote)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=60), auto_decompress=True
        )
        self.progress = f"forwarding to {self.base_url} as {self.model}"

    async def rebuild_session(self, cause: SessionRebuildCause) -> None:
        """Read the credential again (auth failure, rotation) and start a fresh connection pool."""
        old, self._session = self._session, None
        if old is not None:
            await old.close()
        await self.load_weights(None, self.spec.model.source)
        log.info("remote session rebuilt (%s)", cause.value)

    async def reconfigure(self, spec: InferenceDeploymentSpec) -> None:
        """A changed spec (the manifest or ConfigMap was edited): new endpoint, limits, prices or key source."""
        ledger = self.ledger
        self._configure(spec)
        self.ledger = ledger.with_limits(self.remote.budget.usd_per_hour, self.remote.budget.usd_per_day)
        await self.rebuild_session(SessionRebuildCause.REMOTE_CONFIG_CHANGE)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- what the engine reads -------------------------------------------------------------------------------
    @property
    def backend_model(self) -> str:
        return self.model

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        price = self.remote.pricing
        return (prompt_tokens * price.input_usd_per_million + completion_tokens * price.output_usd_per_million) / 1e6

    def runtime_stats(self) -> dict[str, float]:
        hour, day = self.ledger.spent()
        return {**self.stats, "spend_hour_usd": hour, "spend_day_usd": day}

    # ---- the call ---------------------------------------------------------------------------------------------
    async def open(self, call: OpenAICall) -> BackendResponse:
        """The provider's answer to the call, after budget, rate limits and retries (module docstring)."""
        self._check_budget()
        charged = await self._admit_tokens(call.prompt_tokens_estimate + call.max_tokens)
        url = self.base_url + call.path.removeprefix("/v1")
        try:
            answer = await self._open(url, call.body, "text/event-stream" if call.stream else "application/json")
        except BaseException:
            self._settle(charged, None)
            raise
        if isinstance(answer, _Refusal):
            self._settle(charged, None)
            headers = {"content-type": "application/json"}
            if answer.retry_after:
                headers["retry-after"] = answer.retry_after
            return BackendResponse(answer.status, headers, _once(answer.raw))
        resp = answer

        async def close() -> None:
            resp.close()

        return BackendResponse(
            200,
            {"content-type": resp.headers.get("content-type", "application/json")},
            self._relay(resp),
            close=close,
            on_finish=lambda usage: self._settle(charged, usage),
        )

    async def _relay(self, resp: aiohttp.ClientResponse) -> AsyncGenerator[bytes]:
        try:
            async for data in body_chunks(resp):
                yield data
        except StreamBrokenError as exc:
            self.stats["upstream_errors"] += 1
            raise RunnerError(f"the provider's stream broke: {exc}") from None
        finally:
            resp.close()

    def _settle(self, charged: int, usage: Usage | None) -> None:
        """After the answer: the tokens charged up front beyond the provider's usage go back to the bucket;
        the usage's cost goes to the ledger."""
        used = usage.prompt_tokens + usage.completion_tokens if usage is not None else 0
        if self._tokens is not None and used < charged:
            self._tokens.give_back(charged - used)
        if usage is not None:
            cost = self._cost(usage.prompt_tokens, usage.completion_tokens)
            self.ledger.add(cost)
            self.stats["cost_usd"] += cost

    def _check_budget(self) -> None:
        refusal = self.ledger.refusal()
        if refusal is None:
            return
        self.stats["budget_refusals"] += 1
        raise UpstreamError(
            429,
            f"The spend budget of this deployment's {self.spec.model.name} provider is used up: "
            f"${refusal.spent_usd:.4f} of ${refusal.limit_usd:.4f} this {refusal.window}. "
            f"It resets in {refusal.resets_in_s} s.",
            type="insufficient_quota",
            code="budget_exhausted",
            retry_after=str(refusal.resets_in_s),
        )

    async def _admit_tokens(self, tokens: int) -> int:
        wait = 0.0
        if self._requests is not None:
            wait = max(wait, self._requests.wait_s(1))
        if self._tokens is not None:
            wait = max(wait, self._tokens.wait_s(tokens))
        limit = self.remote.rate_limits.max_wait_seconds
        if wait > limit:
            self.stats["rate_limited"] += 1
            retry = max(1, int(wait - limit + 0.999))
            raise UpstreamError(
                429,
                f"The provider's declared rate limits are reached; this request would wait {wait:.1f} s "
                f"(more than rateLimits.maxWaitSeconds {limit:g} s). Retry after {retry} s.",
                type="rate_limit_error",
                code="rate_limited",
                retry_after=str(retry),
            )
        # Reserve before waiting: the buckets are charged now, so a request arriving during the wait sees them
        # drawn down and waits its own turn after this one. (Checking, sleeping, then taking let every request
        # that checked during the same wait pass together, far beyond the declared rate.)
        if self._requests is not None:
            self._requests.take(1)
        if self._tokens is not None:
            self._tokens.take(tokens)
        if wait > 0:
            self.stats["rate_limit_wait_s"] += wait
            try:
                await asyncio.sleep(wait)
            except asyncio.CancelledError:  # the client left while waiting: its reservation goes to the others
                if self._requests is not None:
                    self._requests.give_back(1)
                if self._tokens is not None:
                    self._tokens.give_back(tokens)
                raise
        return tokens if self._tokens is not None else 0

    def _headers(self, accept: str) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": accept, **self.remote.headers}
        if self._key is not None:
            headers["authorization"] = f"Bearer {self._key}"
        tracing.inject(headers)  # a provider that traces joins the request's trace
        return headers

    async def _open(self, url: str, body: bytes, accept: str) -> aiohttp.ClientResponse | _Refusal:
        """POST until a 200 arrives, retrying what may be retried; the provider's last refusal when none does.

        Raises UpstreamError when the provider cannot be reached at all, ContextFaultError on 401/403."""
        session = self._session
        if session is None:
            raise RunnerError("the remote runner is not started")
        remote = self.remote
        timeout = aiohttp.ClientTimeout(
            total=remote.timeout_seconds,
            sock_connect=remote.connect_timeout_seconds,
            sock_read=remote.first_byte_timeout_seconds,
        )
        failure: UpstreamError | _Refusal | None = None
        for attempt in range(remote.max_retries + 1):
            if attempt:
                self.stats["upstream_retries"] += 1
                await asyncio.sleep(backoff_s(attempt - 1, failure.retry_after if failure else None, self._rng))
            self.stats["upstream_requests"] += 1
            try:
                resp = await asyncio.wait_for(
                    session.post(url, data=body, headers=self._headers(accept), timeout=timeout),
                    remote.first_byte_timeout_seconds,
                )
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                failure = UpstreamError(
                    502,
                    f"The provider at {self.base_url} could not be reached ({type(exc).__name__}).",
                    type="server_error",
                    code="upstream_unreachable",
                    retry_after="1",
                )
                continue
            except TimeoutError:
                failure = UpstreamError(
                    504,
                    f"The provider sent no response within {remote.first_byte_timeout_seconds:g} s.",
                    type="server_error",
                    code="upstream_timeout",
                    retry_after="1",
                )
                continue
            if resp.status == 200:
                return resp
            raw = await resp.read()
            resp.release()
            retry_after = resp.headers.get("Retry-After")
            if resp.status in (401, 403):
                self.stats["upstream_errors"] += 1
                raise ContextFaultError(
                    f"the provider rejected the credential (HTTP {resp.status})",
                    SessionRebuildCause.REMOTE_AUTH_FAILURE,
                )
            failure = _Refusal(resp.status, raw, retry_after)
            if resp.status not in RETRY_STATUS:
                break
            log.warning("provider answered %d (attempt %d of %d)", resp.status, attempt + 1, remote.max_retries + 1)
        self.stats["upstream_errors"] += 1
        if isinstance(failure, UpstreamError):
            raise failure
        assert failure is not None
        return failure


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A provider's non-200 answer that is not retried (or the last one after the retries)."""

    status: int
    raw: bytes
    retry_after: str | None


async def _once(data: bytes) -> AsyncGenerator[bytes]:
    yield data
