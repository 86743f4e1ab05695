"""Batched decode of Llama-architecture models over a paged KV cache.

:class:`PagedLlama` runs the forward pass of a loaded transformers
``LlamaForCausalLM`` (SmolLM2 is one) by itself, on the model's own parameter
tensors (nothing is copied), with its K/V in a :class:`PagedKVCache`:

- :meth:`PagedLlama.begin` registers a sequence (its first blocks may come
  from the prefix cache) and :meth:`PagedLlama.extend` computes any span of its
  positions against everything before them, so a long prompt can be prefilled
  in chunks across steps, and a speculative draft verified in one forward;
  :meth:`PagedLlama.prefill` does both for a whole prompt;
- :meth:`PagedLlama.decode` advances any set of sequences by one token in ONE
  forward: the projections and the MLP are single matmuls over the batch (on a
  CPU a decode step is bound by reading the weights, so a batch of 16 costs
  little more than one sequence), rotary embeddings use each sequence's own
  position, each new K/V goes to that sequence's next slot, and attention reads
  each sequence's blocks through its block table (padded to the longest
  sequence of the batch and masked).

Sequences can join (prefill) and leave (:meth:`PagedLlama.free`) between any
two steps without touching anyone else's cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from modelfleet.dataplane.engine.kv_cache import PagedKVCache


@dataclass(frozen=True)
class _Layer:
    """Parameter tensors of one decoder layer (the model's own, not copies)."""

    input_norm: torch.Tensor
    q: torch.Tensor
    q_bias: torch.Tensor | None
    k: torch.Tensor
    k_bias: torch.Tensor | None
    v: torch.Tensor
    v_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate: torch.Tensor
    gate_bias: torch.Tensor | None
    up: torch.Tensor
    up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(f"PagedLlama supports the default rotary embedding only, not {rope_type!r}")
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise NotImplementedError(f"PagedLlama does not support rope_scaling {scaling!r}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("the model config names no rope_theta")
    return float(theta)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PagedLlama:
    """A paged-KV forward pass over the weights of a loaded HF Llama model."""

    def __init__(
        self,
        model: Any,
        *,
        num_blocks: int = 256,
        block_size: int = 16,
        cache: PagedKVCache | None = None,
    ) -> None:
        config = model.config
        if getattr(config, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"PagedLlama supports SiLU MLPs only, not {config.hidden_act!r}")
        self.config = config
        self.num_layers = int(config.num_hidden_layers)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.hidden_size = int(config.hidden_size)
        self.head_dim = int(getattr(config, "head_dim", None) or self.hidden_size // self.num_heads)
        self.eps = float(config.rms_norm_eps)
        self.scale = 1.0 / math.sqrt(self.head_dim)

        inner = model.model
        self.embed: torch.Tensor = inner.embed_tokens.weight
        self.final_norm: torch.Tensor = inner.norm.weight
        self.lm_head: torch.Tensor = model.lm_head.weight  # the embedding itself when tied
        self.layers = [self._layer(layer) for layer in inner.layers[: self.num_layers]]
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        self.inv_freq = 1.0 / (
            _rope_theta(config)
            ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=self.device) / self.head_dim)
        )
        if cache is None:
            cache = PagedKVCache(
                num_layers=self.num_layers,
                num_blocks=num_blocks,
                block_size=block_size,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                dtype=self.dtype,
                device=self.device,
            )
        self.cache = cache
        if (self.cache.num_layers, self.cache.num_kv_heads, self.cache.head_dim) != (
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
        ):
            raise ValueError("the cache's layers, KV heads or head_dim do not match the model")

    @staticmethod
    def _layer(layer: Any) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        return _Layer(
            input_norm=layer.input_layernorm.weight,
            q=attn.q_proj.weight,
            q_bias=attn.q_proj.bias,
            k=attn.k_proj.weight,
            k_bias=attn.k_proj.bias,
            v=attn.v_proj.weight,
            v_bias=attn.v_proj.bias,
            o=attn.o_proj.weight,
            o_bias=attn.o_proj.bias,
            post_norm=layer.post_attention_layernorm.weight,
            gate=mlp.gate_proj.weight,
            gate_bias=mlp.gate_proj.bias,
            up=mlp.up_proj.weight,
            up_bias=mlp.up_proj.bias,
            down=mlp.down_proj.weight,
            down_bias=mlp.down_proj.bias,
        )

    # ---- public ----------------------------------------------------------

    def begin(self, seq_id: int, token_ids: list[int], *, prefix_cache: bool = True) -> int:
        """Take blocks for a new sequence's tokens; returns how many leading tokens the prefix cache already holds.

        Those need no computing: :meth:`extend` the rest. Raises
        :class:`~modelfleet.dataplane.engine.kv_cache.OutOfBlocksError` when
        the tokens do not fit (nothing is allocated then).
        """
        if not token_ids:
            raise ValueError("a sequence needs at least one token")
        return self.cache.allocate(seq_id, len(token_ids), token_ids if prefix_cache else None)

    def extend(self, seq_id: int, token_ids: list[int], start: int, *, all_logits: bool = False) -> torch.Tensor:
        """Compute positions ``[start, start + len(token_ids))`` of a sequence whose earlier positions are computed.

        The positions must already belong to the sequence (:meth:`begin`, or
        ``cache.extend`` for draft tokens). Returns the logits of the last
        position ``[vocab]``, or of every position ``[n, vocab]`` with ``all_logits``.
        """
        if not token_ids:
            raise ValueError("extend needs at least one token")
        if start + len(token_ids) > self.cache.length(seq_id):
            raise ValueError(f"positions up to {start + len(token_ids)} are not allocated to sequence {seq_id}")
        with torch.inference_mode():
            x = self._extend(seq_id, token_ids, start)
            return self._logits(x) if all_logits else self._logits(x[-1:])[0]

    def prefill(self, seq_id: int, token_ids: list[int], *, prefix_cache: bool = False) -> torch.Tensor:
        """Run a new sequence's whole prompt. Returns the last position's logits ``[vocab]``.

        Raises :class:`~modelfleet.dataplane.engine.kv_cache.OutOfBlocksError`
        when the prompt does not fit (nothing is allocated then).
        """
        cached = self.begin(seq_id, token_ids, prefix_cache=prefix_cache)
        try:
            logits = self.extend(seq_id, token_ids[cached:], cached)
        except BaseException:
            self.cache.free(seq_id)
            raise
        if prefix_cache:
            self.cache.register(seq_id, token_ids, len(token_ids))
        return logits

    def decode(self, seq_ids: list[int], last_tokens: list[int]) -> torch.Tensor:
        """Advance every sequence by one token in one batched forward. Returns logits ``[batch, vocab]``.

        ``last_tokens[i]`` is the token sequence ``seq_ids[i]`` sampled last;
        it is placed at the sequence's next position. Raises
        :class:`~modelfleet.dataplane.engine.kv_cache.OutOfBlocksError` before
        any work when the step needs more new blocks than are free.
        """
        if len(seq_ids) != len(last_tokens):
            raise ValueError("seq_ids and last_tokens differ in length")
        if not seq_ids:
            return torch.empty((0, self.lm_head.shape[0]), dtype=self.dtype, device=self.device)
        positions = [self.cache.length(s) for s in seq_ids]
        new = self.cache.append_slots(seq_ids)
        with torch.inference_mode():
            return self._decode(seq_ids, last_tokens, positions, new)

    def free(self, seq_id: int) -> None:
        """Drop a sequence; its blocks go back to the free list."""
        self.cache.free(seq_id)

    # ---- the forward pass ------------------------------------------------

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, ``[n, head_dim]``, for integer positions ``[n]`` (as transformers computes them)."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _qkv(
        self, layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated q ``[n, H, D]``, rotated k and v ``[n, Hkv, D]`` for hidden states ``[n, hidden]``."""
        n = x.shape[0]
        h = self._rms(x, layer.input_norm)
        q = F.linear(h, layer.q, layer.q_bias).view(n, self.num_heads, self.head_dim)
        k = F.linear(h, layer.k, layer.k_bias).view(n, self.num_kv_heads, self.head_dim)
        v = F.linear(h, layer.v, layer.v_bias).view(n, self.num_kv_heads, self.head_dim)
        c, s = cos[:, None, :], sin[:, None, :]
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        return q, k, v

    def _finish_layer(self, layer: _Layer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, MLP, residual; ``attn`` is ``[n, H * D]``."""
        x = x + F.linear(attn, layer.o, layer.o_bias)
        h = self._rms(x, layer.post_norm)
        mlp = F.silu(F.linear(h, layer.gate, layer.gate_bias)) * F.linear(h, layer.up, layer.up_bias)
        return x + F.linear(mlp, layer.down, layer.down_bias)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._rms(x, self.final_norm), self.lm_head)

    def _extend(self, seq_id: int, token_ids: list[int], start: int) -> torch.Tensor:
        """Hidden states ``[n, hidden]`` of positions ``[start, start + n)``; their K/V are written to the cache."""
        n = len(token_ids)
        end = start + n
        dev = self.device
        ids = torch.tensor(token_ids, dtype=torch.long, device=dev)
        slots = self.cache.slots(seq_id, 0, end)
        new_slots = slots[start:]
        cos, sin = self._rope(torch.arange(start, end, device=dev))
        mask = None
        if start:
            # query i (position start + i) sees every key up to and including its own position
            mask = torch.arange(end, device=dev)[None, :] <= torch.arange(start, end, device=dev)[:, None]
        x = F.embedding(ids, self.embed)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            self.cache.write(i, new_slots, k, v)
            if start:
                keys, values = self.cache.gather(i, slots)  # [end, Hkv, D]
            else:  # nothing earlier: attend to the new K/V directly, no gather
                keys, values = k, v
            attn = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                keys.transpose(0, 1)[None],
                values.transpose(0, 1)[None],
                attn_mask=mask,
                is_causal=not start,
                scale=self.scale,
                enable_gqa=True,
            )
            x = self._finish_layer(layer, x, attn[0].transpose(0, 1).reshape(n, -1))
        return x

    def _decode(
        self, seq_ids: list[int], last_tokens: list[int], positions: list[int], new: list[tuple[int, int]]
    ) -> torch.Tensor:
        batch = len(seq_ids)
        bs = self.cache.block_size
        dev = self.device
        new_slots = torch.tensor([block * bs + offset for block, offset in new], dtype=torch.long, device=dev)
        lengths = torch.tensor(positions, dtype=torch.long, device=dev) + 1
        longest = int(lengths.max())
        # Flat slot of every (sequence, position), padded with slot 0 past each sequence's end and masked.
        table = torch.zeros((batch, longest), dtype=torch.long, device=dev)
        for row, seq_id in enumerate(seq_ids):
            table[row, : positions[row] + 1] = self.cache.slots(seq_id)
        mask = (torch.arange(longest, device=dev)[None, :] < lengths[:, None])[:, None, None, :]
        cos, sin = self._rope(lengths - 1)
        x = F.embedding(torch.tensor(last_tokens, dtype=torch.long, device=dev), self.embed)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            self.cache.write(i, new_slots, k, v)
            keys, values = self.cache.gather(i, table)  # [batch, longest, Hkv, D]
            attn = F.scaled_dot_product_attention(
                q[:, :, None, :],
                keys.transpose(1, 2),
                values.transpose(1, 2),
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=True,
            )
            x = self._finish_layer(layer, x, attn.reshape(batch, -1))
        return self._logits(x)
