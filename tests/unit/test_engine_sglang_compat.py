"""The engine's compatibility surface for routers that probe SGLang workers (sglang-router).

The engine app is built around a stand-in runner whose weights "load" when the
test says so; no model is involved.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from aiohttp.test_utils import TestClient, TestServer

from modelfleet.dataplane.engine.api import EngineState, build_app
from modelfleet.dataplane.engine.metrics import EngineMetrics
from modelfleet.dataplane.runners.base import CHAT, COMPLETIONS, RunnerCapabilities, RunnerFamily
from modelfleet.dataplane.spec import InferenceDeploymentSpec


class Codec:
    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return [1, 2, 3]

    def encode_text(self, text: str) -> list[int]:
        return [1, 2, 3]


class StandInRunner:
    """Loads when ``loaded`` is set; never asked to execute here."""

    capabilities = RunnerCapabilities(RunnerFamily.TOKEN_GENERATOR, frozenset({CHAT, COMPLETIONS}))

    def __init__(self) -> None:
        self.loaded = asyncio.Event()
        self.codec = Codec()
        self.progress = "loading"

    async def load_weights(self, ctx: object, source: object) -> None:
        await self.loaded.wait()
        self.progress = "loaded"

    def execute(self, batch: object) -> AsyncIterator[object]:
        raise AssertionError("not used")

    def runtime_stats(self) -> dict[str, float]:
        return {}

    async def close(self) -> None:
        pass


def spec() -> InferenceDeploymentSpec:
    return InferenceDeploymentSpec.model_validate(
        {
            "model": {"name": "tiny", "source": {"path": "/nonexistent"}},
            "runtime": {"kind": "torch"},
            "engine": {"maxModelLen": 1024, "maxNumSeqs": 3},
        }
    )


async def test_health_and_info_endpoints_answer_like_an_sglang_worker() -> None:
    runner = StandInRunner()
    state = EngineState(spec(), runner, EngineMetrics())  # type: ignore[arg-type]
    async with TestClient(TestServer(build_app(state))) as client:
        resp = await client.get("/health")
        assert resp.status == 503  # not ready: a router must not register it yet
        runner.loaded.set()
        for _ in range(100):
            if state.service is not None:
                break
            await asyncio.sleep(0.01)
        resp = await client.get("/health")
        assert resp.status == 200
        for path in ("/server_info", "/get_server_info", "/model_info", "/get_model_info"):
            resp = await client.get(path)
            assert resp.status == 200, path
            info = await resp.json()
            assert info["served_model_name"] == "tiny"
            assert info["max_model_len"] == 1024
            assert "model_path" not in info and "tokenizer_path" not in info  # no tokenizer download


async def test_sglang_extension_fields_at_their_defaults_are_ignored_others_refused() -> None:
    runner = StandInRunner()
    runner.loaded.set()
    state = EngineState(spec(), runner, EngineMetrics())  # type: ignore[arg-type]
    sglang_defaults = {
        "no_stop_trim": False,
        "continue_final_message": False,
        "skip_special_tokens": True,
        "separate_reasoning": True,
        "stream_reasoning": True,
        "return_hidden_states": False,
    }
    body = {"model": "other", "messages": [{"role": "user", "content": "hi"}], **sglang_defaults}
    async with TestClient(TestServer(build_app(state))) as client:
        for _ in range(100):
            if state.service is not None:
                break
            await asyncio.sleep(0.01)
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 404  # got past validation to the model lookup
        resp = await client.post("/v1/chat/completions", json=body | {"no_stop_trim": True})
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "no_stop_trim"
