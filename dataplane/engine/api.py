"""HTTP surface of an engine replica (aiohttp: it sits on the hot path).

Routes: the OpenAI-compatible API the sidecar forwards to (chat and text
completions, or /v1/embeddings, or /v1/rerank: the deployment's mode picks
which one answers; see engine/pooling.py), /v1/models,
/healthz (alive), /readyz (weights loaded; 503 with progress while loading,
and with status "rebuilding" and the cause while the worker rebuilds the
runner's session), /load (the sidecar's load view) and /metrics. With
``MODELFLEET_FAULT_INJECTION=1`` only, also ``POST /admin/fault``: a test-only
switch that fakes a poisoned device context (see engine/faults.py).

Compatibility with routers that probe SGLang workers (sglang-router,
``bench/routing_quality.py``): ``GET /health`` (200 once ready, else 503),
``/server_info``, ``/get_server_info``, ``/model_info`` and
``/get_model_info`` (the served model name and context length), and the
SGLang sampling extensions such a router adds to every chat body, dropped
when they hold SGLang's defaults (a no-op here) and refused otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import Any, TypeVar, cast

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from modelfleet.dataplane.common.headers import PREFIX_KEY_HEADER
from modelfleet.dataplane.engine.core import EngineCore
from modelfleet.dataplane.engine.faults import FaultInjector
from modelfleet.dataplane.engine.metrics import EngineMetrics, ModelServerCollector
from modelfleet.dataplane.engine.passthrough import PassthroughService
from modelfleet.dataplane.engine.pooling import ENDPOINT_MODES, Embedder, PoolingService, require_mode
from modelfleet.dataplane.engine.prefix_keys import RecentPrefixKeys
from modelfleet.dataplane.engine.service import EngineService, served_models
from modelfleet.dataplane.engine.worker import EngineWorker
from modelfleet.dataplane.httpserver import SSE_HEADERS, Handler, error_middleware, json_response
from modelfleet.dataplane.protocol import (
    PRIORITY_HEADER,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    RerankRequest,
    WireModel,
    parse_json_body,
    parse_priority,
    unavailable,
    validation_error,
)
from modelfleet.dataplane.runners.base import (
    CHAT,
    COMPLETIONS,
    FaultInjectable,
    ModelRunner,
    ModelServerMetrics,
    as_backend,
    as_token_generator,
)
from modelfleet.dataplane.spec import InferenceDeploymentSpec

log = logging.getLogger(__name__)


class EngineState:
    """Everything the engine's handlers share, owned by the app."""

    def __init__(
        self,
        spec: InferenceDeploymentSpec,
        runner: ModelRunner,
        metrics: EngineMetrics,
        *,
        fault_injector: FaultInjector | None = None,
    ) -> None:
        self.spec = spec
        self.runner = runner
        self.metrics = metrics
        self.worker = EngineWorker(runner, metrics)
        self.core = EngineCore(self.worker, spec.engine, metrics)
        self.capabilities = runner.capabilities
        if not self.capabilities.model_server_metrics:  # else the backend's own are re-exported (/metrics)
            metrics.registry.register(ModelServerCollector(self.core.load, runner.runtime_stats, spec.model.name))
        self.fault_injector = fault_injector
        if fault_injector is not None:
            if not self.capabilities.fault_injection:
                raise RuntimeError(f"{type(runner).__name__} has no fault_hook; fault injection needs one")
            cast(FaultInjectable, runner).fault_hook = fault_injector.check
        self.service: EngineService | None = None  # token generators: ModelFleet implements the API
        self.pooling: PoolingService | None = None  # embedding and rerank modes
        self.passthrough: PassthroughService | None = None  # passthrough runners: the backend implements it
        self.load_error: str | None = None
        self.draining = False
        self.prefix_keys = RecentPrefixKeys()  # reported in /load for the sidecars' shared placement

    @property
    def progress(self) -> str:
        return self.runner.progress

    @property
    def ready(self) -> bool:
        return (self.service is not None or self.pooling is not None or self.passthrough is not None) and not (
            self.draining
        )

    def _not_ready(self) -> ApiError:
        return unavailable(5, f"The model is not ready yet ({self.progress}).")

    def ready_service(self) -> EngineService:
        if self.service is None or self.draining:
            raise self._not_ready()
        return self.service

    def ready_passthrough(self) -> PassthroughService:
        if self.passthrough is None or self.draining:
            raise self._not_ready()
        return self.passthrough


async def _passthrough(state: EngineState, request: web.Request, endpoint: str) -> web.StreamResponse:
    """A passthrough runner's request: forwarded as sent, its answer relayed (engine/passthrough.py)."""
    require_mode(state.spec, endpoint)
    return await state.ready_passthrough().handle(request, endpoint, lambda: _load_headers(state))


async def _openai(
    request: web.Request, endpoint: str, model: type[ChatCompletionRequest] | type[CompletionRequest]
) -> web.StreamResponse:
    state = request.app[STATE]
    if state.capabilities.passthrough:
        return await _passthrough(state, request, endpoint)
    require_mode(state.spec, endpoint)
    body = _drop_sglang_defaults(parse_json_body(await request.read()))
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None
    priority = parse_priority(request.headers.get(PRIORITY_HEADER))
    service = state.ready_service()
    prep = await service.prepare(req, request.headers.get("x-request-id"), priority)
    state.prefix_keys.note(request.headers.get(PREFIX_KEY_HEADER))
    headers = {"x-request-id": prep.request_id, **_load_headers(state)}
    if not prep.stream:
        return json_response(await service.complete(prep), headers=headers)
    async with aclosing(service.stream(prep)) as events:
        first = await anext(events)  # errors before the first byte keep their HTTP status
        resp = web.StreamResponse(headers=SSE_HEADERS | headers)
        await resp.prepare(request)
        await resp.write(first)
        async for event in events:
            await resp.write(event)
    await resp.write_eof()
    return resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, CHAT, ChatCompletionRequest)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, COMPLETIONS, CompletionRequest)


W = TypeVar("W", bound=WireModel)


def _pooling_request(state: EngineState, endpoint: str, model: type[W], raw: bytes) -> tuple[dict[str, Any], W]:
    """Mode check, then the body and its validated form."""
    require_mode(state.spec, endpoint)
    body = parse_json_body(raw)
    try:
        return body, model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None


async def _pool(state: EngineState, req: WireModel, request_id: str | None) -> dict[str, Any]:
    """The answer of an embedding or rerank request, computed here."""
    if state.pooling is None or state.draining:
        raise state._not_ready()
    if isinstance(req, EmbeddingRequest):
        return await state.pooling.embeddings(req, request_id)
    assert isinstance(req, RerankRequest)
    return await state.pooling.rerank(req, request_id)


def _pooling_route(endpoint: str, model: type[EmbeddingRequest] | type[RerankRequest]) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        if state.capabilities.passthrough:
            return await _passthrough(state, request, endpoint)
        _body, req = _pooling_request(state, endpoint, model, await request.read())
        return json_response(await _pool(state, req, request.headers.get("x-request-id")))

    return handle


embeddings = _pooling_route("/v1/embeddings", EmbeddingRequest)
rerank = _pooling_route("/v1/rerank", RerankRequest)


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return json_response(served_models(state.spec) if state.ready else {"object": "list", "data": []})


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.load_error:
        return json_response({"status": "failed", "error": state.load_error}, status=500)
    if state.worker.fatal:  # the device cannot be rebuilt in this process: ask to be restarted
        return json_response({"status": "failed", "error": state.worker.fatal}, status=500)
    return json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.worker.rebuilding and not state.draining:
        return json_response({"status": "rebuilding", **state.worker.status()}, status=503)
    if state.ready:
        return json_response({"status": "ready", "progress": state.progress})
    status = "draining" if state.draining else ("failed" if state.load_error else "loading")
    return json_response({"status": status, "progress": state.load_error or state.progress}, status=503)


async def load(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ready = state.ready and not state.worker.rebuilding
    body: dict[str, object] = {
        **state.core.load(),
        "ready": ready,
        "prefix_keys": state.prefix_keys.report(),
        **_runtime_load(state),
    }
    return json_response(body)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    data = generate_latest(state.metrics.registry)
    if state.capabilities.model_server_metrics:  # the backend's vllm:* families, as it reports them
        try:
            data += (await cast(ModelServerMetrics, state.runner).model_server_metrics()).encode()
        except (aiohttp.ClientError, TimeoutError) as exc:  # loading or restarting: ModelFleet's own still answer
            log.debug("the backend's metrics are unavailable: %s", exc)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


# ---- compatibility with routers that probe SGLang workers -----------------------------------
# sglang-router registers a worker only once its GET /health answers 200, then reads
# /server_info and /model_info (falling back to the /get_* spellings) for the worker's
# metadata; it re-serializes every chat body with SGLang's extension fields at their defaults.

# SGLang extension fields and the value that means "do what an OpenAI server does"
SGLANG_DEFAULTS: dict[str, object] = {
    "no_stop_trim": False,
    "continue_final_message": False,
    "skip_special_tokens": True,
    "separate_reasoning": True,
    "stream_reasoning": True,
    "return_hidden_states": False,
}


def _runtime_load(state: EngineState) -> dict[str, float]:
    """KV usage and prefix-cache hit rate from the runner's counters (runners without them: nothing)."""
    runtime = state.runner.runtime_stats()
    out: dict[str, float] = {}
    if runtime.get("kv_blocks_total"):
        out["kv_usage"] = round(runtime["kv_blocks_used"] / runtime["kv_blocks_total"], 4)
    if runtime.get("prefix_queries"):
        out["prefix_hit_rate"] = round(runtime["prefix_hits"] / runtime["prefix_queries"], 4)
    return out


def _load_headers(state: EngineState) -> dict[str, str]:
    """The replica's load as a request arrives: waiting requests and KV usage (rollout observations read them)."""
    headers = {"x-modelfleet-queue-depth": str(state.core.queued)}
    kv = _runtime_load(state).get("kv_usage")
    if kv is not None:
        headers["x-modelfleet-kv-usage"] = f"{kv:.4f}"
    return headers


def _drop_sglang_defaults(body: dict[str, object]) -> dict[str, object]:
    """The body without SGLang extension fields that hold their no-op defaults; other values stay and get a 400."""
    return {k: v for k, v in body.items() if k not in SGLANG_DEFAULTS or SGLANG_DEFAULTS[k] != v}


async def health(request: web.Request) -> web.Response:
    """SGLang's health probe: 200 when the engine takes requests (like /readyz), 503 otherwise."""
    state = request.app[STATE]
    if state.ready and not state.worker.rebuilding:
        return json_response({"status": "ok"})
    return json_response({"status": "unavailable", "progress": state.load_error or state.progress}, status=503)


async def model_info(request: web.Request) -> web.Response:
    """SGLang's /model_info and /server_info: the served model name and the context length.

    No ``model_path`` or ``tokenizer_path``: a router would try to load a tokenizer from them.
    """
    spec = request.app[STATE].spec
    return json_response(
        {
            "served_model_name": spec.model.name,
            "is_generation": spec.model.mode.value == "completion",
            "max_model_len": spec.engine.max_model_len,
            "max_running_requests": spec.engine.max_num_seqs,
            "dp_size": 1,
            "tp_size": 1,
        }
    )


async def admin_fault(request: web.Request) -> web.Response:
    """Test-only: arm the fault injector; the next ``count`` runner steps fail as a poisoned CUDA context would."""
    injector = request.app[STATE].fault_injector
    assert injector is not None  # the route exists only with an injector
    body = parse_json_body(await request.read() or b"{}")
    count = body.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ApiError(400, "count must be an integer >= 0 (0 disarms).", param="count", code="invalid_value")
    injector.arm(count)
    log.warning("fault injection armed: the next %d runner steps fail", count)
    return json_response({"armed": count})


STATE = web.AppKey("engine_state", EngineState)


def build_app(state: EngineState) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=32 * 1024 * 1024)
    app[STATE] = state
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/rerank", rerank)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/load", load)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    for path in ("/server_info", "/get_server_info", "/model_info", "/get_model_info"):
        app.router.add_get(path, model_info)
    if state.fault_injector is not None:
        app.router.add_post("/admin/fault", admin_fault)

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        task = asyncio.create_task(_load_model(state))
        yield
        state.draining = True
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await state.worker.close()
        await state.runner.close()

    app.cleanup_ctx.append(lifecycle)
    return app


async def _load_model(state: EngineState) -> None:
    try:
        await state.runner.load_weights(None, state.spec.model.source)
    except Exception as exc:
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.error("loading the model failed: %s", state.load_error)
        return
    caps = state.capabilities
    wanted = next(e for e, mode in ENDPOINT_MODES.items() if mode is state.spec.model.mode)
    if wanted not in caps.endpoints:
        state.load_error = f"runtime {state.spec.runtime.kind.value} cannot serve mode {state.spec.model.mode.value}"
        return
    if caps.passthrough:  # the backend tokenizes and answers; the engine relays
        state.passthrough = PassthroughService(state.spec, state.core, as_backend(state.runner), state.metrics)
    elif caps.embeds:
        state.pooling = PoolingService(state.spec, cast(Embedder, state.runner), state.metrics)
    else:
        codec = as_token_generator(state.runner).codec
        if codec is None:
            state.load_error = "runner has no tokenizer"
            return
        state.service = EngineService(state.spec, state.core, codec)
    log.info("engine ready: %s", ", ".join(state.spec.served_names()))
