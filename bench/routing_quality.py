"""Routing quality over 4 real engines with prefix caching (issue #5 (b)).

Targets: PrefixAffinity at least 2x lower p90 time to first token than
RoundRobin, and no worse p90 than sglang-router's cache-aware policy.

The workload is multi-tenant chat: ``--tenants`` tenants (8), each with its
own system prompt of about 300 tokens (12 rules of ~25 tokens, 19 full KV
blocks of 16 tokens), and ``--requests`` requests per tenant with short user
questions, in a seeded order that interleaves the tenants, sent
``--concurrency`` at a time, greedy, ``--tokens`` output tokens each.

Each contender gets its own fresh ``modelfleet up`` of a manifest derived from
``examples/smollm2-local.yaml``: ``replicas: 4``, ``prefixCaching: true``,
``maxNumSeqs: 4``, and ``numKvBlocks: 96`` per replica. That is the sizing
that makes routing matter: a tenant's prompt takes about 20 blocks (19 full
blocks of the system prompt are shareable, then the question and the output),
so 96 blocks hold 4 tenants' prefixes, or fewer while up to 4 sequences of
other tenants run and pin theirs. A replica that sees all 8 tenants in turn
(RoundRobin, LeastOutstanding) evicts each prefix before the tenant comes
back, least recently used first; one that sees about 2 tenants
(PrefixAffinity) keeps them. ``prefixChars`` is set to the shortest system
prompt plus its role line, so the sidecar keys on the tenant, not the
question.

Contenders, each through the same client code:

- ``RoundRobin``, ``LeastOutstanding``, ``PrefixAffinity``: the full stack,
  gateway -> sidecar -> engine, with ``spec.routing.policy`` set.
- ``sglang-router``: ``sglang-router launch --policy cache_aware`` with the
  4 engines of its own fresh stack as ``--worker-urls`` (the engines answer its
  ``/health``, ``/server_info`` and ``/model_info`` probes); the client talks
  to the router's port, so this path has one hop less than ours.

Before each run every engine gets one short request outside the workload
(torch warm-up); the hit rate is the sum over the 4 engines of
``modelfleet_engine_prefix_cache_hit_tokens_total`` over
``..._queried_tokens_total`` during the run. The engines run with
``OMP_NUM_THREADS=1``: 4 engines share the machine's cores, and whatever is
computed on one replica is not computed on another, so on a 2-core machine
the cache hits show up in throughput as well as in TTFT.

    .venv/bin/python bench/routing_quality.py [--tenants 8] [--requests 12] [--concurrency 8] [--tokens 8]

Needs the ``bench`` extra for the sglang-router contender (``make bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402
import yaml  # noqa: E402

from bench.prompts import QUESTIONS  # noqa: E402
from bench.streams import stream_ttft  # noqa: E402
from modelfleet.dataplane.launcher import free_port  # noqa: E402
from tests.integration.conftest import Stack, get, metric, start_stack, stop_stack  # noqa: E402

MANIFEST = ROOT / "examples" / "smollm2-local.yaml"
NAME = "routing"
MODEL = "smollm2-routing"
REPLICAS = 4
POLICIES = ("RoundRobin", "LeastOutstanding", "PrefixAffinity")
SGLANG = "sglang-router"
CONTENDERS = (*POLICIES, SGLANG)
AFFINITY_VS_RR_MIN = 2.0
BUSINESSES = [
    "a bakery in Lyon",
    "a bicycle repair shop",
    "a public library",
    "a mountain hotel",
    "a train operator",
    "a dental clinic",
    "a city swimming pool",
    "a furniture store",
    "a language school",
    "a car rental agency",
    "a vegan restaurant",
    "a museum of science",
]


def system_prompt(tenant: int) -> str:
    business = BUSINESSES[tenant % len(BUSINESSES)]
    rules = " ".join(
        f"Rule {i}: be accurate about {business}, stay polite, keep answers short, and never invent facts."
        for i in range(1, 13)
    )
    return f"You are the assistant of {business}. {rules}"


def prefix_chars(tenants: int) -> int:
    """The sidecar's key (``system\\n<prompt>\\n...``) up to the shortest system prompt: the tenant, not the question."""
    return len("system\n") + min(len(system_prompt(t)) for t in range(tenants))


def write_manifest(path: Path, policy: str, args: argparse.Namespace) -> None:
    doc = yaml.safe_load(MANIFEST.read_text())
    doc["metadata"]["name"] = NAME
    doc["spec"]["model"]["name"] = MODEL
    doc["spec"]["model"].pop("aliases", None)
    doc["spec"]["replicas"] = REPLICAS
    doc["spec"].setdefault("engine", {}).update(
        maxNumSeqs=args.max_num_seqs,
        prefixCaching=True,
        kvBlockSize=16,
        numKvBlocks=args.kv_blocks,
        maxPrefillTokensPerStep=512,
    )
    doc["spec"]["routing"] = {"policy": policy, "prefixChars": prefix_chars(args.tenants), "loadBound": args.load_bound}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def engine_urls(stack: Stack) -> list[str]:
    """The engines' addresses, from their "engine NAME/i listening on HOST:PORT" log lines."""
    urls: dict[int, str] = {}
    for line in stack.output().splitlines():
        for i in range(REPLICAS):
            if f"engine {NAME}/{i} listening on" in line:
                urls[i] = "http://" + line.rsplit(" ", 1)[1]
    if len(urls) != REPLICAS:
        raise SystemExit(f"found {len(urls)} engine addresses in {stack.log}, expected {REPLICAS}")
    return [urls[i] for i in range(REPLICAS)]


def sidecar_urls(stack: Stack) -> list[str]:
    """The sidecars' addresses, from the launcher's "NAME/sidecar-i: pid N, URL" lines."""
    return [ln.rsplit(" ", 1)[1] for ln in stack.output().splitlines() if f"{NAME}/sidecar-" in ln and ", http" in ln]


def routed_reasons(sidecars: list[str]) -> dict[str, float]:
    """modelfleet_sidecar_routed_total summed over the sidecars, by reason."""
    out: dict[str, float] = {}
    for url in sidecars:
        _, text = get(url + "/metrics")
        for line in text.splitlines():
            if line.startswith("modelfleet_sidecar_routed_total{") and 'reason="' in line:
                reason = line.split('reason="', 1)[1].split('"', 1)[0]
                out[reason] = out.get(reason, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def workload(args: argparse.Namespace) -> list[tuple[int, str]]:
    """Rounds of every tenant once, each round in its own seeded order, questions drawn with the same seed."""
    rng = random.Random(args.seed)
    work = []
    for _ in range(args.requests):
        tenants = list(range(args.tenants))
        rng.shuffle(tenants)
        work += [(t, rng.choice(QUESTIONS)) for t in tenants]
    return work


async def one(client: openai.AsyncOpenAI, tenant: int | None, question: str, tokens: int) -> tuple[float, float]:
    messages = [{"role": "user", "content": question}]
    if tenant is not None:
        messages.insert(0, {"role": "system", "content": system_prompt(tenant)})
    return await stream_ttft(client, MODEL, messages, tokens)


async def one_traced(client: openai.AsyncOpenAI, tenant: int, question: str, tokens: int) -> tuple[float, float, str]:
    """As ``one``, timed the same way, plus the replica that served it (the sidecar's x-modelfleet-replica)."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system_prompt(tenant)},
        {"role": "user", "content": question},
    ]
    start = time.perf_counter()
    first = None
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    async for chunk in raw.parse():
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
    end = time.perf_counter() - start
    return (first if first is not None else end), end, raw.headers.get("x-modelfleet-replica", "?")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run_workload(base_url: str, engines: list[str], args: argparse.Namespace) -> dict[str, float]:
    for url in engines:  # torch warm-up on every engine, outside the workload and its tenants
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as warm:
            await one(warm, None, "Hello", 2)
    hits0 = sum(metric(u, "modelfleet_engine_prefix_cache_hit_tokens_total") for u in engines)
    per_engine0 = [metric(u, "modelfleet_engine_prefix_cache_queried_tokens_total") for u in engines]
    queried0 = sum(per_engine0)
    gate = asyncio.Semaphore(args.concurrency)
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=600) as client:

        async def limited(tenant: int, question: str) -> tuple[float, float, str]:
            async with gate:
                if args.dump is not None:
                    return await one_traced(client, tenant, question, args.tokens)
                return (*await one(client, tenant, question, args.tokens), "")

        start = time.perf_counter()
        work = workload(args)
        results = await asyncio.gather(*(limited(t, q) for t, q in work))
        wall = time.perf_counter() - start
    if args.dump is not None:  # per request, in workload order: for reading where a tail comes from
        rows = [
            {"i": i, "tenant": t, "ttft_ms": r[0] * 1000, "e2e_ms": r[1] * 1000, "replica": r[2]}
            for i, ((t, _), r) in enumerate(zip(work, results, strict=True))
        ]
        with args.dump.open("a") as out:
            out.write(json.dumps({"contender": args.current, "requests": rows}) + "\n")
    hits = sum(metric(u, "modelfleet_engine_prefix_cache_hit_tokens_total") for u in engines) - hits0
    per_engine = [metric(u, "modelfleet_engine_prefix_cache_queried_tokens_total") for u in engines]
    queried = sum(per_engine) - queried0
    ttft = [r[0] for r in results]
    return {
        "requests": len(results),
        "ttft_p50_ms": statistics.median(ttft) * 1000,
        "ttft_p90_ms": pct(ttft, 0.9) * 1000,
        "e2e_mean_ms": statistics.mean(r[1] for r in results) * 1000,
        "req_per_s": len(results) / wall,
        "wall_s": wall,
        "hit_rate": hits / queried if queried else 0.0,
        **{
            f"share:{i}": (b - a) / queried if queried else 0.0
            for i, (a, b) in enumerate(zip(per_engine0, per_engine, strict=True))
        },
    }


def _chat_ok(url: str) -> bool:
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "stream": True}
    ).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status == 200 and b"[DONE]" in resp.read()
    except (OSError, urllib.error.HTTPError):
        return False


def start_sglang_router(engines: list[str], workdir: Path) -> tuple[str, subprocess.Popen[bytes], Path]:
    exe = Path(sys.executable).parent / "sglang-router"
    if not exe.exists():
        found = shutil.which("sglang-router")
        if found is None:
            raise SystemExit("sglang-router is not installed: `make bench` installs the bench extra")
        exe = Path(found)
    port, metrics_port = free_port(), free_port()
    cmd = [str(exe), "launch", "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *engines]
    cmd += ["--policy", "cache_aware", "--log-level", "warn"]
    cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env |= {"NO_PROXY": "*", "HF_HUB_OFFLINE": "1"}
    log = workdir / "sglang-router.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not _chat_ok(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"sglang-router did not serve a chat completion; log {log}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    print(f"  {SGLANG}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    return url, proc, log


def run_contender(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    manifest = workdir / f"{name}.yaml"
    write_manifest(manifest, name if name in POLICIES else "RoundRobin", args)
    stack = start_stack(manifest, workdir, env={"OMP_NUM_THREADS": "1"})
    router: subprocess.Popen[bytes] | None = None
    try:
        engines = engine_urls(stack)
        base_url = stack.base_url
        if name == SGLANG:
            base_url, router, _ = start_sglang_router(engines, workdir)
        row = asyncio.run(run_workload(base_url, engines, args))
        if name in POLICIES:
            row |= {f"routed:{k}": v for k, v in routed_reasons(sidecar_urls(stack)).items()}
        return row
    finally:
        if router is not None:
            router.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                router.wait(15)
            if router.poll() is None:
                router.kill()
        stop_stack(stack, timeout=60)


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "absent"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--requests", type=int, default=12, help="requests per tenant")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8, help="output tokens per request")
    parser.add_argument("--max-num-seqs", type=int, default=4, help="engine.maxNumSeqs per replica")
    parser.add_argument("--kv-blocks", type=int, default=96, help="engine.numKvBlocks per replica")
    parser.add_argument("--load-bound", type=float, default=1.25, help="routing.loadBound of PrefixAffinity")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--dump", type=Path, help="append each contender's per-request TTFTs (JSON lines) here")
    args = parser.parse_args()
    if args.tenants > len(BUSINESSES):
        parser.error(f"--tenants: at most {len(BUSINESSES)}")
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    workdir = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    rows: dict[str, dict[str, float]] = {}
    for name in args.contenders:
        print(f"{name}: starting", file=sys.stderr, flush=True)
        args.current = name
        rows[name] = r = run_contender(name, args, workdir)
        print(
            f"{name}: TTFT p50 {r['ttft_p50_ms']:.0f} ms, p90 {r['ttft_p90_ms']:.0f} ms, {r['req_per_s']:.2f} req/s,"
            f" hit rate {r['hit_rate']:.1%}, {r['wall_s']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\nmachine: {platform.node()} {os.cpu_count()} cpus, python {platform.python_version()}; load average before"
        f" {load_before}, after {load_after}; sglang-router {_version('sglang-router')}"
    )
    print(
        f"{REPLICAS} engines (SmolLM2-135M int8, OMP_NUM_THREADS=1, maxNumSeqs {args.max_num_seqs}, numKvBlocks"
        f" {args.kv_blocks} x 16 tokens, prefixCaching); {args.tenants} tenants x {args.requests} requests,"
        f" concurrency {args.concurrency}, {args.tokens} tokens out, seed {args.seed}; prefixChars"
        f" {prefix_chars(args.tenants)}, loadBound {args.load_bound}"
    )
    print(
        f"{'contender':<18} {'requests':>8} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'e2e mean ms':>12} {'req/s':>7} {'hit rate':>9}"
    )
    for name, r in rows.items():
        print(
            f"{name:<18} {int(r['requests']):>8} {r['ttft_p50_ms']:>12.0f} {r['ttft_p90_ms']:>12.0f}"
            f" {r['e2e_mean_ms']:>12.0f} {r['req_per_s']:>7.2f} {r['hit_rate']:>9.1%}"
        )
    for name, r in rows.items():
        shares = " ".join(f"{r[f'share:{i}']:.0%}" for i in range(REPLICAS))
        routed = ", ".join(f"{k[7:]} {v:.0f}" for k, v in r.items() if k.startswith("routed:"))
        print(
            f"  {name}: prompt tokens per engine {shares}" + (f"; sidecar routing reasons: {routed}" if routed else "")
        )
    aff = rows.get("PrefixAffinity")
    if aff is None:
        return
    print("targets:")
    if "RoundRobin" in rows:
        ratio = rows["RoundRobin"]["ttft_p90_ms"] / aff["ttft_p90_ms"]
        verdict = "MET" if ratio >= AFFINITY_VS_RR_MIN else "MISSED"
        print(f"  p90 TTFT RoundRobin / PrefixAffinity = {ratio:.2f}x (>= {AFFINITY_VS_RR_MIN:g}x: {verdict})")
    if SGLANG in rows:
        theirs = rows[SGLANG]["ttft_p90_ms"]
        verdict = "MET" if aff["ttft_p90_ms"] <= theirs else "MISSED"
        print(f"  p90 TTFT PrefixAffinity {aff['ttft_p90_ms']:.0f} ms vs {SGLANG} {theirs:.0f} ms (<=: {verdict})")


if __name__ == "__main__":
    main()
