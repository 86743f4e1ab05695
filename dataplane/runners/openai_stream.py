"""Talking to an OpenAI-compatible server: the request body it gets, and its SSE stream as TokenChunks.

Shared by the runners that forward instead of computing (remote providers;
vLLM and SGLang servers). The upstream is always asked to stream, with usage
in the last event, whatever the client asked: the engine service builds the
client's response (streamed or not) from the chunks, exactly as for the torch
runner. The upstream's text arrives already detokenized, so chunks carry no
token ids; ``completion_tokens`` counts content events until the upstream's
usage event gives the real numbers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from modelfleet.dataplane.runners.base import FinishReason, RunnerError, SequenceRequest, TokenChunk, UpstreamError

FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}


def estimate_tokens(text: str) -> int:
    """A provider-agnostic token estimate: about four characters per token for English text and code."""
    return max(1, (len(text) + 3) // 4)


def upstream_body(seq: SequenceRequest, model: str) -> dict[str, Any]:
    """The body sent upstream: the client's, with the upstream model name, streaming and usage on."""
    assert seq.openai is not None
    body = dict(seq.openai.body)
    body["model"] = model
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    return body


def upstream_error(status: int, raw: bytes, retry_after: str | None) -> UpstreamError:
    """The provider's error as the client will see it: its message when it sent an OpenAI-shaped one."""
    try:
        err = json.loads(raw)["error"]
        message = str(err["message"])
        kind = str(err.get("type") or "upstream_error")
        code = err.get("code")
        code = str(code) if code is not None else None
    except (ValueError, KeyError, TypeError):
        message = f"The provider answered HTTP {status}."
        kind, code = "upstream_error", None
    return UpstreamError(status, f"Provider error: {message}", type=kind, code=code, retry_after=retry_after)


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of ``data:`` lines until ``[DONE]`` (or the end of the body)."""
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue  # comments, event names, blank separators
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            raise RunnerError("the provider sent a malformed stream event") from None
        if isinstance(event, dict):
            yield event


async def token_chunks(resp: aiohttp.ClientResponse, seq: SequenceRequest, chat: bool) -> AsyncIterator[TokenChunk]:
    """The upstream stream as TokenChunks; the last one carries the finish reason and the upstream's usage."""
    prompt_tokens = seq.prompt_tokens_estimate
    completion_tokens = 0
    reason: FinishReason | None = None
    async for event in sse_events(resp):
        if "error" in event:
            err = event["error"] if isinstance(event["error"], dict) else {}
            raise RunnerError(f"the provider failed mid-stream: {err.get('message', 'no message')}")
        usage = event.get("usage")
        if isinstance(usage, dict):
            prompt_tokens = int(usage.get("prompt_tokens") or prompt_tokens)
            completion_tokens = int(usage.get("completion_tokens") or completion_tokens)
        for choice in event.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if chat:
                delta = choice.get("delta") or {}
                text = delta.get("content") if isinstance(delta, dict) else None
            else:
                text = choice.get("text")
            if choice.get("finish_reason"):
                reason = FINISH_REASONS.get(str(choice["finish_reason"]), FinishReason.STOP)
            if text:
                completion_tokens += 1
                yield TokenChunk(seq.request_id, (), str(text), prompt_tokens, completion_tokens)
    if reason is None:
        raise RunnerError("the provider's stream ended without a finish reason (cut off)")
    yield TokenChunk(seq.request_id, (), "", prompt_tokens, completion_tokens, reason)
