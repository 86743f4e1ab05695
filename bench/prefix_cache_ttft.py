"""Time to first token with and without the prefix cache on a shared-prefix workload (issue #3).

A multi-tenant chat workload: ``--tenants`` tenants, each with its own long
system prompt, and ``--requests`` requests per tenant with short, different
user questions, sent ``--concurrency`` at a time in a fixed interleaved order.
Two deployments of the same model run in one ``modelfleet up`` (identical but
for ``engine.prefixCaching``), and the same request list goes through the full
stack (gateway -> sidecar -> engine) to each in turn, greedy with a few output
tokens. The first request of every tenant is a miss either way; after that
the cached deployment computes only the question.

    .venv/bin/python bench/prefix_cache_ttft.py [--tenants 4] [--requests 8] [--concurrency 4] [--tokens 8]

Prints TTFT p50/p90, mean end-to-end latency and requests/s per deployment, and
the engine's prefix-cache hit rate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402
import yaml  # noqa: E402

from bench.prompts import QUESTIONS  # noqa: E402
from bench.streams import stream_ttft  # noqa: E402
from tests.integration.conftest import engine_url, metric, start_stack, stop_stack  # noqa: E402

MANIFEST = ROOT / "examples" / "smollm2-local.yaml"
BUSINESSES = ["a bakery in Lyon", "a bicycle repair shop", "a public library", "a mountain hotel", "a train operator"]


def system_prompt(business: str) -> str:
    rules = " ".join(
        f"Rule {i}: be accurate about {business}, stay polite, keep answers short, and never invent facts."
        for i in range(1, 16)
    )
    return f"You are the assistant of {business}. {rules}"


def write_manifest(path: Path, concurrency: int) -> None:
    base = yaml.safe_load(MANIFEST.read_text())
    docs = []
    for name, caching in (("cached", True), ("uncached", False)):
        doc = yaml.safe_load(yaml.safe_dump(base))
        doc["metadata"]["name"] = name
        doc["spec"]["model"]["name"] = f"smollm2-{name}"
        doc["spec"]["model"].pop("aliases", None)
        engine = doc["spec"].setdefault("engine", {})
        engine.update(maxNumSeqs=max(concurrency, 1), prefixCaching=caching, maxPrefillTokensPerStep=512)
        docs.append(doc)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


async def one(client: openai.AsyncOpenAI, model: str, tenant: int, question: str, tokens: int) -> tuple[float, float]:
    system = system_prompt(BUSINESSES[tenant % len(BUSINESSES)])
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return await stream_ttft(client, model, messages, tokens)


async def run_workload(client: openai.AsyncOpenAI, model: str, args: argparse.Namespace) -> dict[str, float]:
    work = [(t, QUESTIONS[r % len(QUESTIONS)]) for r in range(args.requests) for t in range(args.tenants)]
    gate = asyncio.Semaphore(args.concurrency)

    async def limited(tenant: int, question: str) -> tuple[float, float]:
        async with gate:
            return await one(client, model, tenant, question, args.tokens)

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(t, q) for t, q in work))
    wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    return {
        "requests": len(results),
        "ttft_p50_ms": statistics.median(ttft) * 1000,
        "ttft_p90_ms": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))] * 1000,
        "e2e_mean_ms": statistics.mean(r[1] for r in results) * 1000,
        "req_per_s": len(results) / wall,
    }


async def main_async(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    manifest = workdir / "prefix.yaml"
    write_manifest(manifest, args.concurrency)
    stack = start_stack(manifest, workdir)
    rows = []
    try:
        async with openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0) as client:
            for name in ("uncached", "cached"):
                model = f"smollm2-{name}"
                await one(client, model, 99, "Hello", 2)  # warm-up on a tenant outside the workload
                engine = engine_url(stack, name)
                hits0 = metric(engine, "modelfleet_engine_prefix_cache_hit_tokens_total")
                queries0 = metric(engine, "modelfleet_engine_prefix_cache_queried_tokens_total")
                row = await run_workload(client, model, args)
                queried = metric(engine, "modelfleet_engine_prefix_cache_queried_tokens_total") - queries0
                hits = metric(engine, "modelfleet_engine_prefix_cache_hit_tokens_total") - hits0
                row["hit_rate"] = hits / queried if queried else 0.0
                rows.append((name, row))
    finally:
        stop_stack(stack)
    print(
        f"\nmachine: {platform.node()} {os.cpu_count()} cpus, python {platform.python_version()}; "
        f"{args.tenants} tenants x {args.requests} requests, concurrency {args.concurrency}, {args.tokens} tokens out"
    )
    print(
        f"{'deployment':<10} {'reqs':>5} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'e2e mean ms':>12} {'req/s':>7} {'hit rate':>9}"
    )
    for name, r in rows:
        print(
            f"{name:<10} {int(r['requests']):>5} {r['ttft_p50_ms']:>12.1f} {r['ttft_p90_ms']:>12.1f} "
            f"{r['e2e_mean_ms']:>12.1f} {r['req_per_s']:>7.2f} {r['hit_rate']:>9.1%}"
        )
    (_, miss), (_, hit) = rows
    print(f"TTFT p50 speed-up with the prefix cache: {miss['ttft_p50_ms'] / hit['ttft_p50_ms']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--requests", type=int, default=8, help="requests per tenant")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
