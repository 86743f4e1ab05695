"""`runtime.kind: vllm` serving real tokens: examples/smollm2-vllm-cpu.yaml through `modelfleet up`.

One stack for the module (vLLM takes minutes to start here). The official
openai client talks to the gateway, as a user's application would; the tool
call and the json_schema answer are also asked of the vLLM child directly (its
Unix socket), which shows the runner's flags reached the real server.

The passthrough oracle (docs/openai-api.md): for this OpenAI-compatible
backend, the JSON answer through ModelFleet equals the answer of the same
server called directly (temperature 0, a seed), except ``id``, ``created`` and
``model``; the same holds through a ``remote`` deployment of a second, small
ModelFleet in front of this one (``rstack``: no model of its own, it starts in
seconds). Chat with tools and logprobs, text completions with logprobs and n,
streams assembled, vLLM's own sampling extensions, and the backend's errors.
See tests/integration/vllm_cpu.py for the environment and the opt-out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration.conftest import Stack, start_stack, stop_stack
from tests.integration.vllm_cpu import ROOT, children, direct_client, vllm_stack

MANIFEST = ROOT / "examples" / "smollm2-vllm-cpu.yaml"
MODEL = "smollm2-135m-instruct"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
PLACE = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


def valid_place(text: str) -> bool:
    """The answer validates against PLACE: an object of exactly a city and a country, both strings."""
    value = json.loads(text)
    return (
        isinstance(value, dict)
        and set(value) == {"city", "country"}
        and all(isinstance(v, str) for v in value.values())
    )


@pytest.fixture(scope="module")
def vstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from vllm_stack(MANIFEST, tmp_path_factory.mktemp("vllm-cpu"))


@pytest.fixture(scope="module")
def client(vstack: Stack) -> openai.OpenAI:
    return vstack.client(timeout=300)


@pytest.fixture(scope="module")
def child(vstack: Stack) -> Iterator[openai.OpenAI]:
    (_pid, socket_path), *_ = children(vstack)
    c = direct_client(socket_path)
    yield c
    c.close()


def test_up_shows_vllm_load_progress(vstack):
    out = vstack.output()
    assert "starting vllm (pid" in out  # the engine's progress, echoed by `modelfleet up` while vLLM loads
    assert "[vllm " in out  # the child's own output, prefixed, in the engine's log
    assert "-m vllm.entrypoints.openai.api_server" in out


def test_paris_at_temperature_0(client):
    reply = client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=20)
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.model == MODEL
    assert reply.usage is not None and reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    by_alias = client.chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=20)
    assert by_alias.choices[0].message.content == reply.choices[0].message.content


def test_streaming_with_usage(client):
    whole = client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=20)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CAPITAL,
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) > 1  # streamed in pieces, not at once
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_a_text_completion(client):
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8)
    assert reply.choices[0].text.strip()
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    assert reply.usage.completion_tokens == 8 or reply.choices[0].finish_reason == "stop"


def test_a_tool_call_through_vllms_hermes_parser(child):
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = child.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[WEATHER_TOOL],
            tool_choice=tool_choice,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=60,
        )
        calls = reply.choices[0].message.tool_calls
        assert calls and calls[0].type == "function" and calls[0].function.name == "get_weather", reply
        # vLLM 0.32's hermes grammar guarantees JSON arguments, not the tool's schema (SmolLM2 answers "Paris")
        json.loads(calls[0].function.arguments)


@pytest.mark.parametrize("door", ["child", "client"])  # vLLM's own socket, then through ModelFleet
def test_a_json_schema_answer_validates(door, request):
    reply = request.getfixturevalue(door).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a city and its country."}],
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": PLACE, "strict": True}},
        temperature=0,
        max_tokens=60,
    )
    assert valid_place(reply.choices[0].message.content or ""), reply


def test_a_tool_call_through_modelfleet(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="required",
        temperature=0,
        max_tokens=60,
    )
    assert reply.choices[0].message.tool_calls


def test_the_child_listens_on_a_private_unix_socket_only(vstack):
    (_pid, socket_path), *_ = children(vstack)
    assert Path(socket_path).is_socket() and Path(socket_path).parent.stat().st_mode & 0o077 == 0


# ---- the passthrough oracle ---------------------------------------------------------------------------------
REMOTE_MODEL = "remote-smollm2"
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
# vLLM's own sampling extensions, unknown to the OpenAI API: they must reach the server
VLLM_EXTRAS = {"top_k": 1, "repetition_penalty": 1.05, "min_tokens": 4}
REQUESTS: dict[str, dict[str, Any]] = {
    "chat-tools-logprobs": {
        "messages": WEATHER,
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        "logprobs": True,
        "top_logprobs": 3,
        "max_tokens": 60,
    },
    "chat-json-schema": {
        "messages": [{"role": "user", "content": "Name a city and its country."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": PLACE, "strict": True}},
        "extra_body": VLLM_EXTRAS,
        "max_tokens": 60,
    },
    "completion-logprobs-n": {
        "prompt": "The capital of France is",
        "logprobs": 2,
        "n": 2,
        "temperature": 0.7,  # vLLM refuses n > 1 when greedy; top_k 1 and the seed keep it deterministic
        "extra_body": VLLM_EXTRAS,
        "max_tokens": 8,
    },
}


@pytest.fixture(scope="module")
def rstack(vstack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A second ModelFleet whose one deployment is `remote`, in front of the vLLM stack's gateway (by its alias)."""
    tmp = tmp_path_factory.mktemp("remote-vllm")
    manifest = tmp / "remote.yaml"
    manifest.write_text(
        f"""
apiVersion: modelfleet.io/v1alpha1
kind: InferenceDeployment
metadata: {{name: remote-vllm}}
spec:
  model: {{name: {REMOTE_MODEL}, source: {{runtimeManaged: true}}}}
  runtime:
    kind: remote
    remote: {{baseUrl: "{vstack.base_url}/v1", model: smollm2, firstByteTimeoutSeconds: 300}}
"""
    )
    s = start_stack(manifest, tmp)
    yield s
    if s.proc.poll() is None:
        stop_stack(s)


def comparable(answer: Any) -> Any:
    """The answer without what differs between two calls of the same server: the top-level id, created and
    model, and every nested id (vLLM draws tool-call ids at random)."""

    def strip(value: Any, top: bool) -> Any:
        if isinstance(value, dict):
            drop = {"id", "created", "model"} if top else {"id"}
            return {k: strip(v, False) for k, v in value.items() if k not in drop}
        if isinstance(value, list):
            return [strip(v, False) for v in value]
        return value

    return strip(answer, True)


def ask(client: openai.OpenAI, model: str, name: str) -> dict[str, Any]:
    """The answer's JSON as the server sent it (the official client's raw response)."""
    kw = {"model": model, "temperature": 0, "seed": 7, **REQUESTS[name]}
    api = client.chat.completions if "messages" in kw else client.completions
    raw = api.with_raw_response.create(**kw)
    answer: dict[str, Any] = raw.http_response.json()
    return answer


def assembled(client: openai.OpenAI, model: str, name: str) -> dict[str, Any]:
    """A streamed chat answer put together: text, tool calls, logprobs, finish reason, and whether the client
    saw a usage event."""
    kw = {"model": model, "temperature": 0, "seed": 7, "stream": True, **REQUESTS[name]}
    text, reasons, tokens = [], [], []
    calls: dict[int, dict[str, str]] = {}
    usage_events = 0
    for chunk in client.chat.completions.create(**kw):
        usage_events += chunk.usage is not None
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
                if call.function is not None:
                    entry["name"] += call.function.name or ""
                    entry["arguments"] += call.function.arguments or ""
            if choice.logprobs is not None and choice.logprobs.content:
                tokens += [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in choice.logprobs.content]
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    return {"text": "".join(text), "calls": calls, "logprobs": tokens, "finish": reasons, "usage": usage_events}


def same(a: Any, b: Any) -> bool:
    """Equal, with logprobs equal to 1e-4: the server's own answers to one request differ from call to call in
    the last digits of a logprob when it samples n=2 (checked on its socket alone), never in a token."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=0, abs_tol=1e-4)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@pytest.mark.parametrize("name", list(REQUESTS))
def test_the_answer_through_modelfleet_is_the_servers_own(name, client, child):
    direct = ask(child, MODEL, name)
    via = ask(client, MODEL, name)
    assert same(comparable(via), comparable(direct)), (via, direct)
    assert via["model"] == MODEL
    by_alias = ask(client, "smollm2", name)
    assert same(comparable(by_alias), comparable(direct)), (by_alias, direct)
    assert by_alias["model"] == "smollm2"  # the name it sent


@pytest.mark.parametrize("name", list(REQUESTS))
def test_the_answer_through_a_remote_deployment_is_the_servers_own(name, rstack, child):
    direct = ask(child, MODEL, name)
    via = ask(rstack.client(timeout=300), REMOTE_MODEL, name)
    assert same(comparable(via), comparable(direct)), (via, direct)
    assert via["model"] == REMOTE_MODEL


def test_a_stream_with_tools_and_logprobs_assembles_to_the_servers_own(client, child, rstack):
    direct = assembled(child, MODEL, "chat-tools-logprobs")
    assert direct["calls"] and direct["logprobs"] and direct["usage"] == 0
    assert assembled(client, MODEL, "chat-tools-logprobs") == direct  # no usage event the client did not ask for
    assert assembled(rstack.client(timeout=300), REMOTE_MODEL, "chat-tools-logprobs") == direct


def test_the_servers_errors_keep_their_status_and_body(client, child, rstack):
    """A request vLLM refuses (a negative temperature): the same status and OpenAI-shaped body at each door."""
    bodies = []
    for c, model in ((child, MODEL), (client, MODEL), (rstack.client(), REMOTE_MODEL)):
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model=model, messages=CAPITAL, temperature=-1, max_tokens=4)
        assert err.value.status_code == 400
        bodies.append(err.value.response.json())
    assert bodies[1] == bodies[0] and bodies[2] == bodies[0], bodies


def test_engine_metrics_carry_vllms_model_server_families(vstack, client):
    """The engine re-exports vLLM's own model-server metrics (what the Gateway API Inference
    Extension's endpoint picker scrapes), once each: vLLM's numbers, not ModelFleet's estimate."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.integration.conftest import engine_url, get

    client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=4)
    status, text = get(engine_url(vstack, "smollm2-vllm") + "/metrics")
    assert status == 200, text
    families = [f.name for f in text_string_to_metric_families(text)]
    assert len(families) == len(set(families)), "a metric family appears twice"
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        assert name in families, name
    info = next(f for f in text_string_to_metric_families(text) if f.name == "vllm:cache_config_info")
    (sample,) = info.samples
    assert int(sample.labels["num_gpu_blocks"]) > 0 and int(sample.labels["block_size"]) > 0
    assert "modelfleet_engine_requests_total" in text  # ModelFleet's own metrics are still there
