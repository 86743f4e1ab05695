"""The paged KV cache's bookkeeping: blocks, tables, free list, prefix caching (no model needed)."""

from __future__ import annotations

import pytest
import torch

from modelfleet.dataplane.batching.kv_cache import OutOfBlocksError, PagedKVCache


def _cache(num_blocks: int = 4, block_size: int = 4) -> PagedKVCache:
    return PagedKVCache(num_layers=2, num_blocks=num_blocks, block_size=block_size, num_kv_heads=3, head_dim=8)


def test_cache_allocates_blocks_for_a_prompt() -> None:
    cache = _cache()
    assert cache.key(0).shape == (4, 4, 3, 8) and cache.value(1).dtype == torch.float32
    assert cache.allocate(7, 5) == 0  # nothing came from the prefix cache
    assert cache.block_table(7) == [0, 1]
    assert (cache.used_blocks, cache.free_blocks, cache.length(7)) == (2, 2, 5)
    cache.allocate(8, 0)
    assert cache.block_table(8) == []
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
    cache.allocate(3, 8)
    assert cache.block_table(3) == [0, 1]  # 1's blocks, first block first
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


def test_prefix_cache_shares_full_blocks_of_a_common_prefix() -> None:
    cache = _cache(num_blocks=8, block_size=4)
    a = list(range(100, 110))  # 10 tokens: 2 full blocks + 2
    assert cache.allocate(1, len(a), a) == 0
    cache.register(1, a, written=10)
    assert cache.cached_blocks == 2
    b = [*a[:8], 7, 7, 7]
    assert cache.allocate(2, len(b), b) == 8  # both full blocks shared
    assert cache.block_table(2)[:2] == cache.block_table(1)[:2]
    assert cache.block_table(2)[2] not in cache.block_table(1)
    assert (cache.prefix_queries, cache.prefix_hits) == (21, 8)
    # a different first block shares nothing, even if later tokens match
    c = [1, 2, 3, 4, *a[4:]]
    assert cache.allocate(3, len(c), c) == 0


def test_prefix_cache_always_leaves_the_last_token_to_compute() -> None:
    cache = _cache(num_blocks=8, block_size=4)
    a = list(range(8))
    cache.allocate(1, 8, a)
    cache.register(1, a, written=8)
    assert cache.allocate(2, 8, a) == 4  # the second block holds the last token: computed again
    assert cache.allocate(3, 9, [*a, 9]) == 8


def test_register_only_counts_written_full_blocks() -> None:
    cache = _cache(num_blocks=8, block_size=4)
    a = list(range(12))
    cache.allocate(1, 12, a)
    cache.register(1, a, written=7)  # the second block is not fully written yet
    assert cache.cached_blocks == 1
    cache.register(1, a, written=12)
    assert cache.cached_blocks == 3


def test_cached_blocks_are_free_and_reclaimed_least_recently_used_first() -> None:
    cache = _cache(num_blocks=4, block_size=2)
    x, y = [1, 2, 3], [4, 5, 6]
    for seq, toks in ((1, x), (2, y)):
        cache.allocate(seq, 3, toks)
        cache.register(seq, toks, written=3)
    cache.free(1)  # x's first block: cached, unreferenced, older
    cache.free(2)
    assert (cache.free_blocks, cache.cached_blocks) == (4, 2)
    cache.allocate(3, 6)  # 3 blocks without prefix caching: 2 never-cached ones, then x's (the LRU)
    assert (cache.cached_blocks, cache.prefix_evictions) == (1, 1)
    cache.free(3)
    assert cache.allocate(4, 3, y) == 2  # y's block survived
    assert cache.allocate(5, 3, x) == 0


def test_a_shared_block_survives_until_its_last_holder_frees_it() -> None:
    cache = _cache(num_blocks=3, block_size=2)
    a = [1, 2, 3]
    cache.allocate(1, 3, a)
    cache.register(1, a, written=3)
    cache.allocate(2, 3, a)
    shared = cache.block_table(1)[0]
    cache.free(1)
    assert shared in cache.block_table(2) and cache.free_blocks == 1
    with pytest.raises(OutOfBlocksError):
        cache.allocate(3, 4)  # the shared block is held: only one block is free
    cache.free(2)
    assert cache.free_blocks == 3


def test_extend_and_truncate_for_draft_tokens() -> None:
    cache = _cache(num_blocks=4, block_size=4)
    cache.allocate(1, 3)
    cache.extend(1, 4)  # positions 3..6: one new block
    assert cache.length(1) == 7 and len(cache.block_table(1)) == 2
    cache.truncate(1, 4)  # rejected drafts: back to one block
    assert cache.length(1) == 4 and len(cache.block_table(1)) == 1 and cache.free_blocks == 3
    with pytest.raises(ValueError):
        cache.truncate(1, 5)
    with pytest.raises(OutOfBlocksError):
        cache.extend(1, 20)
    assert cache.length(1) == 4
