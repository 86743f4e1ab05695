"""Judged rollouts in a cluster: the operator's side of a canary or shadow rollout.

When a CR with ``spec.rollout`` changes its version (``spec_version``, dataplane/rollout/version.py: the
model, runtime, engine, placement, routing or spill-over; not ``replicas``, ``rollout`` or a
remote runtime's endpoint settings), the baseline keeps running at the spec in its ConfigMap and the changed
spec runs beside it as the *candidate* (``<name>-candidate`` children). The baseline's
sidecars read the rollout plan (dataplane/rollout/plan.py) from the ``rollout.json`` key of
the baseline's ConfigMap, send the candidate its share of traffic, and record what both
sides did. A timer gathers those observations from every ready baseline pod, runs the
release gate (dataplane/rollout/gate.py), and :func:`decide` turns the report into the next
state: advance a canary step, promote (the baseline takes the candidate's spec), hold, or
roll back (the candidate is removed and its spec hash remembered, so it is not retried).
A person can force either end with the annotation ``modelfleet.io/rollout-action:
promote|abort``.

Plan and apply stay apart: :func:`decide` is pure (state, report, annotation and time in;
children to render, status, conditions and events out), :func:`collect` takes the HTTP
fetch as a parameter, and only :func:`fetch_json` and :func:`read_baseline` do I/O.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
import yaml
from pydantic import ValidationError

from modelfleet.dataplane.rollout.gate import evaluate
from modelfleet.dataplane.rollout.observations import (
    Observation,
    RolloutInputError,
    check_observations,
    parse_policy,
)
from modelfleet.dataplane.rollout.plan import Action, Progress, RolloutPlan, next_action, plan_for, sides
from modelfleet.dataplane.rollout.version import spec_version
from modelfleet.dataplane.spec import (
    InferenceDeploymentSpec,
    RolloutPhase,
    RolloutSpec,
    RolloutStatus,
    RolloutStrategy,
)
from modelfleet.operator import status as st
from modelfleet.operator.resources import names

log = logging.getLogger(__name__)

ACTION_ANNOTATION = "modelfleet.io/rollout-action"
PROMOTE, ABORT = "promote", "abort"

ROLLOUT_PROGRESSING, ROLLOUT_HELD, PROMOTED, ROLLED_BACK = "RolloutProgressing", "RolloutHeld", "Promoted", "RolledBack"
ACTIVE = (RolloutPhase.CANARY, RolloutPhase.SHADOW)

# the gate's failing signal -> a condition reason (CamelCase)
SIGNAL_REASONS = {
    "matched_traffic": "NotEnoughMatchedTraffic",
    "output_mismatch": "OutputMismatch",
    "error_rate": "ErrorRateIncrease",
    "latency_p95": "LatencyRegression",
    "ttft_p95": "LatencyRegression",
    "itl_p95": "LatencyRegression",
    "kv_usage_p95": "KVUsageRegression",
}
MAX_REASONS, MAX_REASON_CHARS = 3, 240
TICK_S = 2.0  # how often the timer looks; it runs the gate every spec.rollout.analysisIntervalSeconds


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Outcome:
    """What a reconcile renders and records, decided by :func:`decide`."""

    baseline: InferenceDeploymentSpec  # the baseline children's spec
    candidate: InferenceDeploymentSpec | None = None  # candidate children exist iff set (replicas sized)
    plan: RolloutPlan | None = None  # ``rollout.json`` in the baseline's ConfigMap iff set
    status: RolloutStatus | None = None  # ``status.rollout``
    conditions: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    handled_action: str | None = None  # the annotation's value, acted on or ignored: remove it

    @property
    def rollout_plan(self) -> dict[str, Any] | None:
        return self.plan.to_wire() if self.plan is not None else None


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch(stamp: str | None, default: float) -> float:
    if not stamp:
        return default
    try:
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return default


def state_of(status: Mapping[str, Any] | None) -> RolloutStatus | None:
    """``status.rollout`` as the model; None when absent or unreadable."""
    raw = (status or {}).get("rollout")
    if not raw:
        return None
    try:
        return RolloutStatus.model_validate(raw)
    except ValidationError:
        log.warning("status.rollout is unreadable; treating it as absent")
        return None


def is_active(state: RolloutStatus | None) -> bool:
    return state is not None and state.phase in ACTIVE


def involved(spec: Mapping[str, Any], status: Mapping[str, Any] | None) -> bool:
    """Whether a reconcile must look at rollouts at all (else it is the plain rolling update)."""
    return bool(spec.get("rollout")) or is_active(state_of(status))


def candidate_replicas(spec: InferenceDeploymentSpec, rollout: RolloutSpec) -> int:
    """Enough replicas for the largest share of traffic the candidate takes (at least one)."""
    share = (
        max(s.weight for s in rollout.steps) if rollout.strategy is RolloutStrategy.CANARY else rollout.mirror_percent
    )
    return max(1, math.ceil(spec.replicas * share / 100))


def _short(reasons: Sequence[str]) -> list[str]:
    return [r if len(r) <= MAX_REASON_CHARS else r[: MAX_REASON_CHARS - 1] + "…" for r in reasons[:MAX_REASONS]]


def _signal_reason(report: Mapping[str, Any], default: str) -> str:
    for item in report.get("triage") or []:
        signal = str(item.get("signal", ""))
        if signal in SIGNAL_REASONS:
            return SIGNAL_REASONS[signal]
        if signal.endswith("_evidence"):
            return "MissingEvidence"
    return default


def _sources(report: Mapping[str, Any]) -> str:
    src = report.get("sources")
    if not src:
        return ""
    return f" (observations from {src['answered']} of {src['asked']} ready baseline sidecars)"


def decide(
    desired: InferenceDeploymentSpec,
    baseline: InferenceDeploymentSpec | None,
    state: RolloutStatus | None,
    *,
    peers: list[str],
    now: float,
    report: Mapping[str, Any] | None = None,
    action: str | None = None,
    generation: int | None = None,
) -> Outcome:
    """The transition table: what to render and record, from the desired spec, the running
    baseline's spec (None before the first apply), ``status.rollout``, a gate report (None
    outside an analysis tick), the ``rollout-action`` annotation and the time (epoch seconds)."""
    stamp = rfc3339(now)
    active = is_active(state)

    def cond(type_: str, ok: bool, reason: str, message: str = "") -> dict[str, Any]:
        return st.condition(type_, ok, reason, message, generation)

    def ignored(why: str) -> list[Event]:
        if action is None:
            return []
        return [Event("Normal", "RolloutActionIgnored", f"{ACTION_ANNOTATION}={action}: {why}; annotation removed")]

    if action is not None and action not in (PROMOTE, ABORT):  # decide as without it, warn, remove it
        out = decide(desired, baseline, state, peers=peers, now=now, report=report, generation=generation)
        warning = Event("Warning", "RolloutActionInvalid", f"{ACTION_ANNOTATION}={action!r}: use promote or abort")
        return replace(out, events=[*out.events, warning], handled_action=action)

    if baseline is None:  # the first apply: nothing runs yet, so nothing to judge against
        return Outcome(desired, status=state, events=ignored("nothing runs yet"), handled_action=action)
    d_hash, b_hash = spec_version(desired), spec_version(baseline)
    rollout = desired.rollout

    if rollout is None or d_hash == b_hash:
        # no judged change: render the desired spec (a rolling update without spec.rollout;
        # with it, only replicas/rollout/remote settings changed, which need no new pods)
        if not active:
            return Outcome(desired, status=state, events=ignored("no rollout is running"), handled_action=action)
        assert state is not None
        why = (
            "spec.rollout was removed; the spec rolls out as a rolling update"
            if rollout is None
            else "the spec was changed back to the running version"
        )
        ended = state.model_copy(
            update={"phase": RolloutPhase.ROLLED_BACK, "weight": 0, "decision": None, "reasons": [why],
                    "finished_at": stamp}
        )  # fmt: skip
        return Outcome(
            desired,
            status=ended,
            conditions=[
                cond(ROLLOUT_PROGRESSING, False, "Cancelled", why),
                cond(ROLLOUT_HELD, False, "Cancelled", why),
                cond(ROLLED_BACK, True, "Cancelled", why),
            ],
            events=[Event("Normal", "RolloutCancelled", f"candidate {state.candidate_version} removed: {why}"),
                    *ignored("the rollout was cancelled")],
            handled_action=action,
        )  # fmt: skip

    # a judged change: the baseline keeps its spec (taking only the settings that need no new pods)
    running = baseline.model_copy(update={"replicas": desired.replicas, "rollout": rollout})
    candidate = desired.model_copy(update={"replicas": candidate_replicas(desired, rollout)})
    rejected = state.rejected_spec_hash if state is not None else None
    conditions: list[dict[str, Any]] = []
    events: list[Event] = []

    def promote(by_hand: bool, why: str) -> Outcome:
        prev = state if state is not None and state.candidate_version == d_hash else None
        done = RolloutStatus(
            phase=RolloutPhase.PROMOTED,
            step=prev.step if prev else 0,
            weight=100,
            candidate_version=d_hash,
            baseline_version=b_hash,
            decision=PROMOTE if not by_hand else (prev.decision if prev else None),
            reasons=[why],
            started_at=prev.started_at if prev else stamp,
            step_started_at=prev.step_started_at if prev else stamp,
            finished_at=stamp,
            rejected_spec_hash=None if rejected == d_hash else rejected,
        )
        reason = "PromotedByHand" if by_hand else "GatePassed"
        return Outcome(
            desired,
            status=done,
            conditions=[
                *conditions,
                cond(ROLLOUT_PROGRESSING, False, "Promoted", why),
                cond(ROLLOUT_HELD, False, "Promoted", why),
                cond(PROMOTED, True, reason, why),
                cond(ROLLED_BACK, False, "Promoted", why),
            ],
            events=[*events, Event("Normal", "Promoted", f"spec {d_hash} replaces {b_hash}: {why}")],
            handled_action=action,
        )

    def roll_back(current: RolloutStatus, reason: str, why: str, decision: str | None, reasons: list[str]) -> Outcome:
        done = current.model_copy(
            update={"phase": RolloutPhase.ROLLED_BACK, "weight": 0, "decision": decision, "reasons": _short(reasons),
                    "finished_at": stamp, "rejected_spec_hash": d_hash}
        )  # fmt: skip
        return Outcome(
            running,
            status=done,
            conditions=[
                *conditions,
                cond(ROLLOUT_PROGRESSING, False, "RolledBack", why),
                cond(ROLLOUT_HELD, False, "RolledBack", why),
                cond(PROMOTED, False, "RolledBack", why),
                cond(ROLLED_BACK, True, reason, why),
            ],
            events=[*events, Event("Warning", "RolledBack", f"candidate {d_hash} removed, {b_hash} runs on: {why}")],
            handled_action=action,
        )

    if action == PROMOTE:
        return promote(True, f"promoted by hand ({ACTION_ANNOTATION}={PROMOTE})")

    current = state if active and state is not None and state.candidate_version == d_hash else None
    if current is None and rejected == d_hash:
        # rolled back before: the baseline runs on until the spec changes again (or a person promotes it)
        return Outcome(
            running, status=state, events=ignored(f"spec {d_hash} was rolled back; no rollout runs"),
            handled_action=action,
        )  # fmt: skip

    if current is None:
        if active and state is not None:
            events.append(
                Event("Normal", "RolloutRestarted",
                      f"the spec changed during the rollout of {state.candidate_version}; {d_hash} starts over")
            )  # fmt: skip
        first = plan_for(rollout, d_hash, 0, peers)
        current = RolloutStatus(
            phase=RolloutPhase(rollout.strategy.value),
            step=0,
            weight=first.weight,
            candidate_version=d_hash,
            baseline_version=b_hash,
            started_at=stamp,
            step_started_at=stamp,
            rejected_spec_hash=rejected,
        )
        what = f"{first.weight}% of requests" if rollout.strategy is RolloutStrategy.CANARY else "a mirror of requests"
        message = f"{rollout.strategy.value} rollout of spec {d_hash} beside {b_hash}: the candidate gets {what}"
        events.append(Event("Normal", "RolloutStarted", message))
        conditions += [
            cond(ROLLOUT_PROGRESSING, True, "Started", message),
            cond(ROLLOUT_HELD, False, "Started", "the gate has not judged yet"),
            cond(PROMOTED, False, "RolloutRunning", ""),
            cond(ROLLED_BACK, False, "RolloutRunning", ""),
        ]

    if action == ABORT:
        why = f"rolled back by hand ({ACTION_ANNOTATION}={ABORT})"
        return roll_back(current, "AbortedByHand", why, current.decision, [why])

    def staying(at: RolloutStatus) -> Outcome:
        plan = plan_for(rollout, d_hash, at.step, peers).model_copy(update=sides(baseline, desired, b_hash, d_hash))
        return Outcome(running, candidate, plan, at, conditions, events)

    if report is None:
        return staying(current)

    decision = str(report.get("decision"))
    reasons = [str(r) for r in report.get("reasons") or []]
    progress = Progress(current.step, epoch(current.started_at, now), epoch(current.step_started_at, now))
    act, why = next_action(rollout, progress, decision, now)
    if act is Action.ROLLBACK:
        timed_out = decision != "rollback"
        reason = "MaxDurationExceeded" if timed_out else _signal_reason(report, "GateRolledBack")
        return roll_back(current, reason, "; ".join([why, *_short(reasons)]), decision, [why, *reasons])
    if act is Action.PROMOTE:
        return promote(False, why)
    if act is Action.ADVANCE:
        nxt = plan_for(rollout, d_hash, current.step + 1, peers)
        advanced = current.model_copy(
            update={"step": current.step + 1, "weight": nxt.weight, "step_started_at": stamp, "decision": decision,
                    "reasons": [why]}
        )  # fmt: skip
        message = f"{why}: step {advanced.step + 1} of {len(rollout.steps)}, the candidate serves {nxt.weight}%"
        events.append(Event("Normal", "RolloutAdvanced", message))
        conditions += [
            cond(ROLLOUT_PROGRESSING, True, "StepAdvanced", message),
            cond(ROLLOUT_HELD, False, "GatePassed", why),
        ]
        return staying(advanced)
    if act is Action.HOLD:
        reason = _signal_reason(report, "GateHolds")
        message = "; ".join(_short(reasons) or [why]) + _sources(report)
        if current.decision != "hold":
            events.append(Event("Warning", "RolloutHeld", message))
        conditions += [
            cond(ROLLOUT_PROGRESSING, True, "Analyzing", f"step {current.step + 1} of {len(rollout.steps)}"),
            cond(ROLLOUT_HELD, True, reason, message),
        ]
        return staying(current.model_copy(update={"decision": decision, "reasons": _short(reasons or [why])}))
    # WAIT: the gate is content; the step's hold time has not passed
    if current.decision != "promote":
        events.append(Event("Normal", "GatePassed", why))
    conditions += [
        cond(ROLLOUT_PROGRESSING, True, "Analyzing", why),
        cond(ROLLOUT_HELD, False, "GatePassed", why),
    ]
    return staying(current.model_copy(update={"decision": decision, "reasons": [why]}))


# ---- observations: the one I/O part, with the fetch passed in --------------------------------------


@dataclass(frozen=True)
class Collected:
    baseline: list[Observation]
    candidate: list[Observation]
    asked: int  # ready baseline sidecars
    answered: int
    invalid: int = 0  # observations dropped as unreadable


Fetch = Callable[[str], Awaitable[Any]]  # URL -> decoded JSON; raises when unreachable


def ready_pods(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Running pods whose Ready condition is True and that have an IP."""
    out = []
    for pod in pods:
        status = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        if ready and status.get("podIP") and not (pod.get("metadata") or {}).get("deletionTimestamp"):
            out.append(pod)
    return out


def observation_urls(pods: Sequence[Mapping[str, Any]], rollout_id: str, template: str) -> list[str]:
    """``template`` fields: pod_ip, port, pod_name, namespace, rollout_id (OperatorSettings)."""
    return [
        template.format(
            pod_ip=p["status"]["podIP"],
            port=names.SIDECAR_PORT,
            pod_name=p["metadata"]["name"],
            namespace=p["metadata"].get("namespace", ""),
            rollout_id=rollout_id,
        )
        for p in ready_pods(pods)
    ]


def _observations(side: str, items: Any) -> tuple[list[Observation], int]:
    out, invalid = [], 0
    for item in items if isinstance(items, list) else []:
        try:
            obs = Observation.model_validate(item)
            check_observations(side, [obs])
        except (ValidationError, RolloutInputError):
            invalid += 1
            continue
        out.append(obs)
    return out, invalid


async def collect(urls: Sequence[str], fetch: Fetch) -> Collected:
    """Every sidecar's observations, merged (each request is observed by the one sidecar that served it;
    a repeated request id keeps its first record). An unreachable sidecar is missing evidence."""
    answers = await asyncio.gather(*(fetch(u) for u in urls), return_exceptions=True)
    sides: dict[str, dict[str, Observation]] = {"baseline": {}, "candidate": {}}
    answered = invalid = 0
    for url, answer in zip(urls, answers, strict=True):
        if isinstance(answer, BaseException) or not isinstance(answer, dict):
            log.debug("rollout observations of %s unavailable: %r", url, answer)
            continue
        answered += 1
        for side, seen in sides.items():
            got, bad = _observations(side, answer.get(side))
            invalid += bad
            for obs in got:
                seen.setdefault(obs.request_id, obs)
    return Collected(list(sides["baseline"].values()), list(sides["candidate"].values()), len(urls), answered, invalid)


def judge(rollout: RolloutSpec, collected: Collected) -> dict[str, Any]:
    """The gate's report on what was collected, with where the evidence came from."""
    report = evaluate(parse_policy(rollout.gate.policy()), collected.baseline, collected.candidate)
    report["sources"] = {"asked": collected.asked, "answered": collected.answered, "invalid": collected.invalid}
    return report


def fetch_json(session: aiohttp.ClientSession) -> Fetch:
    async def fetch(url: str) -> Any:
        async with session.get(url) as resp:
            resp.raise_for_status()
            return await resp.json()

    return fetch


def read_baseline(config_map: Mapping[str, Any] | None) -> InferenceDeploymentSpec | None:
    """The spec the baseline runs, from its ConfigMap's ``deployment.yaml``; None if absent or unreadable."""
    text = ((config_map or {}).get("data") or {}).get(names.CONFIG_FILE)
    if not text:
        return None
    try:
        doc = yaml.safe_load(text)
        return InferenceDeploymentSpec.model_validate(doc["spec"])
    except (yaml.YAMLError, ValidationError, KeyError, TypeError):
        return None


def candidate_objects(name: str) -> list[tuple[str, str, str]]:
    """(apiVersion, kind, name) of the candidate children (``children.candidate_children``)."""
    cand = names.candidate_name(name)
    return [
        ("apps/v1", "Deployment", cand),
        ("v1", "ConfigMap", names.config_map_name(cand)),
        ("v1", "Service", names.service_name(cand)),
        ("v1", "Service", names.peers_service_name(cand)),
    ]


def lock(memo: Any, namespace: str, name: str) -> asyncio.Lock:
    """One lock per CR: reconciles (handlers, drift repair) and the rollout timer never interleave."""
    locks: dict[tuple[str, str], asyncio.Lock] = memo.rollout_locks
    return locks.setdefault((namespace, name), asyncio.Lock())
