"""The operator's rollout flow as pure functions: the transition table (desired spec, running
baseline, status.rollout, gate report, annotation, time -> what to render and record), the
candidate's children, and observation gathering with the HTTP fetch passed in."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import yaml

from modelfleet.dataplane.rollout.version import spec_version as spec_hash
from modelfleet.dataplane.spec import InferenceDeploymentSpec, RolloutPhase, RolloutStatus
from modelfleet.operator import rollout
from modelfleet.operator.resources import names
from modelfleet.operator.resources.children import (
    Owner,
    PodPlacement,
    candidate_children,
    candidate_url,
    plan_children,
)
from modelfleet.operator.rollout import ACTION_ANNOTATION, Outcome, decide
from modelfleet.operator.settings import OperatorSettings

OWNER = Owner("chat", "llm", "uid-1")
SETTINGS = OperatorSettings(image_registry="registry.example/mf", image_tag="1.2.3")
PEERS = [candidate_url(OWNER)]
T0 = 1_800_000_000.0
CANARY = {"steps": [{"weight": 10, "holdSeconds": 60}, {"weight": 50, "holdSeconds": 60}], "maxDurationSeconds": 3600}


def spec(replicas: int = 2, rollout_: dict[str, Any] | None = None, **kw: Any) -> InferenceDeploymentSpec:
    base: dict[str, Any] = {
        "model": {"name": "m", "source": {"path": "/models/m"}},
        "runtime": {"kind": "torch", "device": "cpu"},
        "replicas": replicas,
    }
    if rollout_ is not None:
        base["rollout"] = rollout_
    base.update(kw)
    return InferenceDeploymentSpec.model_validate(base)


BASE = spec(rollout_=CANARY)
NEW = spec(rollout_=CANARY, engine={"maxNumSeqs": 4})


def report(decision: str, *signals: str) -> dict[str, Any]:
    return {
        "decision": decision,
        "reasons": [f"{s} failed" for s in signals],
        "triage": [{"signal": s} for s in signals],
        "sources": {"asked": 2, "answered": 2, "invalid": 0},
    }


def conds(out: Outcome) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in out.conditions}


def reasons(out: Outcome) -> list[str]:
    return [e.reason for e in out.events]


def start() -> Outcome:
    return decide(NEW, BASE, None, peers=PEERS, now=T0)


def test_first_apply_and_plain_updates_render_the_desired_spec_with_no_candidate():
    first = decide(NEW, None, None, peers=PEERS, now=T0)
    assert first.baseline == NEW and first.candidate is None and first.plan is None and first.events == []
    plain = decide(spec(engine={"maxNumSeqs": 4}), spec(), None, peers=PEERS, now=T0)  # no spec.rollout
    assert plain.baseline.engine.max_num_seqs == 4 and plain.candidate is None and plain.status is None
    scaled = decide(spec(replicas=5, rollout_=CANARY), BASE, None, peers=PEERS, now=T0)  # needs no new pods
    assert scaled.baseline.replicas == 5 and scaled.candidate is None and scaled.status is None


def test_a_change_that_needs_new_pods_starts_a_candidate_and_keeps_the_baseline():
    out = start()
    assert spec_hash(out.baseline) == spec_hash(BASE)  # the baseline does not roll
    assert out.candidate is not None and spec_hash(out.candidate) == spec_hash(NEW)
    assert out.candidate.replicas == 1  # ceil(2 replicas * 50 % largest step)
    assert out.plan is not None
    assert out.plan.to_wire() == {
        "id": spec_hash(NEW),
        "strategy": "Canary",
        "weight": 10,
        "mirrorPercent": 100,
        "candidatePeers": ["http://chat-candidate.llm.svc:8000"],
        "baselineVersion": spec_hash(BASE),
        "candidateVersion": spec_hash(NEW),
        "baselineRuntime": "torch",
        "candidateRuntime": "torch",
        "baselineAccelerator": "cpu",
        "candidateAccelerator": "cpu",
    }
    assert out.status is not None and out.status.phase is RolloutPhase.CANARY
    assert (out.status.step, out.status.weight, out.status.candidate_version) == (0, 10, spec_hash(NEW))
    assert out.status.started_at == out.status.step_started_at == "2027-01-15T08:00:00Z"
    assert reasons(out) == ["RolloutStarted"] and out.events[0].type == "Normal"
    assert conds(out)["RolloutProgressing"]["status"] == "True"
    assert conds(out)["Promoted"]["status"] == conds(out)["RolledBack"]["status"] == "False"


def test_a_reconcile_between_ticks_keeps_the_step_and_says_nothing():
    state = start().status
    again = decide(NEW, BASE, state, peers=PEERS, now=T0 + 30)
    assert again.status == state and again.events == [] and again.conditions == []
    assert again.plan is not None and again.plan.weight == 10 and again.candidate is not None


def test_hold_reports_the_gates_reason_once():
    state = start().status
    held = decide(NEW, BASE, state, peers=PEERS, now=T0 + 10, report=report("hold", "matched_traffic"))
    cond = conds(held)["RolloutHeld"]
    assert cond["status"] == "True" and cond["reason"] == "NotEnoughMatchedTraffic"
    assert "matched_traffic failed" in cond["message"] and "2 of 2 ready baseline sidecars" in cond["message"]
    assert reasons(held) == ["RolloutHeld"] and held.events[0].type == "Warning"
    assert held.status is not None and held.status.decision == "hold" and held.candidate is not None
    still = decide(NEW, BASE, held.status, peers=PEERS, now=T0 + 20, report=report("hold", "matched_traffic"))
    assert still.events == []  # no event per tick
    latency = decide(NEW, BASE, state, peers=PEERS, now=T0 + 10, report=report("hold", "ttft_p95"))
    assert conds(latency)["RolloutHeld"]["reason"] == "LatencyRegression"


def test_canary_waits_advances_then_promotes():
    state = start().status
    waiting = decide(NEW, BASE, state, peers=PEERS, now=T0 + 30, report=report("promote"))
    assert waiting.status is not None and waiting.status.step == 0 and reasons(waiting) == ["GatePassed"]
    assert conds(waiting)["RolloutHeld"]["status"] == "False"
    advanced = decide(NEW, BASE, waiting.status, peers=PEERS, now=T0 + 61, report=report("promote"))
    assert advanced.status is not None and (advanced.status.step, advanced.status.weight) == (1, 50)
    assert advanced.plan is not None and advanced.plan.weight == 50 and reasons(advanced) == ["RolloutAdvanced"]
    assert advanced.status.step_started_at == "2027-01-15T08:01:01Z"
    too_soon = decide(NEW, BASE, advanced.status, peers=PEERS, now=T0 + 100, report=report("promote"))
    assert too_soon.status is not None and too_soon.status.step == 1 and too_soon.candidate is not None
    promoted = decide(NEW, BASE, advanced.status, peers=PEERS, now=T0 + 122, report=report("promote"))
    assert promoted.baseline == NEW and promoted.candidate is None and promoted.plan is None
    assert promoted.status is not None and promoted.status.phase is RolloutPhase.PROMOTED
    assert conds(promoted)["Promoted"]["status"] == "True" and conds(promoted)["Promoted"]["reason"] == "GatePassed"
    assert conds(promoted)["RolloutProgressing"]["status"] == "False"
    assert reasons(promoted) == ["Promoted"] and promoted.handled_action is None


def test_gate_rollback_removes_the_candidate_and_the_spec_is_not_retried():
    state = start().status
    out = decide(NEW, BASE, state, peers=PEERS, now=T0 + 10, report=report("rollback", "output_mismatch"))
    assert out.candidate is None and out.plan is None and spec_hash(out.baseline) == spec_hash(BASE)
    assert out.status is not None and out.status.phase is RolloutPhase.ROLLED_BACK
    assert out.status.rejected_spec_hash == spec_hash(NEW)
    assert conds(out)["RolledBack"]["reason"] == "OutputMismatch"
    assert reasons(out) == ["RolledBack"] and out.events[0].type == "Warning"
    later = decide(NEW, BASE, out.status, peers=PEERS, now=T0 + 500, report=None)
    assert later.candidate is None and later.status == out.status and later.events == []
    newer = spec(rollout_=CANARY, engine={"maxNumSeqs": 8})
    again = decide(newer, BASE, out.status, peers=PEERS, now=T0 + 600)
    assert again.candidate is not None and again.status is not None and again.status.phase is RolloutPhase.CANARY
    assert again.status.rejected_spec_hash == spec_hash(NEW)  # still remembered


def test_a_rollout_past_max_duration_rolls_back():
    state = start().status
    out = decide(NEW, BASE, state, peers=PEERS, now=T0 + 3601, report=report("hold", "matched_traffic"))
    assert out.status is not None and out.status.phase is RolloutPhase.ROLLED_BACK
    assert conds(out)["RolledBack"]["reason"] == "MaxDurationExceeded"


@pytest.mark.parametrize("state_of", ["running", "rejected", "none"])
def test_promote_annotation_forces_the_desired_spec_in(state_of):
    started = start().status
    assert started is not None
    state = {
        "running": started,
        "rejected": started.model_copy(
            update={"phase": RolloutPhase.ROLLED_BACK, "rejected_spec_hash": spec_hash(NEW)}
        ),
        "none": None,
    }[state_of]
    out = decide(NEW, BASE, state, peers=PEERS, now=T0 + 5, action="promote")
    assert out.baseline == NEW and out.candidate is None and out.plan is None
    assert out.status is not None and out.status.phase is RolloutPhase.PROMOTED
    assert out.status.rejected_spec_hash is None
    assert conds(out)["Promoted"]["reason"] == "PromotedByHand" and out.handled_action == "promote"
    assert reasons(out) == ["Promoted"] and ACTION_ANNOTATION in out.events[0].message


def test_abort_annotation_rolls_back_and_remembers_the_spec():
    out = decide(NEW, BASE, start().status, peers=PEERS, now=T0 + 5, action="abort")
    assert out.candidate is None and out.handled_action == "abort"
    assert out.status is not None and out.status.rejected_spec_hash == spec_hash(NEW)
    assert conds(out)["RolledBack"]["reason"] == "AbortedByHand"
    assert "by hand" in out.events[0].message
    # given with the spec change itself: the rollout starts and ends at once
    at_once = decide(NEW, BASE, None, peers=PEERS, now=T0, action="abort")
    assert reasons(at_once) == ["RolloutStarted", "RolledBack"] and at_once.candidate is None


def test_annotations_with_nothing_to_do_or_unknown_values_are_removed_with_an_event():
    idle = decide(BASE, BASE, None, peers=PEERS, now=T0, action="abort")
    assert idle.handled_action == "abort" and reasons(idle) == ["RolloutActionIgnored"]
    bogus = decide(NEW, BASE, start().status, peers=PEERS, now=T0 + 5, action="yolo")
    assert bogus.handled_action == "yolo" and reasons(bogus) == ["RolloutActionInvalid"]
    assert bogus.candidate is not None  # the rollout goes on


def test_spec_changes_during_a_rollout_restart_or_cancel_it():
    state = start().status
    newer = spec(rollout_=CANARY, engine={"maxNumSeqs": 8})
    restarted = decide(newer, BASE, state, peers=PEERS, now=T0 + 30)
    assert reasons(restarted) == ["RolloutRestarted", "RolloutStarted"]
    assert restarted.status is not None and restarted.status.candidate_version == spec_hash(newer)
    reverted = decide(BASE, BASE, state, peers=PEERS, now=T0 + 30)
    assert reverted.candidate is None and reverted.status is not None
    assert reverted.status.phase is RolloutPhase.ROLLED_BACK and reverted.status.rejected_spec_hash is None
    assert reasons(reverted) == ["RolloutCancelled"]
    removed = decide(spec(engine={"maxNumSeqs": 4}), BASE, state, peers=PEERS, now=T0 + 30)  # no spec.rollout
    assert removed.baseline.engine.max_num_seqs == 4 and removed.candidate is None  # plain rolling update


def test_shadow_mirrors_and_promotes_after_its_first_hold():
    shadow = {"strategy": "Shadow", "mirrorPercent": 25, "steps": [{"weight": 1, "holdSeconds": 20}]}
    new, base = spec(replicas=4, rollout_=shadow, engine={"maxNumSeqs": 4}), spec(replicas=4, rollout_=shadow)
    out = decide(new, base, None, peers=PEERS, now=T0)
    assert out.plan is not None and (out.plan.strategy, out.plan.weight, out.plan.mirror_percent) == ("Shadow", 0, 25)
    assert out.status is not None and out.status.phase is RolloutPhase.SHADOW
    assert out.candidate is not None and out.candidate.replicas == 1  # ceil(4 * 25 %)
    done = decide(new, base, out.status, peers=PEERS, now=T0 + 21, report=report("promote"))
    assert done.status is not None and done.status.phase is RolloutPhase.PROMOTED and done.baseline == new


def test_status_round_trips_through_the_wire():
    state = start().status
    assert state is not None
    assert rollout.state_of({"rollout": state.to_wire()}) == state
    assert rollout.state_of({"rollout": {"phase": "Sideways"}}) is None
    assert rollout.involved({"rollout": {}}, None) is False and rollout.involved({"rollout": CANARY}, None)
    assert rollout.involved({}, {"rollout": state.to_wire()})


# ---- children -----------------------------------------------------------------------------------


def by_kind(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def test_candidate_children_sit_beside_the_baseline_without_sharing_its_selectors():
    cand = by_kind(candidate_children(OWNER, NEW, SETTINGS, PodPlacement()))
    assert set(cand) == {
        ("ConfigMap", "chat-candidate-config"),
        ("Deployment", "chat-candidate"),
        ("Service", "chat-candidate"),
        ("Service", "chat-candidate-peers"),
    }
    assert {(kind, name) for _, kind, name in rollout.candidate_objects("chat")} == set(cand)
    base = by_kind(plan_children(OWNER, BASE, SETTINGS, PodPlacement()))
    dep = cand[("Deployment", "chat-candidate")]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    for obj in base.values():  # no baseline selector matches a candidate pod
        selector = (obj.get("spec") or {}).get("selector") or {}
        selector = selector.get("matchLabels", selector)
        if selector:
            assert not all(pod_labels.get(k) == v for k, v in selector.items()), obj["metadata"]["name"]
    assert pod_labels[names.CANDIDATE_OF_LABEL] == "chat"
    assert all(o["metadata"]["labels"][names.CANDIDATE_OF_LABEL] == "chat" for o in cand.values())
    assert all(o["metadata"]["ownerReferences"][0]["name"] == "chat" for o in cand.values())
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "chat-sidecar"  # the baseline's: RBAC is not duplicated
    assert pod["volumes"][0]["configMap"]["name"] == "chat-candidate-config"
    engine, sidecar = pod["containers"]
    assert engine["args"][engine["args"].index("--deployment") + 1] == "chat"  # the manifest's name
    assert sidecar["args"][sidecar["args"].index("--service") + 1] == "chat-candidate-peers"
    assert dep["spec"]["replicas"] == NEW.replicas
    front = cand[("Service", "chat-candidate")]
    assert front["spec"]["ports"][0]["port"] == names.SIDECAR_PORT
    manifest = yaml.safe_load(cand[("ConfigMap", "chat-candidate-config")]["data"]["deployment.yaml"])
    assert manifest["metadata"]["name"] == "chat" and manifest["spec"]["engine"]["maxNumSeqs"] == 4
    assert names.ROLLOUT_FILE not in cand[("ConfigMap", "chat-candidate-config")]["data"]


def test_the_baseline_configmap_carries_the_plan_and_its_sidecars_read_it():
    plan = start().rollout_plan
    objs = by_kind(plan_children(OWNER, BASE, SETTINGS, PodPlacement(), plan))
    data = objs[("ConfigMap", "chat-config")]["data"]
    assert json.loads(data["rollout.json"]) == plan
    assert (
        "rollout.json"
        not in by_kind(plan_children(OWNER, BASE, SETTINGS, PodPlacement()))[("ConfigMap", "chat-config")]["data"]
    )
    sidecar = objs[("Deployment", "chat")]["spec"]["template"]["spec"]["containers"][1]["args"]
    assert sidecar[sidecar.index("--rollout-file") + 1] == "/etc/modelfleet/rollout.json"


def test_spec_hash_ignores_what_needs_no_new_pods():
    assert spec_hash(spec(replicas=1)) == spec_hash(spec(replicas=7, rollout_=CANARY))
    assert spec_hash(spec()) != spec_hash(spec(engine={"maxNumSeqs": 4}))


# ---- observations ----------------------------------------------------------------------------


def pod(name: str, ip: str | None, ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "llm"},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def obs(rid: str, tokens: list[int], latency: float = 10.0) -> dict[str, Any]:
    return {"request_id": rid, "ok": True, "latency_ms": latency, "output_tokens": tokens}


def test_observations_come_from_ready_baseline_sidecars_and_unreachable_ones_are_missing_evidence():
    pods = [pod("a", "10.0.0.1"), pod("b", "10.0.0.2"), pod("c", "10.0.0.3", ready=False), pod("d", None)]
    urls = rollout.observation_urls(pods, "abc123", SETTINGS.rollout_url_template)
    assert urls == [
        "http://10.0.0.1:8000/rollout/observations?id=abc123",
        "http://10.0.0.2:8000/rollout/observations?id=abc123",
    ]
    answers: dict[str, Any] = {
        urls[0]: {
            "baseline": [obs(f"r{i}", [1, 2]) for i in range(15)] + [{"request_id": "bad", "ok": "yes"}],
            "candidate": [obs(f"r{i}", [1, 2]) for i in range(15)],
        },
        urls[1]: ConnectionError("refused"),
    }

    async def fetch(url: str) -> Any:
        answer = answers[url]
        if isinstance(answer, Exception):
            raise answer
        return answer

    collected = asyncio.run(rollout.collect(urls, fetch))
    assert (collected.asked, collected.answered, collected.invalid) == (2, 1, 1)
    assert len(collected.baseline) == len(collected.candidate) == 15
    spec_ = spec(rollout_={**CANARY, "gate": {"minMatchedRequests": 20}})
    assert spec_.rollout is not None
    held = rollout.judge(spec_.rollout, collected)
    assert held["decision"] == "hold" and held["sources"] == {"asked": 2, "answered": 1, "invalid": 1}
    answers[urls[1]] = {
        "baseline": [obs(f"s{i}", [1, 2]) for i in range(10)],
        "candidate": [obs(f"s{i}", [1, 3]) for i in range(10)],
    }
    bad = rollout.judge(spec_.rollout, asyncio.run(rollout.collect(urls, fetch)))
    assert bad["decision"] == "rollback"  # outputs differ on 10 of 25 matched requests
    out = decide(NEW, BASE, start().status, peers=PEERS, now=T0 + 10, report=bad)
    assert out.candidate is None and conds(out)["RolledBack"]["reason"] == "OutputMismatch"


def test_no_sidecar_at_all_holds_for_too_little_traffic():
    assert BASE.rollout is not None
    report_ = rollout.judge(BASE.rollout, asyncio.run(rollout.collect([], lambda url: asyncio.sleep(0))))
    out = decide(NEW, BASE, start().status, peers=PEERS, now=T0 + 10, report=report_)
    assert conds(out)["RolloutHeld"]["reason"] == "NotEnoughMatchedTraffic"
    assert "0 matched requests" in conds(out)["RolloutHeld"]["message"]


def test_baseline_is_read_from_the_configmap():
    cm = by_kind(plan_children(OWNER, NEW, SETTINGS, PodPlacement()))[("ConfigMap", "chat-config")]
    assert rollout.read_baseline(cm) == NEW
    assert rollout.read_baseline({"data": {"deployment.yaml": "junk"}}) is None
    assert rollout.read_baseline(None) is None


def test_rollout_status_model_matches_the_wire_names():
    wire = RolloutStatus(phase=RolloutPhase.CANARY, rejected_spec_hash="x", step_started_at="t").to_wire()
    assert {"phase", "rejectedSpecHash", "stepStartedAt"} <= set(wire)
