"""The engine's recent prefix keys: bounded by count and age, and reported in /load."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from aiohttp.test_utils import TestClient, TestServer

from modelfleet.dataplane.common.headers import PREFIX_KEY_HEADER
from modelfleet.dataplane.engine.api import EngineState, build_app
from modelfleet.dataplane.engine.metrics import EngineMetrics
from modelfleet.dataplane.engine.prefix_keys import RecentPrefixKeys
from modelfleet.dataplane.runners.base import (
    CHAT,
    COMPLETIONS,
    ExecuteBatch,
    FinishReason,
    RunnerCapabilities,
    RunnerFamily,
    TokenChunk,
)
from modelfleet.dataplane.spec import InferenceDeploymentSpec


def hexkey(i: int) -> str:
    return f"{i:032x}"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_counts_requests_per_key_and_ignores_malformed_keys() -> None:
    keys = RecentPrefixKeys()
    for key in (hexkey(1), hexkey(2), hexkey(1), None, "xyz", "g" * 32, hexkey(0xABC).upper(), hexkey(1) + "0"):
        keys.note(key)
    assert keys.report() == {hexkey(1): 2, hexkey(2): 1}


def test_the_set_is_capped_by_count_least_recently_served_first() -> None:
    keys = RecentPrefixKeys(max_keys=3)
    for i in range(5):
        keys.note(hexkey(i))
    keys.note(hexkey(2))  # served again: now the most recent
    keys.note(hexkey(5))
    assert list(keys.report()) == [hexkey(4), hexkey(2), hexkey(5)]
    assert len(keys) == 3


def test_keys_not_served_within_the_age_bound_drop_out_and_restart_their_count() -> None:
    clock = Clock()
    keys = RecentPrefixKeys(max_age_s=120.0, clock=clock)
    keys.note(hexkey(1))
    keys.note(hexkey(1))
    clock.now += 60
    keys.note(hexkey(2))
    clock.now += 61  # key 1: 121 s old, key 2: 61 s
    assert keys.report() == {hexkey(2): 1}
    keys.note(hexkey(1))
    assert keys.report() == {hexkey(2): 1, hexkey(1): 1}  # a fresh entry, not 3
    clock.now += 1000
    assert keys.report() == {} and len(keys) == 0


class Codec:
    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return [1, 2, 3]

    def encode_text(self, text: str) -> list[int]:
        return [1, 2, 3]

    def decode(self, ids: Sequence[int]) -> str:
        return "x"


class OneTokenRunner:
    """Loaded at once; every sequence ends after one token."""

    capabilities = RunnerCapabilities(RunnerFamily.TOKEN_GENERATOR, frozenset({CHAT, COMPLETIONS}))

    def __init__(self) -> None:
        self.codec = Codec()
        self.progress = "loaded"

    async def load_weights(self, ctx: object, source: object) -> None:
        pass

    async def execute(self, batch: ExecuteBatch) -> AsyncIterator[TokenChunk]:
        for seq in batch.sequences:
            yield TokenChunk(seq.request_id, (7,), "x", len(seq.prompt_token_ids), 1, FinishReason.STOP)

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


async def test_load_reports_the_prefix_keys_of_served_requests() -> None:
    state = EngineState(spec(), OneTokenRunner(), EngineMetrics())  # type: ignore[arg-type]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    async with TestClient(TestServer(build_app(state))) as client:
        for _ in range(100):
            if state.service is not None:
                break
            await asyncio.sleep(0.01)
        assert (await (await client.get("/load")).json())["prefix_keys"] == {}
        for key in (hexkey(1), hexkey(1), hexkey(2)):
            resp = await client.post("/v1/chat/completions", json=body, headers={PREFIX_KEY_HEADER: key})
            assert resp.status == 200, await resp.text()
        resp = await client.post("/v1/chat/completions", json=body)  # no key: nothing noted
        assert resp.status == 200
        load = await (await client.get("/load")).json()
        assert load["prefix_keys"] == {hexkey(1): 2, hexkey(2): 1}
        assert load["max_num_seqs"] == 3  # the rest of the load view is unchanged
