"""A paged key/value cache: fixed-size blocks shared by all sequences.

Every layer owns two preallocated tensors, K and V, shaped
``[num_blocks, block_size, num_kv_heads, head_dim]``. A sequence holds a
*block table* (the ids of the blocks its tokens live in, in order) and a length;
token ``p`` of a sequence sits in block ``table[p // block_size]`` at offset
``p % block_size``. Blocks come from one free list, so a sequence that finishes
returns its blocks at once and the next one to join reuses them; nobody's cache
is ever moved or recomputed.

The bookkeeping (allocation, appending, freeing) is the same for every layer;
the model writes each layer's K/V through :meth:`PagedKVCache.slots`, which
turns positions into flat slot indices of ``key(layer).view(-1, H, D)``.

Automatic prefix caching: once a block is full and its K/V are written
(:meth:`PagedKVCache.register`), it is keyed by a digest of *every token up to
its end* (a chain: the digest of the previous block plus this block's tokens),
so two sequences that share a prefix share its blocks exactly, whatever
follows. A new sequence given its tokens (:meth:`PagedKVCache.allocate`) takes
the longest chain of cached blocks as its own first blocks (reference counted)
and only the rest of its prompt needs computing. A cached block nobody holds
stays resident and still counts as free: it is reclaimed, least recently used
first, only when a block without cached contents is not available. Shared blocks
are never written: a sequence always computes at least its last prompt token,
in a block of its own.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import torch


class OutOfBlocksError(RuntimeError):
    """The cache has no free block left for a request; nothing was changed."""


def _chain(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Digest of a block's tokens and everything before them (``parent`` is the previous block's digest)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little", signed=False) for t in tokens))
    return h.digest()


class PagedKVCache:
    """Preallocated K/V blocks for ``num_layers`` layers, with per-sequence block tables."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_layers < 1 or num_blocks < 1 or block_size < 1 or num_kv_heads < 1 or head_dim < 1:
            raise ValueError("num_layers, num_blocks, block_size, num_kv_heads and head_dim must all be >= 1")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self._k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # Popped from the end: block 0 is handed out first, and a freed block is reused next.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        # prefix caching
        self._refs = [0] * num_blocks
        self._by_digest: dict[bytes, int] = {}
        self._digest_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self._chains: dict[int, tuple[int, bytes]] = {}  # seq -> (full blocks registered, digest of the last)
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found (and not computed)
        self.prefix_evictions = 0

    # ---- capacity -------------------------------------------------------

    @property
    def free_blocks(self) -> int:
        """Blocks a new token can take: never used, or cached but held by no sequence."""
        return len(self._free) + len(self._evictable)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        """Blocks whose contents are in the prefix cache (held or not)."""
        return len(self._digest_of)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that ``num_tokens`` tokens occupy."""
        return -(-num_tokens // self.block_size)

    def bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self._k[0].element_size()

    # ---- sequences ------------------------------------------------------

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._tables

    @property
    def sequences(self) -> list[int]:
        return list(self._tables)

    def block_table(self, seq_id: int) -> list[int]:
        """A copy of the sequence's block table."""
        return list(self._table(seq_id))

    def length(self, seq_id: int) -> int:
        """Tokens the sequence holds (including slots handed out but not yet written)."""
        self._table(seq_id)
        return self._lengths[seq_id]

    def allocate(self, seq_id: int, num_tokens: int, token_ids: Sequence[int] | None = None) -> int:
        """Register a new sequence of ``num_tokens`` tokens; returns how many of them are already cached.

        With ``token_ids`` (the sequence's tokens, at least ``num_tokens`` of
        them) the longest chain of cached full blocks becomes the start of the
        block table and those tokens need no computing; the count returned is
        a multiple of ``block_size`` and always below ``num_tokens``. Raises
        :class:`OutOfBlocksError` (and changes nothing) when the free blocks
        are too few, ``ValueError`` when the sequence already exists.
        """
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already has blocks; free it first")
        if num_tokens < 0:
            raise ValueError("num_tokens must be >= 0")
        shared: list[int] = []
        digest = b""
        if token_ids is not None and num_tokens > 0:
            if len(token_ids) < num_tokens:
                raise ValueError("token_ids is shorter than num_tokens")
            bs = self.block_size
            for i in range((num_tokens - 1) // bs):  # the last prompt token is always computed
                nxt = _chain(digest, token_ids[i * bs : (i + 1) * bs])
                block = self._by_digest.get(nxt)
                if block is None:
                    break
                shared.append(block)
                digest = nxt
        need = self.blocks_needed(num_tokens) - len(shared)
        reclaimable = sum(1 for b in shared if self._refs[b] == 0)  # our own hits are not free for us
        if need > self.free_blocks - reclaimable:
            raise OutOfBlocksError(
                f"sequence {seq_id} needs {need} blocks for {num_tokens} tokens, "
                f"only {self.free_blocks - reclaimable} of {self.num_blocks} are free"
            )
        for block in shared:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        table = shared + [self._take() for _ in range(need)]
        self._tables[seq_id] = table
        self._lengths[seq_id] = num_tokens
        self._chains[seq_id] = (len(shared), digest)
        if token_ids is not None:
            self.prefix_queries += num_tokens
            self.prefix_hits += len(shared) * self.block_size
        return len(shared) * self.block_size

    def register(self, seq_id: int, token_ids: Sequence[int], written: int) -> None:
        """Offer the sequence's full blocks among its first ``written`` tokens (K/V computed) to the prefix cache.

        ``token_ids`` are the sequence's tokens from position 0. Cheap when no
        new block filled up since the last call.
        """
        table = self._table(seq_id)
        done, digest = self._chains[seq_id]
        full = min(written, len(token_ids), self._lengths[seq_id]) // self.block_size
        bs = self.block_size
        for i in range(done, full):
            digest = _chain(digest, token_ids[i * bs : (i + 1) * bs])
            block = table[i]
            if digest not in self._by_digest and block not in self._digest_of:
                self._by_digest[digest] = block
                self._digest_of[block] = digest
        if full > done:
            self._chains[seq_id] = (full, digest)

    def _take(self) -> int:
        """A block for new contents: a never-cached one first, else the least recently used cached one."""
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._by_digest[self._digest_of.pop(block)]
            self.prefix_evictions += 1
        self._refs[block] = 1
        return block

    def _release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if block in self._digest_of:
                self._evictable[block] = None  # most recently used at the end
            else:
                self._free.append(block)

    def append_slot(self, seq_id: int) -> tuple[int, int]:
        """Reserve the slot of the sequence's next token: ``(block, offset)``.

        Takes a new block when the last one is full; raises
        :class:`OutOfBlocksError` (and changes nothing) when none is free.
        """
        table = self._table(seq_id)
        position = self._lengths[seq_id]
        index, offset = divmod(position, self.block_size)
        if index == len(table):
            if not self.free_blocks:
                raise OutOfBlocksError(
                    f"sequence {seq_id} needs a new block at token {position}, all {self.num_blocks} are in use"
                )
            table.append(self._take())
        self._lengths[seq_id] = position + 1
        return table[index], offset

    def append_slots(self, seq_ids: list[int]) -> list[tuple[int, int]]:
        """:meth:`append_slot` for several sequences, all or nothing."""
        for seq_id in seq_ids:
            self._table(seq_id)
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("a sequence appears twice in one step")
        need = sum(1 for s in seq_ids if self._lengths[s] == len(self._tables[s]) * self.block_size)
        if need > self.free_blocks:
            raise OutOfBlocksError(
                f"this step needs {need} new blocks for {len(seq_ids)} sequences, only {self.free_blocks} are free"
            )
        return [self.append_slot(s) for s in seq_ids]

    def extend(self, seq_id: int, num_tokens: int) -> None:
        """Grow the sequence by ``num_tokens`` positions (taking blocks as needed), all or nothing."""
        table = self._table(seq_id)
        length = self._lengths[seq_id] + num_tokens
        need = self.blocks_needed(length) - len(table)
        if need > self.free_blocks:
            raise OutOfBlocksError(f"sequence {seq_id} needs {need} more blocks, only {self.free_blocks} are free")
        table.extend(self._take() for _ in range(max(need, 0)))
        self._lengths[seq_id] = length

    def truncate(self, seq_id: int, length: int) -> None:
        """Shrink the sequence to its first ``length`` positions; blocks past them are released."""
        table = self._table(seq_id)
        if not 0 <= length <= self._lengths[seq_id]:
            raise ValueError(f"cannot truncate sequence {seq_id} of length {self._lengths[seq_id]} to {length}")
        keep = self.blocks_needed(length)
        for block in reversed(table[keep:]):
            self._release(block)
        del table[keep:]
        self._lengths[seq_id] = length
        if self._chains[seq_id][0] * self.block_size > length:  # rare: only a caller that truncates registered blocks
            self._chains[seq_id] = (0, b"")

    def free(self, seq_id: int) -> None:
        """Release the sequence's blocks and forget it; cached blocks stay resident until reclaimed."""
        table = self._tables.pop(seq_id, None)
        if table is None:
            raise KeyError(f"unknown sequence {seq_id}")
        del self._lengths[seq_id]
        del self._chains[seq_id]
        # Reversed so that the sequence's first block is the next one handed out.
        for block in reversed(table):
            self._release(block)

    # ---- tensors --------------------------------------------------------

    def key(self, layer: int) -> torch.Tensor:
        """K blocks of one layer, ``[num_blocks, block_size, num_kv_heads, head_dim]``."""
        return self._k[layer]

    def value(self, layer: int) -> torch.Tensor:
        """V blocks of one layer, ``[num_blocks, block_size, num_kv_heads, head_dim]``."""
        return self._v[layer]

    def slot(self, seq_id: int, position: int) -> int:
        """Flat slot index (``block * block_size + offset``) of one position of a sequence."""
        table = self._table(seq_id)
        if not 0 <= position < self._lengths[seq_id]:
            raise IndexError(f"position {position} is outside sequence {seq_id} (length {self._lengths[seq_id]})")
        index, offset = divmod(position, self.block_size)
        return table[index] * self.block_size + offset

    def slots(self, seq_id: int, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Flat slot indices of positions ``[start, end)`` of a sequence (all of it by default)."""
        table = self._table(seq_id)
        length = self._lengths[seq_id]
        end = length if end is None else end
        if not 0 <= start <= end <= length:
            raise IndexError(f"positions [{start}, {end}) are outside sequence {seq_id} (length {length})")
        device = self._k[0].device
        positions = torch.arange(start, end, device=device)
        blocks = torch.tensor(table, dtype=torch.long, device=device)
        if blocks.numel() == 0:
            return positions
        return blocks[positions // self.block_size] * self.block_size + positions % self.block_size

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store ``key``/``value`` (``[n, num_kv_heads, head_dim]``) at flat ``slots`` (``[n]``) of one layer."""
        shape = (-1, self.num_kv_heads, self.head_dim)
        self._k[layer].view(shape).index_copy_(0, slots, key)
        self._v[layer].view(shape).index_copy_(0, slots, value)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at flat ``slots`` (any shape ``S``): two tensors ``[*S, num_kv_heads, head_dim]``."""
        shape = (-1, self.num_kv_heads, self.head_dim)
        flat = slots.reshape(-1)
        k = self._k[layer].view(shape).index_select(0, flat)
        v = self._v[layer].view(shape).index_select(0, flat)
        out_shape = (*slots.shape, self.num_kv_heads, self.head_dim)
        return k.view(out_shape), v.view(out_shape)

    def _table(self, seq_id: int) -> list[int]:
        table = self._tables.get(seq_id)
        if table is None:
            raise KeyError(f"unknown sequence {seq_id}")
        return table
