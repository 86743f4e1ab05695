"""The torch runner: a causal LM from transformers, driven step by step in-process.

One worker thread owns the model and runs a step loop: sequences join the
running set between steps and leave when they finish, so a long generation
never blocks a new request for more than one step. Every sequence keeps its own
KV cache; prefill and decode call the model's forward directly (no
``generate``), sampling and detokenization happen here, and chunks are handed
to the asyncio side through thread-safe queues.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelfleet.dataplane.engine.faults import is_context_fault
from modelfleet.dataplane.runners.base import (
    ContextFaultError,
    DeviceContext,
    ExecuteBatch,
    FinishReason,
    RateLimits,
    RequiredMemory,
    RunnerError,
    RuntimeKind,
    SequenceRequest,
    SessionRebuildCause,
    TokenChunk,
    TransportKind,
    WeightSource,
)
from modelfleet.dataplane.runners.decoding import IncrementalDetokenizer, StopChecker, sample_next
from modelfleet.dataplane.runners.llama_paged import PagedLlama
from modelfleet.dataplane.runners.weights import resolve_hf_dir
from modelfleet.dataplane.spec import Device, DType, InferenceDeploymentSpec

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

log = logging.getLogger(__name__)

Sink = Callable[[TokenChunk | BaseException], None]


class TorchCodec:
    """Chat template and tokenization of a Hugging Face tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        out = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return [int(t) for t in ids]

    def encode_text(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]


@dataclass
class _Sequence:
    request: SequenceRequest
    sink: Sink
    detok: IncrementalDetokenizer
    stop: StopChecker
    generator: torch.Generator | None
    seq_id: int = 0
    cache: Any = None  # per-sequence transformers cache (models without a paged forward)
    blocks: int = 0  # paged-KV blocks reserved for prompt + max_tokens
    generated: list[int] = field(default_factory=list)
    aborted: bool = False


def pick_device(device: Device) -> str:
    if device is Device.CUDA or (device is Device.AUTO and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RunnerError("runtime.device is cuda but no CUDA device is visible")
        return "cuda:0"
    return "cpu"


def pick_dtype(dtype: DType, device: str) -> torch.dtype:
    if dtype is DType.AUTO:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {DType.FLOAT32: torch.float32, DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16}[dtype]


class TorchRunner:
    """In-process transformers model with a per-step scheduler thread."""

    runtime_kind = RuntimeKind.TORCH
    transport_kind = TransportKind.IN_PROCESS
    gil_pinned = True

    def __init__(
        self, *, dtype: DType = DType.AUTO, device: Device = Device.AUTO, kv_blocks: int = 256, kv_block_size: int = 16
    ) -> None:
        self._dtype_choice = dtype
        self._device_choice = device
        self._kv_blocks = kv_blocks
        self._kv_block_size = kv_block_size
        self.paged: PagedLlama | None = None
        self._reserved = 0
        self._seq_ids = itertools.count(1)
        self.device = "cpu"
        self.progress = "starting"
        self.model: Any = None
        self.codec: TorchCodec | None = None
        self.eos_token_ids: frozenset[int] = frozenset()
        self._pending: list[_Sequence] = []
        self._active: dict[str, _Sequence] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._source: WeightSource | None = None
        self._poisoned: str | None = None  # why the device context is unusable, until rebuild_session
        self.fault_hook: Callable[[], None] | None = None  # called once per step with work (fault injection)

    # ---- lifecycle -------------------------------------------------------

    async def load_weights(self, ctx: DeviceContext | None, source: WeightSource) -> None:
        self._source = source
        await asyncio.to_thread(self._load_sync, ctx, source)
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._step_loop, name="torch-runner", daemon=True)
            self._thread.start()

    def _set_progress(self, text: str) -> None:
        self.progress = text
        log.info("%s", text)

    def _load_sync(self, ctx: DeviceContext | None, source: WeightSource) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.monotonic()
        self.device = ctx.device if ctx else pick_device(self._device_choice)
        dtype = pick_dtype(self._dtype_choice, self.device)
        self._set_progress("resolving weights")
        path: Path = resolve_hf_dir(source, self._set_progress)
        self._set_progress(f"loading weights from {path.name} ({dtype}, {self.device})")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model.to(self.device)
        model.eval()
        eos: set[int] = set()
        for cfg in (model.generation_config, model.config):
            value = getattr(cfg, "eos_token_id", None)
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, list):
                eos.update(int(v) for v in value)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_token_ids = frozenset(eos)
        self.paged = None
        self._reserved = 0
        if getattr(model.config, "model_type", "") == "llama":
            self.paged = PagedLlama(model, num_blocks=self._kv_blocks, block_size=self._kv_block_size)
            log.info(
                "paged KV cache: %d blocks of %d tokens (%.0f MiB); decode is batched",
                self._kv_blocks,
                self._kv_block_size,
                self._kv_blocks * self._kv_block_size * self.paged.cache.bytes_per_token() / 2**20,
            )
        else:
            log.info("no paged forward for model type %r: one cache per sequence, unbatched", model.config.model_type)
        self.model = model
        self.codec = TorchCodec(tokenizer)
        self._set_progress(f"ready (loaded in {time.monotonic() - started:.1f} s)")

    async def rebuild_session(self, cause: SessionRebuildCause) -> None:
        """Drop the model and every cache, then load again from the same source."""
        log.warning("rebuilding torch session: %s", cause.value)
        with self._cond:
            failing = list(self._active.values()) + self._pending
            self._active.clear()
            self._pending.clear()
        for seq in failing:
            seq.sink(RunnerError(f"session rebuilt ({cause.value})"))
        self.model = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if self._source is not None:
            await asyncio.to_thread(self._load_sync, DeviceContext(self.device), self._source)  # new cache, 0 reserved
        with self._cond:
            self._poisoned = None

    async def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None

    # ---- protocol --------------------------------------------------------

    def rate_limits(self) -> RateLimits | None:
        return None

    def estimate_cost_usd(self, batch: ExecuteBatch) -> float:
        return 0.0

    def required_memory(self, spec: InferenceDeploymentSpec) -> RequiredMemory:
        if self.model is None:
            raise RunnerError("required_memory needs loaded weights (placement estimates from headers instead)")
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        cfg = self.model.config
        kv_per_token = (
            2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
        )
        kv = (
            kv_per_token
            * next(self.model.parameters()).element_size()
            * spec.engine.max_model_len
            * spec.engine.max_num_seqs
        )
        total = weights + kv
        on_gpu = self.device.startswith("cuda")
        return RequiredMemory(
            ram_bytes=0 if on_gpu else total,
            vram_bytes=total if on_gpu else 0,
            detail={"weights": weights, "kv_cache": kv},
        )

    async def execute(self, batch: ExecuteBatch) -> AsyncIterator[TokenChunk]:
        if self.model is None or self.codec is None:
            raise RunnerError("torch runner has no weights loaded")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenChunk | BaseException] = asyncio.Queue()

        def sink(item: TokenChunk | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        seqs = [self._new_sequence(req, sink) for req in batch.sequences]
        with self._cond:
            if self._poisoned is not None:
                raise ContextFaultError(f"device context unusable until rebuilt: {self._poisoned}")
            self._pending.extend(seqs)
            self._cond.notify_all()
        remaining = {s.request.request_id for s in seqs}
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    remaining.discard(item.request_id)
                yield item
        finally:
            for request_id in remaining:
                self._abort_now(request_id)

    async def abort(self, request_id: str) -> None:
        self._abort_now(request_id)

    def _abort_now(self, request_id: str) -> None:
        with self._cond:
            seq = self._active.get(request_id)
            if seq is None:
                seq = next((s for s in self._pending if s.request.request_id == request_id), None)
            if seq is not None:
                seq.aborted = True
                self._cond.notify_all()

    def _new_sequence(self, req: SequenceRequest, sink: Sink) -> _Sequence:
        assert self.codec is not None
        generator = None
        if not req.sampling.greedy:
            generator = torch.Generator(device=self.device)
            if req.sampling.seed is not None:
                seed = req.sampling.seed
                if req.resume_token_ids:  # a fresh generator seeded from (seed, tokens so far): still reproducible
                    seed = (seed + len(req.resume_token_ids) * 0x9E3779B97F4A7C15) % 2**64
                generator.manual_seed(seed)
            else:
                generator.seed()
        blocks = 0
        if self.paged is not None:
            blocks = self.paged.cache.blocks_needed(len(req.prompt_token_ids) + req.sampling.max_tokens)
        seq = _Sequence(
            request=req,
            sink=sink,
            detok=IncrementalDetokenizer(self.codec.tokenizer),
            stop=StopChecker(req.sampling.stop),
            generator=generator,
            seq_id=next(self._seq_ids),
            blocks=blocks,
            generated=list(req.resume_token_ids),
        )
        for token in req.resume_token_ids:  # replay: the text they give was handed out before the fault
            seq.stop.feed(seq.detok.push(token))
        return seq

    # ---- the worker thread -----------------------------------------------

    def _admit(self) -> tuple[list[_Sequence], list[_Sequence]]:
        """Under the lock: move pending sequences whose KV blocks fit into the running set.

        Blocks for prompt + max_tokens are reserved at admission, so a running
        sequence never runs out of cache. A sequence that does not fit waits
        without holding back smaller ones behind it; one that could never fit
        fails at once.
        """
        joining: list[_Sequence] = []
        impossible: list[_Sequence] = []
        waiting: list[_Sequence] = []
        total = self.paged.cache.num_blocks if self.paged is not None else 0
        for seq in self._pending:
            if self.paged is None:
                joining.append(seq)
            elif seq.blocks > total:
                impossible.append(seq)
            elif seq.aborted or self._reserved + seq.blocks <= total:
                self._reserved += seq.blocks
                joining.append(seq)
            else:
                waiting.append(seq)
        self._pending = waiting
        for seq in joining:
            self._active[seq.request.request_id] = seq
        return joining, impossible

    def _step_loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stopping and not self._active and not self._pending:
                    self._cond.wait()
                if self._stopping:
                    return
                joining, impossible = self._admit()
                running = [s for s in self._active.values() if s not in joining]
                if not joining and not running:  # everything waits for blocks held by no one: wait for a change
                    self._cond.wait(0.05)
                    continue
            for seq in impossible:
                seq.sink(RunnerError(f"needs {seq.blocks} KV blocks; this replica has {self._kv_blocks} in all"))
            try:
                self._step(joining, running)
            except Exception as exc:
                if not is_context_fault(exc):
                    raise
                self._poison(exc)

    def _step(self, joining: list[_Sequence], running: list[_Sequence]) -> None:
        if self.fault_hook is not None:
            self.fault_hook()
        for seq in [*running, *joining]:
            if seq.aborted:
                self._finish(seq, FinishReason.ABORT, "")
        if self.paged is None:
            for seq in [*running, *joining]:
                if seq.request.request_id in self._active:
                    self._step_one(seq)
            return
        for seq in joining:  # prefill newcomers one by one
            if seq.request.request_id in self._active:
                self._step_one(seq)
        batch = [s for s in running if s.request.request_id in self._active]
        if batch:
            self._decode_batch(batch)

    def _poison(self, exc: Exception) -> None:
        """The device context is unusable: fail every sequence and step no more until rebuild_session."""
        log.error("device context poisoned (%s: %s); waiting for a session rebuild", type(exc).__name__, exc)
        with self._cond:
            self._poisoned = f"{type(exc).__name__}: {exc}"
            failing = list(self._active.values()) + self._pending
            self._active.clear()
            self._pending.clear()
            self.paged = None  # its memory is on the broken context; rebuild_session makes a new cache
            self._reserved = 0
        for seq in failing:
            seq.cache = None
            seq.sink(ContextFaultError(self._poisoned))

    def _step_one(self, seq: _Sequence) -> None:
        try:
            with torch.inference_mode():
                token = self._next_token(seq)
        except Exception as exc:  # a fault of this sequence: report it on it, keep serving others
            if is_context_fault(exc):
                raise
            log.exception("step failed for %s", seq.request.request_id)
            self._drop(seq)
            seq.sink(RunnerError(f"model step failed: {type(exc).__name__}"))
            return
        self._advance(seq, token)

    def _decode_batch(self, batch: list[_Sequence]) -> None:
        assert self.paged is not None
        try:
            with torch.inference_mode():
                logits = self.paged.decode([s.seq_id for s in batch], [s.generated[-1] for s in batch])
                tokens = [
                    sample_next(logits[i].float(), seq.request.sampling, seq.generator) for i, seq in enumerate(batch)
                ]
        except Exception as exc:
            if is_context_fault(exc):
                raise
            log.exception("batched decode step failed for %d sequences", len(batch))
            for seq in batch:
                self._drop(seq)
                seq.sink(RunnerError(f"model step failed: {type(exc).__name__}"))
            return
        for seq, token in zip(batch, tokens, strict=True):
            self._advance(seq, token)

    def _next_token(self, seq: _Sequence) -> int:
        """Prefill (paged or not), or one unbatched decode step for models without a paged forward."""
        if self.paged is not None:  # a resumed sequence prefills its earlier tokens too
            logits = self.paged.prefill(seq.seq_id, [*seq.request.prompt_token_ids, *seq.generated])
            return sample_next(logits.float(), seq.request.sampling, seq.generator)
        from transformers import DynamicCache

        if seq.cache is None:
            seq.cache = DynamicCache()
            ids = torch.tensor([[*seq.request.prompt_token_ids, *seq.generated]], dtype=torch.long, device=self.device)
        else:
            ids = torch.tensor([[seq.generated[-1]]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, past_key_values=seq.cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[0, -1].float()
        return sample_next(logits, seq.request.sampling, seq.generator)

    def _advance(self, seq: _Sequence, token: int) -> None:
        seq.generated.append(token)
        sampling = seq.request.sampling
        if token in self.eos_token_ids and not sampling.ignore_eos:
            self._finish(seq, FinishReason.STOP, seq.stop.flush(), token)
            return
        delta = seq.detok.push(token)
        emit, hit = seq.stop.feed(delta)
        if hit:
            self._finish(seq, FinishReason.STOP, emit, token)
        elif len(seq.generated) >= sampling.max_tokens:
            self._finish(seq, FinishReason.LENGTH, emit + seq.stop.flush(), token)
        else:
            seq.sink(self._chunk(seq, (token,), emit, None))

    def _chunk(self, seq: _Sequence, tokens: tuple[int, ...], text: str, reason: FinishReason | None) -> TokenChunk:
        return TokenChunk(
            request_id=seq.request.request_id,
            token_ids=tokens,
            text=text,
            prompt_tokens=len(seq.request.prompt_token_ids),
            completion_tokens=len(seq.generated),
            finish_reason=reason,
        )

    def _finish(self, seq: _Sequence, reason: FinishReason, text: str, token: int | None = None) -> None:
        self._drop(seq)
        seq.sink(self._chunk(seq, (token,) if token is not None else (), text, reason))

    def _drop(self, seq: _Sequence) -> None:
        with self._cond:
            if self._active.pop(seq.request.request_id, None) is not None and self.paged is not None:
                if seq.seq_id in self.paged.cache:
                    self.paged.free(seq.seq_id)
                self._reserved -= seq.blocks
            self._cond.notify_all()
        seq.cache = None
