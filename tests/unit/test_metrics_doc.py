"""docs/metrics.md lists exactly what the processes export, and the dashboard queries only that.

Each process's registry is built for real (``GatewayMetrics``, ``SidecarMetrics``,
``EngineMetrics`` with a runner reporting every ``RUNTIME_STATS`` key), and its
metric families are read back with ``registry.collect()``: what a scrape of
``/metrics`` would list, not what a regex finds in the source.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from modelfleet.dataplane.engine.metrics import RUNTIME_STATS, EngineMetrics, watch_runner
from modelfleet.dataplane.gateway.metrics import GatewayMetrics
from modelfleet.dataplane.sidecar.metrics import SidecarMetrics

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "metrics.md"
DASHBOARDS = sorted((ROOT / "helm" / "modelfleet" / "dashboards").glob("*.json"))

Exported = dict[str, tuple[str, tuple[str, ...]]]  # exposed name -> (type, labels)


class EveryStat:
    """A runner whose runtime_stats() reports every key the engine exports."""

    def runtime_stats(self) -> dict[str, float]:
        return dict.fromkeys(RUNTIME_STATS, 0.0)


def _exposed(name: str, kind: str) -> str:
    return name + "_total" if kind == "counter" else name


def _from_registry(holder: Any, registry: CollectorRegistry, extra_labels: tuple[str, ...] = ()) -> Exported:
    """Name, type and labels of every family the registry yields; labels from the metric objects."""
    labels = {
        _exposed(m._name, m._type): tuple(m._labelnames)
        for m in vars(holder).values()
        if isinstance(m, MetricWrapperBase)
    }
    out: Exported = {}
    for family in registry.collect():
        name = _exposed(family.name, family.type)
        out[name] = (family.type, labels.get(name, extra_labels))
    return out


def exported() -> dict[str, Exported]:
    gateway, sidecar, engine = GatewayMetrics(), SidecarMetrics(), EngineMetrics()
    watch_runner(engine, EveryStat())
    out = {
        "gateway": _from_registry(gateway, gateway.registry),
        "sidecar": _from_registry(sidecar, sidecar.registry),
        "engine": _from_registry(engine, engine.registry, extra_labels=("tier",)),
    }
    runtime = {_exposed(name, kind) for name, kind, _ in RUNTIME_STATS.values()}
    assert runtime <= set(out["engine"]), "a RUNTIME_STATS entry was not collected"
    return out


def documented() -> dict[str, Exported]:
    """The tables of docs/metrics.md, per '## <process>' section."""
    out: dict[str, Exported] = {}
    section = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            continue
        row = re.match(r"\|\s*`(modelfleet_[a-z_]+)`\s*\|\s*(counter|gauge|histogram)\s*\|([^|]*)\|", line)
        if row and section is not None:
            labels = tuple(re.findall(r"`([a-z_]+)`", row.group(3)))
            out.setdefault(section, {})[row.group(1)] = (row.group(2), labels)
    return out


def test_docs_list_every_metric_each_process_exports():
    code, doc = exported(), documented()
    assert set(doc) == set(code), "docs/metrics.md needs one table section per process (## gateway, ## sidecar, ...)"
    for process in code:
        missing = sorted(set(code[process]) - set(doc[process]))
        stale = sorted(set(doc[process]) - set(code[process]))
        rows = "\n".join(
            f"| `{n}` | {code[process][n][0]} | {', '.join(f'`{x}`' for x in code[process][n][1]) or '-'} | ... |"
            for n in missing
        )
        assert not missing, f"{process} exports metrics docs/metrics.md does not list; add:\n{rows}"
        assert not stale, f"docs/metrics.md lists {process} metrics the code does not export: {stale}"
        for name, (kind, labels) in code[process].items():
            assert doc[process][name] == (kind, labels), f"{name}: code says {kind} {labels}, doc {doc[process][name]}"


def test_operator_exports_no_metrics_of_its_own():
    # docs/metrics.md says so; a metric added there needs a section and this test changed
    for path in (ROOT / "operator").rglob("*.py"):
        assert not re.search(r"\b(Counter|Gauge|Histogram|Summary)\(\s*\"modelfleet_", path.read_text()), path


def test_issue_9_metrics_exist():
    every = {name for process in exported().values() for name in process}
    for name in (
        "modelfleet_gateway_time_to_first_token_seconds",
        "modelfleet_engine_time_to_first_token_seconds",
        "modelfleet_engine_inter_token_latency_seconds",
        "modelfleet_gateway_request_seconds",
        "modelfleet_engine_request_seconds",
        "modelfleet_engine_queued_requests",
        "modelfleet_engine_kv_blocks_used",
        "modelfleet_engine_prefix_cache_hit_tokens_total",
        "modelfleet_engine_prefix_cache_queried_tokens_total",
        "modelfleet_gateway_prompt_tokens_total",
        "modelfleet_gateway_completion_tokens_total",
        "modelfleet_engine_cost_usd_total",
        "modelfleet_sidecar_failures_total",
        "modelfleet_engine_rebuilds_total",
        "modelfleet_sidecar_routed_total",
    ):
        assert name in every, name


def test_inter_token_latency_splits_a_chunk_into_its_tokens():
    metrics = EngineMetrics()
    metrics.observe_inter_token(0.09, 3)  # three tokens in one chunk, 90 ms after the previous one
    metrics.observe_inter_token(0.02, 1)
    value = metrics.registry.get_sample_value
    assert value("modelfleet_engine_inter_token_latency_seconds_count") == 4
    assert value("modelfleet_engine_inter_token_latency_seconds_sum") == pytest.approx(0.11)
    assert value("modelfleet_engine_inter_token_latency_seconds_bucket", {"le": "0.02"}) == 1
    assert value("modelfleet_engine_inter_token_latency_seconds_bucket", {"le": "0.04"}) == 4


# ------------------------------------------------------------------ dashboards


def series(code: dict[str, Exported]) -> set[str]:
    """Every series name Prometheus stores for the exported metrics."""
    out: set[str] = set()
    for process in code.values():
        for name, (kind, _) in process.items():
            if kind == "histogram":
                out |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            else:
                out.add(name)
    return out


def panel_exprs(path: Path) -> list[tuple[str, str]]:
    def walk(panels: list[dict[str, Any]]) -> list[tuple[str, str]]:
        out = []
        for panel in panels:
            out += [(panel.get("title", ""), t["expr"]) for t in panel.get("targets", []) if "expr" in t]
            out += walk(panel.get("panels", []))  # panels inside collapsed rows
        return out

    return walk(json.loads(path.read_text())["panels"])


def test_dashboards_query_only_exported_metrics():
    known = series(exported())
    assert DASHBOARDS
    for path in DASHBOARDS:
        exprs = panel_exprs(path)
        assert exprs, path
        for title, expr in exprs:
            used = set(re.findall(r"\bmodelfleet_[a-z_]+", expr))
            assert used, f"{path.name} panel {title!r} queries no ModelFleet metric: {expr}"
            assert used <= known, f"{path.name} panel {title!r} queries what no process exports: {used - known}"


def test_dashboard_shows_cache_kv_spillover_cost_rebuilds_and_inter_token_latency():
    used = {m for path in DASHBOARDS for _, expr in panel_exprs(path) for m in re.findall(r"modelfleet_[a-z_]+", expr)}
    for name in (
        "modelfleet_engine_prefix_cache_hit_tokens_total",
        "modelfleet_engine_kv_blocks_used",
        "modelfleet_sidecar_spilled_total",
        "modelfleet_engine_cost_usd_total",
        "modelfleet_engine_rebuilds_total",
        "modelfleet_engine_inter_token_latency_seconds_bucket",
        "modelfleet_sidecar_routed_total",
    ):
        assert name in used, f"{name} is on no dashboard panel"


async def test_engine_stream_observes_inter_token_latency():
    """EngineService._chunks: the first token is time to first token, each later one an inter-token gap."""
    from modelfleet.dataplane.engine.service import EngineService
    from modelfleet.dataplane.runners.base import TokenChunk

    class Core:
        metrics = EngineMetrics()

        async def generate(self, sequence: object):
            for i, ids in enumerate([(1,), (2, 3), (), (4,)]):
                yield TokenChunk("r", ids, "x" * len(ids), 5, i + 1, "stop" if i == 3 else None)

    service = EngineService.__new__(EngineService)
    service.core = Core()  # type: ignore[assignment]
    prep = type("Prep", (), {"sequence": type("Seq", (), {"prompt_token_ids": [0] * 5})()})()
    assert len([c async for c in service._chunks(prep)]) == 4  # type: ignore[arg-type]
    value = Core.metrics.registry.get_sample_value
    assert value("modelfleet_engine_time_to_first_token_seconds_count") == 1
    assert value("modelfleet_engine_inter_token_latency_seconds_count") == 3  # tokens 2, 3 and 4
