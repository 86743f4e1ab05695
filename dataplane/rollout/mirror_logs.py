"""Read mirrored request logs (vLLM-style stream events, SGLang-style request records) into observations.

File
    JSON Lines (one JSON object per line; blank lines are skipped) or one JSON array of the same
    objects. A file may mix both record styles below. Timestamps are seconds (any epoch, as long as
    one request's timestamps share it); every number is strict and finite.

vLLM-style: one object per event, keyed by ``request_id`` and ``event``
    ``{"event": "arrival", "request_id": "r1", "ts": 100.0, ...metadata}``
        the request reached the server. Metadata (all optional): ``model``, ``model_version``,
        ``runtime`` (default ``"vllm"``), ``accelerator``, ``replica``, ``route``, ``queue_depth``,
        ``kv_usage`` (0-1), ``prompt_tokens``.
    ``{"event": "token", "request_id": "r1", "ts": 100.05, "token_ids": [791]}``
        one streamed chunk, one or more token ids.
    ``{"event": "finish", "request_id": "r1", "ts": 100.3, "finish_reason": "stop"}``
        the end. Optional: ``error`` (a message: the request failed), ``output_vector`` (numeric output
        of an embedding request, which streams no tokens), ``completion_tokens``.
    A request's events appear in time order, arrival first and finish last; other requests' events
    may interleave. ``finish_reason`` ``"abort"`` or ``"error"``, or an ``error``, mark a failure.

SGLang-style: one object per request, keyed by ``rid``
    ``{"rid": "r1", "created": 100.0, "stream": [{"t": 100.05, "output_ids": [791]}, ...],
    "meta_info": {"e2e_latency": 0.3, "prompt_tokens": 12, "completion_tokens": 3,
    "finish_reason": {"type": "stop"}}, ...metadata}``
        the same metadata fields as a vLLM arrival (``runtime`` defaults to ``"sglang"``);
        ``embedding`` instead of ``stream`` for numeric output; ``error`` or a finish reason of
        type ``"abort"`` mark a failure. ``e2e_latency`` is seconds, as SGLang reports it.

Derived observation fields
    ``latency_ms``: finish ts - arrival ts (vLLM) or ``e2e_latency`` (SGLang), in ms.
    ``ttft_ms``: first chunk ts - arrival ts (``created``).
    ``itl_ms``: for each chunk after the first, the gap since the previous chunk divided evenly over
    its tokens (a chunk of k tokens after a gap g gives k gaps of g/k: a server that batches its
    stream under load is not credited with faster decoding). The first chunk only sets ``ttft_ms``.
    ``output_tokens``: the chunks' token ids in order; ``completion_tokens``: their count unless given.

Errors name the file, the line (or array index) and the field:
``cand.jsonl:7: ts: 99.9 is earlier than the previous event of request 'r1' (cand.jsonl:5)``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelfleet.dataplane.rollout.observations import (
    Fraction,
    Label,
    NonNegFloat,
    NonNegInt,
    Observation,
    RolloutInputError,
    validation_problems,
)

Timestamp = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]
TokenIds = Annotated[list[Annotated[int, Field(strict=True)]], Field(min_length=1)]
Vector = list[Annotated[float, Field(strict=True, allow_inf_nan=False)]]
FAILED_REASONS = frozenset({"abort", "error"})
M = TypeVar("M", bound=BaseModel)


class _Metadata(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: Label | None = None
    model_version: Label | None = None
    runtime: Label | None = None
    accelerator: Label | None = None
    replica: Label | None = None
    route: Label | None = None
    queue_depth: NonNegInt | None = None
    kv_usage: Fraction | None = None
    prompt_tokens: NonNegInt | None = None


class VllmArrival(_Metadata):
    event: Literal["arrival"]
    request_id: Label
    ts: Timestamp


class VllmToken(BaseModel):
    model_config = ConfigDict(extra="ignore")

    event: Literal["token"]
    request_id: Label
    ts: Timestamp
    token_ids: TokenIds


class VllmFinish(BaseModel):
    model_config = ConfigDict(extra="ignore")

    event: Literal["finish"]
    request_id: Label
    ts: Timestamp
    finish_reason: Label | None = None
    error: Annotated[str, Field(strict=True)] | None = None
    output_vector: Vector | None = None
    completion_tokens: NonNegInt | None = None


class SglChunk(BaseModel):
    model_config = ConfigDict(extra="ignore")

    t: Timestamp
    output_ids: TokenIds


class SglFinishReason(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Label


class SglMetaInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    e2e_latency: NonNegFloat
    prompt_tokens: NonNegInt | None = None
    completion_tokens: NonNegInt | None = None
    finish_reason: SglFinishReason | None = None


class SglRecord(_Metadata):
    rid: Label
    created: Timestamp
    stream: list[SglChunk] = Field(default_factory=list)
    embedding: Vector | None = None
    meta_info: SglMetaInfo
    error: Annotated[str, Field(strict=True)] | None = None


@dataclass
class _Open:
    """A vLLM-style request between its arrival and its finish."""

    where: str
    arrival: VllmArrival
    last_ts: float
    last_where: str
    chunks: list[tuple[float, list[int]]] = field(default_factory=list)


def _records(text: str, name: str) -> Iterator[tuple[str, Any]]:
    """``(location, decoded object)`` for each record of a JSON array or JSON Lines text."""
    if text.lstrip().startswith("["):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RolloutInputError(f"{name}: not valid JSON: {exc}") from None
        for i, item in enumerate(doc):
            yield f"{name}[{i}]", item
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{name}:{number}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise RolloutInputError(f"{name}:{number}: not valid JSON: {exc.msg}") from None


def _validate(model: type[M], doc: Any, where: str) -> M:
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise RolloutInputError(f"{where}: {validation_problems(exc)}") from None


def _timing(start: float, chunks: list[tuple[float, list[int]]]) -> tuple[float | None, list[float] | None]:
    """TTFT and inter-token gaps in ms from the arrival time and the timed chunks."""
    if not chunks:
        return None, None
    ttft = (chunks[0][0] - start) * 1000
    gaps: list[float] = []
    for (prev, _), (ts, ids) in pairwise(chunks):
        gaps.extend([(ts - prev) * 1000 / len(ids)] * len(ids))
    return ttft, gaps


def _observation(meta: _Metadata, default_runtime: str, **fields: Any) -> Observation:
    return Observation(
        model=meta.model,
        model_version=meta.model_version,
        runtime=meta.runtime or default_runtime,
        accelerator=meta.accelerator,
        replica=meta.replica,
        route=meta.route,
        queue_depth=meta.queue_depth,
        kv_usage=meta.kv_usage,
        prompt_tokens=meta.prompt_tokens,
        **fields,
    )


def _check_output(where: str, request_id: str, obs: Observation) -> Observation:
    if obs.ok and obs.output_tokens is None and obs.output_vector is None:
        raise RolloutInputError(
            f"{where}: request {request_id!r} succeeded but has no output (token chunks or a vector)"
        )
    return obs


def _sglang(rec: SglRecord, where: str) -> Observation:
    chunks: list[tuple[float, list[int]]] = []
    prev = rec.created
    for i, chunk in enumerate(rec.stream):
        if chunk.t < prev:
            raise RolloutInputError(f"{where}: stream[{i}].t: {chunk.t} is earlier than the previous event")
        prev = chunk.t
        chunks.append((chunk.t, chunk.output_ids))
    if chunks and rec.embedding is not None:
        raise RolloutInputError(f"{where}: embedding: give stream or embedding, not both")
    reason = rec.meta_info.finish_reason
    ok = rec.error is None and (reason is None or reason.type not in FAILED_REASONS)
    tokens = [t for _, ids in chunks for t in ids] if chunks else None
    ttft, gaps = _timing(rec.created, chunks)
    obs = _observation(
        rec,
        "sglang",
        request_id=rec.rid,
        ok=ok,
        latency_ms=rec.meta_info.e2e_latency * 1000,
        output_tokens=tokens,
        output_vector=rec.embedding,
        ttft_ms=ttft,
        itl_ms=gaps,
        completion_tokens=rec.meta_info.completion_tokens
        if rec.meta_info.completion_tokens is not None
        else (len(tokens) if tokens is not None else None),
    )
    if rec.meta_info.prompt_tokens is not None and obs.prompt_tokens is None:
        obs = obs.model_copy(update={"prompt_tokens": rec.meta_info.prompt_tokens})
    return _check_output(where, rec.rid, obs)


def parse_mirror_log(text: str, name: str) -> list[Observation]:
    """The observations in one log's text, in the order their requests first appear; ``name`` labels errors."""
    done: dict[str, tuple[str, Observation]] = {}  # request id -> where it began, its observation
    open_: dict[str, _Open] = {}
    order: list[str] = []
    for where, doc in _records(text, name):
        if not isinstance(doc, dict):
            raise RolloutInputError(f"{where}: must be an object")
        if "rid" in doc:
            rec = _validate(SglRecord, doc, where)
            if rec.rid in done or rec.rid in open_:
                first = done[rec.rid][0] if rec.rid in done else open_[rec.rid].where
                raise RolloutInputError(f"{where}: rid: duplicate request {rec.rid!r} (also {first})")
            done[rec.rid] = (where, _sglang(rec, where))
            order.append(rec.rid)
            continue
        if "request_id" not in doc:
            raise RolloutInputError(f"{where}: request_id: is required (or rid, for an SGLang-style request record)")
        event = doc.get("event")
        if event == "arrival":
            arrival = _validate(VllmArrival, doc, where)
            rid = arrival.request_id
            if rid in done or rid in open_:
                first = done[rid][0] if rid in done else open_[rid].where
                raise RolloutInputError(f"{where}: request_id: duplicate arrival of {rid!r} (also {first})")
            open_[rid] = _Open(where=where, arrival=arrival, last_ts=arrival.ts, last_where=where)
            order.append(rid)
            continue
        step: VllmToken | VllmFinish
        if event == "token":
            step = _validate(VllmToken, doc, where)
        elif event == "finish":
            step = _validate(VllmFinish, doc, where)
        else:
            raise RolloutInputError(f"{where}: event: must be one of arrival, token, finish")
        rid = step.request_id
        if rid not in open_:
            state = f"finished at {done[rid][0]}" if rid in done else "has no arrival event before it"
            raise RolloutInputError(f"{where}: request_id: request {rid!r} {state}")
        current = open_[rid]
        if step.ts < current.last_ts:
            raise RolloutInputError(
                f"{where}: ts: {step.ts} is earlier than the previous event of request {rid!r} ({current.last_where})"
            )
        current.last_ts, current.last_where = step.ts, where
        if isinstance(step, VllmToken):
            current.chunks.append((step.ts, step.token_ids))
            continue
        if current.chunks and step.output_vector is not None:
            raise RolloutInputError(f"{where}: output_vector: request {rid!r} also streamed tokens")
        start = current.arrival.ts
        tokens = [t for _, ids in current.chunks for t in ids] if current.chunks else None
        ttft, gaps = _timing(start, current.chunks)
        ok = step.error is None and step.finish_reason not in FAILED_REASONS
        obs = _observation(
            current.arrival,
            "vllm",
            request_id=rid,
            ok=ok,
            latency_ms=(step.ts - start) * 1000,
            output_tokens=tokens,
            output_vector=step.output_vector,
            ttft_ms=ttft,
            itl_ms=gaps,
            completion_tokens=step.completion_tokens
            if step.completion_tokens is not None
            else (len(tokens) if tokens is not None else None),
        )
        done[rid] = (current.where, _check_output(where, rid, obs))
        del open_[rid]
    if open_:
        rid, current = next(iter(open_.items()))
        raise RolloutInputError(f"{current.where}: request {rid!r} has no finish event")
    return [done[rid][1] for rid in order]


def load_mirror_log(path: Path) -> list[Observation]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RolloutInputError(f"cannot read {path}: {exc.strerror}") from None
    return parse_mirror_log(text, str(path))
