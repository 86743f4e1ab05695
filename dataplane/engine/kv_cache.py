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
"""

from __future__ import annotations

import torch


class OutOfBlocksError(RuntimeError):
    """The cache has no free block left for a request; nothing was changed."""


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

    # ---- capacity -------------------------------------------------------

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

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

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Register a new sequence of ``num_tokens`` tokens and return its block table.

        Raises :class:`OutOfBlocksError` (and changes nothing) when the free
        list is too short, ``ValueError`` when the sequence already exists.
        """
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already has blocks; free it first")
        if num_tokens < 0:
            raise ValueError("num_tokens must be >= 0")
        need = self.blocks_needed(num_tokens)
        if need > len(self._free):
            raise OutOfBlocksError(
                f"sequence {seq_id} needs {need} blocks for {num_tokens} tokens, "
                f"only {len(self._free)} of {self.num_blocks} are free"
            )
        table = [self._free.pop() for _ in range(need)]
        self._tables[seq_id] = table
        self._lengths[seq_id] = num_tokens
        return list(table)

    def append_slot(self, seq_id: int) -> tuple[int, int]:
        """Reserve the slot of the sequence's next token: ``(block, offset)``.

        Takes a new block when the last one is full; raises
        :class:`OutOfBlocksError` (and changes nothing) when none is free.
        """
        table = self._table(seq_id)
        position = self._lengths[seq_id]
        index, offset = divmod(position, self.block_size)
        if index == len(table):
            if not self._free:
                raise OutOfBlocksError(
                    f"sequence {seq_id} needs a new block at token {position}, all {self.num_blocks} are in use"
                )
            table.append(self._free.pop())
        self._lengths[seq_id] = position + 1
        return table[index], offset

    def append_slots(self, seq_ids: list[int]) -> list[tuple[int, int]]:
        """:meth:`append_slot` for several sequences, all or nothing."""
        for seq_id in seq_ids:
            self._table(seq_id)
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("a sequence appears twice in one step")
        need = sum(1 for s in seq_ids if self._lengths[s] == len(self._tables[s]) * self.block_size)
        if need > len(self._free):
            raise OutOfBlocksError(
                f"this step needs {need} new blocks for {len(seq_ids)} sequences, only {len(self._free)} are free"
            )
        return [self.append_slot(s) for s in seq_ids]

    def free(self, seq_id: int) -> None:
        """Return the sequence's blocks to the free list and forget it."""
        table = self._tables.pop(seq_id, None)
        if table is None:
            raise KeyError(f"unknown sequence {seq_id}")
        del self._lengths[seq_id]
        # Reversed so that the sequence's first block is the next one handed out.
        self._free.extend(reversed(table))

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
