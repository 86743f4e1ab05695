"""The torch runner: a causal LM from transformers, driven step by step in-process.

One worker thread owns the model and runs a step loop. For Llama-architecture
models (SmolLM2 and most open models) every step is planned by the engine's
:class:`~modelfleet.dataplane.batching.scheduler.Scheduler`: it admits sequences
whose KV blocks fit (reserved for prompt + max_tokens), hands out a per-step
prefill budget (long prompts are prefilled in chunks while others keep
decoding), and picks the decode batch; :class:`PagedLlama` computes the chunks
and decodes the whole batch in one forward over the paged KV cache, whose
prefix cache lets a prompt skip the blocks another request already computed.
Greedy sequences may speculate with prompt-lookup drafts when few sequences
decode (``engine.speculative``). Other models fall back to one transformers
cache per sequence, unbatched. Nothing calls ``generate``; sampling and
detokenization happen here, and chunks reach the asyncio side through
thread-safe queues.
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

from modelfleet.dataplane.batching.scheduler import NeverFitsError, SchedRequest, Scheduler, SchedulerConfig
from modelfleet.dataplane.runners.base import (
    CHAT,
    COMPLETIONS,
    ContextFaultError,
    DeviceContext,
    ExecuteBatch,
    FinishReason,
    RunnerCapabilities,
    RunnerError,
    RunnerFamily,
    RuntimeKind,
    SequenceRequest,
    SessionRebuildCause,
    TokenChunk,
    TransportKind,
    WeightSource,
    is_context_fault,
)
from modelfleet.dataplane.runners.decoding import IncrementalDetokenizer, LogitsAdjuster, StopChecker, sample_next
from modelfleet.dataplane.runners.llama_paged import PagedLlama
from modelfleet.dataplane.runners.ngram import DraftStats, accept_greedy, propose
from modelfleet.dataplane.runners.weights import resolve_hf_dir
from modelfleet.dataplane.spec import Device, DType, EngineSpec, Quantization

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

log = logging.getLogger(__name__)

Sink = Callable[[TokenChunk | BaseException], None]


class TorchCodec:
    """Chat template and tokenization of a Hugging Face tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int | None = None) -> None:
        self.tokenizer = tokenizer
        # the width of the model's logits (may exceed the tokenizer's own ids); the tokenizer's size without a model
        self.vocab_size = vocab_size if vocab_size is not None else len(tokenizer)

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
    adjust: LogitsAdjuster | None = None  # bias, penalties, min_tokens: only for a sequence that asks for them
    seq_id: int = 0
    cache: Any = None  # per-sequence transformers cache (models without a paged forward)
    context: list[int] = field(default_factory=list)  # tokens to prefill: the prompt (+ tokens before a fault)
    generated: list[int] = field(default_factory=list)
    draft: DraftStats | None = None  # speculation of this sequence, while it pays
    offered: int = 0  # full KV blocks already offered to the prefix cache
    aborted: bool = False

    @property
    def id(self) -> str:
        return self.request.request_id


@dataclass
class StepStats:
    """Where the step loop's time goes (read by the engine's metrics and the scheduler-overhead benchmark).

    The step thread adds a whole step at once under the lock, so a reader in
    another thread never sees one step's forward time without its step time.
    """

    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    forward_pending: float = 0.0  # forward time of the step in progress (step thread only)
    steps: int = 0
    step_s: float = 0.0  # whole steps, scheduler and bookkeeping included
    forward_s: float = 0.0  # model forwards and sampling
    scheduler_s: float = 0.0  # admit + plan + complete
    prefill_tokens: int = 0  # prompt positions computed (prefix-cache hits are not)
    prefill_chunks: int = 0
    drafted: int = 0  # speculative draft tokens proposed
    accepted: int = 0  # of those, accepted

    def add_step(self, step_s: float, scheduler_s: float) -> None:
        with self.lock:
            self.steps += 1
            self.step_s += step_s
            self.scheduler_s += scheduler_s
            self.forward_s += self.forward_pending
            self.forward_pending = 0.0

    def snapshot(self) -> dict[str, float]:
        with self.lock:
            return {
                "steps": self.steps,
                "step_s": self.step_s,
                "forward_s": self.forward_s,
                "scheduler_s": self.scheduler_s,
                "prefill_tokens": self.prefill_tokens,
                "prefill_chunks": self.prefill_chunks,
                "drafted": self.drafted,
                "accepted": self.accepted,
            }


WIDE_STEP = 8  # decode batches wider than this are compute-bound on a CPU: use every core


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
    # ModelFleet implements the OpenAI API on the tokens this runner streams (docs/openai-api.md)
    capabilities = RunnerCapabilities(
        family=RunnerFamily.TOKEN_GENERATOR, endpoints=frozenset({CHAT, COMPLETIONS}), fault_injection=True
    )

    def __init__(
        self,
        *,
        dtype: DType = DType.AUTO,
        device: Device = Device.AUTO,
        engine: EngineSpec | None = None,
        quantization: Quantization = Quantization.NONE,
        cpu_threads: int | None = None,
    ) -> None:
        self._cpu_threads = cpu_threads
        self._threads = 0  # torch's intra-op threads as last set (CPU)
        self._thread_split = (1, 1)  # (small, wide) step threads, decided once at load
        self._dtype_choice = dtype
        self._quantization = quantization
        self._device_choice = device
        self.engine = engine or EngineSpec()
        self._kv_blocks = self.engine.kv_blocks()
        self._kv_block_size = self.engine.kv_block_size
        self.paged: PagedLlama | None = None
        self.scheduler: Scheduler | None = None
        self.step_stats = StepStats()
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
        self._poisoned_cause = SessionRebuildCause.DEVICE_CONTEXT_POISONED
        self.fault_hook: Callable[[], None] | None = None  # called once per step with work (fault injection)

    # ---- lifecycle -------------------------------------------------------

    async def load_weights(self, ctx: DeviceContext | None, source: WeightSource) -> None:
        self._source = source
        await asyncio.to_thread(self._load_sync, ctx, source)
        if self._thread is None:
            self._start_thread()

    def _start_thread(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._step_thread, name="torch-runner", daemon=True)
        self._thread.start()

    def _set_progress(self, text: str) -> None:
        self.progress = text
        log.info("%s", text)

    def _load_sync(self, ctx: DeviceContext | None, source: WeightSource) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.monotonic()
        self.device = ctx.device if ctx else pick_device(self._device_choice)
        dtype = pick_dtype(self._dtype_choice, self.device)
        if self.device == "cpu":
            self._thread_split = self._thread_plan()
            self._set_threads(self._thread_split[0])
            log.info("torch CPU threads: %d for small decode steps, %d for wide ones", *self._thread_split)
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
        self.scheduler = None
        if getattr(model.config, "model_type", "") == "llama":
            self.paged = PagedLlama(
                model,
                num_blocks=self._kv_blocks,
                block_size=self._kv_block_size,
                quantization=self._quantization.value,
            )
            if self.paged.quantization != Quantization.NONE:
                log.info("paged forward multiplies by %s weights (quantized at load)", self.paged.quantization)
            self.scheduler = Scheduler(
                SchedulerConfig(
                    kv_blocks=self._kv_blocks,
                    block_tokens=self._kv_block_size,
                    max_active=self.engine.max_num_seqs,
                    prefill_tokens_per_step=self.engine.max_prefill_tokens_per_step,
                )
            )
            log.info(
                "paged KV cache: %d blocks of %d tokens (%.0f MiB); decode is batched",
                self._kv_blocks,
                self._kv_block_size,
                self._kv_blocks * self._kv_block_size * self.paged.cache.bytes_per_token() / 2**20,
            )
        else:
            log.info("no paged forward for model type %r: one cache per sequence, unbatched", model.config.model_type)
            if self._quantization is not Quantization.NONE:
                log.warning(
                    "quantization %s applies to the paged (Llama) forward only: model type %r runs in %s",
                    self._quantization.value,
                    model.config.model_type,
                    dtype,
                )
        self.model = model
        self.codec = TorchCodec(tokenizer, int(model.config.vocab_size))
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
            if self._thread is not None and not self._thread.is_alive() and not self._stopping:
                self._start_thread()  # the last resort of _step_thread ended the old one

    async def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None

    # ---- protocol --------------------------------------------------------

    def runtime_stats(self) -> dict[str, float]:
        """KV, prefix-cache and step-loop counters (exported by the engine's /metrics and /load)."""
        stats: dict[str, float] = dict(self.step_stats.snapshot())
        paged = self.paged
        if paged is not None:
            cache = paged.cache
            stats.update(
                kv_blocks_total=cache.num_blocks,
                kv_block_size=cache.block_size,
                kv_blocks_used=cache.used_blocks,
                kv_blocks_cached=cache.cached_blocks,
                prefix_queries=cache.prefix_queries,
                prefix_hits=cache.prefix_hits,
                prefix_evictions=cache.prefix_evictions,
            )
        return stats

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
                raise ContextFaultError(f"runner unusable until rebuilt: {self._poisoned}", self._poisoned_cause)
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
        seq = _Sequence(
            request=req,
            sink=sink,
            detok=IncrementalDetokenizer(self.codec.tokenizer),
            stop=StopChecker(req.sampling.stop),
            generator=generator,
            adjust=LogitsAdjuster.for_sequence(
                req.sampling, req.prompt_token_ids, self.eos_token_ids, torch.device(self.device)
            ),
            seq_id=next(self._seq_ids),
            context=[*req.prompt_token_ids, *req.resume_token_ids],
            generated=list(req.resume_token_ids),
        )
        if self.engine.speculative is not None and req.sampling.greedy and seq.adjust is None:
            # drafts are checked against the model's own argmax: not for logits a sequence changes
            seq.draft = DraftStats(min_acceptance=self.engine.speculative.min_acceptance_rate)
        for i, token in enumerate(req.resume_token_ids):  # replay: their text was handed out before the fault
            seq.stop.feed(seq.detok.push(token), armed=i + 1 > req.sampling.min_tokens)
        return seq

    # ---- the worker thread -----------------------------------------------

    def _step_thread(self) -> None:
        """The step loop, and a last resort should the loop itself break: nothing may end this thread silently."""
        try:
            self._step_loop()
        except BaseException as exc:
            log.critical("the torch step thread ended on %s; failing every sequence", type(exc).__name__, exc_info=True)
            self._poison(exc, SessionRebuildCause.STEP_LOOP_FAILED)  # rebuild_session starts a new thread

    def _step_loop(self) -> None:
        """Steps while there is work. A fault no single sequence owns fails them all and waits for a rebuild."""
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stopping and not self._active and not self._pending:
                    self._cond.wait()
                if self._stopping:
                    return
                joining = self._pending
                self._pending = []
                for seq in joining:
                    self._active[seq.id] = seq
            try:
                if self.fault_hook is not None:
                    self.fault_hook()
                for seq in list(self._active.values()):
                    if seq.aborted:
                        self._finish(seq, FinishReason.ABORT, "")
                if self.scheduler is not None:
                    self._paged_step(joining)
                else:
                    for seq in list(self._active.values()):
                        self._step_one(seq)
            except Exception as exc:
                if is_context_fault(exc):
                    self._poison(exc, SessionRebuildCause.DEVICE_CONTEXT_POISONED)
                else:
                    # not one sequence's fault (the per-sequence handlers catch those): the scheduler or the KV
                    # cache failed mid-update, so neither can be trusted; the worker rebuilds them from scratch
                    log.exception("a step failed outside any one sequence; the runner needs a session rebuild")
                    self._poison(exc, SessionRebuildCause.STEP_LOOP_FAILED)

    def _thread_plan(self) -> tuple[int, int]:
        """CPU threads for (small, wide) steps.

        A decode step of a few sequences reads the weights and barely computes:
        one core fewer costs it little, and that core keeps the event loop, the
        sidecar and the gateway from preempting the math threads mid-step (on 2
        cores: 67 instead of 44 tokens/s for one stream). A wide step (prefill,
        or many sequences) is compute-bound and takes every core.
        ``runtime.cpuThreads``, or ``OMP_NUM_THREADS`` when set, fixes both: with
        several engines on one machine each must stay within its share, or their
        spinning math threads oversubscribe the cores. Cores are the ones this
        process may run on (its CPU affinity), not the whole machine's.
        """
        if self._cpu_threads:
            return self._cpu_threads, self._cpu_threads
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        if env.isdigit() and int(env) > 0:
            return int(env), int(env)
        cores = len(os.sched_getaffinity(0)) or 1
        return max(1, cores - 1), cores

    def _set_threads(self, threads: int) -> None:
        if threads != self._threads:
            torch.set_num_threads(threads)
            self._threads = threads

    def _paged_step(self, joining: list[_Sequence]) -> None:
        """One scheduler step: admit, prefill chunks, one batched decode."""
        sched, paged = self.scheduler, self.paged
        assert sched is not None and paged is not None
        started = time.perf_counter()
        for seq in joining:
            if seq.id not in self._active:
                continue
            remaining = seq.request.sampling.max_tokens - len(seq.generated)
            try:
                sched.add(SchedRequest(seq.id, len(seq.context), max(remaining, 1), seq.request.priority))
            except NeverFitsError:
                self._drop(seq)
                need = sched.blocks_needed(len(seq.request.prompt_token_ids) + seq.request.sampling.max_tokens)
                seq.sink(RunnerError(f"needs {need} KV blocks; this replica has {self._kv_blocks} in all"))
        for request_id in sched.admit():
            seq = self._active[request_id]
            cached = paged.begin(seq.seq_id, seq.context, prefix_cache=self.engine.prefix_caching)
            sched.mark_cached(request_id, cached)
        plan = sched.plan()
        planned = time.perf_counter()
        if not plan.prefill and not plan.decode:
            with self._cond:  # everything waits for blocks: wake on a change (a finish or a newcomer)
                if not self._pending:
                    self._cond.wait(0.05)
            return
        if self.device == "cpu":
            small, wide = self._thread_split
            self._set_threads(wide if plan.prefill or len(plan.decode) > WIDE_STEP else small)
        for request_id, start, n in plan.prefill:
            if request_id in self._active:
                self._prefill_chunk(self._active[request_id], start, n)
        decoding = [self._active[i] for i in plan.decode if i in self._active]
        if decoding:
            self._decode(decoding)
        completing = time.perf_counter()
        sched.complete(plan)
        ended = time.perf_counter()
        self.step_stats.add_step(ended - started, (planned - started) + (ended - completing))

    def _prefill_chunk(self, seq: _Sequence, start: int, n: int) -> None:
        assert self.paged is not None
        began = time.perf_counter()
        self.step_stats.prefill_tokens += n
        self.step_stats.prefill_chunks += 1
        try:
            logits = self.paged.extend(seq.seq_id, seq.context[start : start + n], start)
            if start + n < len(seq.context):
                self._offer_blocks(seq)
                return  # more chunks to come; the logits of a middle position are not needed
            token = sample_next(logits.float(), seq.request.sampling, seq.generator, seq.adjust, seq.generated)
        except Exception as exc:
            self._fail(seq, exc)
            return
        finally:
            self.step_stats.forward_pending += time.perf_counter() - began
        self._offer_blocks(seq)
        self._advance(seq, token)

    def _decode(self, batch: list[_Sequence]) -> None:
        """Advance the batch by one token each: speculative for a few greedy sequences, else one batched forward."""
        spec = self.engine.speculative
        plain = batch
        if spec is not None and len(batch) <= spec.max_batch:
            plain = [s for s in batch if not self._speculate(s, spec.num_draft_tokens)]
        if not plain:
            return
        assert self.paged is not None
        began = time.perf_counter()
        try:
            with torch.inference_mode():
                logits = self.paged.decode([s.seq_id for s in plain], [s.generated[-1] for s in plain])
                tokens = [
                    sample_next(logits[i].float(), seq.request.sampling, seq.generator, seq.adjust, seq.generated)
                    for i, seq in enumerate(plain)
                ]
            self.step_stats.forward_pending += time.perf_counter() - began
        except Exception as exc:
            if is_context_fault(exc):
                raise
            log.exception("batched decode step failed for %d sequences", len(plain))
            for seq in plain:
                self._drop(seq)
                seq.sink(RunnerError(f"model step failed: {type(exc).__name__}"))
            return
        for seq, token in zip(plain, tokens, strict=True):
            self._offer_blocks(seq)
            self._advance(seq, token)

    def _speculate(self, seq: _Sequence, num_draft: int) -> bool:
        """Verify a prompt-lookup draft in one forward; False when this sequence should decode normally."""
        if seq.draft is None or not seq.draft.enabled:
            return False
        assert self.paged is not None
        room = seq.request.sampling.max_tokens - len(seq.generated) - 1  # the forward also yields one token
        history = [*seq.request.prompt_token_ids, *seq.generated]
        draft = propose(history, min(num_draft, room))
        if not draft:
            return False
        cache = self.paged.cache
        length = cache.length(seq.seq_id)  # the last sampled token is not in the cache yet
        began = time.perf_counter()
        try:
            cache.extend(seq.seq_id, len(draft) + 1)
            logits = self.paged.extend(seq.seq_id, [seq.generated[-1], *draft], length, all_logits=True)
            choices = [int(t) for t in logits.argmax(dim=-1).tolist()]
        except Exception as exc:
            self._fail(seq, exc)
            return True
        finally:
            self.step_stats.forward_pending += time.perf_counter() - began
        kept = accept_greedy(draft, choices)
        cache.truncate(seq.seq_id, length + len(kept))  # K/V of the last sampled token and the accepted drafts
        seq.draft.record(len(draft), len(kept) - 1)
        self.step_stats.drafted += len(draft)
        self.step_stats.accepted += len(kept) - 1
        for token in kept:
            if seq.id not in self._active:
                break  # finished (EOS, stop string, length) part way through the accepted tokens
            self._advance(seq, token)
        self._offer_blocks(seq)
        return True

    def _offer_blocks(self, seq: _Sequence) -> None:
        """Offer the sequence's newly full KV blocks to the prefix cache: prompts, and answers for the next turn."""
        paged = self.paged
        if not self.engine.prefix_caching or paged is None or seq.seq_id not in paged.cache:
            return
        written = paged.cache.length(seq.seq_id)  # positions whose K/V are computed
        if written // self._kv_block_size > seq.offered:
            tokens = [*seq.context, *seq.generated[len(seq.request.resume_token_ids) :]]
            paged.cache.register(seq.seq_id, tokens, written)
            seq.offered = written // self._kv_block_size

    def _fail(self, seq: _Sequence, exc: Exception) -> None:
        """A fault of this sequence alone: report it on it and keep serving the others."""
        if is_context_fault(exc):
            raise exc
        log.exception("step failed for %s", seq.id)
        self._drop(seq)
        seq.sink(RunnerError(f"model step failed: {type(exc).__name__}"))

    def _poison(self, exc: BaseException, cause: SessionRebuildCause) -> None:
        """The device context (or the runner's own state) is unusable: fail every sequence with
        ``ContextFaultError`` and step no more until rebuild_session."""
        log.error("%s (%s: %s); waiting for a session rebuild", cause.value, type(exc).__name__, exc)
        with self._cond:
            self._poisoned = f"{type(exc).__name__}: {exc}"
            self._poisoned_cause = cause
            failing = list(self._active.values()) + self._pending
            self._active.clear()
            self._pending.clear()
            self.paged = None  # its memory is on the broken context; rebuild_session makes a new cache
            self.scheduler = None
        for seq in failing:
            seq.cache = None
            seq.sink(ContextFaultError(self._poisoned, cause))

    def _step_one(self, seq: _Sequence) -> None:
        """One unbatched step of a model without a paged forward: prefill, or decode one token."""
        if seq.id not in self._active:
            return
        from transformers import DynamicCache

        try:
            with torch.inference_mode():
                if seq.cache is None:
                    seq.cache = DynamicCache()
                    ids = torch.tensor([seq.context], dtype=torch.long, device=self.device)
                else:
                    ids = torch.tensor([[seq.generated[-1]]], dtype=torch.long, device=self.device)
                out = self.model(input_ids=ids, cache=seq.cache, use_cache=True, logits_to_keep=1)
                token = sample_next(
                    out.logits[0, -1].float(), seq.request.sampling, seq.generator, seq.adjust, seq.generated
                )
        except Exception as exc:
            self._fail(seq, exc)
            return
        self._advance(seq, token)

    def _advance(self, seq: _Sequence, token: int) -> None:
        seq.generated.append(token)
        sampling = seq.request.sampling
        # end-of-sequence and stop_token_ids end it (their text is not emitted); min_tokens keeps them from
        # being sampled before that (LogitsAdjuster), and stop strings are looked for only after it
        if (token in self.eos_token_ids and not sampling.ignore_eos) or token in sampling.stop_token_ids:
            self._finish(seq, FinishReason.STOP, seq.stop.flush(), token)
            return
        delta = seq.detok.push(token)
        emit, hit = seq.stop.feed(delta, armed=len(seq.generated) > sampling.min_tokens)
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
        if reason is not FinishReason.ABORT:
            self._offer_blocks(seq)
        self._drop(seq)
        seq.sink(self._chunk(seq, (token,) if token is not None else (), text, reason))

    def _drop(self, seq: _Sequence) -> None:
        """Forget a sequence: its scheduler slot, reservation and KV blocks are returned (step thread only)."""
        with self._cond:
            self._active.pop(seq.id, None)
            self._cond.notify_all()
        if self.scheduler is not None:
            self.scheduler.abort(seq.id)
        if self.paged is not None and seq.seq_id in self.paged.cache:
            self.paged.free(seq.seq_id)
        seq.cache = None
