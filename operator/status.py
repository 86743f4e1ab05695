"""CR status from what the operator knows: pure functions, no I/O.

Conditions follow Kubernetes conventions: one entry per type, with
``lastTransitionTime`` changed only when ``status`` flips and
``observedGeneration`` naming the spec generation acted on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from modelfleet.dataplane.spec import Phase

PLACED, AVAILABLE, PROGRESSING, DEGRADED = "Placed", "Available", "Progressing", "Degraded"
CONDITION_ORDER = (PLACED, AVAILABLE, PROGRESSING, DEGRADED)


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, ok: bool, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def merge_conditions(
    old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]], now: str
) -> list[dict[str, Any]]:
    """``new`` replaces entries of the same type; transition times survive unchanged statuses."""
    by_type = {c["type"]: dict(c) for c in old}
    for cond in new:
        prev = by_type.get(cond["type"])
        merged = dict(cond)
        if prev is not None and prev.get("status") == cond["status"] and prev.get("lastTransitionTime"):
            merged["lastTransitionTime"] = prev["lastTransitionTime"]
        else:
            merged["lastTransitionTime"] = now
        by_type[cond["type"]] = merged
    ordered = [by_type.pop(t) for t in CONDITION_ORDER if t in by_type]
    return ordered + sorted(by_type.values(), key=lambda c: str(c["type"]))


def rollout_conditions(
    desired: int, deployment: Mapping[str, Any] | None, generation: int | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Available / Progressing / Degraded and the replica counts, from the child Deployment."""
    if deployment is None:
        conds = [
            condition(AVAILABLE, False, "NoDeployment", "the data-plane Deployment does not exist yet", generation),
            condition(PROGRESSING, True, "Creating", "creating the data-plane Deployment", generation),
            condition(DEGRADED, False, "AsExpected", "", generation),
        ]
        return conds, {"replicas": 0, "readyReplicas": 0}
    st = deployment.get("status") or {}
    ready = int(st.get("readyReplicas") or 0)
    updated = int(st.get("updatedReplicas") or 0)
    total = int(st.get("replicas") or 0)
    dep_conds = {c.get("type"): c for c in st.get("conditions") or []}
    current = (deployment.get("metadata") or {}).get("generation") == st.get("observedGeneration")
    failure = dep_conds.get("ReplicaFailure", {})
    stuck = dep_conds.get("Progressing", {}).get("reason") == "ProgressDeadlineExceeded"
    available = ready >= desired and (desired == 0 or ready > 0)
    progressing = not current or updated < desired or total > desired or ready < desired
    degraded_msg = ""
    if failure.get("status") == "True":
        degraded_msg = f"pods cannot be created: {failure.get('message', '')}"
    elif stuck:
        degraded_msg = dep_conds["Progressing"].get("message", "rollout exceeded its progress deadline")
    conds = [
        condition(AVAILABLE, available, "MinimumReplicasAvailable" if available else "ReplicasNotReady",
                  f"{ready}/{desired} replicas ready", generation),
        condition(PROGRESSING, progressing, "RollingOut" if progressing else "Complete",
                  f"{updated}/{desired} replicas updated, {ready} ready" if progressing else "rollout complete", generation),
        condition(DEGRADED, bool(degraded_msg), "RolloutFailed" if degraded_msg else "AsExpected", degraded_msg, generation),
    ]  # fmt: skip
    return conds, {"replicas": total, "readyReplicas": ready}


def phase(conditions: Sequence[Mapping[str, Any]]) -> Phase:
    by_type = {c["type"]: c.get("status") for c in conditions}
    if by_type.get(PLACED) == "False":
        return Phase.UNPLACEABLE
    if by_type.get(DEGRADED) == "True":
        return Phase.DEGRADED
    if by_type.get(AVAILABLE) == "True" and by_type.get(PROGRESSING) != "True":
        return Phase.AVAILABLE
    if by_type.get(PLACED) == "True":
        return Phase.PROGRESSING
    return Phase.PENDING
