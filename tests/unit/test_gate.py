"""The release gate: fixtures through the CLI and the pure function, malformed input, tolerance scoping, determinism."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelfleet.dataplane.cli import main
from modelfleet.dataplane.rollout.commands import EXIT_CODES
from modelfleet.dataplane.rollout.gate import Decision, evaluate, p95, render_report
from modelfleet.dataplane.rollout.observations import (
    GatePolicy,
    Observation,
    RolloutInputError,
    parse_gate_input,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "gate"

EXPECTED: dict[str, Decision] = {
    "promote.json": "promote",
    "promote_tolerance.json": "promote",
    "hold_latency.json": "hold",
    "hold_traffic.json": "hold",
    "rollback_mismatch.json": "rollback",
    "rollback_errors.json": "rollback",
}


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())  # type: ignore[no-any-return]


def run_gate(tmp_path: Path, doc: dict[str, Any] | Path, name: str = "report.json") -> tuple[int, Path]:
    if isinstance(doc, dict):
        source = tmp_path / "input.json"
        source.write_text(json.dumps(doc), encoding="utf-8")
    else:
        source = doc
    out = tmp_path / name
    return main(["gate", "--input", str(source), "--output", str(out)]), out


def judge(doc: dict[str, Any]) -> dict[str, Any]:
    parsed = parse_gate_input(doc)
    return evaluate(parsed.policy, parsed.baseline, parsed.candidate)


def test_every_fixture_has_an_expected_decision() -> None:
    assert sorted(p.name for p in FIXTURES.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("fixture", sorted(EXPECTED))
def test_fixture_decision_through_cli_and_pure_function(tmp_path: Path, fixture: str) -> None:
    code, out = run_gate(tmp_path, FIXTURES / fixture)
    report = json.loads(out.read_text())
    assert report["decision"] == EXPECTED[fixture]
    assert code == EXIT_CODES[EXPECTED[fixture]]
    assert judge(load(fixture)) == report
    # a decision other than promote always says why, and each reason has a triage item
    assert (report["reasons"] == []) == (EXPECTED[fixture] == "promote")
    assert len(report["triage"]) == len(report["reasons"])


def test_exit_codes_are_distinct_per_decision() -> None:
    assert EXIT_CODES == {"promote": 0, "hold": 3, "rollback": 4}


def test_promote_counts_unmatched_and_shared_errors() -> None:
    report = judge(load("promote.json"))
    m = report["metrics"]
    assert (m["matched"], m["baseline_only"], m["candidate_only"]) == (12, 1, 0)
    # req-05 failed on both sides: an error, but no increase, and not compared for output
    assert (m["baseline_errors"], m["candidate_errors"], m["error_rate_increase"]) == (1, 1, 0.0)
    assert (m["compared"], m["mismatches"]) == (11, 0)
    assert m["ttft_p95"]["coverage"] == 1.0
    assert m["latency_p95"]["ratio"] is not None and m["latency_p95"]["ratio"] <= 1.0
    assert report["triage"] == []
    assert report["segments"]["model_version"].keys() == {"v1->v2"}


def test_hold_latency_points_at_the_slow_accelerator() -> None:
    report = judge(load("hold_latency.json"))
    assert [t["signal"] for t in report["triage"]] == ["latency_p95"]
    (item,) = report["triage"]
    assert item["owner_hint"] == "performance"
    assert item["recommended_action"].startswith("hold")
    assert item["worst_segments"]["accelerator"]["segment"] == "a100"
    assert "accelerator=a100" in item["next_step"]
    acc = report["segments"]["accelerator"]
    assert acc["a100"]["latency_p95"]["ratio"] > 1.2 >= acc["h100"]["latency_p95"]["ratio"]
    assert acc["a100"]["matched"] + acc["h100"]["matched"] == 12
    assert item["observed"] == report["metrics"]["latency_p95"]["ratio"] > item["threshold"] == 1.2


def test_hold_traffic_says_how_many_more() -> None:
    report = judge(load("hold_traffic.json"))
    m = report["metrics"]
    assert (m["matched"], m["baseline_only"], m["candidate_only"]) == (6, 2, 2)
    (item,) = report["triage"]
    assert item["signal"] == "matched_traffic"
    assert item["owner_hint"] == "release-manager"
    assert "at least 4 more requests" in item["next_step"]


def test_rollback_mismatch_wins_over_hold_and_names_requests() -> None:
    report = judge(load("rollback_mismatch.json"))
    assert report["decision"] == "rollback"
    # the latency regression is still reported, after the rollback signal
    assert [t["signal"] for t in report["triage"]] == ["output_mismatch", "latency_p95"]
    mismatch = report["triage"][0]
    assert mismatch["request_ids"] == ["req-03", "req-07"]
    assert mismatch["owner_hint"] == "model-runtime"
    assert mismatch["recommended_action"].startswith("roll back")
    assert mismatch["worst_segments"]["runtime"] == {"segment": "sglang", "value": 0.333333}
    runtime = report["segments"]["runtime"]
    assert (runtime["sglang"]["mismatches"], runtime["sglang"]["compared"]) == (2, 6)
    assert runtime["vllm"]["mismatch_rate"] == 0.0
    assert report["metrics"]["mismatch_rate"] == round(2 / 12, 6)


def test_rollback_errors() -> None:
    report = judge(load("rollback_errors.json"))
    m = report["metrics"]
    assert (m["baseline_error_rate"], m["candidate_error_rate"], m["error_rate_increase"]) == (0.0, 0.25, 0.25)
    (item,) = report["triage"]
    assert (item["signal"], item["owner_hint"]) == ("error_rate", "serving-oncall")
    # failed candidate requests are errors, not output mismatches
    assert (m["compared"], m["mismatches"]) == (9, 0)


def test_tolerance_rules_are_scoped() -> None:
    doc = load("promote_tolerance.json")
    report = judge(doc)
    # sglang/a100 pairs use the wide rule; vllm/h100 pairs the model-wide one
    assert report["metrics"]["tolerance_rules_used"] == {"tolerances[0]": 6, "tolerances[1]": 6}
    assert report["metrics"]["max_vector_abs_diff"] == 0.0015

    no_rules = copy.deepcopy(doc)
    no_rules["policy"]["tolerances"] = []
    report = judge(no_rules)
    assert report["decision"] == "rollback"
    assert report["metrics"]["tolerance_rules_used"] == {"default": 12}
    assert report["segments"]["runtime"]["sglang"]["mismatches"] == 6
    assert report["segments"]["runtime"]["vllm"]["mismatches"] == 0

    wrong_scope = copy.deepcopy(doc)
    wrong_scope["policy"]["tolerances"][0]["accelerator"] = "h100"  # the wide rule no longer matches a100
    report = judge(wrong_scope)
    assert report["decision"] == "rollback"
    assert report["segments"]["accelerator"]["a100"]["mismatch_rate"] == 1.0
    assert report["segments"]["accelerator"]["h100"]["mismatch_rate"] == 0.0


def obs(rid: str, **fields: Any) -> Observation:
    return Observation(request_id=rid, ok=True, latency_ms=10.0, output_tokens=[1], **fields)


def test_most_specific_tolerance_rule_wins_then_the_first() -> None:
    policy = GatePolicy.model_validate(
        {
            "tolerances": [
                {"runtime": "sglang", "abs_tol": 0.1},
                {"runtime": "sglang", "accelerator": "a100", "abs_tol": 0.01},
                {"accelerator": "a100", "abs_tol": 0.2},
                {"model": "m", "abs_tol": 0.3},
            ]
        }
    )
    assert policy.tolerance_for(obs("a", runtime="sglang", accelerator="a100"))[0] == "tolerances[1]"
    assert policy.tolerance_for(obs("a", runtime="sglang", accelerator="h100"))[0] == "tolerances[0]"
    assert policy.tolerance_for(obs("a", runtime="vllm", accelerator="a100"))[0] == "tolerances[2]"
    # a rule scoped to a field matches no observation lacking that field
    assert policy.tolerance_for(obs("a", runtime="vllm"))[0] == "default"
    # equally specific: the first listed
    assert policy.tolerance_for(obs("a", model="m", accelerator="a100"))[0] == "tolerances[2]"


def test_vector_of_other_length_or_other_kind_is_a_mismatch() -> None:
    policy = GatePolicy.model_validate({"min_matched": 1, "default_tolerance": {"abs_tol": 1.0}})
    base = [Observation(request_id="a", ok=True, latency_ms=1.0, output_vector=[0.0, 0.0])]
    longer = [Observation(request_id="a", ok=True, latency_ms=1.0, output_vector=[0.0, 0.0, 0.0])]
    tokens = [Observation(request_id="a", ok=True, latency_ms=1.0, output_tokens=[0, 0])]
    close = [Observation(request_id="a", ok=True, latency_ms=1.0, output_vector=[0.9, -0.9])]
    assert evaluate(policy, base, longer)["decision"] == "rollback"
    assert evaluate(policy, base, tokens)["decision"] == "rollback"
    assert evaluate(policy, base, close)["decision"] == "promote"


def side(n: int, **fields: Any) -> list[dict[str, Any]]:
    return [
        {"request_id": f"r{i:03d}", "ok": True, "latency_ms": 100.0 + i, "output_tokens": [i, i + 1], **fields}
        for i in range(n)
    ]


def test_required_evidence_missing_holds() -> None:
    base = side(20, ttft_ms=10.0)
    cand = side(20, ttft_ms=10.0)
    for row in cand[:3]:
        del row["ttft_ms"]
    doc = {"policy": {"require": ["ttft_ms", "itl_ms"]}, "baseline": base, "candidate": cand}
    report = judge(doc)
    assert report["decision"] == "hold"
    assert [t["signal"] for t in report["triage"]] == ["ttft_ms_evidence", "itl_ms_evidence"]
    assert {t["owner_hint"] for t in report["triage"]} == {"telemetry"}
    assert report["metrics"]["ttft_p95"]["coverage"] == 0.85
    assert report["metrics"]["itl_p95"]["coverage"] == 0.0
    # not required: the same gaps are reported but do not hold
    doc["policy"] = {}
    assert judge(doc)["decision"] == "promote"


@pytest.mark.parametrize(
    ("field", "signal", "owner"),
    [("ttft_ms", "ttft_p95", "performance"), ("kv_usage", "kv_usage_p95", "scheduler-capacity")],
)
def test_ttft_and_kv_pressure_regressions_hold(field: str, signal: str, owner: str) -> None:
    base = side(20, **{field: 0.4})
    cand = side(20, **{field: 0.6})
    report = judge({"baseline": base, "candidate": cand})
    assert report["decision"] == "hold"
    (item,) = report["triage"]
    assert (item["signal"], item["owner_hint"], item["observed"]) == (signal, owner, 1.5)


def test_itl_p95_pools_every_gap() -> None:
    base = side(20, itl_ms=[10.0] * 20)
    cand = side(20, itl_ms=[10.0] * 18 + [30.0, 30.0])  # 10 % of gaps slow: above the 95th percentile
    assert judge({"baseline": base, "candidate": cand})["metrics"]["itl_p95"]["ratio"] == 3.0
    cand = side(20, itl_ms=[10.0] * 19 + [30.0])  # 5 %: p95 is still 10
    assert judge({"baseline": base, "candidate": cand})["decision"] == "promote"


def test_ratio_at_the_threshold_promotes_and_just_above_holds() -> None:
    base = side(20, ttft_ms=100.0)
    assert judge({"baseline": base, "candidate": side(20, ttft_ms=120.0)})["decision"] == "promote"
    assert judge({"baseline": base, "candidate": side(20, ttft_ms=120.1)})["decision"] == "hold"


def test_candidate_regression_from_zero_baseline_holds() -> None:
    report = judge({"baseline": side(20, kv_usage=0.0), "candidate": side(20, kv_usage=0.5)})
    assert report["decision"] == "hold"
    assert report["metrics"]["kv_usage_p95"]["ratio"] is None
    assert report["triage"][0]["signal"] == "kv_usage_p95"


def test_p95_is_nearest_rank() -> None:
    assert p95([]) is None
    assert p95([5.0]) == 5.0
    assert p95([float(i) for i in range(1, 21)]) == 19.0
    assert p95([float(i) for i in range(1, 101)]) == 95.0
    assert p95([float(i) for i in range(1, 102)]) == 96.0


def set_path(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("candidate", 3, "latency_ms"), -1.0, "candidate[3].latency_ms: must be >= 0"),
        (("candidate", 3, "latency_ms"), "12", "candidate[3].latency_ms: must be a number"),
        (("candidate", 3, "latency_ms"), DELETE, "candidate[3].latency_ms: is required when ok is true"),
        (("baseline", 0, "ok"), 1, "baseline[0].ok: must be true or false"),
        (("baseline", 0, "request_id"), DELETE, "baseline[0].request_id: is required"),
        (("candidate", 2, "output_tokens", 1), "a", "candidate[2].output_tokens[1]: must be an integer"),
        (("candidate", 2, "output_tokens", 1), 1.5, "candidate[2].output_tokens[1]: must be an integer"),
        (("candidate", 4, "output_tokens"), DELETE, "candidate[4].output_tokens: a successful request needs"),
        (("candidate", 0, "kv_usage"), 1.5, "candidate[0].kv_usage: must be <= 1"),
        (("candidate", 1, "request_id"), "req-00", "candidate[1].request_id: duplicate 'req-00' (also candidate[0])"),
        (("policy", "max_latency_p95_ratio"), 0.5, "policy.max_latency_p95_ratio: must be >= 1"),
        (("policy", "min_matchd"), 5, "policy.min_matchd: is not a known field"),
        (("policy", "require"), ["ttft"], "policy.require[0]: must be one of"),
        (("policy", "tolerances"), [{"runtime": "x", "abs_tol": -1}], "policy.tolerances[0].abs_tol: must be >= 0"),
        (("candidate",), DELETE, "candidate: is required"),
        (("baseline",), {}, "baseline: must be a list"),
    ],
)
def test_malformed_input_names_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], path: tuple[Any, ...], value: Any, message: str
) -> None:
    doc = load("promote.json")
    set_path(doc, path, value)
    with pytest.raises(RolloutInputError) as err:
        parse_gate_input(doc)
    assert message in str(err.value)
    code, out = run_gate(tmp_path, doc)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_non_finite_numbers_are_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (FIXTURES / "promote.json").read_text().replace('"latency_ms": 100.0', '"latency_ms": NaN', 1)
    assert "NaN" in text
    source = tmp_path / "nan.json"
    source.write_text(text)
    code, _ = run_gate(tmp_path, source)
    assert code == 2
    assert "baseline[0].latency_ms: must be a finite number" in capsys.readouterr().err


def test_unreadable_and_invalid_json_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_gate(tmp_path, tmp_path / "missing.json")[0] == 2
    assert "cannot read" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert run_gate(tmp_path, bad)[0] == 2
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("fixture", sorted(EXPECTED))
def test_report_is_byte_identical_and_independent_of_input_order(tmp_path: Path, fixture: str) -> None:
    _, one = run_gate(tmp_path, FIXTURES / fixture, "one.json")
    _, two = run_gate(tmp_path, FIXTURES / fixture, "two.json")
    assert one.read_bytes() == two.read_bytes()
    shuffled = load(fixture)
    rng = random.Random(7)
    rng.shuffle(shuffled["baseline"])
    rng.shuffle(shuffled["candidate"])
    _, three = run_gate(tmp_path, shuffled, "three.json")
    assert three.read_bytes() == one.read_bytes()
    text = one.read_text()
    assert text == render_report(json.loads(text))  # sorted keys, stable layout


def test_report_shape(tmp_path: Path) -> None:
    report = judge(load("rollback_mismatch.json"))
    assert set(report) == {"decision", "reasons", "metrics", "segments", "triage", "policy"}
    assert set(report["segments"]) == {"runtime", "accelerator", "model_version"}
    for item in report["triage"]:
        assert {"signal", "recommended_action", "owner_hint", "next_step"} <= set(item)
        assert all(isinstance(item[k], str) and item[k] for k in ("recommended_action", "owner_hint", "next_step"))
    # the resolved policy, defaults included, is echoed for the audit trail
    assert report["policy"]["max_error_rate_increase"] == 0.01
    assert report["policy"]["min_matched"] == 10


# -- properties ------------------------------------------------------------------------------------------

observation_rows = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=1e5, allow_nan=False),
        st.lists(st.integers(min_value=0, max_value=50_000), min_size=1, max_size=8),
        st.booleans(),
    ),
    min_size=20,
    max_size=60,
)


def rows_to_side(rows: list[tuple[float, list[int], bool]]) -> list[Observation]:
    return [
        Observation(request_id=f"r{i}", ok=ok, latency_ms=lat, output_tokens=toks)
        for i, (lat, toks, ok) in enumerate(rows)
    ]


@settings(max_examples=40, deadline=None)
@given(rows=observation_rows)
def test_identical_sides_with_enough_traffic_promote(rows: list[tuple[float, list[int], bool]]) -> None:
    observations = rows_to_side(rows)
    report = evaluate(GatePolicy(), observations, list(reversed(observations)))
    assert report["decision"] == "promote", report["reasons"]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=20, max_value=80),
    max_rate=st.sampled_from([0.0, 0.01, 0.05, 0.1]),
    extra=st.integers(min_value=0, max_value=5),
)
def test_mismatches_past_the_threshold_roll_back(n: int, max_rate: float, extra: int) -> None:
    policy = GatePolicy(max_mismatch_rate=max_rate)
    base = [Observation(request_id=f"r{i}", ok=True, latency_ms=1.0, output_tokens=[i]) for i in range(n)]
    allowed = int(max_rate * n)  # mismatches at or below the threshold
    bad = min(n, allowed + 1 + extra)
    cand = [o.model_copy(update={"output_tokens": [-1]}) if i < bad else o for i, o in enumerate(base)]
    assert evaluate(policy, base, cand)["decision"] == "rollback"
    ok = [o.model_copy(update={"output_tokens": [-1]}) if i < allowed else o for i, o in enumerate(base)]
    assert evaluate(policy, base, ok)["decision"] == "promote"


def test_kv_usage_below_the_floor_is_no_pressure() -> None:
    """An idle baseline reads 0 KV usage at arrival; a candidate at 0.2 is no regression (floor 0.5)."""
    report = judge({"baseline": side(20, kv_usage=0.0), "candidate": side(20, kv_usage=0.2)})
    assert report["decision"] == "promote"
    assert report["metrics"]["kv_usage_p95"]["candidate_p95"] == 0.2
    lowered = judge(
        {"policy": {"kv_usage_floor": 0.1}, "baseline": side(20, kv_usage=0.0), "candidate": side(20, kv_usage=0.2)}
    )
    assert lowered["decision"] == "hold"
