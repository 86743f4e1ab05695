"""Mirrored request logs: timings derived from stream events, both record styles, errors that name the line and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from modelfleet.dataplane.cli import main
from modelfleet.dataplane.rollout.mirror_logs import parse_mirror_log
from modelfleet.dataplane.rollout.observations import RolloutInputError

MIRROR = Path(__file__).resolve().parent.parent / "fixtures" / "gate" / "mirror"


def jsonl(*records: dict[str, Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def arrival(rid: str, ts: float, **meta: Any) -> dict[str, Any]:
    return {"event": "arrival", "request_id": rid, "ts": ts, **meta}


def token(rid: str, ts: float, *ids: int) -> dict[str, Any]:
    return {"event": "token", "request_id": rid, "ts": ts, "token_ids": list(ids)}


def finish(rid: str, ts: float, **extra: Any) -> dict[str, Any]:
    return {"event": "finish", "request_id": rid, "ts": ts, "finish_reason": "stop", **extra}


def test_vllm_events_give_latency_ttft_and_gaps() -> None:
    text = jsonl(
        arrival("a", 10.0, model_version="v1", accelerator="h100", queue_depth=2, kv_usage=0.5, prompt_tokens=7),
        token("a", 10.050, 11),
        token("a", 10.070, 12, 13),  # two tokens 20 ms after the first chunk: 10 ms each
        token("a", 10.085, 14),
        finish("a", 10.100),
    )
    (obs,) = parse_mirror_log(text, "log")
    assert obs.ok and obs.request_id == "a"
    assert obs.latency_ms == pytest.approx(100.0)
    assert obs.ttft_ms == pytest.approx(50.0)
    assert obs.itl_ms == pytest.approx([10.0, 10.0, 15.0])
    assert obs.output_tokens == [11, 12, 13, 14]
    assert obs.completion_tokens == 4
    assert (obs.runtime, obs.model_version, obs.accelerator) == ("vllm", "v1", "h100")
    assert (obs.queue_depth, obs.kv_usage, obs.prompt_tokens) == (2, 0.5, 7)


def test_interleaved_requests_keep_their_order_of_arrival() -> None:
    text = jsonl(
        arrival("b", 1.0),
        arrival("a", 1.1),
        token("a", 1.2, 5),
        token("b", 1.3, 6),
        finish("a", 1.4),
        finish("b", 1.5),
    )
    observations = parse_mirror_log(text, "log")
    assert [o.request_id for o in observations] == ["b", "a"]
    assert [o.ttft_ms for o in observations] == pytest.approx([300.0, 100.0])
    assert [o.itl_ms for o in observations] == [[], []]  # one chunk each: no gap


def test_sglang_record() -> None:
    rec = {
        "rid": "s1",
        "created": 50.0,
        "accelerator": "a100",
        "stream": [
            {"t": 50.04, "output_ids": [1]},
            {"t": 50.06, "output_ids": [2]},
            {"t": 50.09, "output_ids": [3, 4]},
        ],
        "meta_info": {"e2e_latency": 0.1, "prompt_tokens": 9, "finish_reason": {"type": "length"}},
    }
    (obs,) = parse_mirror_log(jsonl(rec), "log")
    assert obs.ok and obs.runtime == "sglang" and obs.accelerator == "a100"
    assert obs.latency_ms == pytest.approx(100.0)
    assert obs.ttft_ms == pytest.approx(40.0)
    assert obs.itl_ms == pytest.approx([20.0, 15.0, 15.0])
    assert obs.output_tokens == [1, 2, 3, 4]
    assert (obs.prompt_tokens, obs.completion_tokens) == (9, 4)


@pytest.mark.parametrize(
    ("records", "ok"),
    [
        ([arrival("a", 1.0), token("a", 1.1, 1), finish("a", 1.2)], True),
        ([arrival("a", 1.0), finish("a", 1.2, finish_reason="abort")], False),
        ([arrival("a", 1.0), token("a", 1.1, 1), finish("a", 1.2, error="engine died")], False),
        ([{"rid": "a", "created": 1.0, "meta_info": {"e2e_latency": 0.1, "finish_reason": {"type": "abort"}}}], False),
        ([{"rid": "a", "created": 1.0, "error": "timeout", "meta_info": {"e2e_latency": 0.1}}], False),
    ],
)
def test_failures(records: list[dict[str, Any]], ok: bool) -> None:
    (obs,) = parse_mirror_log(jsonl(*records), "log")
    assert obs.ok is ok


def test_vector_outputs_in_both_styles() -> None:
    text = jsonl(
        arrival("v", 1.0),
        finish("v", 1.02, output_vector=[0.5, -0.25]),
        {"rid": "s", "created": 2.0, "embedding": [0.5, -0.25], "meta_info": {"e2e_latency": 0.03}},
    )
    vllm, sglang = parse_mirror_log(text, "log")
    assert vllm.output_vector == sglang.output_vector == [0.5, -0.25]
    assert vllm.output_tokens is None and vllm.ttft_ms is None
    assert vllm.latency_ms == pytest.approx(20.0) and sglang.latency_ms == pytest.approx(30.0)


def test_json_array_reads_like_jsonl() -> None:
    records = [arrival("a", 1.0), token("a", 1.1, 1), finish("a", 1.2)]
    assert parse_mirror_log(json.dumps(records), "log") == parse_mirror_log(jsonl(*records), "log")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (jsonl(token("a", 1.0, 1)), "log:1: request_id: request 'a' has no arrival event before it"),
        (
            jsonl(arrival("a", 1.0), token("a", 1.2, 1), token("a", 1.1, 2), finish("a", 1.3)),
            "log:3: ts: 1.1 is earlier than the previous event of request 'a' (log:2)",
        ),
        (jsonl(arrival("a", 1.0), token("a", 1.1, 1)), "log:1: request 'a' has no finish event"),
        (jsonl(arrival("a", 1.0), arrival("a", 1.1)), "log:2: request_id: duplicate arrival of 'a' (also log:1)"),
        (
            jsonl(arrival("a", 1.0), token("a", 1.1, 1), finish("a", 1.2), token("a", 1.3, 2)),
            "log:4: request_id: request 'a' finished at log:1",
        ),
        (jsonl(arrival("a", 1.0), {**token("a", 1.1), "token_ids": []}), "log:2: token_ids: must not be empty"),
        (jsonl(arrival("a", 1.0), {**token("a", 1.1, 1), "event": "tok"}), "log:2: event: must be one of"),
        (jsonl({**arrival("a", 1.0), "ts": "1.0"}), "log:1: ts: must be a number"),
        (jsonl({**arrival("a", 1.0), "kv_usage": 2}), "log:1: kv_usage: must be <= 1"),
        (jsonl(arrival("a", 1.0), finish("a", 1.1)), "log:2: request 'a' succeeded but has no output"),
        (jsonl({"ts": 1.0}), "log:1: request_id: is required (or rid"),
        (
            '{"rid": "a", "created": 1.0, "embedding": [1.0], "meta_info": {"e2e_latency": 0.1}}\n{nope\n',
            "log:2: not valid JSON",
        ),
        (
            jsonl({"rid": "a", "created": 1.0, "stream": [{"t": 1.1, "output_ids": [1]}, {"output_ids": [2]}]}),
            "log:1: stream[1].t: is required; meta_info: is required",
        ),
        (
            jsonl(
                {"rid": "a", "created": 1.0, "stream": [{"t": 0.5, "output_ids": [1]}], "meta_info": {"e2e_latency": 1}}
            ),
            "log:1: stream[0].t: 0.5 is earlier than the previous event",
        ),
        (
            jsonl(
                {"rid": "a", "created": 1.0, "embedding": [1.0], "meta_info": {"e2e_latency": 1}},
                {"rid": "a", "created": 2.0, "embedding": [1.0], "meta_info": {"e2e_latency": 1}},
            ),
            "log:2: rid: duplicate request 'a' (also log:1)",
        ),
        (json.dumps([arrival("a", 1.0), "x"]), "log[1]: must be an object"),
    ],
)
def test_malformed_logs_name_line_and_field(text: str, message: str) -> None:
    with pytest.raises(RolloutInputError) as err:
        parse_mirror_log(text, "log")
    assert message in str(err.value)


def mirror_gate(tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any] | None]:
    out = tmp_path / "report.json"
    code = main(
        [
            "mirror-gate",
            "--baseline",
            str(MIRROR / "vllm_baseline.jsonl"),
            "--candidate",
            str(MIRROR / "sglang_candidate.jsonl"),
            "--output",
            str(out),
            *extra,
        ]
    )
    return code, json.loads(out.read_text()) if out.exists() else None


def test_fixture_logs_promote_vllm_to_sglang(tmp_path: Path) -> None:
    code, report = mirror_gate(tmp_path, "--policy", str(MIRROR / "policy.json"))
    assert code == 0 and report is not None
    assert report["decision"] == "promote"
    m = report["metrics"]
    # m-09 was aborted by its client on both sides: counted as an error on both, not compared
    assert (m["matched"], m["compared"], m["baseline_errors"], m["candidate_errors"]) == (10, 9, 1, 1)
    assert (m["ttft_p95"]["baseline_p95"], m["ttft_p95"]["candidate_p95"]) == (20.0, 19.0)
    assert (m["itl_p95"]["baseline_p95"], m["itl_p95"]["candidate_p95"]) == (10.0, 10.5)
    assert {name: s["coverage"] for name, s in m.items() if name.endswith("_p95")} == dict.fromkeys(
        ("latency_p95", "ttft_p95", "itl_p95", "kv_usage_p95"), 1.0
    )
    assert list(report["segments"]["runtime"]) == ["sglang"]
    assert list(report["segments"]["model_version"]) == ["v1->v2"]
    assert report["segments"]["model_version"]["v1->v2"]["matched"] == 10
    assert report["policy"]["require"] == ["ttft_ms", "itl_ms", "kv_usage"]


def test_fixture_logs_hold_under_a_stricter_policy(tmp_path: Path) -> None:
    policy = tmp_path / "strict.json"
    policy.write_text(json.dumps({"min_matched": 8, "max_itl_p95_ratio": 1.01}))
    code, report = mirror_gate(tmp_path, "--policy", str(policy))
    assert code == 3 and report is not None
    assert [t["signal"] for t in report["triage"]] == ["itl_p95"]
    # the default policy wants 20 matched requests; the logs have 10
    code, report = mirror_gate(tmp_path)
    assert code == 3 and report is not None
    assert [t["signal"] for t in report["triage"]] == ["matched_traffic"]


def test_bad_policy_file_names_file_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "typo.json"
    policy.write_text(json.dumps({"min_matched": 8, "max_ttft_ratio": 2}))
    code, report = mirror_gate(tmp_path, "--policy", str(policy))
    assert code == 2 and report is None
    assert f"{policy}: max_ttft_ratio: is not a known field" in capsys.readouterr().err


def test_mirror_gate_report_is_byte_identical(tmp_path: Path) -> None:
    mirror_gate(tmp_path, "--policy", str(MIRROR / "policy.json"))
    first = (tmp_path / "report.json").read_bytes()
    mirror_gate(tmp_path, "--policy", str(MIRROR / "policy.json"))
    assert (tmp_path / "report.json").read_bytes() == first
