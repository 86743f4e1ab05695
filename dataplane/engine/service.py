"""OpenAI semantics on top of the engine core for token generators: tokenize, check limits, format.

The engine answers the same OpenAI-compatible API as the gateway, so the
sidecar and gateway forward bytes instead of translating them. Passthrough
runners (vLLM, SGLang, remote) are served by engine/passthrough.py instead:
their backend implements the API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from modelfleet.dataplane.engine.core import EngineCore
from modelfleet.dataplane.engine.worker import EngineRebuildingError
from modelfleet.dataplane.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    model_not_found,
)
from modelfleet.dataplane.runners.base import (
    RunnerError,
    SamplingParams,
    SequenceRequest,
    TextCodec,
    TokenChunk,
    UpstreamError,
)
from modelfleet.dataplane.spec import InferenceDeploymentSpec


@dataclass(frozen=True)
class Prepared:
    """A validated request turned into a sequence for the runner."""

    kind: str  # "chat" | "text"
    request_id: str
    model: str
    sequence: SequenceRequest
    stream: bool
    include_usage: bool


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


log = logging.getLogger(__name__)


def runner_failure(what: str, exc: RunnerError, request_id: str) -> ApiError:
    """A runner's own failure as the client gets it: a generic 500 naming the request id, never the message.

    A runner's message is for operators (a child's pid and exit code, a device error, a provider's address),
    so it goes to the log under the request id, where the id in the client's error finds it.
    """
    log.error("%s failed for request %s: %s: %s", what, request_id, type(exc).__name__, exc)
    return ApiError(
        500,
        f"{what} failed because of an internal error (request id {request_id}). "
        "Retry the request; if it keeps failing, report it with this request id.",
        type="server_error",
        code="runner_error",
    )


def runner_api_error(exc: RunnerError, what: str, request_id: str) -> ApiError:
    """What the client gets for a runner's failure: a retriable 503 while the replica rebuilds, a provider's
    (or a passthrough runner's own) refusal as it is, else the generic 500 of ``runner_failure``."""
    if isinstance(exc, EngineRebuildingError):
        return ApiError(
            503,
            f"{exc} Retry after {exc.retry_after_s} s.",
            type="service_unavailable",
            code="engine_rebuilding",
            headers={"Retry-After": str(exc.retry_after_s)},
        )
    if isinstance(exc, UpstreamError):
        return upstream_api_error(exc)
    return runner_failure(what, exc, request_id)


def served_model_check(spec: InferenceDeploymentSpec, model: str, misdirected_status: int) -> None:
    """Nothing when this replica serves the model; else 404 model_not_found, or 421 Misdirected Request for
    runners whose process serves exactly one model (vLLM, SGLang; docs/runners.md)."""
    if model in spec.served_names():
        return
    if misdirected_status == 421:
        raise ApiError(
            421,
            f"This server does not serve the model '{model}'; it serves {spec.model.name}.",
            param="model",
            code="misdirected_request",
        )
    raise model_not_found(model)


def served_models(spec: InferenceDeploymentSpec) -> dict[str, Any]:
    """``GET /v1/models``: the deployment's model and its aliases."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "modelfleet"} for name in spec.served_names()
        ],
    }


def upstream_api_error(exc: UpstreamError) -> ApiError:
    """A forwarding runner's refusal as the client gets it: the upstream's (or the runner's own) status,
    type, code and message, with its Retry-After."""
    headers = {"Retry-After": exc.retry_after} if exc.retry_after else None
    return ApiError(exc.status, str(exc), type=exc.type, code=exc.code, headers=headers)


class EngineService:
    """Turns OpenAI requests into runner sequences and chunks into responses."""

    def __init__(self, spec: InferenceDeploymentSpec, core: EngineCore, codec: TextCodec) -> None:
        self.spec = spec
        self.core = core
        self.codec = codec
        self.max_model_len = spec.engine.max_model_len

    async def prepare(
        self, req: ChatCompletionRequest | CompletionRequest, request_id: str | None, priority: int = 0
    ) -> Prepared:
        """The request checked and turned into a sequence."""
        served_model_check(self.spec, req.model, 404)
        if isinstance(req, ChatCompletionRequest):
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            prompt_ids = await asyncio.to_thread(self.codec.encode_chat, messages)
            kind, param = "chat", "messages"
        else:
            if isinstance(req.prompt, str):
                prompt_ids = await asyncio.to_thread(self.codec.encode_text, req.prompt)
            elif isinstance(req.prompt[0], str):
                prompt_ids = await asyncio.to_thread(self.codec.encode_text, str(req.prompt[0]))
            else:
                prompt_ids = [int(t) for t in req.prompt]
            kind, param = "text", "prompt"
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise ApiError(400, "The prompt is empty after tokenization.", param=param, code="empty_prompt")
        if n_prompt >= self.max_model_len:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, your {param} resulted in {n_prompt} tokens.",
                param=param,
                code="context_length_exceeded",
            )
        limit = req.token_limit()
        room = self.max_model_len - n_prompt
        if limit is not None and limit > room:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, you requested {n_prompt + limit} tokens ({n_prompt} in the {param}, "
                f"{limit} for the completion). Please reduce the length of the {param} or completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        max_tokens = limit if limit is not None else room
        if req.min_tokens > max_tokens:  # an explicit limit was checked with the request; this is the context's
            raise ApiError(
                400,
                f"min_tokens ({req.min_tokens}) must not exceed the {max_tokens} tokens the context leaves "
                f"for the completion.",
                param="min_tokens",
                code="invalid_value",
            )
        for field, token in req.token_ids_named():
            if token >= self.codec.vocab_size:
                raise ApiError(
                    400,
                    f"{field} names token id {token}; this model's token ids are 0 to {self.codec.vocab_size - 1}.",
                    param=field,
                    code="invalid_value",
                )
        rid = request_id or uuid.uuid4().hex
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=req.stop_list(),
            ignore_eos=req.ignore_eos,
            top_k=max(req.top_k or 0, 0),  # vLLM's -1 is 0: all tokens
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=req.logit_bias_pairs(),
            min_tokens=req.min_tokens,
            stop_token_ids=frozenset(req.stop_token_ids or ()),
        )
        return Prepared(
            kind=kind,
            request_id=rid,
            model=req.model,
            sequence=SequenceRequest(
                request_id=rid, prompt_token_ids=tuple(prompt_ids), sampling=sampling, priority=priority
            ),
            stream=req.stream,
            include_usage=req.wants_usage_in_stream(),
        )

    async def _chunks(self, prep: Prepared) -> AsyncGenerator[TokenChunk]:
        metrics = self.core.metrics
        started = time.perf_counter()
        first = True
        previous = started
        outcome = "error"
        last: TokenChunk | None = None
        try:
            async for chunk in self.core.generate(prep.sequence):
                if chunk.token_ids or chunk.text:
                    now = time.perf_counter()
                    if first:
                        metrics.ttft_seconds.observe(now - started)
                        first = False
                    else:
                        metrics.observe_inter_token(now - previous, len(chunk.token_ids))
                    previous = now
                last = chunk
                yield chunk
            outcome = "ok"
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except RunnerError as exc:  # a rebuild: retriable 503 before the first byte, an SSE error event after
            raise runner_api_error(exc, "Generation", prep.request_id) from None
        finally:
            metrics.requests.labels(outcome=outcome).inc()
            metrics.e2e_seconds.observe(time.perf_counter() - started)
            metrics.prompt_tokens.inc(last.prompt_tokens if last is not None else len(prep.sequence.prompt_token_ids))
            if last is not None:
                metrics.generation_tokens.inc(last.completion_tokens)

    @staticmethod
    def _usage(chunk: TokenChunk | None, prompt_tokens: int) -> dict[str, int]:
        completion = chunk.completion_tokens if chunk else 0
        prompt_tokens = chunk.prompt_tokens if chunk else prompt_tokens
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }

    async def complete(self, prep: Prepared) -> dict[str, Any]:
        """A non-streaming response."""
        parts: list[str] = []
        last: TokenChunk | None = None
        async for chunk in self._chunks(prep):
            parts.append(chunk.text)
            last = chunk
        text = "".join(parts)
        reason = last.finish_reason.value if last and last.finish_reason else "stop"
        created = int(time.time())
        usage = self._usage(last, len(prep.sequence.prompt_token_ids))
        if prep.kind == "chat":
            return {
                "id": f"chatcmpl-{prep.request_id}",
                "object": "chat.completion",
                "created": created,
                "model": prep.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": reason,
                        "logprobs": None,
                    }
                ],
                "usage": usage,
            }
        return {
            "id": f"cmpl-{prep.request_id}",
            "object": "text_completion",
            "created": created,
            "model": prep.model,
            "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}],
            "usage": usage,
        }

    async def stream(self, prep: Prepared) -> AsyncGenerator[bytes]:
        """Server-sent events, ending in ``data: [DONE]``.

        An error after the first byte is sent as an error event (the HTTP
        status is already 200), never as a silent truncation.
        """
        created = int(time.time())
        chat = prep.kind == "chat"
        base: dict[str, Any] = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{prep.request_id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": prep.model,
        }
        async with aclosing(self._chunks(prep)) as chunks:
            # Admission and the first token happen before the first byte, so a full
            # queue or a context error still reaches the client as an HTTP status.
            try:
                first: TokenChunk | None = await anext(chunks)
            except StopAsyncIteration:
                first = None
            if chat:
                yield _sse(
                    {
                        **base,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None,
                                "logprobs": None,
                            }
                        ],
                    }
                )
            last: TokenChunk | None = None
            try:
                chunk = first
                while chunk is not None:
                    last = chunk
                    reason = chunk.finish_reason.value if chunk.finish_reason else None
                    if chunk.text or reason is not None:
                        if chat:
                            delta = {"content": chunk.text} if chunk.text else {}
                            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
                        else:
                            choice = {"index": 0, "text": chunk.text, "finish_reason": reason, "logprobs": None}
                        yield _sse({**base, "choices": [choice]})
                    chunk = await anext(chunks, None)
            except ApiError as exc:
                yield _sse(exc.body())
                yield SSE_DONE
                return
        if prep.include_usage:
            yield _sse({**base, "choices": [], "usage": self._usage(last, len(prep.sequence.prompt_token_ids))})
        yield SSE_DONE
