"""Embedding and rerank deployments (MiniLM) through gateway -> sidecar -> engine,
driven by the official `openai` client (httpx for rerank, which it has no method for)."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.integration.conftest import start_stack, stop_stack

pytestmark = [pytest.mark.model, pytest.mark.slow]

MANIFEST = Path(__file__).with_name("minilm.yaml")
MODEL = "minilm"
CAT = "A cat is sleeping on the sofa."
KITTEN = "A kitten naps on the couch."
STOCKS = "The stock market fell sharply on Tuesday."


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    s = start_stack(MANIFEST, tmp_path_factory.mktemp("minilm"))
    yield s
    if s.proc.poll() is None:
        stop_stack(s)


def vectors(reply) -> np.ndarray:
    return np.array([d.embedding for d in reply.data], dtype=np.float32)


def post(stack, path: str, body: dict) -> httpx.Response:
    return httpx.post(stack.base_url + path, json=body, timeout=60)


def test_related_sentences_are_closer_than_unrelated(minilm):
    reply = minilm.client().embeddings.create(model=MODEL, input=[CAT, KITTEN, STOCKS])
    v = vectors(reply)
    assert v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.5 > v[0] @ v[2]
    assert v[0] @ v[1] > v[1] @ v[2] + 0.3
    assert reply.model == MODEL and reply.object == "list"


def test_batch_returns_one_vector_per_input_in_order(minilm):
    client = minilm.client()
    texts = [STOCKS, "hi", CAT, "A much longer sentence, with several clauses, that needs many more tokens to encode."]
    batch = client.embeddings.create(model=MODEL, input=texts)
    assert [d.index for d in batch.data] == [0, 1, 2, 3]
    singles = [client.embeddings.create(model=MODEL, input=t) for t in texts]
    np.testing.assert_allclose(vectors(batch), np.concatenate([vectors(s) for s in singles]), atol=1e-5)
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)


def test_usage_counts_the_tokens_with_special_tokens(minilm):
    reply = minilm.client().embeddings.create(model=MODEL, input="hello world")
    assert reply.usage.prompt_tokens == 4  # [CLS] hello world [SEP]
    assert reply.usage.total_tokens == 4


def test_token_ids_embed_like_their_text(minilm):
    client = minilm.client()
    text = client.embeddings.create(model=MODEL, input="hello world")
    ids = client.embeddings.create(model=MODEL, input=[101, 7592, 2088, 102])  # [CLS] hello world [SEP]
    np.testing.assert_allclose(vectors(ids), vectors(text), atol=1e-6)


def test_base64_decodes_to_the_same_floats(minilm):
    body = {"model": MODEL, "input": [CAT, STOCKS]}
    floats = post(minilm, "/v1/embeddings", {**body, "encoding_format": "float"}).json()
    packed = post(minilm, "/v1/embeddings", {**body, "encoding_format": "base64"}).json()
    for f, b in zip(floats["data"], packed["data"], strict=True):
        assert isinstance(f["embedding"], list) and isinstance(b["embedding"], str)
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.tolist() == np.array(f["embedding"], dtype=np.float32).tolist()  # bit for bit
    assert floats["usage"] == packed["usage"]
    # the openai client asks for base64 by default and decodes it itself
    default = minilm.client().embeddings.create(model=MODEL, input=[CAT, STOCKS])
    np.testing.assert_array_equal(vectors(default), np.array([d["embedding"] for d in floats["data"]], np.float32))


def test_too_long_input_is_a_400_naming_it(minilm):
    with pytest.raises(openai.BadRequestError) as err:
        minilm.client().embeddings.create(model=MODEL, input=["short", "word " * 400])
    assert err.value.body["param"] == "input[1]"
    assert err.value.body["code"] == "context_length_exceeded"
    assert "256 tokens" in err.value.body["message"]


def test_unsupported_dimensions_is_a_400(minilm):
    with pytest.raises(openai.BadRequestError) as err:
        minilm.client().embeddings.create(model=MODEL, input=CAT, dimensions=128)
    assert err.value.body["param"] == "dimensions"
    assert "384" in err.value.body["message"]
    same = minilm.client().embeddings.create(model=MODEL, input=CAT, dimensions=384)
    assert len(same.data[0].embedding) == 384


def test_unknown_model_is_a_404(minilm):
    with pytest.raises(openai.NotFoundError) as err:
        minilm.client().embeddings.create(model="no-such-model", input=CAT)
    assert err.value.body["code"] == "model_not_found"


def test_dmr_path_reaches_the_embedding_deployment(minilm):
    resp = post(minilm, "/engines/torch/v1/embeddings", {"model": MODEL, "input": CAT, "encoding_format": "float"})
    assert resp.status_code == 200
    assert len(resp.json()["data"][0]["embedding"]) == 384


DOCS = [
    "Bananas are rich in potassium.",
    "Paris is the capital and largest city of France.",
    "The stock market fell sharply on Tuesday.",
    "France is a country in Western Europe.",
]
QUERY = "What is the capital of France?"


def test_rerank_puts_the_relevant_document_first(minilm):
    resp = post(minilm, "/v1/rerank", {"model": "minilm-rerank", "query": QUERY, "documents": DOCS})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    results = body["results"]
    assert results[0]["index"] == 1
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0]["document"] == {"text": DOCS[1]}
    assert body["model"] == "minilm-rerank" and body["id"].startswith("rerank-")
    assert body["usage"]["total_tokens"] > len(DOCS)


def test_rerank_honours_top_n_and_return_documents(minilm):
    body = {"model": "minilm-rerank", "query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": False}
    results = post(minilm, "/v1/rerank", body).json()["results"]
    assert [r["index"] for r in results] == [1, 3]  # Paris, then France
    assert all("document" not in r for r in results)


def test_rerank_validation_names_the_field(minilm):
    resp = post(minilm, "/v1/rerank", {"model": "minilm-rerank", "query": QUERY, "documents": []})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "documents"


def test_chat_to_an_embedding_deployment_is_a_clear_400(minilm):
    with pytest.raises(openai.BadRequestError) as err:
        minilm.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}])
    error = err.value.body
    assert error["type"] == "invalid_request_error" and error["code"] == "unsupported_endpoint"
    assert "serves embeddings" in error["message"] and "/v1/embeddings" in error["message"]
    resp = post(minilm, "/v1/embeddings", {"model": "minilm-rerank", "input": CAT})
    assert resp.status_code == 400 and "/v1/rerank" in resp.json()["error"]["message"]


def test_embeddings_from_the_chat_deployment_is_a_clear_400(stack):
    """The SmolLM2 stack the other integration tests share (package fixture)."""
    with pytest.raises(openai.BadRequestError) as err:
        stack.client().embeddings.create(model="smollm2", input=CAT)
    error = err.value.body
    assert error["code"] == "unsupported_endpoint"
    assert "serves chat and text completions" in error["message"] and "/v1/chat/completions" in error["message"]
    resp = post(stack, "/v1/rerank", {"model": "smollm2", "query": QUERY, "documents": DOCS})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "unsupported_endpoint"


@pytest.fixture(scope="module")
def remote_minilm(minilm, tmp_path_factory):
    """Remote-runner deployments whose provider is the MiniLM stack above: a real OpenAI-compatible
    embeddings API on loopback (hosted providers cannot be reached from these machines)."""
    tmp = tmp_path_factory.mktemp("remote-minilm")
    manifest = tmp / "remote.yaml"
    manifest.write_text(
        f"""
apiVersion: modelfleet.io/v1alpha1
kind: InferenceDeployment
metadata: {{name: hosted-embed}}
spec:
  model: {{name: hosted-embed, mode: embedding, source: {{runtimeManaged: true}}}}
  runtime:
    kind: remote
    remote: {{baseUrl: "{minilm.base_url}/v1", model: minilm, pricing: {{inputUsdPerMillion: 100}}}}
---
apiVersion: modelfleet.io/v1alpha1
kind: InferenceDeployment
metadata: {{name: hosted-rerank}}
spec:
  model: {{name: hosted-rerank, mode: rerank, source: {{runtimeManaged: true}}}}
  runtime:
    kind: remote
    remote: {{baseUrl: "{minilm.base_url}/v1", model: minilm-rerank}}
"""
    )
    s = start_stack(manifest, tmp)
    yield s
    if s.proc.poll() is None:
        stop_stack(s)


def test_embeddings_and_rerank_through_a_remote_runner(remote_minilm, minilm):
    direct = vectors(minilm.client().embeddings.create(model=MODEL, input=[CAT, KITTEN, STOCKS]))
    reply = remote_minilm.client().embeddings.create(model="hosted-embed", input=[CAT, KITTEN, STOCKS])
    v = vectors(reply)
    assert reply.model == "hosted-embed"
    np.testing.assert_allclose(v, direct, atol=1e-6)  # the provider's vectors, untouched
    assert v[0] @ v[1] > 0.5 > v[0] @ v[2]
    assert reply.usage.prompt_tokens > 0
    ranked = post(remote_minilm, "/v1/rerank", {"model": "hosted-rerank", "query": QUERY, "documents": DOCS})
    assert ranked.status_code == 200, ranked.text
    expected = post(minilm, "/v1/rerank", {"model": "minilm-rerank", "query": QUERY, "documents": DOCS}).json()
    assert [r["index"] for r in ranked.json()["results"]] == [r["index"] for r in expected["results"]]
    wrong = post(
        remote_minilm,
        "/v1/chat/completions",
        {"model": "hosted-embed", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "unsupported_endpoint"
