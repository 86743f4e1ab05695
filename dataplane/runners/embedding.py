"""The torch embedding runner: a sentence-transformers bi-encoder (MiniLM) in-process.

Embeddings are computed as sentence-transformers computes them for MiniLM
(``modules.json``: Transformer -> Pooling(mean) -> Normalize): the encoder's
last hidden states, averaged over the real tokens (the attention mask keeps
padding out), then scaled to unit L2 norm. transformers' ``AutoModel`` runs the
encoder; sentence-transformers itself is not needed.

One worker thread owns the model, so requests are computed one after another
and never on the event loop. Inside a request the inputs are sorted by length
and run in batches of ``max_batch`` (less padding per batch), then put back in
request order. This runner serves the engine's embedding and rerank modes; it
never generates tokens (``execute`` fails).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from modelfleet.dataplane.runners.base import (
    EMBEDDINGS,
    RERANK,
    DeviceContext,
    ExecuteBatch,
    RunnerCapabilities,
    RunnerError,
    RunnerFamily,
    RuntimeKind,
    SessionRebuildCause,
    TokenChunk,
    TransportKind,
    WeightSource,
)
from modelfleet.dataplane.runners.torch import pick_device, pick_dtype
from modelfleet.dataplane.runners.weights import resolve_hf_dir
from modelfleet.dataplane.spec import Device, DType

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import numpy.typing as npt
import torch

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 32


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors where the mask is 1: (batch, seq, dim), (batch, seq) -> (batch, dim)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return summed / counts


def l2_normalize(vectors: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit length (as torch.nn.functional.normalize, eps 1e-12)."""
    return torch.nn.functional.normalize(vectors, p=2, dim=1)


def max_input_tokens(model_dir: Path, tokenizer: Any, config: Any) -> int:
    """The longest input the model embeds, special tokens included.

    sentence-transformers' ``max_seq_length`` (256 for all-MiniLM-L6-v2: the
    length it was trained on) when the folder has one, else the tokenizer's
    and the position table's limit.
    """
    limits = [int(getattr(config, "max_position_embeddings", 512))]
    st_config = model_dir / "sentence_bert_config.json"
    if st_config.exists():
        value = json.loads(st_config.read_text()).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            limits.append(value)
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        limits.append(model_max)
    return min(limits)


def cpu_threads(configured: int | None) -> int:
    """Math threads on CPU: runtime.cpuThreads, else OMP_NUM_THREADS, else every core this process may use.

    An encoder forward is compute-bound (no decode steps that only read the weights), so it takes every core.
    """
    if configured:
        return configured
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) or 1


class EmbeddingCodec:
    """The tokenizer as the engine's TextCodec (chat has no template here: messages are joined)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.encode_text("\n".join(m.get("content", "") for m in messages))

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])


class EmbeddingRunner:
    """A bi-encoder (BERT-family, mean pooling, unit-norm output) on one worker thread."""

    runtime_kind = RuntimeKind.TORCH
    transport_kind = TransportKind.IN_PROCESS
    gil_pinned = True
    # ModelFleet implements /v1/embeddings and /v1/rerank on the vectors it computes (engine/pooling.py)
    capabilities = RunnerCapabilities(
        family=RunnerFamily.TOKEN_GENERATOR, endpoints=frozenset({EMBEDDINGS, RERANK}), embeds=True
    )

    def __init__(
        self,
        *,
        dtype: DType = DType.AUTO,
        device: Device = Device.AUTO,
        cpu_threads: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self._dtype_choice = dtype
        self._device_choice = device
        self._cpu_threads = cpu_threads
        self.max_batch = max_batch
        self.device = "cpu"
        self.progress = "starting"
        self.model: Any = None
        self.tokenizer: Any = None
        self.codec: EmbeddingCodec | None = None
        self.dimensions = 0
        self.max_input_tokens = 0
        self.vocab_size = 0
        self._source: WeightSource | None = None
        # one thread owns the model: requests run one after another, off the event loop
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedding-runner")

    # ---- lifecycle -------------------------------------------------------

    async def load_weights(self, ctx: DeviceContext | None, source: WeightSource) -> None:
        self._source = source
        await self._run(self._load_sync, ctx, source)

    def _set_progress(self, text: str) -> None:
        self.progress = text
        log.info("%s", text)

    def _load_sync(self, ctx: DeviceContext | None, source: WeightSource) -> None:
        from transformers import AutoModel, AutoTokenizer

        started = time.monotonic()
        self.device = ctx.device if ctx else pick_device(self._device_choice)
        dtype = pick_dtype(self._dtype_choice, self.device)
        if self.device == "cpu":
            torch.set_num_threads(cpu_threads(self._cpu_threads))
        self._set_progress("resolving weights")
        path = resolve_hf_dir(source, self._set_progress)
        self._set_progress(f"loading encoder from {path.name} ({dtype}, {self.device})")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model: Any = AutoModel.from_pretrained(path, dtype=dtype)
        model.to(self.device)
        model.eval()
        self.tokenizer = tokenizer
        self.codec = EmbeddingCodec(tokenizer)
        self.model = model
        self.dimensions = int(model.config.hidden_size)
        self.vocab_size = int(model.config.vocab_size)
        self.max_input_tokens = max_input_tokens(path, tokenizer, model.config)
        self._set_progress(
            f"ready (loaded in {time.monotonic() - started:.1f} s; {self.dimensions} dimensions, "
            f"inputs up to {self.max_input_tokens} tokens)"
        )

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def rebuild_session(self, cause: SessionRebuildCause) -> None:
        log.warning("rebuilding embedding session: %s", cause.value)
        self.model = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if self._source is not None:
            await self._run(self._load_sync, DeviceContext(self.device), self._source)

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    # ---- embedding -------------------------------------------------------

    async def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text with the model's special tokens ([CLS] ... [SEP]), never truncated."""
        return await asyncio.to_thread(self._tokenize_sync, list(texts))  # fast tokenizer, releases the GIL

    def _tokenize_sync(self, texts: list[str]) -> list[list[int]]:
        if self.tokenizer is None:
            raise RunnerError("the model is not loaded")
        encoded = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)
        return [list(ids) for ids in encoded["input_ids"]]

    async def embed(self, token_ids: Sequence[Sequence[int]]) -> npt.NDArray[np.float32]:
        """Unit-norm embeddings, one row per input, in input order."""
        result: npt.NDArray[np.float32] = await self._run(self._embed_sync, [list(ids) for ids in token_ids])
        return result

    def _embed_sync(self, token_ids: list[list[int]]) -> npt.NDArray[np.float32]:
        model = self.model
        if model is None:
            raise RunnerError("the model is not loaded")
        out = np.zeros((len(token_ids), self.dimensions), dtype=np.float32)
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        pad = int(self.tokenizer.pad_token_id or 0)
        with torch.inference_mode():
            for start in range(0, len(order), self.max_batch):
                rows = order[start : start + self.max_batch]
                width = max(len(token_ids[i]) for i in rows)
                ids = torch.full((len(rows), width), pad, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    n = len(token_ids[i])
                    ids[r, :n] = torch.tensor(token_ids[i], dtype=torch.long)
                    mask[r, :n] = 1
                ids, mask = ids.to(self.device), mask.to(self.device)
                hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
                vectors = l2_normalize(mean_pool(hidden.float(), mask))
                out[rows] = vectors.cpu().numpy()
        return out

    # ---- protocol --------------------------------------------------------

    async def execute(self, batch: ExecuteBatch) -> AsyncIterator[TokenChunk]:
        raise RunnerError("an embedding model does not generate text")
        yield  # pragma: no cover  (makes this an async generator)

    def runtime_stats(self) -> dict[str, float]:
        return {}
