"""Decode throughput: the torch runner in-process versus the full local stack.

Target (issue #2): the stack (gateway -> sidecar -> engine over loopback HTTP)
should cost little next to the model itself. Both contenders run in the same
invocation, with the same prompts, greedy decoding and ``ignore_eos`` so every
stream generates exactly ``--tokens`` tokens.

    .venv/bin/python bench/decode_throughput.py [--tokens 128] [--concurrency 1 8]

Prints one table row per (contender, concurrency): aggregate decode tokens/s,
per-stream tokens/s, and median time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.prompts import PROMPTS  # noqa: E402
from modelfleet.dataplane.manifest import load_manifests  # noqa: E402
from modelfleet.dataplane.runners.base import ExecuteBatch, SamplingParams, SequenceRequest  # noqa: E402

MANIFEST = ROOT / "examples" / "smollm2-local.yaml"


async def one_in_process(runner, codec, i: int, tokens: int) -> tuple[int, float, float]:
    ids = codec.encode_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
    req = SequenceRequest(f"r{i}", tuple(ids), SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    start = time.perf_counter()
    first = None
    n = 0
    async for chunk in runner.execute(ExecuteBatch((req,))):
        if first is None and chunk.token_ids:
            first = time.perf_counter() - start
        n = chunk.completion_tokens
    return n, first or 0.0, time.perf_counter() - start


async def one_over_http(client, i: int, tokens: int) -> tuple[int, float, float]:
    start = time.perf_counter()
    first = None
    n = 0
    stream = await client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage:
            n = chunk.usage.completion_tokens
    return n, first or 0.0, time.perf_counter() - start


async def run_round(make, concurrency: int, tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    results = await asyncio.gather(*(make(i, tokens) for i in range(concurrency)))
    wall = time.perf_counter() - start
    total = sum(r[0] for r in results)
    return {
        "tokens": total,
        "wall_s": wall,
        "agg_tps": total / wall,
        "per_stream_tps": statistics.mean(r[0] / r[2] for r in results),
        "ttft_p50_ms": statistics.median(r[1] for r in results) * 1000,
    }


async def bench_in_process(levels: list[int], tokens: int) -> list[tuple[str, int, dict[str, float]]]:
    from modelfleet.dataplane.runners.registry import create_runner
    from modelfleet.dataplane.runners.torch import TorchRunner

    (dep,) = load_manifests(MANIFEST)
    runner = create_runner(dep.spec)  # exactly what the engine builds from the same manifest
    assert isinstance(runner, TorchRunner)
    await runner.load_weights(None, dep.spec.model.source)
    codec = runner.codec
    await run_round(lambda i, t: one_in_process(runner, codec, i, t), 1, 8)  # warm-up
    rows = []
    for c in levels:
        rows.append(
            ("runner in-process", c, await run_round(lambda i, t: one_in_process(runner, codec, i, t), c, tokens))
        )
    await runner.close()
    return rows


async def bench_stack(levels: list[int], tokens: int) -> list[tuple[str, int, dict[str, float]]]:
    import tempfile

    import openai

    from tests.integration.conftest import start_stack, stop_stack

    stack = start_stack(MANIFEST, Path(tempfile.mkdtemp(prefix="bench-")))
    try:
        client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0)
        await run_round(lambda i, t: one_over_http(client, i, t), 1, 8)  # warm-up
        rows = []
        for c in levels:
            rows.append(("full stack (HTTP)", c, await run_round(lambda i, t: one_over_http(client, i, t), c, tokens)))
        await client.close()
        return rows
    finally:
        stop_stack(stack)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    rows = asyncio.run(bench_in_process(args.concurrency, args.tokens))
    rows += asyncio.run(bench_stack(args.concurrency, args.tokens))
    print(
        f"\nmachine: {platform.node()} {os.cpu_count()} cpus, python {platform.python_version()}; tokens/stream={args.tokens}"
    )
    print(
        f"{'contender':<20} {'streams':>7} {'tokens':>7} {'wall s':>8} {'agg tok/s':>10} {'tok/s/stream':>13} {'TTFT p50 ms':>12}"
    )
    for name, c, r in rows:
        print(
            f"{name:<20} {c:>7} {int(r['tokens']):>7} {r['wall_s']:>8.2f} {r['agg_tps']:>10.1f} {r['per_stream_tps']:>13.1f} {r['ttft_p50_ms']:>12.1f}"
        )


if __name__ == "__main__":
    main()
