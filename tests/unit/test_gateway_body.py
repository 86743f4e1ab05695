"""The gateway validates a body once and forwards the client's own bytes, patched
only to ask a stream for usage; the usage event reaches the client only when it
asked for it. A fake sidecar (aiohttp, in process) records what it was sent."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from modelfleet.dataplane.gateway.api import create_app, parse_request, upstream_body
from modelfleet.dataplane.gateway.routes import DeploymentRoute, RoutingTable
from modelfleet.dataplane.protocol import ApiError, ChatCompletionRequest, CompletionRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
USAGE = {"id": "x", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def _chat(body: dict) -> tuple[ChatCompletionRequest, bytes]:
    raw = json.dumps(body).encode()
    req = parse_request(ChatCompletionRequest, raw)
    assert isinstance(req, ChatCompletionRequest)
    return req, raw


@pytest.mark.parametrize("extra", [{}, {"stream": False}, {"stream": True, "stream_options": {"include_usage": True}}])
def test_body_passes_through_untouched(extra):
    req, raw = _chat({**CHAT, **extra})
    assert upstream_body(req, raw) is raw


@pytest.mark.parametrize(
    "extra,trailer",
    [
        ({"stream": True}, b""),
        ({"stream": True}, b" \n"),
        ({"stream": True, "stream_options": None}, b""),
        ({"stream": True, "stream_options": {"include_usage": False}}, b""),
        ({"stream": True, "stream_options": {}}, b"\n"),
    ],
)
def test_stream_is_patched_to_ask_for_usage(extra, trailer):
    req, raw = _chat({**CHAT, **extra})
    sent = json.loads(upstream_body(req, raw + trailer))
    assert sent == {**CHAT, **extra, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize(
    "raw,content_type,message",
    [
        (b"", None, "must be a JSON object"),
        (b"  ", "application/json", "must be a JSON object"),
        (b"[]", None, "must be a JSON object"),
        (b"null", "application/json", "must be a JSON object"),
        (json.dumps(CHAT).encode(), "text/plain", "must be a JSON object"),
        (b"{bad", "application/json; charset=utf-8", "not valid JSON"),
    ],
)
def test_bodies_that_are_not_json_objects(raw, content_type, message):
    with pytest.raises(ApiError) as err:
        parse_request(CompletionRequest, raw, content_type)
    assert err.value.status == 400 and err.value.code == "invalid_json" and message in err.value.message


def test_validation_error_names_the_field():
    with pytest.raises(ApiError) as err:
        parse_request(ChatCompletionRequest, json.dumps({**CHAT, "n": 2}).encode(), "application/vnd.x+json")
    assert err.value.status == 400 and err.value.param == "n"


@pytest.fixture
async def sidecar():
    seen: list[dict] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append({"body": body, "request_id": request.headers.get("x-request-id")})
        if not body.get("stream"):
            return web.json_response({"id": "x", "choices": [], "usage": USAGE["usage"]})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n')
        usage = b"data: " + json.dumps(USAGE, separators=(",", ":")).encode() + b"\n\n"
        await resp.write(usage[:20])  # an event split over two reads
        await asyncio.sleep(0.01)
        await resp.write(usage[20:])
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with TestServer(app) as server:
        yield str(server.make_url("")).rstrip("/"), seen


@pytest.fixture
async def gateway(sidecar):
    url, seen = sidecar
    table = RoutingTable([DeploymentRoute(name="d", models=["m"], endpoints=[url])])
    async with TestClient(TestServer(create_app(table))) as client:
        yield client, seen


@pytest.mark.parametrize("include_usage", [False, True])
async def test_stream_usage_reaches_the_client_only_when_asked(gateway, include_usage):
    client, seen = gateway
    body = {**CHAT, "stream": True, **({"stream_options": {"include_usage": True}} if include_usage else {})}
    resp = await client.post("/v1/chat/completions", json=body, headers={"x-request-id": "r1"})
    assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
    text = (await resp.read()).decode()
    assert text.endswith("data: [DONE]\n\n") and '"content":"hi"' in text
    assert ('"usage"' in text) is include_usage
    assert seen[-1] == {"body": {**CHAT, "stream": True, "stream_options": {"include_usage": True}}, "request_id": "r1"}
    metrics = await (await client.get("/metrics")).text()
    assert 'modelfleet_gateway_completion_tokens_total{deployment="d"} 2.0' in metrics


async def test_plain_answer_is_relayed(gateway):
    client, seen = gateway
    resp = await client.post("/engines/llama.cpp/v1/chat/completions", json=CHAT)
    assert resp.status == 200 and (await resp.json())["usage"]["completion_tokens"] == 2
    assert seen[-1]["body"] == CHAT and seen[-1]["request_id"]


async def test_openapi_document_is_served(gateway):
    client, _ = gateway
    doc = await (await client.get("/openapi.json")).json()
    assert doc["info"]["title"] == "ModelFleet gateway"
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(
        doc["paths"]
    )
    assert not any(p.startswith("/engines") for p in doc["paths"])
