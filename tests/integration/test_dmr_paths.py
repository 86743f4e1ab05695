"""Clients written for Docker Model Runner work unchanged: the official openai
client with a DMR base URL (/engines/v1, /engines/llama.cpp/v1) reaches the
same deployments as /v1."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def dmr_client(stack, prefix: str) -> openai.OpenAI:
    client = openai.OpenAI(base_url=stack.base_url + prefix + "/v1", api_key="unused", max_retries=0, timeout=60)
    stack.clients.append(client)  # closed with the stack
    return client


@pytest.mark.parametrize("prefix", ["/engines", "/engines/llama.cpp", "/engines/torch"])
def test_dmr_base_urls_serve_the_same_deployments(stack, prefix):
    client = dmr_client(stack, prefix)
    assert {m.id for m in client.models.list()} == {m.id for m in stack.client().models.list()}
    reply = client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0, max_tokens=8)
    plain = stack.client().chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0, max_tokens=8)
    assert reply.choices[0].message.content == plain.choices[0].message.content
    chunks = list(
        client.completions.create(model="smollm2-135m-instruct", prompt="Paris is", max_tokens=4, stream=True)
    )
    assert chunks[-1].choices[0].finish_reason in {"length", "stop"}


def test_dmr_unknown_model_and_engine_are_404(stack):
    with pytest.raises(openai.NotFoundError) as err:
        dmr_client(stack, "/engines/llama.cpp").chat.completions.create(model="ai/nope", messages=MESSAGES)
    assert err.value.body["code"] == "model_not_found"
    resp = httpx.post(
        stack.base_url + "/engines/ollama/v1/chat/completions", json={"model": "smollm2", "messages": MESSAGES}
    )
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "engine_not_found" and "'ollama'" in resp.json()["error"]["message"]
