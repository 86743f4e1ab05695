"""The gateway's OpenAPI document, produced once at startup by FastAPI from the wire models.

The gateway serves on aiohttp; FastAPI only writes the document (``/openapi.json``).
The declarations mirror the gateway's public routes; the Docker Model Runner
aliases stay out of the document. The handlers are never called.
"""

from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response

from modelfleet.dataplane.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, RerankRequest

TITLE = "ModelFleet gateway"
VERSION = "0.1.0"


def _never() -> Any:  # pragma: no cover
    raise NotImplementedError("documentation only: the aiohttp app serves this route")


def openapi_document() -> dict[str, Any]:
    doc = FastAPI(title=TITLE, version=VERSION)

    @doc.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest) -> Response:
        return _never()  # type: ignore[no-any-return]

    @doc.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest) -> Response:
        return _never()  # type: ignore[no-any-return]

    @doc.post("/v1/embeddings", response_model=None, summary="Embeddings (deployments in mode embedding)")
    async def embeddings(req: EmbeddingRequest) -> Response:
        return _never()  # type: ignore[no-any-return]

    @doc.post("/v1/rerank", response_model=None, summary="Rerank documents against a query (mode rerank)")
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

    return doc.openapi()
