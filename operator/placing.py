"""Placement as the operator runs it: read the inventory, estimate, decide.

The thin I/O edge around the pure modules ``inventory``, ``dataplane.sizing`` and
``placement``: it reads Nodes and Pods, leaves out the deployment's own pods
(so re-reconciling a placed deployment sees the GPUs it already holds as
free, and decides the same), and turns a plan into what a pod template needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from modelfleet.dataplane.sizing import estimate_for
from modelfleet.dataplane.spec import InferenceDeploymentSpec, PlacementStatus
from modelfleet.operator.inventory import gpu_nodes
from modelfleet.operator.placement import PlacementFailure, plan_placement
from modelfleet.operator.resources import names
from modelfleet.operator.resources.children import Owner, PodPlacement


@dataclass(frozen=True)
class Placed:
    pod: PodPlacement
    status: PlacementStatus


@dataclass(frozen=True)
class Unplaceable:
    reason: str
    message: str


def place(
    owner: Owner,
    spec: InferenceDeploymentSpec,
    nodes: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
) -> Placed | Unplaceable:
    """Decide from the operator's watched view of Nodes and (non-terminated, bound) Pods."""
    if not spec.needs_gpu():
        plan = plan_placement(spec, [], None)
    else:
        others = [
            p
            for p in pods
            if not (
                (p.get("metadata") or {}).get("namespace") == owner.namespace
                and ((p.get("metadata") or {}).get("labels") or {}).get(names.DEPLOYMENT_LABEL) == owner.instance
            )
        ]
        plan = plan_placement(spec, gpu_nodes(nodes, others), estimate_for(spec))
    if isinstance(plan, PlacementFailure):
        return Unplaceable(plan.reason.value, plan.message)
    pod = PodPlacement(
        gpu_resource=plan.resource_name,
        gpus_per_replica=plan.gpus_per_replica,
        node_affinity=plan.node_affinity(),
        tolerations=list(plan.tolerations),
        spread_topology_key=plan.spread_topology_key,
    )
    return Placed(pod, plan.to_status())
