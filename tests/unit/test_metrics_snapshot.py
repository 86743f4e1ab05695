"""Per-deployment metrics from two scrapes of each pod's Prometheus text."""

from __future__ import annotations

import pytest

from modelfleet.dataplane.engine.metrics import EngineMetrics
from modelfleet.operator.metrics_snapshot import parse, quantile, snapshot


def scrape_text(ok: int, cancelled: int, tokens: int, ttfts: list[float]) -> str:
    from prometheus_client import generate_latest

    m = EngineMetrics()  # the engine's own metric definitions, so names cannot drift apart
    m.requests.labels(outcome="ok").inc(ok)
    m.requests.labels(outcome="cancelled").inc(cancelled)
    m.generation_tokens.inc(tokens)
    for t in ttfts:
        m.ttft_seconds.observe(t)
    return generate_latest(m.registry).decode()


def test_rates_errors_and_p95_across_pods():
    prev = {"a": parse(scrape_text(10, 0, 100, [0.02] * 10)), "b": parse(scrape_text(0, 0, 0, []))}
    cur = {
        "a": parse(scrape_text(30, 2, 500, [0.02] * 10 + [0.03] * 20)),
        "b": parse(scrape_text(18, 0, 300, [0.3] * 18)),
    }
    snap = snapshot(prev, cur, 10.0, "2026-11-23T00:00:00Z")
    assert snap.requests_per_second == pytest.approx((22 + 18) / 10)
    assert snap.tokens_per_second == pytest.approx((400 + 300) / 10)
    assert snap.errors_by_kind == {"cancelled": 2}
    assert 0.25 <= snap.ttft_p95_seconds <= 0.5  # 18 of 38 new observations took 0.3 s


def test_restarted_pod_counts_from_zero_and_empty_histogram_has_no_p95():
    prev = {"a": parse(scrape_text(100, 0, 1000, []))}
    cur = {"a": parse(scrape_text(5, 0, 50, []))}
    snap = snapshot(prev, cur, 5.0, "t")
    assert snap.requests_per_second == pytest.approx(1.0)
    assert snap.ttft_p95_seconds is None
    assert quantile({}, 0.95) is None
