"""The soak of issue #9 (4), sized down: bench/soak.py's driver and verdict, fewer clients, shorter.

``make soak`` runs the full size (500 clients x 60 s); the numbers are in bench/RESULTS.md.
Here: 100 streaming clients x 15 s against gateway + sidecar in front of a fake upstream (it
stands in for the engines, so the load lands on ModelFleet's own processes), and 8 clients x 15 s
through the real engine (SmolLM2 int8). Same rules: no error but 429, every stream ends in
[DONE], and no ModelFleet process's RSS grows by 10% from the first to the last 10 seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is scripts, not an installed package (`python -m pytest` has it already)
    sys.path.insert(0, str(ROOT))

from bench.soak import run_soak  # noqa: E402


@pytest.mark.slow
def test_100_streaming_clients_for_15_s_through_gateway_and_sidecar() -> None:
    result = run_soak("fake", clients=100, duration=15, warmup=3, window=10)
    print(result.table())
    assert {r.name for r in result.rows if not r.instrument} == {"gateway", "sidecar"}
    assert result.load.ok >= 1000, "the soak did not load the stack"
    assert not result.failures(), result.table()


@pytest.mark.slow
@pytest.mark.model
def test_8_streaming_clients_for_15_s_through_the_real_engine() -> None:
    result = run_soak("engine", clients=8, duration=15, warmup=5, window=10, max_tokens=8)
    print(result.table())
    roles = {r.name for r in result.rows}
    assert {"launcher (up)", "gateway", "sidecar soak", "engine soak/0"} <= roles, roles
    assert result.load.ok >= 8
    assert not result.failures(), result.table()


def test_the_verdict_catches_growth_errors_and_cut_streams() -> None:
    """The rules themselves, on made-up numbers: a soak that cannot fail proves nothing."""
    from collections import Counter

    from bench.soak import Load, Row, SoakResult

    def result(load: Load, growth_kb: float) -> SoakResult:
        rows = [Row("gateway", 100_000, 100_000 + growth_kb, False), Row("fake upstream 0", 10_000, 20_000, True)]
        return SoakResult("fake", 10, 15, 10, load, rows, 10.0)

    ok = Load(requests=10, ok=10, latencies=[0.01] * 10)
    assert result(ok, 9_000).failures() == []  # 9% growth; the instrument's 100% is not judged
    assert any("gateway: RSS grew 10.0%" in f for f in result(ok, 10_000).failures())
    throttled = Load(requests=12, ok=10, statuses=Counter({"429": 2}), latencies=[0.01] * 10)
    assert result(throttled, 0).failures() == []
    broken = Load(requests=12, ok=10, statuses=Counter({"502": 1, "ClientPayloadError": 1}), latencies=[0.01] * 10)
    assert "errors other than 429" in result(broken, 0).failures()[0]
    cut = Load(requests=11, ok=10, incomplete=1, latencies=[0.01] * 10)
    assert "without [DONE]" in result(cut, 0).failures()[0]
