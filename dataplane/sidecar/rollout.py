"""Canary and shadow traffic at the sidecar, and the observations the release gate judges.

The rollout plan (dataplane/rollout/plan.py) arrives as a JSON file that the
controller (the launcher locally, the operator in a cluster) writes; the
sidecar reads it again whenever it changes (checked at most once a second, on
the request path, so no task is needed) and a missing or empty file means no
rollout. While a plan is in force, each request is routed:

- Canary: served by the candidate with probability ``weight`` percent (else by
  the baseline as usual); of the candidate's requests, ``mirrorPercent``
  percent are also sent to the baseline in the background, so both sides have
  an answer to compare;
- Shadow: served by the baseline; ``mirrorPercent`` percent are also sent to
  the candidate in the background. A mirrored answer is recorded, never
  returned.

Both sides of a request get one observation each (the gate's Observation
format, joined by request id): ok, latency, time to first token and
inter-token gaps as the sidecar saw them, and the output: for greedy requests
(temperature 0) a fingerprint of the generated text (a 64-bit blake2b, in
``output_tokens``: equal texts give equal fingerprints, so the gate's exact
comparison applies); embeddings give their vectors (compared within the
gate's tolerance); sampled generations give no output to compare. Mirrors are
bounded (``MAX_MIRRORS`` in flight; beyond that a mirror is dropped and
counted) and observations are kept per rollout id in bounded buffers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from modelfleet.dataplane.rollout.plan import RolloutPlan
from modelfleet.dataplane.spec import RolloutStrategy

log = logging.getLogger(__name__)

QUEUE_DEPTH_HEADER = "x-modelfleet-queue-depth"  # set by the engine: requests waiting when this one arrived
KV_USAGE_HEADER = "x-modelfleet-kv-usage"  # set by the engine: fraction of its KV blocks in use then
MAX_OBSERVATIONS = 20_000  # per side and rollout
MAX_MIRRORS = 32  # mirrored requests in flight per sidecar
BASELINE, CANDIDATE = "baseline", "candidate"


@dataclass(frozen=True)
class Route:
    serve: str  # BASELINE or CANDIDATE
    mirror: str | None  # the other side, when this request is mirrored


def fingerprint(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def comparable(body: dict[str, Any]) -> bool:
    """Greedy generation (same input, same output) or embeddings; sampled text cannot be compared."""
    if "input" in body:  # embeddings
        return True
    temperature = body.get("temperature")
    return isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0


@dataclass
class Capture:
    """What one side answered, read from the bytes as they pass (SSE or one JSON body)."""

    request_id: str
    compare: bool
    started: float = field(default_factory=time.perf_counter)
    status: int = 200
    streaming: bool = False
    _buffer: bytes = b""
    _text: list[str] = field(default_factory=list)
    _vector: list[float] | None = None
    _token_times: list[float] = field(default_factory=list)
    _error: bool = False
    _usage: dict[str, Any] = field(default_factory=dict)
    queue_depth: int | None = None
    kv_usage: float | None = None

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if not self.streaming:
            return
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._line(line.strip())

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        try:
            event = json.loads(payload)
        except ValueError:
            self._error = True
            return
        if not isinstance(event, dict):
            return
        if "error" in event:
            self._error = True
        self._take(event, streamed=True)

    def _take(self, body: dict[str, Any], streamed: bool) -> None:
        if isinstance(body.get("usage"), dict):
            self._usage = body["usage"]
        for choice in body.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") if streamed else choice.get("message")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(text, str) and text:
                self._text.append(text)
                self._token_times.append(time.perf_counter())
        data = body.get("data")
        if isinstance(data, list):  # embeddings: every vector, in order
            vector: list[float] = []
            for item in data:
                emb = item.get("embedding") if isinstance(item, dict) else None
                if isinstance(emb, list):
                    vector.extend(float(x) for x in emb if isinstance(x, int | float))
            self._vector = vector or None

    def read_headers(self, headers: Mapping[str, str]) -> None:
        """The engine's queue depth at admission and KV usage (x-modelfleet-queue-depth, x-modelfleet-kv-usage)."""
        with contextlib.suppress(TypeError, ValueError):
            self.queue_depth = int(headers.get(QUEUE_DEPTH_HEADER, ""))
        with contextlib.suppress(TypeError, ValueError):
            kv = float(headers.get(KV_USAGE_HEADER, ""))
            self.kv_usage = kv if 0.0 <= kv <= 1.0 else None

    def observation(self, side: Mapping[str, str | None], replica: str | None, route: str) -> dict[str, Any]:
        """The gate's Observation of this answer; ``replica`` None when no upstream answered at all."""
        done = time.perf_counter()
        if not self.streaming and self._buffer:
            try:
                body = json.loads(self._buffer)
            except ValueError:
                self._error = True
            else:
                if isinstance(body, dict):
                    self._take(body, streamed=False)
        ok = self.status == 200 and not self._error
        obs: dict[str, Any] = {
            "request_id": self.request_id,
            "ok": ok,
            "latency_ms": round((done - self.started) * 1000, 3),
            "route": route,
        }
        if replica:  # the gate's field is a non-empty label
            obs["replica"] = replica
        for key in ("model_version", "runtime", "accelerator"):
            if side.get(key):
                obs[key] = side[key]
        if self.queue_depth is not None and self.queue_depth >= 0:
            obs["queue_depth"] = self.queue_depth
        if self.kv_usage is not None:
            obs["kv_usage"] = self.kv_usage
        if ok and self.compare:
            if self._vector is not None:
                obs["output_vector"] = self._vector
            else:
                obs["output_tokens"] = [fingerprint("".join(self._text))]
        if self.streaming and self._token_times:
            obs["ttft_ms"] = round((self._token_times[0] - self.started) * 1000, 3)
            gaps = [b - a for a, b in zip(self._token_times, self._token_times[1:], strict=False)]
            obs["itl_ms"] = [round(g * 1000, 3) for g in gaps]
        for key in ("prompt_tokens", "completion_tokens"):
            value = self._usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                obs[key] = value
        return obs


class RolloutTraffic:
    """The plan in force (read from ``path``), the routing draw, and the observations per side."""

    def __init__(self, path: Path, *, seed: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.plan: RolloutPlan | None = None
        self._rng = random.Random(seed)
        self._clock = clock
        self._checked = -1.0
        self._stamp: tuple[float, int] | None = None
        self._turn = 0
        self.observations: dict[str, deque[dict[str, Any]]] = {
            BASELINE: deque(maxlen=MAX_OBSERVATIONS),
            CANDIDATE: deque(maxlen=MAX_OBSERVATIONS),
        }
        self.mirrors = asyncio.Semaphore(MAX_MIRRORS)
        self.tasks: set[asyncio.Task[None]] = set()

    def refresh(self, force: bool = False) -> RolloutPlan | None:
        """The plan in force; the file is looked at no more than once a second."""
        now = self._clock()
        if not force and now - self._checked < 1.0:
            return self.plan
        self._checked = now
        try:
            st = self.path.stat()
            stamp: tuple[float, int] | None = (st.st_mtime, st.st_size)
        except OSError:
            stamp = None
        if stamp == self._stamp:
            return self.plan
        self._stamp = stamp
        plan = self._read() if stamp is not None else None
        if plan is None or self.plan is None or plan.id != self.plan.id:
            for buffer in self.observations.values():
                buffer.clear()
        if plan != self.plan:
            log.info("rollout plan: %s", plan.to_wire() if plan else "none")
        self.plan = plan
        return plan

    def _read(self) -> RolloutPlan | None:
        try:
            text = self.path.read_text()
            if not text.strip():
                return None
            return RolloutPlan.model_validate(json.loads(text))
        except (OSError, ValueError, ValidationError) as exc:
            log.error("rollout plan %s is not usable (%s); no rollout traffic", self.path, type(exc).__name__)
            return None

    def route(self) -> Route | None:
        """Where this request goes, or None without a plan."""
        plan = self.refresh()
        if plan is None:
            return None
        mirrored = self._rng.random() * 100 < plan.mirror_percent
        if plan.strategy is RolloutStrategy.SHADOW:
            return Route(BASELINE, CANDIDATE if mirrored else None)
        if self._rng.random() * 100 < plan.weight:
            return Route(CANDIDATE, BASELINE if mirrored else None)
        return Route(BASELINE, None)

    def candidate_url(self) -> str:
        assert self.plan is not None
        self._turn += 1
        return self.plan.candidate_peers[self._turn % len(self.plan.candidate_peers)].rstrip("/")

    def side(self, side: str) -> dict[str, str | None]:
        """What the plan says of one side: model_version, runtime and accelerator (observation fields)."""
        plan = self.plan
        if plan is None:
            return {}
        if side == BASELINE:
            return {
                "model_version": plan.baseline_version,
                "runtime": plan.baseline_runtime,
                "accelerator": plan.baseline_accelerator,
            }
        return {
            "model_version": plan.candidate_version,
            "runtime": plan.candidate_runtime,
            "accelerator": plan.candidate_accelerator,
        }

    def record(self, side: str, plan_id: str, obs: dict[str, Any]) -> None:
        if self.plan is not None and self.plan.id == plan_id:
            self.observations[side].append(obs)

    def snapshot(self, plan_id: str | None) -> dict[str, Any]:
        plan = self.refresh(force=True)
        if plan is None or (plan_id is not None and plan_id != plan.id):
            return {"id": plan.id if plan else None, BASELINE: [], CANDIDATE: []}
        return {
            "id": plan.id,
            BASELINE: list(self.observations[BASELINE]),
            CANDIDATE: list(self.observations[CANDIDATE]),
        }


def request_id(headers: dict[str, str]) -> str:
    return headers.get("x-request-id") or uuid.uuid4().hex
