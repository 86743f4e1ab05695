"""Supervision of the runner through the real stack, the real model and the official
openai client: a context fault mid-decode is survived, repeated ones end in a
retriable 503 and the replica recovers.

The one fake is the fault itself: a CPU cannot poison a CUDA context, so the
engine runs with ``MODELFLEET_FAULT_INJECTION=1`` and ``POST /admin/fault``
makes the runner's next step raise the error a poisoned context raises
(dataplane/engine/faults.py). Everything after that (failing the batch,
rebuilding the session from the weights, resuming the sequences) is the
production path.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import Stack, engine_url, get, metric, start_stack, stop_stack

pytestmark = [pytest.mark.model, pytest.mark.slow]

MODEL = "smollm2-faulty"
MAX_TOKENS = 32
TOPICS = ["the sea", "a cat", "Paris", "winter", "a robot", "bread", "the moon", "a train"]


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(
        Path(__file__).with_name("faults.yaml"),
        tmp_path_factory.mktemp("faulty"),
        env={"MODELFLEET_FAULT_INJECTION": "1"},
    )
    yield s
    if s.proc.poll() is None:
        stop_stack(s)


def arm(engine: str, count: int) -> None:
    resp = httpx.post(engine + "/admin/fault", json={"count": count}, timeout=5)
    assert resp.status_code == 200, resp.text


def wait_ready(engine: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while get(engine + "/readyz")[0] != 200:
        assert time.monotonic() < deadline, f"engine not ready again after {timeout} s"
        time.sleep(0.2)


def messages(topic: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a long story about {topic}."}]


def run_one(client: openai.OpenAI, i: int, started: threading.Event | None) -> dict[str, Any]:
    """Request i (even: streaming, odd: not); sets ``started`` once a streaming one has text."""
    kw: dict[str, Any] = dict(
        model=MODEL, messages=messages(TOPICS[i]), temperature=0, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True}
    )
    if i % 2:
        reply = client.chat.completions.create(**kw)
        assert reply.usage is not None
        return {
            "text": reply.choices[0].message.content,
            "finish": reply.choices[0].finish_reason,
            "tokens": reply.usage.completion_tokens,
        }
    parts: list[str] = []
    finish = tokens = None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
            if len("".join(parts)) > 10 and started is not None:
                started.set()
    return {"text": "".join(parts), "finish": finish, "tokens": tokens}


def run_all(client: openai.OpenAI, events: list[threading.Event] | None = None) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(len(TOPICS)) as pool:
        futures = [
            pool.submit(run_one, client, i, events[i // 2] if events and i % 2 == 0 else None)
            for i in range(len(TOPICS))
        ]
        return [f.result(timeout=180) for f in futures]


def test_admin_fault_is_absent_without_the_switch(stack):
    resp = httpx.post(engine_url(stack, "smollm2") + "/admin/fault", json={"count": 1}, timeout=5)
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "not_found_error"


def test_fault_under_load_resumes_every_request_with_identical_output(faulty):
    engine = engine_url(faulty, "faulty")
    client = faulty.client(timeout=180)
    reference = run_all(client)
    assert all(r["finish"] == "length" and r["tokens"] == MAX_TOKENS for r in reference)
    faults = metric(engine, "modelfleet_engine_context_faults_total")
    rebuilds = metric(engine, 'modelfleet_engine_rebuilds_total{cause="device_context_poisoned",outcome="ok"}')
    resumed = metric(engine, "modelfleet_engine_resumed_sequences_total")

    streaming = [threading.Event() for _ in range(len(TOPICS) // 2)]

    def fault_when_streaming() -> None:
        assert all(e.wait(120) for e in streaming)
        arm(engine, 1)  # every stream has text out: the fault lands mid-decode

    trigger = threading.Thread(target=fault_when_streaming)
    trigger.start()
    results = run_all(client, streaming)
    trigger.join(10)

    assert results == reference  # text, finish reason and token count, streamed or not
    assert metric(engine, "modelfleet_engine_context_faults_total") == faults + 1
    assert (
        metric(engine, 'modelfleet_engine_rebuilds_total{cause="device_context_poisoned",outcome="ok"}') == rebuilds + 1
    )
    assert metric(engine, "modelfleet_engine_resumed_sequences_total") - resumed >= len(streaming)
    wait_ready(engine, 30)
    assert json.loads(get(engine + "/readyz")[1])["status"] == "ready"
    assert metric(engine, "modelfleet_engine_rebuilding") == 0


def stream_events(url: str, body: dict[str, Any], started: threading.Event) -> list[dict[str, Any]]:
    """The JSON events of one SSE response; sets ``started`` at the first text."""
    events: list[dict[str, Any]] = []
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if any(c.get("delta", {}).get("content") for c in events[-1].get("choices", [])):
                    started.set()
            elif line == "data: [DONE]":
                events.append({"done": True})
    return events


def test_repeated_faults_give_a_retriable_error_then_the_replica_recovers(faulty):
    engine = engine_url(faulty, "faulty")
    retriable = metric(engine, "modelfleet_engine_retriable_failures_total")
    body = {"model": MODEL, "messages": messages("a fox"), "temperature": 0, "max_tokens": 8}
    long_body = {**body, "max_tokens": 400, "ignore_eos": True}
    begun = threading.Event()
    started = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(stream_events, faulty.base_url, long_body, begun)
        assert begun.wait(60)
        arm(engine, 1000)  # every step fails: each rebuild is followed by another fault
        plain = pool.submit(httpx.post, faulty.base_url + "/v1/chat/completions", json=body, timeout=120)
        streamed = pool.submit(
            httpx.post, faulty.base_url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120
        )
        responses = [plain.result(), streamed.result()]
        events = running.result()
    assert time.monotonic() - started < 90  # an explicit error, not a hang
    for resp in responses:
        assert resp.status_code == 503  # nothing was streamed yet: an HTTP status, even for stream=True
        assert int(resp.headers["retry-after"]) >= 1
        err = resp.json()["error"]
        assert err["type"] == "service_unavailable" and err["code"] == "engine_rebuilding"
        assert "rebuilt" in err["message"]
    # the stream that had begun ends with an error event, never a silent truncation
    assert events[-1] == {"done": True}
    assert events[-2]["error"]["code"] == "engine_rebuilding"
    assert not any(c.get("finish_reason") for e in events[:-2] for c in e.get("choices", []))
    assert metric(engine, "modelfleet_engine_retriable_failures_total") >= retriable + 3

    status, text = get(engine + "/readyz")  # the last fault's rebuild waits out its backoff
    assert status == 503
    ready = json.loads(text)
    assert ready["status"] == "rebuilding" and "device_context_poisoned" in ready["cause"]
    assert ready["backoff_s"] >= 1
    with pytest.raises(openai.InternalServerError) as err:  # while not ready: the typed error of the client
        faulty.client().chat.completions.create(**body)
    assert err.value.status_code == 503

    arm(engine, 0)  # disarm: the next rebuild sticks
    wait_ready(engine)
    deadline = time.monotonic() + 30
    while True:  # the sidecar re-admits the replica on its next health check
        try:
            reply = faulty.client().chat.completions.create(**body)
            break
        except openai.InternalServerError:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert reply.choices[0].finish_reason == "length"
    assert metric(engine, "modelfleet_engine_rebuilds_total") >= 3
