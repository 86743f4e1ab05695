"""vLLM's sampling extensions in the torch runner's step loop, in-process with the real SmolLM2 (float32):
the token ids the runner streams show what a client's text can only suggest (which token stopped a
sequence, which one a bias forced), and plain greedy decoding gives the tokens it gave before them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace

import pytest

from modelfleet.dataplane.runners.base import ExecuteBatch, FinishReason, SamplingParams, SequenceRequest
from modelfleet.dataplane.runners.torch import TorchRunner
from modelfleet.dataplane.spec import EngineSpec, SpeculativeSpec
from tests.integration.test_torch_runner import loaded

pytestmark = [pytest.mark.model, pytest.mark.slow]

CAPITAL = "What is the capital of France?"
HAIKU = "Write a haiku about the sea."
PRIMES = "List three prime numbers."
REPEAT = "Repeat this line exactly three times: the red fox runs over the green hill."
PARIS, PERIOD, EOS = 7042, 30, 2  # " Paris", ".", <|im_end|>

# Greedy tokens (float32, 32 at most) recorded before the sampling extensions existed: they must not change.
GOLDEN = {
    CAPITAL: [504, 3575, 282, 4649, 314, 7042, 30, 2],
    HAIKU: [
        *(504, 6147, 282, 260, 3426, 28, 253, 13879, 6122, 28, 198, 49, 9154, 303, 5082, 282, 260, 10393, 28, 198),
        *(49, 13151, 282, 260, 6122, 338, 5721, 8823, 28, 198, 49, 13151),
    ],
    PRIMES: [
        *(33, 30, 216, 33, 198, 34, 30, 216, 34, 198, 198, 3902, 359, 260, 805, 9552, 2966, 338, 359, 441),
        *(46522, 411, 750, 550, 9552, 1230, 2560, 327, 216, 33, 284, 216),
    ],
}


@pytest.fixture(scope="module")
def runner() -> Iterator[TorchRunner]:
    yield from loaded(EngineSpec(max_num_seqs=8))


@pytest.fixture(scope="module")
def speculative() -> Iterator[TorchRunner]:
    yield from loaded(EngineSpec(max_num_seqs=8, speculative=SpeculativeSpec(num_draft_tokens=4, max_batch=4)))


GREEDY = SamplingParams(max_tokens=32, temperature=0)


async def generate(
    runner: TorchRunner, question: str, params: SamplingParams = GREEDY, rid: str = "r"
) -> tuple[list[int], str, FinishReason | None]:
    assert runner.codec is not None
    prompt = runner.codec.encode_chat([{"role": "user", "content": question}])
    tokens: list[int] = []
    text = ""
    reason = None
    async for chunk in runner.execute(ExecuteBatch((SequenceRequest(rid, tuple(prompt), params),))):
        tokens.extend(chunk.token_ids)
        text += chunk.text
        reason = chunk.finish_reason
    return tokens, text, reason


async def test_greedy_output_is_the_tokens_it_was_before_the_extensions(runner):
    for question, expected in GOLDEN.items():
        assert (await generate(runner, question))[0] == expected, question


async def test_neutral_values_of_every_extension_change_nothing(runner):
    neutral = replace(GREEDY, top_k=0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
    for question, expected in GOLDEN.items():
        assert (await generate(runner, question, neutral))[0] == expected, question


async def test_stop_token_ids_end_the_sequence_without_their_text(runner):
    tokens, text, reason = await generate(runner, CAPITAL, replace(GREEDY, stop_token_ids=frozenset({PERIOD})))
    assert tokens == [504, 3575, 282, 4649, 314, 7042, PERIOD]  # the stop token is counted...
    assert text == "The capital of France is Paris"  # ...but its text is not returned
    assert reason is FinishReason.STOP
    # they stop it even when end-of-sequence is ignored
    tokens, _, reason = await generate(
        runner, CAPITAL, replace(GREEDY, ignore_eos=True, stop_token_ids=frozenset({PERIOD}))
    )
    assert tokens[-1] == PERIOD and reason is FinishReason.STOP


async def test_min_tokens_holds_off_end_of_sequence_and_stop_token_ids(runner):
    tokens, _, _ = await generate(runner, CAPITAL, replace(GREEDY, max_tokens=20, min_tokens=14))
    assert len(tokens) >= 14 > len(GOLDEN[CAPITAL])
    assert EOS not in tokens[:13]
    tokens, _, _ = await generate(
        runner, CAPITAL, replace(GREEDY, max_tokens=30, min_tokens=10, stop_token_ids=frozenset({PERIOD}))
    )
    assert PERIOD not in tokens[:9] and EOS not in tokens[:9]
    assert len(tokens) >= 10


async def test_logit_bias_forces_a_token_and_bans_another(runner):
    forced, _, _ = await generate(runner, CAPITAL, replace(GREEDY, max_tokens=6, logit_bias=((42, 100.0),)))
    assert forced == [42] * 6
    banned, _, _ = await generate(runner, CAPITAL, replace(GREEDY, logit_bias=((PARIS, -100.0),)))
    assert PARIS not in banned
    assert banned[:5] == GOLDEN[CAPITAL][:5]  # the same up to the banned token


async def test_repetition_penalty_makes_greedy_repeat_less(runner):
    plain, _, _ = await generate(runner, REPEAT, replace(GREEDY, max_tokens=40, ignore_eos=True))
    penalised, _, _ = await generate(
        runner, REPEAT, replace(GREEDY, max_tokens=40, ignore_eos=True, repetition_penalty=1.5)
    )
    assert len(set(penalised)) / len(penalised) > len(set(plain)) / len(plain)


async def test_a_penalised_sequence_in_a_batch_leaves_the_others_alone(runner, speculative):
    penalised = replace(GREEDY, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5)
    alone = (await generate(runner, REPEAT, penalised))[0]
    together = await asyncio.gather(
        generate(runner, CAPITAL, rid="a"),
        generate(runner, REPEAT, penalised, rid="b"),
        generate(runner, PRIMES, rid="c"),
    )
    assert together[0][0] == GOLDEN[CAPITAL]
    assert together[1][0] == alone
    assert together[2][0] == GOLDEN[PRIMES]
    # speculation checks drafts against the model's own argmax: a penalised greedy sequence does not speculate
    assert (await generate(speculative, REPEAT, penalised))[0] == alone
