"""The OpenAI-compatible API through gateway -> sidecar -> engine with the real model,
driven by the official `openai` client."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import httpx
import openai
import pytest

from tests.metrics_text import series_value

pytestmark = [pytest.mark.model, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MODEL = "smollm2-135m-instruct"


def test_chat_answers_paris(stack):
    reply = stack.client().chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=30)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert reply.usage.prompt_tokens > 10
    assert reply.usage.completion_tokens >= len(choice.message.content.split())
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model == MODEL


def test_chat_streams_paris_with_usage(stack):
    client = stack.client()
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=30)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert text == full.choices[0].message.content  # same backend, greedy: same answer streamed or not
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage.prompt_tokens == full.usage.prompt_tokens
    assert usage.completion_tokens == full.usage.completion_tokens


def test_stream_without_include_usage_has_no_usage_chunk_and_ends_done(stack):
    with httpx.stream(
        "POST",
        stack.base_url + "/v1/chat/completions",
        json={"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 4, "stream": True},
        timeout=60,
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert all(p["choices"] for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


def test_text_completion(stack):
    reply = stack.client().completions.create(
        model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=8
    )
    assert reply.object == "text_completion"
    assert "Paris" in reply.choices[0].text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8


def test_model_list(stack):
    ids = {m.id for m in stack.client().models.list()}
    assert ids == {"smollm2-135m-instruct", "smollm2", "smollm2-tight"}


def test_max_tokens_and_length_finish(stack):
    reply = stack.client().chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=3)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


def test_stop_string_cuts_the_text(stack):
    client = stack.client()
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=30)
    text = full.choices[0].message.content
    assert " is " in text
    cut = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=30, stop=[" is "])
    assert cut.choices[0].message.content == text[: text.index(" is ")]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(stack):
    client = stack.client()
    kw = dict(
        model=MODEL, messages=[{"role": "user", "content": "Write a word."}], temperature=1.0, top_p=0.9, max_tokens=12
    )
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    outs = {client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in range(5)}
    assert a == b
    assert len(outs) > 1  # different seeds explore different continuations


def test_full_replica_answers_429_with_retry_after(stack):
    """maxNumSeqs 1 and maxQueueLen 0: a second concurrent request is refused, not queued forever."""
    body = {"model": "smollm2-tight", "messages": QUESTION, "temperature": 0, "max_tokens": 60, "stream": True}
    started = threading.Event()

    def long_request():
        with httpx.stream("POST", stack.base_url + "/v1/chat/completions", json=body, timeout=120) as resp:
            for _ in resp.iter_lines():
                started.set()

    t = threading.Thread(target=long_request)
    t.start()
    assert started.wait(60)
    resp = httpx.post(stack.base_url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
    t.join(120)
    assert resp.status_code == 429
    assert resp.headers["retry-after"] == "1"
    err = resp.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "overloaded"


def _engine_url(stack, deployment: str) -> str:
    for line in stack.output().splitlines():
        if f"engine {deployment}/0 listening on" in line:
            return "http://" + line.rsplit(" ", 1)[1]
    raise AssertionError("engine address not in the launcher log")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:  # closed at once: no socket left to the GC
        return str(resp.read().decode())


def _metric(url: str, series: str) -> float:
    return series_value(_get(url + "/metrics"), series)


def test_client_disconnect_cancels_generation_in_engine(stack):
    engine = _engine_url(stack, "smollm2")
    before = _metric(engine, 'modelfleet_engine_requests_total{outcome="cancelled"}')
    generated_before = _metric(engine, "modelfleet_engine_generation_tokens_total")
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 1500,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", stack.base_url + "/v1/chat/completions", json=body, timeout=60) as resp:
        for n, _ in enumerate(resp.iter_lines()):
            if n >= 6:
                break  # leave after a few tokens
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        load = json.loads(_get(engine + "/load"))
        if _metric(engine, 'modelfleet_engine_requests_total{outcome="cancelled"}') > before and load["running"] == 0:
            break
        time.sleep(0.2)
    assert _metric(engine, 'modelfleet_engine_requests_total{outcome="cancelled"}') == before + 1
    assert load["running"] == 0
    # far fewer than the 1500 tokens asked for were generated
    assert _metric(engine, "modelfleet_engine_generation_tokens_total") - generated_before < 300


def test_gateway_metrics_count_requests_and_tokens(stack):
    before = _metric(stack.base_url, "modelfleet_gateway_completion_tokens_total")
    stack.client().chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=5)
    list(
        stack.client().chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=5, stream=True)
    )
    text = _get(stack.base_url + "/metrics")
    assert (
        'modelfleet_gateway_requests_total{deployment="smollm2",endpoint="/v1/chat/completions",status="200"}' in text
    )
    assert "modelfleet_gateway_time_to_first_token_seconds_bucket" in text
    assert _metric(stack.base_url, "modelfleet_gateway_completion_tokens_total") == before + 10


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_endpoints(stack, path):
    assert httpx.get(stack.base_url + path, timeout=5).status_code == 200


def test_openai_client_raises_typed_errors(stack):
    client = stack.client()
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=7)
    assert bad.value.body["param"] == "temperature"
