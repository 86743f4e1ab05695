"""Sampling, incremental detokenization and stop strings for local runners."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from modelfleet.dataplane.runners.base import SamplingParams


class LogitsAdjuster:
    """The logit changes of one sequence before its token is chosen, with vLLM's semantics and order
    (``SamplingParams``): min_tokens, logit_bias, repetition, frequency and presence penalties.

    Built only for a sequence that asks for one of them (``for_sequence``); the others pay nothing. The
    bias, the stop tokens and the prompt's token set become tensors once; the output's token counts are a
    dense row updated with the tokens generated since the last call, so a step costs a few vectorised
    operations over the vocabulary row, whatever the sequence's length.
    """

    def __init__(
        self, params: SamplingParams, prompt: Sequence[int], eos_token_ids: Iterable[int], device: torch.device
    ) -> None:
        self.params = params
        self._device = device
        self._min_tokens_ids: torch.Tensor | None = None
        if params.min_tokens:
            ids = sorted({*eos_token_ids, *params.stop_token_ids})
            self._min_tokens_ids = torch.tensor(ids, dtype=torch.long, device=device) if ids else None
        self._bias_ids: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None
        if params.logit_bias:
            self._bias_ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long, device=device)
            self._bias = torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32, device=device)
        self._prompt = tuple(prompt)
        self._counts: torch.Tensor | None = None  # times each token was generated (frequency, presence)
        self._seen: torch.Tensor | None = None  # tokens of the prompt or the output (repetition)
        self._counted = 0  # output tokens already in _counts/_seen

    @classmethod
    def for_sequence(
        cls, params: SamplingParams, prompt: Sequence[int], eos_token_ids: Iterable[int], device: torch.device
    ) -> LogitsAdjuster | None:
        """The adjuster a sequence needs, or None when its logits are used as the model gives them."""
        return cls(params, prompt, eos_token_ids, device) if params.adjusts_logits else None

    def __call__(self, logits: torch.Tensor, output: Sequence[int]) -> torch.Tensor:
        """A float32 copy of one row of logits with this sequence's changes, given its output so far."""
        p = self.params
        logits = logits.to(torch.float32, copy=True)
        if self._min_tokens_ids is not None and len(output) < p.min_tokens:
            logits.index_fill_(0, self._min_tokens_ids, float("-inf"))
        if self._bias_ids is not None and self._bias is not None:
            logits.index_add_(0, self._bias_ids, self._bias)
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            counts, seen = self._history(logits.shape[-1], output)
            if p.repetition_penalty != 1.0:
                scale = torch.where(logits > 0, 1.0 / p.repetition_penalty, p.repetition_penalty)
                logits = torch.where(seen, logits * scale, logits)
            if p.frequency_penalty:
                logits -= p.frequency_penalty * counts
            if p.presence_penalty:
                logits -= p.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    def _history(self, vocab: int, output: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._counts is None or self._seen is None:
            self._counts = torch.zeros(vocab, dtype=torch.float32, device=self._device)
            self._seen = torch.zeros(vocab, dtype=torch.bool, device=self._device)
            if self._prompt:
                self._seen[torch.tensor(self._prompt, dtype=torch.long, device=self._device)] = True
        if len(output) > self._counted:
            new = torch.tensor(output[self._counted :], dtype=torch.long, device=self._device)
            self._counts.index_add_(0, new, torch.ones(len(new), dtype=torch.float32, device=self._device))
            self._seen[new] = True
            self._counted = len(output)
        return self._counts, self._seen


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    adjust: LogitsAdjuster | None = None,
    output: Sequence[int] = (),
) -> int:
    """Pick the next token from one row of logits (after ``adjust``, given the output so far): greedy, or
    temperature, then min_p, top_k and top_p (vLLM's order)."""
    if adjust is not None:
        logits = adjust(logits, output)
    if params.greedy:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.min_p > 0.0:
        # drop the tokens less likely than min_p x the most likely one (the top token always stays)
        probs = torch.where(probs < probs.max() * params.min_p, torch.zeros_like(probs), probs)
    top_k = params.top_k if 0 < params.top_k < probs.shape[-1] else 0
    if not top_k and params.top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator).item())
    if top_k:
        sorted_probs, order = torch.topk(probs, top_k)  # the k most likely, in descending order
    else:
        sorted_probs, order = torch.sort(probs, descending=True)
    if params.top_p < 1.0:
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # top_p is a share of the mass min_p and top_k left (all of it, 1, when neither cut anything)
        mass = params.top_p * float(cumulative[-1]) if top_k or params.min_p > 0.0 else params.top_p
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = cumulative - sorted_probs < mass
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return int(order[choice].item())


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes only a short window of recent tokens each step, and holds back text
    while the window ends inside a multi-byte character (U+FFFD).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token: int) -> str:
        self._ids.append(token)
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return str(full[len(prefix) :])
        return ""


class StopChecker:
    """Finds stop strings in streamed text and holds back a possible partial match."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""

    def feed(self, delta: str, armed: bool = True) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was reached (text cut before it).

        Text fed while not ``armed`` (before ``min_tokens``, as vLLM) is never searched for stops.
        """
        if not self._stops:
            return delta, False
        if not armed:
            out, self._pending = self._pending + delta, ""
            return out, False
        self._pending += delta
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self._pending = self._pending[:cut], ""
            return out, True
        if len(self._pending) <= self._hold:
            return "", False
        out = self._pending[: len(self._pending) - self._hold]
        self._pending = self._pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
