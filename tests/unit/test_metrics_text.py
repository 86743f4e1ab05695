"""The tests' metric() helper reads exactly the series it names (tests/metrics_text.py)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tests.metrics_text import series_value


def page() -> str:
    r = CollectorRegistry()
    Gauge("modelfleet_engine_kv_blocks", "total", registry=r).set(64)
    Gauge("modelfleet_engine_kv_blocks_used", "used", registry=r).set(5)
    steps = Counter("modelfleet_engine_steps", "steps", ["tier"], registry=r)
    steps.labels("local").inc(7)
    steps.labels("hosted").inc(2)
    Counter("modelfleet_engine_rebuilds", "rebuilds", ["cause"], registry=r)  # no series yet
    Histogram("modelfleet_engine_e2e_seconds", "latency", registry=r).observe(0.2)
    return generate_latest(r).decode()


def test_a_name_matches_itself_not_the_names_it_prefixes() -> None:
    assert series_value(page(), "modelfleet_engine_kv_blocks") == 64  # not 64 + the 5 of kv_blocks_used
    assert series_value(page(), "modelfleet_engine_kv_blocks_used") == 5


def test_labels_select_and_the_rest_are_summed() -> None:
    assert series_value(page(), 'modelfleet_engine_steps_total{tier="local"}') == 7
    assert series_value(page(), "modelfleet_engine_steps_total") == 9
    assert series_value(page(), 'modelfleet_engine_steps_total{tier="nowhere"}') == 0
    assert series_value(page(), "modelfleet_engine_e2e_seconds_count") == 1


def test_a_metric_with_no_series_yet_reads_zero_and_an_unknown_name_fails() -> None:
    assert series_value(page(), 'modelfleet_engine_rebuilds_total{cause="manual"}') == 0
    with pytest.raises(LookupError):
        series_value(page(), "modelfleet_engine_steps")  # the counter's series is steps_total
    with pytest.raises(LookupError):
        series_value(page(), "modelfleet_engine_kv_block")
