"""The engine in front of a passthrough runner (vLLM, SGLang, a hosted API): forward, relay, read the usage.

For runners of the ``openai_passthrough`` family the backend is the OpenAI
server; the engine admits the request (queue, priority, backpressure), hands
the client's JSON body to the runner and relays the backend's answer. It does
not validate the request beyond what it reads (``model``, ``stream``,
``stream_options``, and the completion limits ``max_tokens`` /
``max_completion_tokens`` / ``n`` for queue accounting), so every field the
backend supports reaches it, including ones ModelFleet does not know.

The only rewrites (docs/openai-api.md):

- the request's ``model`` becomes the name the backend serves (an alias, or a
  hosted provider's own name), and the answer's ``model`` is the name the
  client sent;
- a streamed request that did not ask for usage gets
  ``stream_options.include_usage: true``, and the usage event this adds is
  dropped again from the relayed stream.

What the engine reads from the answer: its status, when its first byte came,
and the usage (the JSON body's ``usage``; in a stream, the events that carry
one, found by a byte search and then parsed, nothing else is). Errors from the
backend keep their status and OpenAI-shaped body (a body of another shape is
wrapped in one). A stream that breaks after its first byte ends with an
OpenAI error event and ``data: [DONE]``, never silently.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from modelfleet.dataplane.engine.core import EngineCore
from modelfleet.dataplane.engine.metrics import EngineMetrics
from modelfleet.dataplane.engine.service import SSE_DONE, runner_api_error, served_model_check
from modelfleet.dataplane.httpserver import SSE_HEADERS
from modelfleet.dataplane.protocol import PRIORITY_HEADER, ApiError, parse_json_body, parse_priority
from modelfleet.dataplane.runners.base import (
    COMPLETIONS,
    EMBEDDINGS,
    RERANK,
    OpenAIBackend,
    OpenAICall,
    RunnerError,
    Usage,
)
from modelfleet.dataplane.runners.openai_stream import error_answer
from modelfleet.dataplane.spec import InferenceDeploymentSpec

USAGE_KEY = b'"usage"'
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions


def forward_body(raw: bytes, body: dict[str, Any], backend_model: str) -> tuple[bytes, bool]:
    """The bytes sent to the backend, and whether the engine added the stream's usage request.

    The client's own bytes when nothing needs rewriting; else its JSON with ``model`` set to the
    backend's name and, for a stream without usage, ``stream_options.include_usage`` (other
    ``stream_options`` kept).
    """
    inject = False
    if body.get("stream") is True:
        options = body.get("stream_options")
        inject = (options is None or isinstance(options, dict)) and not (
            isinstance(options, dict) and options.get("include_usage") is True
        )
    if body.get("model") == backend_model and not inject:
        return raw, False
    out = {**body, "model": backend_model}
    if inject:
        options = body.get("stream_options")
        out["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode(), inject


def completion_limit(endpoint: str, body: Mapping[str, Any], default: int) -> int:
    """The most tokens the request may generate, for queue and rate accounting: n x its limit."""
    if endpoint in (EMBEDDINGS, RERANK):
        return 0

    def positive(value: object) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    limit = positive(body.get("max_completion_tokens")) or positive(body.get("max_tokens"))
    if limit is None:
        limit = COMPLETIONS_DEFAULT_MAX_TOKENS if endpoint == COMPLETIONS else default
    return limit * (positive(body.get("n")) or 1)


def usage_of(value: object) -> Usage | None:
    if not isinstance(value, dict):
        return None
    prompt = value.get("prompt_tokens") or value.get("total_tokens") or 0
    completion = value.get("completion_tokens") or 0
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(prompt, completion)


def _event_json(event: bytes) -> object:
    data = b"".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None


class StreamTap:
    """Relays a backend's event stream, reading the usage and applying the two rewrites.

    Bytes go out at event boundaries (the last ``\\n\\n`` seen); only events that contain ``"usage"`` are
    parsed. ``rename``: the backend's model name becomes the client's (``"model":"x"``, with or without a
    space: inside a JSON string a quote is always escaped, so the pattern is only ever the key itself).
    """

    def __init__(self, client_model: str, backend_model: str, drop_usage: bool) -> None:
        self.drop_usage = drop_usage
        self.usage: Usage | None = None
        self._buffer = b""
        self._rename: list[tuple[bytes, bytes]] = []
        if client_model != backend_model:
            old, new = json.dumps(backend_model).encode(), json.dumps(client_model).encode()
            self._rename = [(b'"model":' + old, b'"model":' + new), (b'"model": ' + old, b'"model": ' + new)]

    def feed(self, data: bytes) -> bytes:
        buffer = self._buffer + data
        end = buffer.rfind(b"\n\n")
        if end < 0:
            self._buffer = buffer
            return b""
        complete, self._buffer = buffer[: end + 2], buffer[end + 2 :]
        if USAGE_KEY in complete:
            complete = self._read_usage(complete)
        return self._renamed(complete)

    def flush(self) -> bytes:
        """What is left after the last event boundary (a well-formed stream leaves nothing)."""
        rest, self._buffer = self._buffer, b""
        if USAGE_KEY in rest:
            rest = self._read_usage(rest)
        return self._renamed(rest)

    def _renamed(self, data: bytes) -> bytes:
        for old, new in self._rename:
            data = data.replace(old, new)
        return data

    def _read_usage(self, complete: bytes) -> bytes:
        out: list[bytes] = []
        for event in complete.split(b"\n\n"):
            if not event:
                continue
            if USAGE_KEY in event:
                doc = _event_json(event)
                usage = usage_of(doc.get("usage")) if isinstance(doc, dict) else None
                if usage is not None:
                    assert isinstance(doc, dict)
                    self.usage = usage
                    if self.drop_usage and doc.get("choices") == []:
                        continue  # the usage event the engine asked for; the client did not
            out.append(event + b"\n\n")
        return b"".join(out)


class PassthroughService:
    """Forwards requests to a passthrough runner's backend and relays its answers (module docstring)."""

    def __init__(
        self, spec: InferenceDeploymentSpec, core: EngineCore, backend: OpenAIBackend, metrics: EngineMetrics
    ) -> None:
        self.spec = spec
        self.core = core
        self.backend = backend
        self.metrics = metrics
        self.misdirected_status = 421 if backend.capabilities.one_model_per_process else 404

    async def handle(
        self, request: web.Request, endpoint: str, load_headers: Callable[[], dict[str, str]]
    ) -> web.StreamResponse:
        raw = await request.read()
        body = parse_json_body(raw)
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise ApiError(
                400, "Missing required parameter: 'model'.", param="model", code="missing_required_parameter"
            )
        served_model_check(self.spec, name, self.misdirected_status)
        priority = parse_priority(request.headers.get(PRIORITY_HEADER))
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        sent, injected = forward_body(raw, body, self.backend.backend_model)
        estimate = max(1, (len(raw) + 3) // 4)  # about four bytes a token; the backend tokenizes
        limit = completion_limit(endpoint, body, self.spec.engine.max_model_len)
        call = OpenAICall(request_id, endpoint, sent, body.get("stream") is True, estimate, limit)
        headers = {"x-request-id": request_id, **load_headers()}
        async with self.core.admitted(priority, estimate + limit):
            return await self._relay(request, call, name, injected, headers)

    async def _relay(
        self, request: web.Request, call: OpenAICall, name: str, injected: bool, headers: dict[str, str]
    ) -> web.StreamResponse:
        metrics = self.metrics
        started = time.perf_counter()
        outcome = "error"
        usage: Usage | None = None
        try:
            try:
                resp, first = await self.core.worker.open(call)
            except RunnerError as exc:
                raise runner_api_error(exc, "Generation", call.request_id) from None
            metrics.ttft_seconds.observe(time.perf_counter() - started)
            try:
                content_type = resp.headers.get("content-type", "application/json")
                if resp.status != 200:
                    data = first + b"".join([chunk async for chunk in resp.chunks])
                    kept = {"Retry-After": resp.headers["retry-after"]} if "retry-after" in resp.headers else {}
                    return web.Response(
                        body=error_answer(resp.status, data),
                        status=resp.status,
                        headers={"Content-Type": "application/json", **kept, **headers},
                    )
                if not content_type.startswith("text/event-stream"):
                    data = first + b"".join([chunk async for chunk in resp.chunks])
                    data, usage = self._answer(data, name)
                    outcome = "ok"
                    return web.Response(body=data, headers={"Content-Type": content_type, **headers})
                tap = StreamTap(name, self.backend.backend_model, drop_usage=injected)
                out = web.StreamResponse(headers=SSE_HEADERS | headers)
                await out.prepare(request)
                try:
                    await out.write(tap.feed(first))
                    async for chunk in resp.chunks:
                        piece = tap.feed(chunk)
                        if piece:
                            await out.write(piece)
                    await out.write(tap.flush())
                except RunnerError as exc:  # the status is sent: the client learns of the failure in the stream
                    error = runner_api_error(exc, "Generation", call.request_id)
                    await out.write(b"data: " + json.dumps(error.body()).encode() + b"\n\n" + SSE_DONE)
                    usage = tap.usage
                    await out.write_eof()
                    return out
                usage = tap.usage
                outcome = "ok"
                await out.write_eof()
                return out
            finally:
                resp.finish(usage)
                await resp.aclose()
        except (asyncio.CancelledError, ConnectionResetError):  # the client went away
            outcome = "cancelled"
            raise
        finally:
            metrics.requests.labels(outcome=outcome).inc()
            metrics.e2e_seconds.observe(time.perf_counter() - started)
            if usage is not None:
                metrics.prompt_tokens.inc(usage.prompt_tokens)
                metrics.generation_tokens.inc(usage.completion_tokens)

    def _answer(self, data: bytes, name: str) -> tuple[bytes, Usage | None]:
        """A JSON answer as the client gets it (the model it named) and its usage."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return data, None
        if not isinstance(doc, dict):
            return data, None
        usage = usage_of(doc.get("usage"))
        if "model" in doc and doc["model"] != name:
            doc["model"] = name
            data = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        return data, usage
