"""File-level entry points of ``modelfleet gate`` and ``modelfleet mirror-gate``: read, judge, write.

The exit status carries the decision so a pipeline step can gate on it without parsing the report:
0 promote, 3 hold, 4 rollback (the report is written in all three cases); 2 input that cannot be
judged (the message names the field), 1 a report that cannot be written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelfleet.dataplane.rollout.gate import Decision, evaluate, render_report
from modelfleet.dataplane.rollout.mirror_logs import load_mirror_log
from modelfleet.dataplane.rollout.observations import (
    GatePolicy,
    RolloutInputError,
    check_observations,
    parse_gate_input,
    parse_policy,
)

EXIT_CODES: dict[Decision, int] = {"promote": 0, "hold": 3, "rollback": 4}
EXIT_BAD_INPUT = 2
EXIT_CANNOT_WRITE = 1


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RolloutInputError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RolloutInputError(f"{path}: not valid JSON: {exc}") from None


def _write(report: dict[str, Any], output_path: Path) -> dict[str, Any]:
    output_path.write_text(render_report(report), encoding="utf-8")
    return report


def gate_file(input_path: Path, output_path: Path) -> dict[str, Any]:
    """Judge ``{"policy", "baseline", "candidate"}`` in ``input_path``; write and return the report."""
    doc = parse_gate_input(_load_json(input_path))
    return _write(evaluate(doc.policy, doc.baseline, doc.candidate), output_path)


def mirror_gate_files(
    baseline_path: Path, candidate_path: Path, policy_path: Path | None, output_path: Path
) -> dict[str, Any]:
    """Judge two mirrored request logs (see ``mirror_logs``) under a policy file or the default policy."""
    policy = GatePolicy()
    if policy_path is not None:
        try:
            policy = parse_policy(_load_json(policy_path), prefix=())
        except RolloutInputError as exc:
            raise RolloutInputError(f"{policy_path}: {exc}") from None
    baseline = load_mirror_log(baseline_path)
    candidate = load_mirror_log(candidate_path)
    for side, observations in (("baseline", baseline), ("candidate", candidate)):
        check_observations(side, observations)
    return _write(evaluate(policy, baseline, candidate), output_path)
