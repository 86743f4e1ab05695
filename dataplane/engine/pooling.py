"""Embedding and rerank semantics of an engine replica: validate, check limits, format.

A deployment serves one mode (``spec.model.mode``): completion answers the
chat and text-completion endpoints, embedding answers ``/v1/embeddings``,
rerank answers ``/v1/rerank``. A request for another mode's endpoint gets a
400 that says which endpoint the deployment serves.

Rerank scores are cosine similarities of the query's and each document's
embedding (a bi-encoder such as MiniLM; the vectors are unit-norm, so the dot
product), in [-1, 1], higher is more relevant. No cross-encoder is involved.

Admission: at most ``engine.maxQueueLen`` requests wait behind the one being
computed; beyond that a request gets a retriable 429, as generation requests do.
"""

from __future__ import annotations

import array
import asyncio
import base64
import sys
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from modelfleet.dataplane.engine.metrics import EngineMetrics
from modelfleet.dataplane.engine.service import runner_failure
from modelfleet.dataplane.protocol import (
    ApiError,
    EmbeddingRequest,
    RerankRequest,
    model_not_found,
    overloaded,
)
from modelfleet.dataplane.runners.base import RunnerError
from modelfleet.dataplane.spec import InferenceDeploymentSpec, Mode

if TYPE_CHECKING:  # numpy comes with the torch extra; an engine without it never imports numpy here
    import numpy as np
    import numpy.typing as npt


class Embedder(Protocol):
    """What the pooling service needs from a runner (runners/embedding.py implements it)."""

    dimensions: int
    max_input_tokens: int
    vocab_size: int

    async def tokenize(self, texts: Sequence[str]) -> list[list[int]]: ...

    async def embed(self, token_ids: Sequence[Sequence[int]]) -> npt.NDArray[np.float32]: ...


# endpoint -> the mode that serves it
ENDPOINT_MODES: dict[str, Mode] = {
    "/v1/chat/completions": Mode.COMPLETION,
    "/v1/completions": Mode.COMPLETION,
    "/v1/embeddings": Mode.EMBEDDING,
    "/v1/rerank": Mode.RERANK,
}
SERVES = {
    Mode.COMPLETION: ("chat and text completions", "POST /v1/chat/completions or /v1/completions"),
    Mode.EMBEDDING: ("embeddings", "POST /v1/embeddings"),
    Mode.RERANK: ("reranking", "POST /v1/rerank"),
}


def require_mode(spec: InferenceDeploymentSpec, endpoint: str) -> None:
    """A 400 when the deployment's mode does not serve this endpoint."""
    wanted = ENDPOINT_MODES[endpoint]
    mode = spec.model.mode
    if mode is wanted:
        return
    what, use = SERVES[mode]
    raise ApiError(
        400,
        f"This deployment (model '{spec.model.name}') serves {what}, not {SERVES[wanted][0]}: "
        f"its mode is {mode.value}. Use {use}.",
        param="model",
        code="unsupported_endpoint",
    )


def encode_base64(vector: npt.NDArray[np.float32]) -> str:
    """OpenAI's base64 encoding: the vector's little-endian float32 bytes."""
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")


def decode_base64(data: str) -> list[float]:
    """The inverse of :func:`encode_base64` (what OpenAI clients do)."""
    floats = array.array("f", base64.b64decode(data))
    if sys.byteorder == "big":
        floats.byteswap()
    return floats.tolist()


def rank(scores: Sequence[float], top_n: int | None) -> list[int]:
    """Indices by score, highest first (ties keep input order); ``top_n`` None or 0 keeps all."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return order[:top_n] if top_n else order


class PoolingService:
    """Turns embedding and rerank requests into runner calls and answers."""

    def __init__(self, spec: InferenceDeploymentSpec, runner: Embedder, metrics: EngineMetrics) -> None:
        self.spec = spec
        self.runner = runner
        self.metrics = metrics
        self.max_tokens = min(runner.max_input_tokens, spec.engine.max_model_len)
        self._in_flight = 0

    def _check_model(self, model: str) -> None:
        if model not in self.spec.served_names():
            raise model_not_found(model)

    def _check_lengths(self, token_ids: Sequence[Sequence[int]], param: Any) -> None:
        for i, ids in enumerate(token_ids):
            name = param(i)
            if not ids:
                raise ApiError(400, f"'{name}' is empty; every input needs at least one token.", param=name)
            if len(ids) > self.max_tokens:
                raise ApiError(
                    400,
                    f"This model's maximum input length is {self.max_tokens} tokens. However, '{name}' "
                    f"resulted in {len(ids)} tokens. Shorten it or split it into several inputs.",
                    param=name,
                    code="context_length_exceeded",
                )

    async def _compute(self, token_ids: list[list[int]], request_id: str) -> npt.NDArray[np.float32]:
        """Embeddings of the inputs, with admission control and the engine's request metrics."""
        if self._in_flight > self.spec.engine.max_queue_len:
            self.metrics.rejected.labels(reason="queue_len").inc()
            raise overloaded(1, "This replica")
        self._in_flight += 1
        self.metrics.running.set(self._in_flight)
        started = time.perf_counter()
        outcome = "error"
        try:
            vectors = await self.runner.embed(token_ids)
            outcome = "ok"
            return vectors
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except RunnerError as exc:
            raise runner_failure("Embedding", exc, request_id) from None
        finally:
            self._in_flight -= 1
            self.metrics.running.set(self._in_flight)
            self.metrics.requests.labels(outcome=outcome).inc()
            self.metrics.e2e_seconds.observe(time.perf_counter() - started)
            self.metrics.prompt_tokens.inc(sum(len(ids) for ids in token_ids))

    async def embeddings(self, req: EmbeddingRequest, request_id: str | None = None) -> dict[str, Any]:
        self._check_model(req.model)
        dims = self.runner.dimensions
        if req.dimensions is not None and req.dimensions != dims:
            raise ApiError(
                400,
                f"This model's embeddings have {dims} dimensions and it does not support shortened embeddings; "
                f"omit 'dimensions' or set it to {dims}.",
                param="dimensions",
                code="unsupported_dimensions",
            )
        texts, token_ids = req.inputs()
        if texts:
            for i, text in enumerate(texts):
                if not text:
                    name = req.input_param(i)
                    raise ApiError(400, f"'{name}' is an empty string; every input needs some text.", param=name)
            token_ids = await self.runner.tokenize(texts)
        else:
            vocab = self.runner.vocab_size
            for i, ids in enumerate(token_ids):
                bad = next((t for t in ids if not 0 <= t < vocab), None)
                if bad is not None:
                    name = req.input_param(i)
                    raise ApiError(
                        400,
                        f"'{name}' holds token id {bad}, outside this model's vocabulary (0 to {vocab - 1}).",
                        param=name,
                    )
        self._check_lengths(token_ids, req.input_param)
        vectors = await self._compute(token_ids, request_id or uuid.uuid4().hex)
        encode = encode_base64 if req.encoding_format == "base64" else lambda v: v.tolist()
        tokens = sum(len(ids) for ids in token_ids)
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "model": req.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def rerank(self, req: RerankRequest, request_id: str | None) -> dict[str, Any]:
        self._check_model(req.model)
        request_id = request_id or uuid.uuid4().hex
        token_ids = await self.runner.tokenize([req.query, *req.documents])
        self._check_lengths(token_ids, lambda i: "query" if i == 0 else f"documents[{i - 1}]")
        vectors = await self._compute(token_ids, request_id)
        scores = (vectors[1:] @ vectors[0]).tolist()  # unit vectors: the dot product is the cosine
        results = []
        for i in rank(scores, req.top_n):
            item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if req.return_documents:
                item["document"] = {"text": req.documents[i]}
            results.append(item)
        tokens = sum(len(ids) for ids in token_ids)
        return {
            "id": f"rerank-{request_id}",
            "model": req.model,
            "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
