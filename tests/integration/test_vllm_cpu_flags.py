"""The real vLLM CPU server started with EVERY flag the vLLM runner maps, then killed mid-stream and mid-load.

One stack for the module: the example manifest with every runtime and engine
field the runner turns into a flag or a CPU setting (see runners/vllm.py). The
server must start with all of them (vLLM refuses an unknown or invalid flag by
exiting), and its own log must show each value. ``--revision`` applies to
huggingFace sources only, which no test may download; it and the draft-model
form of ``--speculative-config`` are checked against vLLM's parser in
tests/unit/test_engine_flags.py.

Then the supervision of docs/runners.md with the real server: the child is
SIGKILLed while a stream is under way, and its replacement is SIGKILLed while
it loads. Every request either completes or ends with an explicit error (an
SSE error event, or a 503 with a code), and the replica serves again after a
rebuild. See tests/integration/vllm_cpu.py for the environment and the opt-out.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import Stack, engine_url, metric
from tests.integration.faultkit import assert_nothing_lost, chat, chat_body
from tests.integration.vllm_cpu import ROOT, children, direct_client, vllm_stack

TEMPLATE = Path(__file__).with_name("smollm2-tools.jinja")
MODEL = "smollm2-135m-instruct"
DEPLOYMENT = "smollm2-vllm-flags"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def all_flags_manifest(tmp: Path) -> Path:
    doc = yaml.safe_load((ROOT / "examples" / "smollm2-vllm-cpu.yaml").read_text())
    doc["metadata"]["name"] = DEPLOYMENT
    spec = doc["spec"]
    spec["model"]["aliases"] = ["smollm2", "smol"]  # --served-model-name NAME ALIAS...
    spec["model"]["dtype"] = "float32"  # --dtype
    spec["runtime"].update(
        {
            "device": "cpu",
            "cpuThreads": 1,  # VLLM_CPU_OMP_THREADS_BIND
            "cpuKvCacheSpace": 1,  # VLLM_CPU_KVCACHE_SPACE
            "gpuMemoryUtilization": 0.5,  # --gpu-memory-utilization
            "enableAutoToolChoice": True,  # --enable-auto-tool-choice
            "toolCallParser": "hermes",  # --tool-call-parser
            "chatTemplate": str(TEMPLATE),  # --chat-template
            "enforceEager": True,  # --enforce-eager
            "extraArgs": ["--seed", "7"],  # appended last
        }
    )
    spec["engine"] = {
        "maxModelLen": 1024,  # --max-model-len
        "maxNumSeqs": 4,  # --max-num-seqs
        "prefixCaching": False,  # --no-enable-prefix-caching
        "speculative": {"numDraftTokens": 2},  # --speculative-config (n-gram prompt lookup)
    }
    path = tmp / "vllm-all-flags.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def fstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("vllm-flags")
    yield from vllm_stack(all_flags_manifest(tmp), tmp)


def test_the_server_started_with_every_mapped_flag(fstack):
    out = fstack.output()
    line = next(x for x in out.splitlines() if "non-default args:" in x)
    for expected in (
        "'enable_auto_tool_choice': True",
        "'tool_call_parser': 'hermes'",
        f"'chat_template': '{TEMPLATE}'",
        "'dtype': 'float32'",
        "'max_model_len': 1024",
        "'max_num_seqs': 4",
        "'enable_prefix_caching': False",
        "'enforce_eager': True",
        "'gpu_memory_utilization': 0.5",
        "'seed': 7",
        "'served_model_name': ['smollm2-135m-instruct', 'smollm2', 'smol']",
        "'speculative_config': {'method': 'ngram', 'num_speculative_tokens': 2",
    ):
        assert expected in line, f"{expected} not in {line}"
    assert "VLLM_CPU_OMP_THREADS_BIND='" in out and "Explicitly set (1.0/" in out  # the CPU settings took


def test_every_served_name_answers(fstack):
    client = fstack.client(timeout=300)
    for name in (MODEL, "smollm2", "smol"):
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=4
        )
        assert reply.choices[0].message.content


def test_the_chat_template_is_the_one_given(fstack):
    (_pid, socket_path), *_ = children(fstack)
    child = direct_client(socket_path)
    try:
        messages: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
        plain = child.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
        with_tools = child.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=1)
    finally:
        child.close()
    # SmolLM2's own template ignores tools; the one given lists them in a system turn
    assert plain.usage is not None and with_tools.usage is not None
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 20


def kill_group(pid: int) -> None:
    os.killpg(pid, signal.SIGKILL)  # the runner starts the server in its own process group: its workers too


def test_killing_vllm_mid_stream_and_mid_load_loses_nothing(fstack):
    base = fstack.base_url
    first_pid, _ = children(fstack)[-1]
    started = threading.Event()
    results: dict[str, dict[str, Any]] = {}

    def run(name: str, body: dict[str, Any], event: threading.Event | None = None) -> None:
        results[name] = chat(base, body, event, timeout=900)

    long_stream = chat_body(MODEL, 400, stream=True, ignore_eos=True, temperature=0)
    streaming = threading.Thread(target=run, args=("streaming", long_stream, started))
    streaming.start()
    assert started.wait(300), "the stream never started"
    time.sleep(1.0)  # a few more tokens out
    kill_group(first_pid)  # mid-stream
    queued = [
        threading.Thread(target=run, args=(f"queued-{i}", chat_body(MODEL, 8, stream=stream, temperature=0)))
        for i, stream in enumerate((True, False, True))
    ]
    for t in queued:
        t.start()
    # the engine worker rebuilds: a fresh child starts; kill it while it loads (before /health answers)
    deadline = time.monotonic() + 300
    while len(children(fstack)) < 2:
        assert time.monotonic() < deadline, "no rebuild started after the child died"
        time.sleep(0.2)
    second_pid, _ = children(fstack)[1]
    time.sleep(5)
    assert "Starting vLLM server on" not in fstack.output().split(f"started vllm (pid {second_pid})")[1]
    kill_group(second_pid)  # mid-load
    for t in (streaming, *queued):
        t.join(900)
    assert len(results) == 4, results
    assert_nothing_lost(list(results.values()))
    cut = results["streaming"]
    assert cut["chunks"] > 1 and cut["outcome"] == "error" and cut["done"], cut  # an error event, then [DONE]
    for r in results.values():
        assert r["outcome"] in ("done", "refused", "error"), r
        if r["outcome"] == "refused":
            assert r["status"] == 503 and r["retry_after"], r  # retriable, and says when
    # recovery: the worker rebuilds again (with its backoff) and the replica serves
    recovered = None
    deadline = time.monotonic() + 600
    while recovered is None or recovered["outcome"] != "done":
        assert time.monotonic() < deadline, f"no recovery: {recovered}"
        recovered = chat(base, chat_body(MODEL, 8, stream=False, temperature=0), timeout=600)
        if recovered["outcome"] != "done":
            time.sleep(3)
    assert len(children(fstack)) >= 3
    url = engine_url(fstack, DEPLOYMENT)
    assert metric(url, "modelfleet_engine_context_faults_total") >= 1
    assert metric(url, "modelfleet_engine_rebuilds_total") >= 2
    # and the new child is a real vLLM again: the openai client gets Paris
    client = fstack.client(timeout=300)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=20,
    )
    assert "Paris" in (reply.choices[0].message.content or "")
