"""A live rollout: what the sidecars are told, and what the controller does next.

Two controllers run rollouts: the launcher locally (``modelfleet up`` watching its
manifest, dataplane/rollout/local.py) and the operator in a cluster. Both speak to
the sidecars through one small JSON document, the *rollout plan*
(:class:`RolloutPlan`), which each sidecar reads from a file (``--rollout-file``;
in a cluster a key of the deployment's ConfigMap): which candidate to send
traffic to, how (Canary weight or Shadow mirror) and under which id. The
sidecars record one observation per request and side; the controller collects
them (``GET /rollout/observations`` of every sidecar), runs the release gate
(dataplane/rollout/gate.py) and asks :func:`next_action` what to do.

:func:`next_action` is pure (time passed in), so both controllers and the tests
share it:

- the gate says rollback, or the rollout is older than ``maxDurationSeconds``:
  ROLLBACK (remove the candidate);
- the gate holds: HOLD (stay at this step; hold reasons are reported);
- the gate promotes: a Canary advances to its next step once the current step
  has lasted ``holdSeconds`` (WAIT until then), and PROMOTEs after the last
  one; a Shadow PROMOTEs once its first step's ``holdSeconds`` have passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from modelfleet.dataplane.spec import InferenceDeploymentSpec, RolloutSpec, RolloutStrategy, RuntimeKind


class RolloutPlan(BaseModel):
    """What every sidecar of the baseline needs to split or mirror traffic (camelCase on the wire)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    id: str = Field(min_length=1, description="Names this rollout; observations are kept per id")
    strategy: RolloutStrategy
    weight: int = Field(ge=0, le=100, description="Canary: percent of requests the candidate serves")
    mirror_percent: int = Field(ge=0, le=100, description="Percent of requests (canary: of the candidate's) mirrored")
    candidate_peers: list[str] = Field(min_length=1, description="URLs the candidate's requests go to")
    baseline_version: str | None = None
    candidate_version: str | None = None
    baseline_runtime: str | None = None
    candidate_runtime: str | None = None
    baseline_accelerator: str | None = None
    candidate_accelerator: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json", exclude_none=True)


def accelerator(spec: InferenceDeploymentSpec) -> str:
    """What a side computes on, as the gate's segments name it: cpu, a GPU type, gpu, or remote."""
    if spec.runtime.kind is RuntimeKind.REMOTE:
        return "remote"
    if not spec.needs_gpu():
        return "cpu"
    types = spec.placement.gpu_types
    return types[0] if types else "gpu"


def sides(
    baseline: InferenceDeploymentSpec, candidate: InferenceDeploymentSpec, baseline_version: str, candidate_version: str
) -> dict[str, Any]:
    """What a plan says of each side (a ``model_copy`` update): version, runtime and accelerator, which the
    sidecars put into every observation so the gate's report has per-segment summaries."""
    return {
        "baseline_version": baseline_version,
        "candidate_version": candidate_version,
        "baseline_runtime": baseline.runtime.kind.value,
        "candidate_runtime": candidate.runtime.kind.value,
        "baseline_accelerator": accelerator(baseline),
        "candidate_accelerator": accelerator(candidate),
    }


class Action(StrEnum):
    WAIT = "wait"  # the gate is content but the step's hold time has not passed
    ADVANCE = "advance"  # next canary step
    PROMOTE = "promote"
    HOLD = "hold"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class Progress:
    """Where a rollout stands: its step and when it and the step began (seconds, any monotonic clock)."""

    step: int
    started_at: float
    step_started_at: float


def plan_for(spec: RolloutSpec, rollout_id: str, step: int, candidate_peers: list[str]) -> RolloutPlan:
    """The plan the sidecars get at a step."""
    canary = spec.strategy is RolloutStrategy.CANARY
    return RolloutPlan(
        id=rollout_id,
        strategy=spec.strategy,
        weight=spec.steps[min(step, len(spec.steps) - 1)].weight if canary else 0,
        mirror_percent=spec.mirror_percent,
        candidate_peers=candidate_peers,
    )


def next_action(spec: RolloutSpec, progress: Progress, decision: str | None, now: float) -> tuple[Action, str]:
    """What to do after a gate report (``decision``: promote, hold, rollback; None: no report yet), and why."""
    if decision == "rollback":
        return Action.ROLLBACK, "the release gate decided rollback"
    if now - progress.started_at > spec.max_duration_seconds:
        return Action.ROLLBACK, f"not promoted within maxDurationSeconds ({spec.max_duration_seconds} s)"
    if decision != "promote":
        return Action.HOLD, "the release gate holds" if decision == "hold" else "no gate report yet"
    step = spec.steps[min(progress.step, len(spec.steps) - 1)]
    held = now - progress.step_started_at
    if held < step.hold_seconds:
        return Action.WAIT, f"step {progress.step + 1} holds for {step.hold_seconds} s ({held:.0f} s so far)"
    if spec.strategy is RolloutStrategy.CANARY and progress.step + 1 < len(spec.steps):
        return Action.ADVANCE, f"step {progress.step + 1} passed the gate"
    return Action.PROMOTE, "the release gate decided promote"
