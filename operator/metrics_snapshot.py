"""Fold the pods' Prometheus metrics into one per-deployment snapshot (pure).

``snapshot(previous, current, seconds)`` takes two scrapes of every pod (the
parsed counters and the time-to-first-token histogram) and returns rates over
the interval, failures by kind and the p95 time to first token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from modelfleet.dataplane.spec import MetricsSnapshot

REQUESTS = "modelfleet_engine_requests"
TOKENS = "modelfleet_engine_generation_tokens"
TTFT = "modelfleet_engine_time_to_first_token_seconds"


@dataclass
class Scrape:
    """The counters of one pod at one moment."""

    requests_by_outcome: dict[str, float] = field(default_factory=dict)
    tokens: float = 0.0
    ttft_buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count


def parse(text: str) -> Scrape:
    out = Scrape()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == REQUESTS and sample.name.endswith("_total"):
                out.requests_by_outcome[sample.labels.get("outcome", "")] = sample.value
            elif family.name == TOKENS and sample.name.endswith("_total"):
                out.tokens = sample.value
            elif family.name == TTFT and sample.name.endswith("_bucket"):
                out.ttft_buckets[float(sample.labels["le"])] = sample.value
    return out


def _delta(cur: float, prev: float) -> float:
    return cur - prev if cur >= prev else cur  # a restarted pod starts its counters again


def quantile(buckets: Mapping[float, float], q: float) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated within its bucket."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if upper == float("inf"):
                return lower
            span = count - below
            return lower + (upper - lower) * ((rank - below) / span if span else 0.0)
        lower, below = upper, count
    return lower


def snapshot(previous: Mapping[str, Scrape], current: Mapping[str, Scrape], seconds: float, at: str) -> MetricsSnapshot:
    requests = tokens = 0.0
    errors: dict[str, int] = {}
    ttft: dict[float, float] = {}
    for pod, cur in current.items():
        prev = previous.get(pod, Scrape())
        for outcome, value in cur.requests_by_outcome.items():
            d = _delta(value, prev.requests_by_outcome.get(outcome, 0.0))
            requests += d
            if outcome != "ok" and d:
                errors[outcome] = errors.get(outcome, 0) + int(d)
        tokens += _delta(cur.tokens, prev.tokens)
        for le, value in cur.ttft_buckets.items():
            ttft[le] = ttft.get(le, 0.0) + _delta(value, prev.ttft_buckets.get(le, 0.0))
    span = max(seconds, 1e-9)
    p95 = quantile(ttft, 0.95)
    return MetricsSnapshot(
        requests_per_second=round(requests / span, 3),
        tokens_per_second=round(tokens / span, 3),
        errors_by_kind=errors,
        ttft_p95_seconds=None if p95 is None else round(p95, 4),
        collected_at=at,
    )
