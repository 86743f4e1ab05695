"""The release gate: judge a candidate against a baseline on the same requests. Pure and deterministic.

Rules, in the order the report lists them:

1. Join baseline and candidate observations by ``request_id``; requests on one side only are counted,
   not judged. Everything below is over the matched requests, ordered by id, so the input order
   never changes the report.
2. Rollback signals (breakage: take the candidate out of traffic):
   - ``output_mismatch``: among requests both sides served successfully, the share whose outputs
     differ is above ``max_mismatch_rate``. Token ids must be equal; vectors must be equal within the
     tolerance that applies to the candidate observation (``GatePolicy.tolerance_for``).
   - ``error_rate``: candidate error rate minus baseline error rate is above ``max_error_rate_increase``.
3. Hold signals (not proven good: keep the candidate where it is and look):
   - ``latency_p95``, ``ttft_p95``, ``itl_p95``, ``kv_usage_p95``: candidate p95 / baseline p95 above the
     policy ratio. Measured over requests both sides served successfully and that carry the field on
     both sides; a signal with no such request is not compared (unless required, below).
   - ``matched_traffic``: fewer matched requests than ``min_matched``.
   - ``<field>_evidence``: a field in ``policy.require`` is missing from some matched successful
     request on either side.
4. Any rollback signal: ``rollback``; else any hold signal: ``hold``; else ``promote``.

p95 is the nearest-rank percentile (the ceil(0.95 n)-th smallest value), so it is always an observed
value and needs no interpolation. Reported numbers are rounded to 6 decimals and the report is a
plain JSON-ready dict; :func:`render_report` serializes it with sorted keys, so equal inputs give
byte-identical reports that diff cleanly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from modelfleet.dataplane.rollout.observations import GatePolicy, Observation

Decision = Literal["promote", "hold", "rollback"]

# ratio signals: report name, observation field, policy threshold attribute
LATENCY_SIGNALS: tuple[tuple[str, str, str], ...] = (
    ("latency_p95", "latency_ms", "max_latency_p95_ratio"),
    ("ttft_p95", "ttft_ms", "max_ttft_p95_ratio"),
    ("itl_p95", "itl_ms", "max_itl_p95_ratio"),
    ("kv_usage_p95", "kv_usage", "max_kv_usage_p95_ratio"),
)

# what a failing signal means for whoever picks up the report
TRIAGE: dict[str, tuple[str, str]] = {
    "output_mismatch": ("roll back the candidate and stop mirroring to it", "model-runtime"),
    "error_rate": ("roll back the candidate and stop mirroring to it", "serving-oncall"),
    "latency_p95": ("hold the rollout at its current traffic share", "performance"),
    "ttft_p95": ("hold the rollout at its current traffic share", "performance"),
    "itl_p95": ("hold the rollout at its current traffic share", "performance"),
    "kv_usage_p95": ("hold the rollout at its current traffic share", "scheduler-capacity"),
    "matched_traffic": ("hold and keep mirroring until enough requests are matched", "release-manager"),
    "evidence": ("hold until the missing signal is recorded on both sides", "telemetry"),
}

Pair = tuple[Observation, Observation]


@dataclass(frozen=True)
class Comparison:
    """How a matched pair's outputs compare; ``None`` fields when the pair was not compared."""

    compared: bool
    match: bool
    rule: str | None = None  # the tolerance used for vectors
    max_abs_diff: float | None = None


def _round(x: float) -> float:
    return round(x, 6)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def p95(values: Sequence[float]) -> float | None:
    """Nearest-rank 95th percentile; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[(95 * len(ordered) + 99) // 100 - 1]


def compare_outputs(policy: GatePolicy, base: Observation, cand: Observation) -> Comparison:
    if not (base.ok and cand.ok):
        return Comparison(compared=False, match=True)
    if base.output_tokens is not None and cand.output_tokens is not None:
        return Comparison(compared=True, match=base.output_tokens == cand.output_tokens)
    if base.output_vector is not None and cand.output_vector is not None:
        rule, tol = policy.tolerance_for(cand)
        if len(base.output_vector) != len(cand.output_vector):
            return Comparison(compared=True, match=False, rule=rule)
        worst = 0.0
        match = True
        for b, c in zip(base.output_vector, cand.output_vector, strict=True):
            diff = abs(c - b)
            worst = max(worst, diff)
            if diff > tol.abs_tol + tol.rel_tol * abs(b):
                match = False
        return Comparison(compared=True, match=match, rule=rule, max_abs_diff=_round(worst))
    # one side produced tokens and the other a vector: not the same kind of output
    return Comparison(compared=True, match=False)


def _values(pairs: Sequence[Pair], field: str, side: int) -> list[float]:
    out: list[float] = []
    for pair in pairs:
        value = getattr(pair[side], field)
        if isinstance(value, list):
            out.extend(value)
        else:
            out.append(float(value))
    return out


def _ratio_metric(pairs: Sequence[Pair], field: str) -> dict[str, Any]:
    """p95 on both sides over the successful pairs carrying ``field`` on both sides."""
    ok = [p for p in pairs if p[0].ok and p[1].ok]
    have = [p for p in ok if getattr(p[0], field) is not None and getattr(p[1], field) is not None]
    base, cand = p95(_values(have, field, 0)), p95(_values(have, field, 1))
    ratio: float | None = None
    if base is not None and cand is not None:
        if base > 0:
            ratio = _round(cand / base)
        elif cand == 0:
            ratio = 1.0
    return {
        "baseline_p95": None if base is None else _round(base),
        "candidate_p95": None if cand is None else _round(cand),
        "ratio": ratio,
        "requests": len(have),
        "coverage": _round(len(have) / len(ok)) if ok else 0.0,
    }


def summarize(pairs: Sequence[Pair], comparisons: Sequence[Comparison]) -> dict[str, Any]:
    """The metrics of a group of matched pairs (all of them, or one segment)."""
    matched = len(pairs)
    compared = sum(c.compared for c in comparisons)
    mismatches = sum(c.compared and not c.match for c in comparisons)
    base_errors = sum(not p[0].ok for p in pairs)
    cand_errors = sum(not p[1].ok for p in pairs)
    base_rate = base_errors / matched if matched else 0.0
    cand_rate = cand_errors / matched if matched else 0.0
    summary: dict[str, Any] = {
        "matched": matched,
        "compared": compared,
        "mismatches": mismatches,
        "mismatch_rate": _round(mismatches / compared) if compared else 0.0,
        "baseline_errors": base_errors,
        "candidate_errors": cand_errors,
        "baseline_error_rate": _round(base_rate),
        "candidate_error_rate": _round(cand_rate),
        "error_rate_increase": _round(cand_rate - base_rate),
    }
    for name, field, _ in LATENCY_SIGNALS:
        summary[name] = _ratio_metric(pairs, field)
    return summary


SEGMENT_KEYS: dict[str, Callable[[Pair], str]] = {
    "runtime": lambda p: p[1].runtime or "unknown",
    "accelerator": lambda p: p[1].accelerator or "unknown",
    "model_version": lambda p: f"{p[0].model_version or 'unknown'}->{p[1].model_version or 'unknown'}",
}


def _segments(pairs: Sequence[Pair], comparisons: Sequence[Comparison]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for dimension, key in SEGMENT_KEYS.items():
        groups: dict[str, list[int]] = {}
        for i, pair in enumerate(pairs):
            groups.setdefault(key(pair), []).append(i)
        out[dimension] = {
            name: summarize([pairs[i] for i in idx], [comparisons[i] for i in idx])
            for name, idx in sorted(groups.items())
        }
    return out


def _signal_value(summary: dict[str, Any], signal: str) -> float | None:
    if signal == "output_mismatch":
        return float(summary["mismatch_rate"]) if summary["compared"] else None
    if signal == "error_rate":
        return float(summary["error_rate_increase"]) if summary["matched"] else None
    ratio = summary[signal]["ratio"]
    return None if ratio is None else float(ratio)


def _worst_segments(segments: dict[str, dict[str, Any]], signal: str) -> dict[str, Any]:
    """Per dimension, the segment where ``signal`` is worst (the first in key order on a tie)."""
    worst: dict[str, Any] = {}
    for dimension, groups in segments.items():
        best: tuple[str, float] | None = None
        for name, summary in groups.items():
            value = _signal_value(summary, signal)
            if value is not None and (best is None or value > best[1]):
                best = (name, value)
        if best is not None:
            worst[dimension] = {"segment": best[0], "value": best[1]}
    return worst


def _where(worst: dict[str, Any]) -> str:
    return ", ".join(f"{dim}={w['segment']} ({_fmt(w['value'])})" for dim, w in sorted(worst.items()))


def evaluate(policy: GatePolicy, baseline: Sequence[Observation], candidate: Sequence[Observation]) -> dict[str, Any]:
    """Judge ``candidate`` against ``baseline``; the report as a JSON-ready dict (see the module docstring)."""
    base_by_id = {o.request_id: o for o in baseline}
    cand_by_id = {o.request_id: o for o in candidate}
    ids = sorted(base_by_id.keys() & cand_by_id.keys())
    pairs: list[Pair] = [(base_by_id[i], cand_by_id[i]) for i in ids]
    comparisons = [compare_outputs(policy, b, c) for b, c in pairs]
    metrics = summarize(pairs, comparisons)
    metrics["baseline_only"] = len(base_by_id.keys() - cand_by_id.keys())
    metrics["candidate_only"] = len(cand_by_id.keys() - base_by_id.keys())
    rules: dict[str, int] = {}
    for comp in comparisons:
        if comp.rule is not None:
            rules[comp.rule] = rules.get(comp.rule, 0) + 1
    metrics["tolerance_rules_used"] = dict(sorted(rules.items()))
    diffs = [c.max_abs_diff for c in comparisons if c.max_abs_diff is not None]
    metrics["max_vector_abs_diff"] = max(diffs) if diffs else None
    segments = _segments(pairs, comparisons)

    rollback: list[dict[str, Any]] = []
    hold: list[dict[str, Any]] = []

    def fail(into: list[dict[str, Any]], signal: str, observed: float | None, threshold: float, reason: str) -> None:
        into.append({"signal": signal, "observed": observed, "threshold": threshold, "reason": reason})

    mismatched_ids = [i for i, c in zip(ids, comparisons, strict=True) if c.compared and not c.match]
    if metrics["compared"] and metrics["mismatch_rate"] > policy.max_mismatch_rate:
        fail(
            rollback,
            "output_mismatch",
            metrics["mismatch_rate"],
            policy.max_mismatch_rate,
            f"output mismatch rate {_fmt(metrics['mismatch_rate'])} > max_mismatch_rate "
            f"{_fmt(policy.max_mismatch_rate)} ({metrics['mismatches']} of {metrics['compared']} compared requests)",
        )
    if metrics["matched"] and metrics["error_rate_increase"] > policy.max_error_rate_increase:
        fail(
            rollback,
            "error_rate",
            metrics["error_rate_increase"],
            policy.max_error_rate_increase,
            f"error rate rose from {_fmt(metrics['baseline_error_rate'])} to {_fmt(metrics['candidate_error_rate'])} "
            f"(+{_fmt(metrics['error_rate_increase'])} > max_error_rate_increase {_fmt(policy.max_error_rate_increase)})",
        )
    if metrics["matched"] < policy.min_matched:
        fail(
            hold,
            "matched_traffic",
            float(metrics["matched"]),
            float(policy.min_matched),
            f"{metrics['matched']} matched requests < min_matched {policy.min_matched} "
            f"({metrics['baseline_only']} baseline-only, {metrics['candidate_only']} candidate-only)",
        )
    for required in policy.require:
        name = next(n for n, f, _ in LATENCY_SIGNALS if f == required)
        coverage = metrics[name]["coverage"]
        if coverage < 1.0:
            fail(
                hold,
                f"{required}_evidence",
                coverage,
                1.0,
                f"policy requires {required} but only {metrics[name]['requests']} of {metrics['compared']} "
                f"matched successful requests carry it on both sides",
            )
    for name, field, attr in LATENCY_SIGNALS:
        limit = float(getattr(policy, attr))
        m = metrics[name]
        if m["baseline_p95"] is None:
            continue
        if field == "kv_usage" and (m["candidate_p95"] or 0.0) < policy.kv_usage_floor:
            continue  # KV usage below the floor is no pressure, however it compares with the baseline
        if m["ratio"] is None:  # baseline p95 of 0, candidate's above it
            fail(hold, name, None, limit, f"{field} p95 rose from 0 to {_fmt(m['candidate_p95'])}")
        elif m["ratio"] > limit:
            fail(
                hold,
                name,
                m["ratio"],
                limit,
                f"{field} p95 {_fmt(m['candidate_p95'])} vs baseline {_fmt(m['baseline_p95'])}: "
                f"ratio {_fmt(m['ratio'])} > {attr} {_fmt(limit)}",
            )

    decision: Decision = "rollback" if rollback else "hold" if hold else "promote"
    triage = [_triage(item, segments, mismatched_ids, metrics, policy) for item in rollback + hold]
    return {
        "decision": decision,
        "reasons": [item["reason"] for item in rollback + hold],
        "metrics": metrics,
        "segments": segments,
        "triage": triage,
        "policy": policy.model_dump(mode="json"),
    }


def _triage(
    item: dict[str, Any],
    segments: dict[str, dict[str, Any]],
    mismatched_ids: list[str],
    metrics: dict[str, Any],
    policy: GatePolicy,
) -> dict[str, Any]:
    signal: str = item["signal"]
    key = "evidence" if signal.endswith("_evidence") else signal
    action, owner = TRIAGE[key]
    entry: dict[str, Any] = {
        "signal": signal,
        "observed": item["observed"],
        "threshold": item["threshold"],
        "recommended_action": action,
        "owner_hint": owner,
    }
    worst: dict[str, Any] = {}
    if key in ("output_mismatch", "error_rate") or key in {n for n, _, _ in LATENCY_SIGNALS}:
        worst = _worst_segments(segments, signal)
        entry["worst_segments"] = worst
    if signal == "output_mismatch":
        sample = mismatched_ids[:10]
        entry["request_ids"] = sample
        entry["next_step"] = (
            f"diff baseline and candidate outputs for {', '.join(sample)}; worst segments: {_where(worst)}; "
            "for vector outputs check whether a scoped tolerance rule is missing for this runtime/accelerator"
        )
    elif signal == "error_rate":
        entry["next_step"] = f"read the candidate's error logs for the failed requests; worst segments: {_where(worst)}"
    elif signal == "matched_traffic":
        short = policy.min_matched - metrics["matched"]
        entry["next_step"] = (
            f"mirror at least {short} more requests to both sides and check that request ids join "
            f"({metrics['baseline_only']} baseline-only, {metrics['candidate_only']} candidate-only so far)"
        )
    elif key == "evidence":
        field = signal.removesuffix("_evidence")
        entry["next_step"] = f"enable {field} recording on baseline and candidate replicas, then re-run the gate"
    elif signal == "kv_usage_p95":
        entry["next_step"] = (
            f"compare KV block size, max_num_seqs and prefix caching between the two; worst segments: {_where(worst)}"
        )
    else:
        entry["next_step"] = (
            f"profile the candidate on the worst segments ({_where(worst)}) and compare queue depth and batch size"
        )
    return entry


def render_report(report: dict[str, Any]) -> str:
    """The report as stable JSON text: sorted keys, two-space indent, trailing newline, no NaN."""
    return json.dumps(report, sort_keys=True, indent=2, allow_nan=False) + "\n"
