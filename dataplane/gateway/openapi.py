"""The gateway's OpenAPI document, produced once at startup by FastAPI from the wire models.

The gateway serves on aiohttp; FastAPI only writes the document (``/openapi.json``).
The declarations mirror the gateway's public routes; the Docker Model Runner
aliases stay out of the document. The handlers are never called.
"""

from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel, Field

from modelfleet.dataplane.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, RerankRequest

TITLE = "ModelFleet gateway"
VERSION = "0.1.0"


def _never() -> Any:  # pragma: no cover
    raise NotImplementedError("documentation only: the aiohttp app serves this route")


class ErrorDetail(BaseModel):
    """The object inside an OpenAI error (what ``protocol.error_body`` builds)."""

    message: str = Field(description="What went wrong, for a person.")
    type: str = Field(description="invalid_request_error, not_found_error, rate_limit_error, server_error, ...")
    param: str | None = Field(description="The request field at fault, as a path (messages[0].role), or null.")
    code: str | None = Field(description="A stable machine-readable code (model_not_found, invalid_json, ...).")


class ErrorResponse(BaseModel):
    """Every error the gateway answers (never FastAPI's 422 validation shape: the gateway is not FastAPI)."""

    error: ErrorDetail


_ERROR = {"model": ErrorResponse}
# what a generation route can answer besides 200: invalid body (400), unknown model or engine (404),
# replicas at capacity (429), a replica that broke off (502), no ready replica (503)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _ERROR | {"description": "Invalid request: the param names the field."},
    404: _ERROR | {"description": "No deployment serves the model."},
    429: _ERROR | {"description": "Every replica is at capacity; see Retry-After."},
    502: _ERROR | {"description": "The replica failed before completing the response."},
    503: _ERROR | {"description": "No ready replica; see Retry-After."},
}


def _without_fastapi_422(spec: dict[str, Any]) -> dict[str, Any]:
    """Drop the 422 FastAPI documents for every body route: the gateway validates itself and answers 400."""
    for methods in spec.get("paths", {}).values():
        for operation in methods.values():
            operation.get("responses", {}).pop("422", None)
    schemas = spec.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return spec


def openapi_document() -> dict[str, Any]:
    doc = FastAPI(title=TITLE, version=VERSION)

    @doc.post("/v1/chat/completions", response_model=None, responses=ERROR_RESPONSES)
    async def chat_completions(req: ChatCompletionRequest) -> Response:
        return _never()  # type: ignore[no-any-return]

    @doc.post("/v1/completions", response_model=None, responses=ERROR_RESPONSES)
    async def completions(req: CompletionRequest) -> Response:
        return _never()  # type: ignore[no-any-return]

    @doc.post(
        "/v1/embeddings",
        response_model=None,
        summary="Embeddings (deployments in mode embedding)",
        responses=ERROR_RESPONSES,
    )
    async def embeddings(req: EmbeddingRequest) -> Response:
        return _never()  # type: ignore[no-any-return]

    @doc.post(
        "/v1/rerank",
        response_model=None,
        summary="Rerank documents against a query (mode rerank)",
        responses=ERROR_RESPONSES,
    )
    async def rerank(req: RerankRequest) -> Response:
        return _never()  # type: ignore[no-any-return]

    @doc.get("/v1/models")
    async def models() -> dict[str, Any]:
        return _never()  # type: ignore[no-any-return]

    @doc.get("/healthz")
    async def healthz() -> dict[str, str]:
        return _never()  # type: ignore[no-any-return]

    @doc.get("/readyz")
    async def readyz() -> dict[str, str]:
        return _never()  # type: ignore[no-any-return]

    @doc.get("/metrics")
    async def prometheus() -> Response:
        return _never()  # type: ignore[no-any-return]

    return _without_fastapi_422(doc.openapi())
