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

``quantization="int8"`` multiplies by int8 copies of the projection and
LM-head weights, quantized once at construction (symmetric, per output
channel; q/k/v and gate/up fused into one matrix each), instead of the model's
own tensors: a quarter of the bytes a float32 decode step reads. The
embedding lookup, the norms and the rest stay in the model's dtype. CPU only;
elsewhere the model's weights are used, with a warning.

Sequences can join (prefill) and leave (:meth:`PagedLlama.free`) between any
two steps without touching anyone else's cache.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from modelfleet.dataplane.batching.kv_cache import PagedKVCache

log = logging.getLogger(__name__)


QUANTIZATIONS = ("none", "int8")
INT8_KERNELS = ("weight-only", "dynamic")


class _Dense:
    """``F.linear`` of one input over several of the model's own weight matrices (nothing is copied)."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> None:
        self.weights = weights
        self.biases = biases

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [F.linear(x, w, b) for w, b in zip(self.weights, self.biases, strict=True)]


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``weight ~= q * scale[:, None]`` with q in [-127, 127]; scale float32."""
    w = weight.detach().to(torch.float32)
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class _Int8:
    """Projections of one input, fused into one int8 weight matrix (quantized once, per output channel).

    Kernels (both CPU):

    - ``weight-only``: ``aten._weight_int8pack_mm`` with bfloat16 activations
      (int8 weights are read, bf16 activations are multiplied in float32
      accumulators): a quarter of the float32 bytes per step, accurate to about
      bfloat16 level. Its CPU kernel wants bf16 (or fp16) activations; with
      float32 ones it is 10-40x slower.
    - ``dynamic``: each row of the activations is quantized to int8 on the fly
      (symmetric, per token) and ``torch._int_mm`` multiplies int8 by int8 into
      int32 (VNNI). Faster at large batches (compute-bound), but the per-token
      activation rounding costs accuracy on small models.

    The output is float32 math cast to ``out_dtype`` and split back into the
    projections. Biases are added in float32.
    """

    def __init__(
        self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], kernel: str, out_dtype: torch.dtype
    ) -> None:
        if kernel not in INT8_KERNELS:
            raise ValueError(f"unknown int8 kernel {kernel!r} (one of {', '.join(INT8_KERNELS)})")
        q, scale = quantize_rows(torch.cat([w.detach() for w in weights], dim=0))
        self.sizes = [int(w.shape[0]) for w in weights]
        self.kernel = kernel
        self.out_dtype = out_dtype
        self.bias: torch.Tensor | None = None
        if any(b is not None for b in biases):
            self.bias = torch.cat(
                [
                    (b.detach() if b is not None else torch.zeros(w.shape[0], device=w.device)).to(torch.float32)
                    for w, b in zip(weights, biases, strict=True)
                ]
            )
        if kernel == "dynamic":
            self.q = q.t().contiguous()  # [in, out]: torch._int_mm multiplies [M, K] by [K, N]
            self.scale = scale
        else:
            self.q = q  # [out, in]
            self.scale = scale.to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.kernel == "dynamic":
            xf = x.to(torch.float32)
            xs = xf.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12).div_(127.0)
            xq = torch.round(xf / xs).to(torch.int8)
            out = torch._int_mm(xq, self.q).to(torch.float32).mul_(xs).mul_(self.scale)
        else:
            out = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scale).to(torch.float32)
        if self.bias is not None:
            out = out.add_(self.bias)
        out = out.to(self.out_dtype)
        return list(torch.split(out, self.sizes, dim=-1)) if len(self.sizes) > 1 else [out]


_Proj = _Dense | _Int8


@dataclass(frozen=True)
class _Layer:
    """One decoder layer: its norms (the model's own tensors) and its projections."""

    input_norm: torch.Tensor
    qkv: _Proj  # h -> [q, k, v]
    o: _Proj  # attn -> [out]
    post_norm: torch.Tensor
    gate_up: _Proj  # h -> [gate, up]
    down: _Proj  # mlp -> [out]


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
        quantization: str = "none",
        int8_kernel: str = "weight-only",
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
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantization!r} (one of {', '.join(QUANTIZATIONS)})")
        if quantization != "none" and self.device.type != "cpu":
            log.warning(
                "quantization %s has CPU kernels only: computing on %s with the model's %s weights instead",
                quantization,
                self.device,
                self.dtype,
            )
            quantization = "none"
        self.quantization = str(quantization)
        self._int8_kernel = int8_kernel
        self.lm_head: torch.Tensor = model.lm_head.weight  # the embedding itself when tied
        self.vocab_size = int(self.lm_head.shape[0])
        self._head = self._proj([self.lm_head], [None])
        self.layers = [self._layer(layer) for layer in inner.layers[: self.num_layers]]
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

    def _proj(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> _Proj:
        if self.quantization == "int8":
            return _Int8(weights, biases, self._int8_kernel, self.dtype)
        return _Dense(weights, biases)

    def _layer(self, layer: Any) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        return _Layer(
            input_norm=layer.input_layernorm.weight,
            qkv=self._proj(
                [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight],
                [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias],
            ),
            o=self._proj([attn.o_proj.weight], [attn.o_proj.bias]),
            post_norm=layer.post_attention_layernorm.weight,
            gate_up=self._proj([mlp.gate_proj.weight, mlp.up_proj.weight], [mlp.gate_proj.bias, mlp.up_proj.bias]),
            down=self._proj([mlp.down_proj.weight], [mlp.down_proj.bias]),
        )

    # ---- public ----------------------------------------------------------

    def begin(self, seq_id: int, token_ids: list[int], *, prefix_cache: bool = True) -> int:
        """Take blocks for a new sequence's tokens; returns how many leading tokens the prefix cache already holds.

        Those need no computing: :meth:`extend` the rest. Raises
        :class:`~modelfleet.dataplane.batching.kv_cache.OutOfBlocksError` when
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
        with torch.inference_mode(), self._attention_backends():
            x = self._extend(seq_id, token_ids, start)
            return self._logits(x) if all_logits else self._logits(x[-1:])[0]

    def prefill(self, seq_id: int, token_ids: list[int], *, prefix_cache: bool = False) -> torch.Tensor:
        """Run a new sequence's whole prompt. Returns the last position's logits ``[vocab]``.

        Raises :class:`~modelfleet.dataplane.batching.kv_cache.OutOfBlocksError`
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
        :class:`~modelfleet.dataplane.batching.kv_cache.OutOfBlocksError` before
        any work when the step needs more new blocks than are free.
        """
        if len(seq_ids) != len(last_tokens):
            raise ValueError("seq_ids and last_tokens differ in length")
        if not seq_ids:
            return torch.empty((0, self.vocab_size), dtype=self.dtype, device=self.device)
        positions = [self.cache.length(s) for s in seq_ids]
        new = self.cache.append_slots(seq_ids)
        with torch.inference_mode(), self._attention_backends():
            return self._decode(seq_ids, last_tokens, positions, new)

    @contextlib.contextmanager
    def _attention_backends(self) -> Iterator[None]:
        """Keep CUDA attention off cuDNN: it rebuilds its plan for every new shape (each decode step has one),
        which cost ~2 ms of CPU per call on an H100 (bench/RESULTS.md) against microseconds of GPU work."""
        if self.device.type != "cuda":
            yield
            return
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            yield

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
        q, k, v = layer.qkv(h)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        c, s = cos[:, None, :], sin[:, None, :]
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        return q, k, v

    def _finish_layer(self, layer: _Layer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, MLP, residual; ``attn`` is ``[n, H * D]``."""
        x = x + layer.o(attn)[0]
        h = self._rms(x, layer.post_norm)
        gate, up = layer.gate_up(h)
        return x + layer.down(F.silu(gate) * up)[0]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(self._rms(x, self.final_norm))[0]

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
