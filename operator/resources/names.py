"""Names and labels of the objects an InferenceDeployment owns."""

from __future__ import annotations

from typing import Any

from modelfleet.dataplane.spec import API_GROUP, API_VERSION, KIND

ENGINE_PORT = 8001
SIDECAR_PORT = 8000
MANAGED_BY = "modelfleet-operator"
DEPLOYMENT_LABEL = "modelfleet.io/deployment"
CONFIG_FILE = "deployment.yaml"
CONFIG_DIR = "/etc/modelfleet"
# the rollout plan the baseline's sidecars follow (dataplane/rollout/plan.py), a key of the
# baseline's ConfigMap beside CONFIG_FILE; absent when no rollout runs
ROLLOUT_FILE = "rollout.json"
# on a rollout's candidate children (named candidate_name(cr)): the InferenceDeployment they belong to
CANDIDATE_OF_LABEL = "modelfleet.io/candidate-of"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def config_map_name(name: str) -> str:
    return f"{name}-config"


def peers_service_name(name: str) -> str:
    return f"{name}-peers"


def sidecar_account_name(name: str) -> str:
    """The pods' ServiceAccount, and the Role and RoleBinding that let its sidecar list EndpointSlices."""
    return f"{name}-sidecar"


def service_name(name: str) -> str:
    return name


def candidate_name(name: str) -> str:
    """Base name of a rollout's candidate children (their Deployment and front Service)."""
    return f"{name}-candidate"


def selector_labels(name: str) -> dict[str, str]:
    return {DEPLOYMENT_LABEL: name}


def labels(name: str, candidate_of: str | None = None) -> dict[str, str]:
    """``name`` is the children's base name; a candidate's (``candidate_of`` set) differs from the
    baseline's, so no selector of the baseline (Services, Deployment, PDB) matches a candidate pod."""
    out = {
        **selector_labels(name),
        "app.kubernetes.io/name": "modelfleet-engine",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }
    if candidate_of is not None:
        out[CANDIDATE_OF_LABEL] = candidate_of
    return out


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(name: str, namespace: str, owner: dict[str, Any], child: str) -> dict[str, Any]:
    return {"name": child, "namespace": namespace, "labels": labels(name), "ownerReferences": [owner]}
