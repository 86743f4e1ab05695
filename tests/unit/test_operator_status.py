"""Conditions and phase computed from what the operator observes."""

from __future__ import annotations

from modelfleet.operator import status as st


def dep(ready: int, updated: int, total: int, gen: int = 1, observed: int = 1, conds=()):
    return {
        "metadata": {"generation": gen},
        "status": {
            "readyReplicas": ready,
            "updatedReplicas": updated,
            "replicas": total,
            "observedGeneration": observed,
            "conditions": list(conds),
        },
    }


def test_rollout_complete_is_available():
    conds, counts = st.rollout_conditions(2, dep(2, 2, 2), 5)
    by = {c["type"]: c for c in conds}
    assert by["Available"]["status"] == "True" and by["Progressing"]["status"] == "False"
    assert counts == {"replicas": 2, "readyReplicas": 2}
    assert all(c["observedGeneration"] == 5 for c in conds)
    assert st.phase([st.condition("Placed", True, "Placed", "", 5), *conds]).value == "Available"


def test_rolling_update_is_progressing():
    conds, _ = st.rollout_conditions(3, dep(2, 1, 3, gen=2, observed=2), 1)
    by = {c["type"]: c["status"] for c in conds}
    assert by == {"Available": "False", "Progressing": "True", "Degraded": "False"}
    assert st.phase([st.condition("Placed", True, "", "", 1), *conds]).value == "Progressing"


def test_replica_failure_is_degraded_with_the_reason():
    failure = {"type": "ReplicaFailure", "status": "True", "message": "exceeded quota"}
    conds, _ = st.rollout_conditions(2, dep(0, 0, 0, conds=[failure]), 1)
    degraded = next(c for c in conds if c["type"] == "Degraded")
    assert degraded["status"] == "True" and "exceeded quota" in degraded["message"]
    assert st.phase(conds).value == "Degraded"


def test_unplaced_wins_over_everything():
    assert st.phase([st.condition("Placed", False, "NoMatchingNodes", "x", 1)]).value == "Unplaceable"


def test_transition_time_survives_unchanged_status():
    old = [{"type": "Available", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    same = st.merge_conditions(old, [st.condition("Available", True, "R", "m", 2)], "2026-02-02T00:00:00Z")
    flipped = st.merge_conditions(old, [st.condition("Available", False, "R", "m", 2)], "2026-02-02T00:00:00Z")
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert flipped[0]["lastTransitionTime"] == "2026-02-02T00:00:00Z"
    merged = st.merge_conditions(old, [st.condition("Placed", True, "", "", 1)], "t")
    assert [c["type"] for c in merged] == ["Placed", "Available"]
