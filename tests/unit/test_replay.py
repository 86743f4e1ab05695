"""`modelfleet replay` end to end through the CLI, and the fixtures' pinned traces."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from modelfleet.dataplane.cli import main
from modelfleet.dataplane.engine.replay import parse_workload, replay

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "replay"

# Pinned traces. A change here means the scheduler's behaviour changed: look at the trace diff
# (`modelfleet replay --input ... --output ...`) before updating them.
FINGERPRINTS = {
    "small.json": "75299061c889c9a48642148b8e640e729254fe9d18d5e8dd48e7a405f41791a9",
    "pressure.json": "c960e51d6a8becad409270488daf3641099d1b839b285ed43f8689ccdee92e69",
}


def run_cli(tmp_path: Path, workload: Path | dict[str, Any], name: str = "report.json") -> tuple[int, Path]:
    if isinstance(workload, dict):
        source = tmp_path / "workload.json"
        source.write_text(json.dumps(workload), encoding="utf-8")
    else:
        source = workload
    out = tmp_path / name
    return main(["replay", "--input", str(source), "--output", str(out)]), out


@pytest.mark.parametrize("fixture", sorted(FINGERPRINTS))
def test_fixture_fingerprint_is_pinned_and_stable(tmp_path: Path, fixture: str) -> None:
    code1, out1 = run_cli(tmp_path, FIXTURES / fixture, "one.json")
    code2, out2 = run_cli(tmp_path, FIXTURES / fixture, "two.json")
    assert code1 == code2 == 0
    assert out1.read_bytes() == out2.read_bytes()
    report = json.loads(out1.read_text())
    assert report["totals"]["fingerprint"] == FINGERPRINTS[fixture]
    workload = json.loads((FIXTURES / fixture).read_text())
    totals = report["totals"]
    assert totals["completed"] == len(workload["requests"])
    assert totals["blocks_returned_at_end"] == workload["capacity"]["kv_blocks"]
    assert totals["ticks"] == len(report["ticks"])
    assert totals["prompt_tokens"] == sum(r["prompt_tokens"] for r in workload["requests"])
    assert totals["decode_tokens"] == sum(r["max_new_tokens"] for r in workload["requests"])
    for row in report["ticks"]:
        assert row["prefill_tokens"] <= workload["capacity"]["prefill_tokens_per_tick"]
        assert len(row["decoded"]) <= workload["capacity"]["decode_tokens_per_tick"]
        assert row["kv_blocks_used"] <= totals["peak_kv_blocks"] <= workload["capacity"]["kv_blocks"]


def test_small_trace_by_hand(tmp_path: Path) -> None:
    code, out = run_cli(tmp_path, FIXTURES / "small.json")
    assert code == 0
    ticks = json.loads(out.read_text())["ticks"]
    # tick 0: r1-r3 arrived, max_active is 3: by priority r3 (2), r1 (1), r2 (0); 2 + 3 + 8 = 13 blocks.
    # The 64-token prefill budget goes in admission order: all of r3 (20), all of r1 (40), 4 of r2.
    assert ticks[0]["admitted"] == ["r3", "r1", "r2"]
    assert ticks[0]["prefill"] == [["r3", 0, 20], ["r1", 0, 40], ["r2", 0, 4]]
    assert ticks[0]["decoded"] == [] and ticks[0]["kv_blocks_used"] == 13
    # r2's 100-token prompt is chunked: 64 more at tick 1, the last 32 at tick 2
    assert ticks[1]["prefill"] == [["r2", 4, 64]] and ticks[2]["prefill"] == [["r2", 68, 32]]
    assert ticks[1]["decoded"] == ["r3", "r1"]
    # r3 (4 new tokens: one from prefill at tick 0, three decodes) finishes at tick 3 and frees a slot;
    # r5 (priority 3, arrived at tick 2) takes it ahead of r4 (15 blocks, which do not fit until r2 is done)
    assert ticks[3]["completed"] == ["r3"]
    assert ticks[4]["admitted"] == ["r5"]
    r4_tick = next(t["tick"] for t in ticks if "r4" in t["admitted"])
    r2_done = next(t["tick"] for t in ticks if "r2" in t["completed"])
    assert r4_tick == r2_done + 1
    assert ticks[-1]["completed"] == ["r4"] and ticks[-1]["active"] == 0 and ticks[-1]["kv_blocks_used"] == 0


def test_pressure_fixture_needs_the_starvation_rule() -> None:
    doc = json.loads((FIXTURES / "pressure.json").read_text())

    def big_admitted_at(workload: dict[str, Any]) -> int:
        report = replay(parse_workload(workload))
        return int(next(t["tick"] for t in report["ticks"] if "big" in t["admitted"]))

    with_rule = big_admitted_at(doc)
    without = copy.deepcopy(doc)
    without["capacity"]["starvation_ticks"] = 1_000_000
    big = next(r for r in doc["requests"] if r["id"] == "big")
    assert with_rule - big["arrival_tick"] > doc["capacity"]["starvation_ticks"]  # it did starve
    assert big_admitted_at(without) > with_rule + 50  # and the rule got it in much sooner
    long_chunks = [row for row in replay(parse_workload(doc))["ticks"] for c in row["prefill"] if c[0] == "long-a"]
    assert len(long_chunks) > 1  # chunked prefill


def test_report_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(tmp_path, FIXTURES / "small.json")
    assert code == 0
    assert FINGERPRINTS["small.json"] in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report["ticks"][0]) == {
        "tick",
        "admitted",
        "prefill_tokens",
        "prefill",
        "decoded",
        "completed",
        "queued",
        "active",
        "kv_blocks_used",
    }
    totals = report["totals"]
    for name in ("peak_kv_percent", "prefill_utilization", "decode_utilization", "kv_utilization"):
        assert isinstance(totals[name], float) and 0 <= totals[name] <= 100
    assert 0 < totals["kv_utilization"] <= 1
    assert totals["peak_kv_percent"] == 100 * totals["peak_kv_blocks"] / 20


def test_empty_workload_replays_to_nothing(tmp_path: Path) -> None:
    workload = {"capacity": {"kv_blocks": 4, "block_tokens": 4, "max_active": 1, "prefill_tokens_per_tick": 4}}
    code, out = run_cli(tmp_path, {**workload, "requests": []})
    assert code == 0
    totals = json.loads(out.read_text())["totals"]
    assert totals["ticks"] == 0 and totals["completed"] == 0 and totals["prefill_utilization"] == 0.0


def small() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((FIXTURES / "small.json").read_text())
    return doc


def broken(edit: Any) -> dict[str, Any]:
    doc = small()
    edit(doc)
    return doc


@pytest.mark.parametrize(
    ("workload", "expected"),
    [
        (broken(lambda d: d["requests"][2].pop("prompt_tokens")), "requests[2].prompt_tokens: is required"),
        (broken(lambda d: d["capacity"].pop("kv_blocks")), "capacity.kv_blocks: is required"),
        (broken(lambda d: d["requests"][1].update(max_new_tokens=-3)), "requests[1].max_new_tokens: must be >= 1"),
        (broken(lambda d: d["requests"][0].update(prompt_tokens=0)), "requests[0].prompt_tokens: must be >= 1"),
        (broken(lambda d: d["requests"][4].update(arrival_tick=-1)), "requests[4].arrival_tick: must be >= 0"),
        (
            broken(lambda d: d["requests"][3].update(prompt_tokens="40")),
            "requests[3].prompt_tokens: must be an integer",
        ),
        (broken(lambda d: d["requests"][3].update(priority=1.5)), "requests[3].priority: must be an integer"),
        (broken(lambda d: d["capacity"].update(max_active=True)), "capacity.max_active: must be an integer"),
        (broken(lambda d: d["requests"][0].update(id=7)), "requests[0].id"),
        (broken(lambda d: d.update(requests={})), "requests: "),
        (broken(lambda d: d["requests"][3].update(id="r1")), "requests[3].id: duplicate id 'r1' (also requests[0])"),
        (
            broken(lambda d: d["requests"][3].update(prompt_tokens=450, max_new_tokens=30)),
            "requests[3]: needs 30 KV blocks, capacity.kv_blocks is 20",
        ),
        ([1, 2], "<root>: must be an object"),
    ],
)
def test_malformed_workload_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], workload: Any, expected: str
) -> None:
    source = tmp_path / "workload.json"
    source.write_text(json.dumps(workload), encoding="utf-8")
    code, out = run_cli(tmp_path, source)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err
    assert not out.exists()


def test_unreadable_or_invalid_json_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(tmp_path, tmp_path / "missing.json")[0] == 2
    assert "cannot read workload" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    assert run_cli(tmp_path, bad)[0] == 2
    assert "not valid JSON" in capsys.readouterr().err
