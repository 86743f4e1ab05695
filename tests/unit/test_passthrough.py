"""The passthrough family's pieces: the two rewrites, the usage read from a relayed stream, the runners'
declared capabilities, and the gateway reading requests by the deployment's runtime (docs/openai-api.md)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from modelfleet.dataplane.engine.passthrough import StreamTap, completion_limit, forward_body
from modelfleet.dataplane.gateway.api import parse_request, upstream_body
from modelfleet.dataplane.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ForwardedGeneration,
    ForwardedRequest,
)
from modelfleet.dataplane.runners.base import CHAT, COMPLETIONS, EMBEDDINGS, RunnerFamily, Usage
from modelfleet.dataplane.runners.openai_stream import StreamBrokenError, body_chunks, error_answer
from modelfleet.dataplane.runners.registry import RUNTIME_FAMILY
from modelfleet.dataplane.spec import RuntimeKind

TOOLS_BODY: dict[str, Any] = {
    "model": "alias",
    "messages": [{"role": "user", "content": "weather?"}],
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    "tool_choice": "required",
    "response_format": {"type": "json_object"},
    "logprobs": True,
    "top_logprobs": 3,
    "top_k": 1,
    "logit_bias": {"42": -100},
    "n": 2,
    "repetition_penalty": 1.0,
    "some_future_field": {"nested": [1, 2]},
}


# ---- the request's rewrites -------------------------------------------------------------------------------
def test_a_body_that_needs_no_rewrite_is_sent_as_the_clients_bytes() -> None:
    raw = b'{"model": "served",  "messages": [], "whatever": 1.50}'
    sent, injected = forward_body(raw, json.loads(raw), "served")
    assert sent is raw and not injected


def test_the_model_is_the_only_field_changed_and_unknown_fields_go_along() -> None:
    raw = json.dumps(TOOLS_BODY).encode()
    sent, injected = forward_body(raw, json.loads(raw), "served")
    assert json.loads(sent) == {**TOOLS_BODY, "model": "served"} and not injected


def test_a_stream_asks_for_usage_keeping_the_clients_other_stream_options() -> None:
    body = {"model": "served", "messages": [], "stream": True, "stream_options": {"continuous_usage_stats": True}}
    sent, injected = forward_body(json.dumps(body).encode(), body, "served")
    assert injected
    assert json.loads(sent)["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    asked = {**body, "stream_options": {"include_usage": True}}
    assert forward_body(json.dumps(asked).encode(), asked, "served")[1] is False
    odd = {**body, "stream_options": "yes"}  # not an object: the backend's to refuse, as sent
    assert forward_body(json.dumps(odd).encode(), odd, "served")[1] is False


def test_completion_limit_counts_n_times_max_tokens() -> None:
    assert completion_limit(CHAT, {"max_tokens": 10, "n": 3}, 999) == 30
    assert completion_limit(CHAT, {"max_completion_tokens": 5, "max_tokens": 10}, 999) == 5
    assert completion_limit(CHAT, {"max_tokens": "many"}, 999) == 999  # the backend refuses it, not the queue
    assert completion_limit(COMPLETIONS, {}, 999) == 16
    assert completion_limit(EMBEDDINGS, {"input": "x"}, 999) == 0


# ---- the answer: usage read, usage event dropped, model renamed -------------------------------------------
def event(obj: dict[str, Any], spaced: bool = False) -> bytes:
    return b"data: " + json.dumps(obj, separators=(", ", ": ") if spaced else (",", ":")).encode() + b"\n\n"


CHUNK = {"id": "c1", "model": "served", "choices": [{"index": 0, "delta": {"content": '"model":"served"'}}]}
USAGE = {"id": "c1", "model": "served", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}
DONE = b"data: [DONE]\n\n"


@pytest.mark.parametrize("spaced", [False, True])
def test_the_usage_event_the_engine_asked_for_is_read_and_dropped(spaced: bool) -> None:
    stream = event(CHUNK, spaced) + event(USAGE, spaced) + DONE
    tap = StreamTap("served", "served", drop_usage=True)
    out = b"".join(tap.feed(stream[i : i + 7]) for i in range(0, len(stream), 7)) + tap.flush()  # split anywhere
    assert out == event(CHUNK, spaced) + DONE
    assert tap.usage == Usage(9, 2)


def test_a_client_that_asked_for_usage_gets_it_and_the_name_it_sent() -> None:
    tap = StreamTap("alias", "served", drop_usage=False)
    out = tap.feed(event(CHUNK) + event(USAGE, spaced=True) + DONE) + tap.flush()
    events = [json.loads(line[6:]) for line in out.decode().splitlines() if line.startswith("data: {")]
    assert [e["model"] for e in events] == ["alias", "alias"]
    assert events[0]["choices"][0]["delta"]["content"] == '"model":"served"'  # text is never touched
    assert events[1]["usage"] == USAGE["usage"] and tap.usage == Usage(9, 2)


def test_usage_in_every_chunk_is_read_and_those_chunks_kept() -> None:
    with_usage = {**CHUNK, "usage": {"prompt_tokens": 9, "completion_tokens": 1}}
    tap = StreamTap("served", "served", drop_usage=True)
    assert tap.feed(event(with_usage)) == event(with_usage)
    assert tap.usage == Usage(9, 1)


def test_error_bodies_keep_their_shape_or_get_one() -> None:
    shaped = b'{"error":{"message":"too long","type":"invalid_request_error","param":null,"code":"x"}}'
    assert error_answer(400, shaped) is shaped
    wrapped = json.loads(error_answer(502, b"<html>bad gateway</html>"))["error"]
    assert wrapped["type"] == "server_error" and "HTTP 502" in wrapped["message"]
    flat = json.loads(error_answer(400, b'{"object":"error","message":"bad n","code":400}'))["error"]
    assert flat["message"] == "bad n" and flat["type"] == "invalid_request_error"


class _Content:
    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts

    async def iter_any(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield part


class _Resp:
    def __init__(self, parts: list[bytes], content_type: str = "text/event-stream") -> None:
        self.content = _Content(parts)
        self.headers = {"content-type": content_type}


def _relay(parts: list[bytes], content_type: str = "text/event-stream") -> bytes:
    async def go() -> bytes:
        return b"".join([c async for c in body_chunks(_Resp(parts, content_type))])  # type: ignore[arg-type]

    return asyncio.run(go())


def test_a_stream_without_done_was_cut_off() -> None:
    assert _relay([event(CHUNK), DONE]) == event(CHUNK) + DONE
    with pytest.raises(StreamBrokenError, match="cut off"):
        _relay([event(CHUNK)])
    assert _relay([b'{"ok":', b"true}"], "application/json") == b'{"ok":true}'  # not a stream: no [DONE]


# ---- capabilities ----------------------------------------------------------------------------------------
def test_each_runtime_declares_its_family_and_the_gateway_agrees() -> None:
    from modelfleet.dataplane.runners.embedding import EmbeddingRunner
    from modelfleet.dataplane.runners.remote import RemoteRunner
    from modelfleet.dataplane.runners.sglang import SglangRunner
    from modelfleet.dataplane.runners.torch import TorchRunner
    from modelfleet.dataplane.runners.vllm import VllmRunner

    runners: list[Any] = [TorchRunner, EmbeddingRunner, VllmRunner, SglangRunner, RemoteRunner]
    for runner in runners:
        assert RUNTIME_FAMILY[runner.runtime_kind] is runner.capabilities.family, runner
    assert VllmRunner.capabilities.passthrough and VllmRunner.capabilities.one_model_per_process
    assert RemoteRunner.capabilities.passthrough and EMBEDDINGS in RemoteRunner.capabilities.endpoints
    assert TorchRunner.capabilities.family is RunnerFamily.TOKEN_GENERATOR and TorchRunner.capabilities.fault_injection
    assert EmbeddingRunner.capabilities.embeds and CHAT not in EmbeddingRunner.capabilities.endpoints
    assert set(RUNTIME_FAMILY) == set(RuntimeKind)


def test_the_engine_reads_capabilities_instead_of_probing_the_runner() -> None:
    """What the engine needs from a runner is in its protocol or its capabilities record, never found by
    getattr/hasattr (metrics.py's optional runtime_stats export aside: every runner has runtime_stats now)."""
    import re
    from pathlib import Path

    import modelfleet.dataplane.engine as engine

    probe = re.compile(r"(?:getattr|hasattr)\((?:self\.|state\.)?runner, \"(\w+)\"")
    for path in Path(engine.__path__[0]).glob("*.py"):
        probed = set(probe.findall(path.read_text())) - {"runtime_stats"}
        assert not probed, f"{path.name} probes the runner for {sorted(probed)}"


# ---- the gateway: strict for the torch runner, as sent for OpenAI-compatible backends --------------------
def test_unknown_fields_pass_for_a_passthrough_deployment_and_are_named_for_torch() -> None:
    raw = json.dumps(TOOLS_BODY).encode()
    with pytest.raises(ApiError) as err:
        parse_request(ChatCompletionRequest, raw, forwards=lambda model: False)
    assert err.value.status == 400 and err.value.param == "n"  # as today: the first field it cannot serve
    with pytest.raises(ApiError):
        parse_request(ChatCompletionRequest, raw)  # no routing table: strict
    req = parse_request(ChatCompletionRequest, raw, forwards=lambda model: model == "alias")
    assert isinstance(req, ForwardedGeneration) and req.model == "alias" and req.token_limit() is None
    assert req.model_extra is not None and req.model_extra["tools"] == TOOLS_BODY["tools"]


def test_a_body_the_strict_model_accepts_is_parsed_once_either_way() -> None:
    raw = b'{"model":"alias","messages":[{"role":"user","content":"hi"}],"max_tokens":4}'
    assert isinstance(parse_request(ChatCompletionRequest, raw, forwards=lambda model: True), ChatCompletionRequest)


def test_forwarded_requests_still_need_a_model_and_a_json_object() -> None:
    with pytest.raises(ApiError) as err:
        parse_request(ChatCompletionRequest, b'{"messages":[],"tools":[]}', forwards=lambda model: True)
    assert err.value.param == "model"
    with pytest.raises(ApiError) as err:
        parse_request(CompletionRequest, b"[1,2]", forwards=lambda model: True)
    assert err.value.code == "invalid_json"


def test_forwarded_limits_and_usage_request() -> None:
    raw = b'{"model":"m","prompt":["a","b"],"n":3,"max_tokens":7,"stream":true,"stream_options":{"x":1}}'
    req = parse_request(CompletionRequest, raw, forwards=lambda model: True)
    assert isinstance(req, ForwardedGeneration) and req.token_limit() == 21 and not req.wants_usage_in_stream()
    assert json.loads(upstream_body(req, raw))["stream_options"] == {"x": 1, "include_usage": True}
    embed = parse_request(EmbeddingRequest, b'{"model":"m","input":"x","truncate_prompt_tokens":3}', forwards=bool)
    assert type(embed) is ForwardedRequest
    assert upstream_body(embed, b"same") == b"same"
