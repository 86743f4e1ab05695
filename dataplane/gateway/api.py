"""The gateway's HTTP routes (FastAPI: the OpenAPI document comes for free).

Thin: validation is the wire models', routing and relaying the service's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelfleet.dataplane.gateway.metrics import GatewayMetrics
from modelfleet.dataplane.gateway.routes import RoutingTable
from modelfleet.dataplane.gateway.service import GatewayService, Relayed
from modelfleet.dataplane.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    internal_error,
    validation_error,
)
from modelfleet.dataplane.spec import RuntimeKind
from modelfleet.dataplane.upstream import new_session

log = logging.getLogger(__name__)
T = TypeVar("T")


# The runtime segment of a Docker Model Runner path (/engines/{runtime}/v1/...):
# DMR's backends (clients written for it mostly hard-code llama.cpp) and
# ModelFleet's runtime kinds. It does not filter deployments: the model does.
ENGINE_NAMES = frozenset({"llama.cpp", "mlx", "diffusers", *(kind.value for kind in RuntimeKind)})


def known_engine(runtime: str) -> None:
    """A dependency of the /engines/{runtime}/... routes: runs before the body is validated."""
    if runtime not in ENGINE_NAMES:
        raise ApiError(
            404,
            f"Unknown engine '{runtime}' in /engines/{runtime}/v1/...; known: {', '.join(sorted(ENGINE_NAMES))}.",
            type="not_found_error",
            code="engine_not_found",
        )


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; cancel it if the client goes away first (stops generation upstream)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise asyncio.CancelledError
    return task.result()


def _to_response(relayed: Relayed) -> Response:
    if relayed.stream is not None:
        return StreamingResponse(
            relayed.stream, status_code=relayed.status, headers=relayed.headers, media_type="text/event-stream"
        )
    return Response(
        relayed.body or b"", status_code=relayed.status, headers=relayed.headers, media_type="application/json"
    )


def create_app(
    table: RoutingTable, refresher: Callable[[GatewayService], Coroutine[Any, Any, None]] | None = None
) -> FastAPI:
    """The gateway; ``refresher`` (cluster mode) keeps ``service.table`` current."""
    metrics = GatewayMetrics()
    service = GatewayService(table, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.session = new_session()
        app.state.service = service
        app.state.metrics = metrics
        task = asyncio.create_task(refresher(service)) if refresher else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await service.session.close()

    app = FastAPI(title="ModelFleet gateway", version="0.1.0", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return _error_response(ApiError(400, "The request body is not valid JSON.", code="invalid_json"))
        if tuple(first.get("loc", ())) == ("body",):
            return _error_response(ApiError(400, "The request body must be a JSON object.", code="invalid_json"))
        return _error_response(validation_error(errors, skip_prefix=1))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(exc.detail), type=kind, code=str(exc.status_code)), status_code=exc.status_code
        )

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled %s", type(exc).__name__, exc_info=exc)
        return _error_response(internal_error())

    async def openai(request: Request, endpoint: str, req: ChatCompletionRequest | CompletionRequest) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        try:
            if req.stream:
                relayed = await service.forward(endpoint, req, request_id, request.headers)
            else:
                relayed = await _until_disconnect(request, service.forward(endpoint, req, request_id, request.headers))
        except ApiError as exc:
            service.count_error(endpoint, exc)
            raise
        return _to_response(relayed)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await openai(request, "/v1/chat/completions", req)

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await openai(request, "/v1/completions", req)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return service.models()

    # Docker Model Runner's paths: /engines/v1/... and /engines/{runtime}/v1/...
    # reach the same deployments; the model picks the deployment, the runtime
    # segment only has to be a name DMR or ModelFleet knows (see ENGINE_NAMES).
    @app.post("/engines/v1/chat/completions", response_model=None, include_in_schema=False)
    async def dmr_chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await openai(request, "/v1/chat/completions", req)

    @app.post("/engines/v1/completions", response_model=None, include_in_schema=False)
    async def dmr_completions(req: CompletionRequest, request: Request) -> Response:
        return await openai(request, "/v1/completions", req)

    @app.get("/engines/v1/models", include_in_schema=False)
    async def dmr_models() -> dict[str, Any]:
        return service.models()

    engine = [Depends(known_engine)]

    @app.post(
        "/engines/{runtime}/v1/chat/completions", response_model=None, include_in_schema=False, dependencies=engine
    )
    async def dmr_runtime_chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await openai(request, "/v1/chat/completions", req)

    @app.post("/engines/{runtime}/v1/completions", response_model=None, include_in_schema=False, dependencies=engine)
    async def dmr_runtime_completions(req: CompletionRequest, request: Request) -> Response:
        return await openai(request, "/v1/completions", req)

    @app.get("/engines/{runtime}/v1/models", include_in_schema=False, dependencies=engine)
    async def dmr_runtime_models() -> dict[str, Any]:
        return service.models()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
