"""The gateway's HTTP routes (aiohttp, like the sidecar: the gateway is on the hot path).

Thin: validation is the wire models', routing and relaying the service's. The
OpenAPI document is FastAPI's, generated once at startup from the same wire
models (gateway/openapi.py) and served as ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from modelfleet.dataplane.gateway.auth import AuthConfig, GatewayAuth
from modelfleet.dataplane.gateway.cors import CorsPolicy, install_cors
from modelfleet.dataplane.gateway.metrics import GatewayMetrics
from modelfleet.dataplane.gateway.openapi import openapi_document
from modelfleet.dataplane.gateway.routes import RoutingTable
from modelfleet.dataplane.gateway.service import GatewayService, Relayed
from modelfleet.dataplane.httpserver import api_error_response, error_middleware, json_response
from modelfleet.dataplane.logs import REQUEST_ID, bounded_request_id
from modelfleet.dataplane.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ForwardedGeneration,
    ForwardedRequest,
    RerankRequest,
    SamplingFields,
    validation_error,
)
from modelfleet.dataplane.spec import RuntimeKind
from modelfleet.dataplane.upstream import new_session

log = logging.getLogger(__name__)

SERVICE = web.AppKey("service", GatewayService)
METRICS = web.AppKey("metrics", GatewayMetrics)

# The runtime segment of a Docker Model Runner path (/engines/{runtime}/v1/...):
# DMR's backends (clients written for it mostly hard-code llama.cpp) and
# ModelFleet's runtime kinds. It does not filter deployments: the model does.
ENGINE_NAMES = frozenset({"llama.cpp", "mlx", "diffusers", *(kind.value for kind in RuntimeKind)})

GatewayRequest = ChatCompletionRequest | CompletionRequest | EmbeddingRequest | RerankRequest | ForwardedRequest
Wire = type[ChatCompletionRequest] | type[CompletionRequest] | type[EmbeddingRequest] | type[RerankRequest]


def known_engine(runtime: str) -> None:
    """Checked on the /engines/{runtime}/... routes before the body is looked at."""
    if runtime not in ENGINE_NAMES:
        raise ApiError(
            404,
            f"Unknown engine '{runtime}' in /engines/{runtime}/v1/...; known: {', '.join(sorted(ENGINE_NAMES))}.",
            type="not_found_error",
            code="engine_not_found",
        )


NOT_AN_OBJECT = "The request body must be a JSON object."


def json_content_type(value: str | None) -> bool:
    """No Content-Type, or a JSON one (application/json, */*+json): the body is read as JSON."""
    if not value:
        return True
    subtype = value.split(";", 1)[0].strip().lower().rpartition("/")[2]
    return subtype == "json" or subtype.endswith("+json")


def parse_request(
    model: Wire, raw: bytes, content_type: str | None = None, forwards: Callable[[str], bool] | None = None
) -> GatewayRequest:
    """Validate the raw body once, straight from JSON; errors in the gateway's 400 shapes.

    ``forwards(model)``: whether that model's deployment runs an OpenAI-compatible backend (vLLM,
    SGLang, remote). A body the strict wire model refuses is then read as a ``ForwardedRequest`` (only
    ``model`` checked), so fields ModelFleet does not implement reach the backend that does. Bodies the
    strict model accepts, the common case, are parsed once.
    """
    if not raw.strip() or not json_content_type(content_type):
        raise ApiError(400, NOT_AN_OBJECT, code="invalid_json")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        first: Mapping[str, Any] = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            raise ApiError(400, "The request body is not valid JSON.", code="invalid_json") from None
        if not first.get("loc"):  # valid JSON, but not an object
            raise ApiError(400, NOT_AN_OBJECT, code="invalid_json") from None
        if forwards is not None:
            forwarded = _forwarded(model, raw)
            if forwarded is not None and forwards(forwarded.model):
                return forwarded
        raise validation_error(errors) from None


def _forwarded(model: Wire, raw: bytes) -> ForwardedRequest | None:
    """The body as a request for an OpenAI-compatible backend, or None when even that cannot be read."""
    kind = ForwardedGeneration if issubclass(model, SamplingFields) else ForwardedRequest
    try:
        return kind.model_validate_json(raw)
    except ValidationError:
        return None


INCLUDE_USAGE = b',"stream_options":{"include_usage":true}}'


def upstream_body(req: GatewayRequest, raw: bytes) -> bytes:
    """What goes to the sidecar: the client's own bytes, patched only where the gateway must.

    A stream always asks for usage so token metrics are complete (the usage
    event is dropped again unless the client asked for it); other
    ``stream_options`` the client sent are kept. Nothing else is changed
    (docs/openai-api.md lists the rewrites).
    """
    if not isinstance(req, SamplingFields | ForwardedGeneration) or not req.streams or req.wants_usage_in_stream():
        return raw  # embeddings and rerank never stream
    if "stream_options" not in req.model_fields_set:
        # a validated JSON object with at least "model": append the one field before its closing brace
        body = raw.rstrip()
        if body.endswith(b"}"):
            return body[:-1] + INCLUDE_USAGE
    payload = json.loads(raw)
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return raw  # not an object: the backend refuses it as it is
    payload["stream_options"] = {**(options or {}), "include_usage": True}
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


DONE = b"data: [DONE]\n\n"


async def _send(request: web.Request, relayed: Relayed) -> web.StreamResponse:
    if relayed.stream is None:
        return web.Response(body=relayed.body or b"", status=relayed.status, headers=relayed.headers)
    headers = {"content-type": "text/event-stream"} | relayed.headers
    resp = web.StreamResponse(status=relayed.status, headers=headers)
    stream = relayed.stream
    held = b""
    try:
        await resp.prepare(request)  # the headers go out with the first bytes
        async for chunk in stream:
            if held:
                await resp.write(held)
                held = b""
            if chunk.endswith(DONE):
                held = chunk  # the last event: send it with the end of the body, one write
            else:
                await resp.write(chunk)
        await resp.write_eof(held)
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:  # the client left mid-stream: close the upstream now, not at GC
            await aclose()
    return resp


def create_app(
    table: RoutingTable,
    refresher: Callable[[GatewayService], Coroutine[Any, Any, None]] | None = None,
    *,
    auth_config: AuthConfig | None = None,
    cors: CorsPolicy | None = None,
) -> web.Application:
    """The gateway; ``refresher`` (cluster mode) keeps ``service.table`` current.

    ``auth_config``: API keys and admin token (gateway/auth.py; None: open); ``cors``: CORS (None: off).
    """
    metrics = GatewayMetrics()
    service = GatewayService(table, metrics)
    openapi = json.dumps(openapi_document(), separators=(",", ":")).encode()
    auth = GatewayAuth(auth_config, metrics) if auth_config is not None else None
    keys = auth if auth is not None and auth.enforcing else None  # None: the OpenAI routes are open

    async def openai(request: web.Request, endpoint: str, model: Wire) -> web.StreamResponse:
        if keys is None:
            raw = await request.read()
            req = parse_request(model, raw, request.headers.get("content-type"), service.table.forwards)
            return await answer(request, endpoint, req, raw)
        key = keys.authenticate(request.headers)  # 401 before the body is read
        raw = await request.read()
        req = parse_request(model, raw, request.headers.get("content-type"), service.table.forwards)
        grant = keys.admit(key, req, len(raw), service.table)  # 403, 429
        resp = None
        try:
            resp = await answer(request, endpoint, req, raw, grant.usage)
            return resp
        finally:
            grant.release(resp.status if resp is not None else None)

    async def answer(
        request: web.Request,
        endpoint: str,
        req: GatewayRequest,
        raw: bytes,
        on_usage: Callable[[int, int], None] | None = None,
    ) -> web.StreamResponse:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        REQUEST_ID.set(bounded_request_id(request_id))  # generated ids reach the log lines too (dataplane/logs.py)
        try:
            relayed = await service.forward(
                endpoint, req, request_id, request.headers, raw=upstream_body(req, raw), on_usage=on_usage
            )
        except ApiError as exc:  # counted by forward(), under the request's deployment
            return api_error_response(exc)
        return await _send(request, relayed)

    def handlers(endpoint: str, model: Wire) -> tuple[Any, Any]:
        async def plain(request: web.Request) -> web.StreamResponse:
            return await openai(request, endpoint, model)

        async def engine(request: web.Request) -> web.StreamResponse:
            known_engine(request.match_info["runtime"])
            return await openai(request, endpoint, model)

        return plain, engine

    def listing(request: web.Request) -> dict[str, Any]:
        if keys is None:
            return service.models()
        return keys.visible_models(keys.authenticate(request.headers), service.models(), service.table)

    async def models(request: web.Request) -> web.Response:
        return json_response(listing(request))

    async def engine_models(request: web.Request) -> web.Response:
        known_engine(request.match_info["runtime"])
        return json_response(listing(request))

    async def healthz(request: web.Request) -> web.Response:
        return json_response({"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
        return json_response({"status": "ready"})

    async def prometheus(request: web.Request) -> web.Response:
        if auth is not None:
            auth.check_admin(request.headers)  # the admin token, never an API key
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=openapi, content_type="application/json")

    app = web.Application(middlewares=[error_middleware], client_max_size=32 * 1024 * 1024)
    app[SERVICE] = service
    app[METRICS] = metrics
    r = app.router
    chat, engine_chat = handlers("/v1/chat/completions", ChatCompletionRequest)
    text, engine_text = handlers("/v1/completions", CompletionRequest)
    embed, engine_embed = handlers("/v1/embeddings", EmbeddingRequest)
    rerank, engine_rerank = handlers("/v1/rerank", RerankRequest)
    # Docker Model Runner's paths: /engines/v1/... and /engines/{runtime}/v1/...
    # reach the same deployments; the model picks the deployment, the runtime
    # segment only has to be a name DMR or ModelFleet knows (see ENGINE_NAMES).
    for prefix in ("", "/engines"):
        r.add_post(prefix + "/v1/chat/completions", chat)
        r.add_post(prefix + "/v1/completions", text)
        r.add_post(prefix + "/v1/embeddings", embed)
        r.add_post(prefix + "/v1/rerank", rerank)
        r.add_get(prefix + "/v1/models", models, allow_head=False)
    r.add_post("/engines/{runtime}/v1/chat/completions", engine_chat)
    r.add_post("/engines/{runtime}/v1/completions", engine_text)
    r.add_post("/engines/{runtime}/v1/embeddings", engine_embed)
    r.add_post("/engines/{runtime}/v1/rerank", engine_rerank)
    r.add_get("/engines/{runtime}/v1/models", engine_models, allow_head=False)
    r.add_get("/healthz", healthz, allow_head=False)
    r.add_get("/readyz", readyz, allow_head=False)
    r.add_get("/metrics", prometheus, allow_head=False)
    r.add_get("/openapi.json", openapi_json, allow_head=False)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        service.session = new_session()
        task = asyncio.create_task(refresher(service)) if refresher else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await service.session.close()

    app.cleanup_ctx.append(lifecycle)
    if auth is not None:
        app.cleanup_ctx.append(auth.watching)  # reload the keys when their file changes
    if cors is not None:
        install_cors(app, cors)
    return app
