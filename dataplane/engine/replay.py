"""`modelfleet replay`: run a workload through the real scheduler on a simulated clock.

No model runs: a tick is one scheduler step, prefill chunks and decodes take
exactly one tick, and a sequence leaves when it has produced ``max_new_tokens``
tokens. What remains is the scheduler's own behaviour (admission, queueing,
chunked prefill, decode fairness, KV reservations), tick by tick, so a change to
the policy shows up as a changed trace. The trace is integers and strings only
and its sha256 (``totals.fingerprint``) is the same on every machine and Python
version, which lets tests pin a whole run in one string.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelfleet.dataplane.batching.scheduler import SchedRequest, Scheduler, SchedulerConfig

Count = Annotated[int, Field(strict=True, ge=1)]
Tick = Annotated[int, Field(strict=True, ge=0)]


class WorkloadError(ValueError):
    """A workload that cannot be replayed, with the offending field named."""


class Capacity(BaseModel):
    model_config = ConfigDict(extra="ignore")

    kv_blocks: Count
    block_tokens: Count
    max_active: Count
    prefill_tokens_per_tick: Count
    decode_tokens_per_tick: Count | None = None
    aging_ticks: Count = SchedulerConfig.aging_steps
    starvation_ticks: Count = SchedulerConfig.starvation_steps

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            kv_blocks=self.kv_blocks,
            block_tokens=self.block_tokens,
            max_active=self.max_active,
            prefill_tokens_per_step=self.prefill_tokens_per_tick,
            decode_tokens_per_step=self.decode_tokens_per_tick,
            aging_steps=self.aging_ticks,
            starvation_steps=self.starvation_ticks,
        )


class WorkloadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: Annotated[str, Field(strict=True, min_length=1)]
    arrival_tick: Tick
    prompt_tokens: Count
    max_new_tokens: Count
    priority: Annotated[int, Field(strict=True)] = 0


class Workload(BaseModel):
    model_config = ConfigDict(extra="ignore")

    capacity: Capacity
    requests: list[WorkloadRequest]


def _location(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        parts.append(f"[{item}]" if isinstance(item, int) else ("." if parts else "") + item)
    return "".join(parts) or "<root>"


def _message(err: Any) -> str:
    kind = err["type"]
    if kind == "missing":
        return "is required"
    if kind == "greater_than_equal":
        return f"must be >= {err['ctx']['ge']}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "must be an integer"
    if kind in ("model_type", "dict_type"):
        return "must be an object"
    return str(err["msg"])


def parse_workload(doc: Any) -> Workload:
    """Validate a decoded workload document; :class:`WorkloadError` names the field that is wrong."""
    try:
        workload = Workload.model_validate(doc)
    except ValidationError as exc:
        problems = [f"{_location(tuple(e['loc']))}: {_message(e)}" for e in exc.errors(include_url=False)]
        raise WorkloadError("; ".join(problems)) from None
    seen: dict[str, int] = {}
    for i, req in enumerate(workload.requests):
        if req.id in seen:
            raise WorkloadError(f"requests[{i}].id: duplicate id {req.id!r} (also requests[{seen[req.id]}])")
        seen[req.id] = i
    probe = Scheduler(workload.capacity.scheduler_config())
    for i, req in enumerate(workload.requests):
        need = probe.blocks_needed(req.prompt_tokens + req.max_new_tokens)
        if need > workload.capacity.kv_blocks:
            raise WorkloadError(
                f"requests[{i}]: needs {need} KV blocks, capacity.kv_blocks is {workload.capacity.kv_blocks}"
            )
    return workload


def load_workload(path: Path) -> Workload:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkloadError(f"cannot read workload {path}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"{path}: not valid JSON: {exc}") from None
    return parse_workload(doc)


def replay(workload: Workload) -> dict[str, Any]:
    """Run the workload to the tick in which its last request completes; the report as a JSON-ready dict."""
    cap = workload.capacity
    config = cap.scheduler_config()
    sched = Scheduler(config)
    arrivals: dict[int, list[WorkloadRequest]] = {}
    for req in workload.requests:
        arrivals.setdefault(req.arrival_tick, []).append(req)
    last_arrival = max(arrivals, default=-1)
    # Each tick with an active sequence computes at least one prompt token or decodes at least one
    # token, and a tick with nothing active admits something if anything waits; so this bound is
    # only reached by a scheduler bug.
    limit = last_arrival + 2 + sum(r.prompt_tokens + r.max_new_tokens for r in workload.requests)

    rows: list[dict[str, Any]] = []
    remaining = len(workload.requests)
    peak = 0
    tick = 0
    while remaining:
        if tick >= limit:
            raise RuntimeError(f"replay did not finish within {limit} ticks: a scheduler bug")
        for req in arrivals.get(tick, ()):
            sched.add(SchedRequest(req.id, req.prompt_tokens, req.max_new_tokens, req.priority))
        admitted = sched.admit()
        peak = max(peak, sched.reserved_blocks)  # before this tick's completions hand blocks back
        plan = sched.plan()
        sched.complete(plan)
        remaining -= len(sched.last_finished)
        rows.append(
            {
                "tick": tick,
                "admitted": admitted,
                "prefill_tokens": plan.prefill_tokens,
                "prefill": [[id, start, n] for id, start, n in plan.prefill],
                "decoded": list(plan.decode),
                "completed": list(sched.last_finished),
                "queued": sched.waiting,
                "active": sched.active,
                "kv_blocks_used": sched.reserved_blocks,
            }
        )
        tick += 1

    ticks = len(rows)
    counts: dict[str, Any] = {
        "completed": sum(len(r["completed"]) for r in rows),
        "ticks": ticks,
        "peak_kv_blocks": peak,
        "ticks_with_queue": sum(1 for r in rows if r["queued"]),
        "ticks_at_full_active": sum(1 for r in rows if r["active"] == cap.max_active),
        "prompt_tokens": sum(r["prefill_tokens"] for r in rows),
        "decode_tokens": sum(r.max_new_tokens for r in workload.requests),
        "blocks_returned_at_end": sched.free_blocks,
    }
    canonical = json.dumps({"ticks": rows, "totals": counts}, sort_keys=True, separators=(",", ":"))
    decode_steps = sum(len(r["decoded"]) for r in rows)

    def ratio(num: float, den: float) -> float:
        return round(num / den, 6) if den else 0.0

    totals = {
        **counts,
        "peak_kv_percent": ratio(100 * peak, cap.kv_blocks),
        "prefill_utilization": ratio(counts["prompt_tokens"], ticks * cap.prefill_tokens_per_tick),
        "decode_utilization": ratio(decode_steps, ticks * config.decode_width),
        "kv_utilization": ratio(sum(r["kv_blocks_used"] for r in rows), ticks * cap.kv_blocks),
        "fingerprint": hashlib.sha256(canonical.encode("ascii")).hexdigest(),
    }
    capacity = {
        "kv_blocks": cap.kv_blocks,
        "block_tokens": cap.block_tokens,
        "max_active": cap.max_active,
        "prefill_tokens_per_tick": cap.prefill_tokens_per_tick,
        "decode_tokens_per_tick": config.decode_width,
        "aging_ticks": cap.aging_ticks,
        "starvation_ticks": cap.starvation_ticks,
    }
    return {"capacity": capacity, "ticks": rows, "totals": totals}


def replay_file(input_path: Path, output_path: Path) -> dict[str, Any]:
    """Replay the workload in ``input_path`` and write the report to ``output_path``; the report."""
    report = replay(load_workload(input_path))
    output_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
