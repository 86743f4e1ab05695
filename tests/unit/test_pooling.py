"""Embedding and rerank logic without a server or a real model: pooling math, the base64
encoding, request validation, mode checks and the service's 400s (a fake embedder)."""

from __future__ import annotations

import asyncio
import base64
import struct

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from modelfleet.dataplane.engine.metrics import EngineMetrics
from modelfleet.dataplane.engine.pooling import PoolingService, decode_base64, encode_base64, rank, require_mode
from modelfleet.dataplane.gateway.openapi import openapi_document
from modelfleet.dataplane.protocol import ApiError, EmbeddingRequest, RerankRequest, validation_error
from modelfleet.dataplane.runners.base import RunnerError
from modelfleet.dataplane.runners.embedding import l2_normalize, mean_pool
from modelfleet.dataplane.spec import InferenceDeploymentSpec


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert mean_pool(hidden, mask).tolist() == [[2.0, 3.0]]


def test_l2_normalize_gives_unit_rows():
    out = l2_normalize(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    np.testing.assert_allclose(out.numpy(), [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)


def test_base64_is_little_endian_float32_and_round_trips():
    v = np.array([1.0, -0.5, 0.1], dtype=np.float32)
    encoded = encode_base64(v)
    assert base64.b64decode(encoded) == struct.pack("<3f", 1.0, -0.5, 0.1)
    assert decode_base64(encoded) == v.tolist()


def test_rank_sorts_descending_keeps_ties_in_order_and_cuts_at_top_n():
    assert rank([0.1, 0.9, 0.5, 0.9], None) == [1, 3, 2, 0]
    assert rank([0.1, 0.9, 0.5], 2) == [1, 2]
    assert rank([0.1, 0.9], 0) == [1, 0]  # 0 means all, as vLLM


def _validate(model, body) -> ApiError:
    with pytest.raises(ValidationError) as exc:
        model.model_validate(body)
    return validation_error(exc.value.errors(include_url=False))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": ["x"] * 2049}, "input"),
        ({"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "m", "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": "m", "input": "x", "bogus": 1}, "bogus"),
        ({"model": "m"}, "input"),
    ],
)
def test_embedding_request_errors_name_the_field(body, param):
    err = _validate(EmbeddingRequest, body)
    assert err.status == 400 and err.param == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "query": "q", "documents": []}, "documents"),
        ({"model": "m", "query": "", "documents": ["d"]}, "query"),
        ({"model": "m", "query": "q", "documents": ["d"], "top_n": -1}, "top_n"),
        ({"model": "m", "query": "q", "documents": ["d"], "rank_fields": ["x"]}, "rank_fields"),
    ],
)
def test_rerank_request_errors_name_the_field(body, param):
    assert _validate(RerankRequest, body).param == param


def test_embedding_inputs_and_their_params():
    assert EmbeddingRequest(model="m", input="a").inputs() == (["a"], [])
    assert EmbeddingRequest(model="m", input=[1, 2]).inputs() == ([], [[1, 2]])
    many = EmbeddingRequest(model="m", input=[[1], [2, 3]])
    assert many.inputs() == ([], [[1], [2, 3]])
    assert many.input_param(1) == "input[1]"
    assert EmbeddingRequest(model="m", input="a").input_param(0) == "input"


def _spec(mode: str, max_queue_len: int = 256) -> InferenceDeploymentSpec:
    return InferenceDeploymentSpec.model_validate(
        {
            "model": {"name": "emb", "mode": mode, "source": {"path": "/nowhere"}},
            "engine": {"maxModelLen": 16, "maxQueueLen": max_queue_len},
        }
    )


def test_require_mode_says_which_endpoint_serves_the_deployment():
    require_mode(_spec("embedding"), "/v1/embeddings")
    with pytest.raises(ApiError) as err:
        require_mode(_spec("embedding"), "/v1/chat/completions")
    assert err.value.status == 400 and err.value.code == "unsupported_endpoint"
    assert "serves embeddings" in err.value.message and "POST /v1/embeddings" in err.value.message
    with pytest.raises(ApiError) as err:
        require_mode(_spec("completion"), "/v1/rerank")
    assert "/v1/chat/completions" in err.value.message


class FakeEmbedder:
    """One token per word plus two specials; the vector is one-hot by word count."""

    dimensions = 4
    max_input_tokens = 256
    vocab_size = 100

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None

    async def tokenize(self, texts):
        return [[1, *[5] * len(t.split()), 2] for t in texts]

    async def embed(self, token_ids):
        if self.gate is not None:
            await self.gate.wait()
        out = np.zeros((len(token_ids), 4), dtype=np.float32)
        for i, ids in enumerate(token_ids):
            out[i, min(len(ids), 5) - 2] = 1.0
        return out


def _service(mode="embedding", **kw) -> tuple[PoolingService, FakeEmbedder]:
    fake = FakeEmbedder()
    return PoolingService(_spec(mode, **kw), fake, EngineMetrics()), fake


async def test_embeddings_answer_in_openai_shape():
    service, _ = _service()
    reply = await service.embeddings(EmbeddingRequest(model="emb", input=["a b", "c"], encoding_format="float"))
    assert [d["index"] for d in reply["data"]] == [0, 1]
    assert reply["data"][0]["embedding"] == [0.0, 0.0, 1.0, 0.0]
    assert reply["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    packed = await service.embeddings(EmbeddingRequest(model="emb", input="c", encoding_format="base64"))
    assert decode_base64(packed["data"][0]["embedding"]) == [0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"input": ["ok", "w " * 20]}, "input[1]", "context_length_exceeded"),  # maxModelLen 16 caps the 256
        ({"input": "w " * 20}, "input", "context_length_exceeded"),
        ({"input": ["ok", ""]}, "input[1]", None),
        ({"input": [[1, 2], [1, 100]]}, "input[1]", None),  # outside the vocabulary
        ({"input": [[1, 2], []]}, "input[1]", None),
        ({"input": "x", "dimensions": 3}, "dimensions", "unsupported_dimensions"),
        ({"input": "x", "model": "other"}, "model", "model_not_found"),
    ],
)
async def test_embedding_errors_name_the_input(body, param, code):
    service, _ = _service()
    with pytest.raises(ApiError) as err:
        await service.embeddings(EmbeddingRequest.model_validate({"model": "emb", **body}))
    assert err.value.param == param
    assert err.value.code == code
    assert err.value.status == (404 if code == "model_not_found" else 400)


async def test_rerank_orders_by_cosine_and_names_long_documents():
    service, _ = _service("rerank")
    reply = await service.rerank(
        RerankRequest(model="emb", query="one two", documents=["a", "b c", "d e f"], top_n=2), "rid"
    )
    assert reply["id"] == "rerank-rid"
    assert [(r["index"], r["relevance_score"]) for r in reply["results"]] == [(1, 1.0), (0, 0.0)]
    assert reply["results"][0]["document"] == {"text": "b c"}
    with pytest.raises(ApiError) as err:
        await service.rerank(RerankRequest(model="emb", query="q", documents=["ok", "w " * 20]), None)
    assert err.value.param == "documents[1]"


async def test_a_full_replica_answers_429():
    service, fake = _service(max_queue_len=0)
    fake.gate = asyncio.Event()
    first = asyncio.create_task(service.embeddings(EmbeddingRequest(model="emb", input="a")))
    await asyncio.sleep(0)
    with pytest.raises(ApiError) as err:
        await service.embeddings(EmbeddingRequest(model="emb", input="b"))
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "1"
    fake.gate.set()
    assert (await first)["usage"]["prompt_tokens"] == 3


class BrokenEmbedder(FakeEmbedder):
    """Fails the way a runner's worker does, with internals (a pid) in its message."""

    async def embed(self, token_ids):
        raise RunnerError("the embedding worker (pid 4242) died with signal 9")


async def test_a_runner_failure_reaches_the_client_without_internals(caplog):
    service = PoolingService(_spec("embedding"), BrokenEmbedder(), EngineMetrics())
    with pytest.raises(ApiError) as err:
        await service.embeddings(EmbeddingRequest(model="emb", input="a"), "rid-embed-1")
    assert err.value.status == 500 and err.value.code == "runner_error" and err.value.type == "server_error"
    assert "rid-embed-1" in err.value.message
    assert "4242" not in err.value.message and "pid" not in err.value.message
    assert any("rid-embed-1" in r.getMessage() and "pid 4242" in r.getMessage() for r in caplog.records)


def test_openapi_document_has_the_embedding_and_rerank_endpoints():
    doc = openapi_document()
    for path, schema in (("/v1/embeddings", "EmbeddingRequest"), ("/v1/rerank", "RerankRequest")):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].endswith("/" + schema)
    assert set(doc["components"]["schemas"]["RerankRequest"]["properties"]) >= {"query", "documents", "top_n"}
