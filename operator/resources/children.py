"""Child manifests of an InferenceDeployment: pure functions from spec to objects.

The plan (these dicts) is computed here; applying it (server-side apply) lives
in ``modelfleet.operator.apply``. Re-rendering the same inputs gives the same
objects, so re-applying is a no-op.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from modelfleet.dataplane.rollout.version import spec_version
from modelfleet.dataplane.sizing import MemoryEstimate, SizeUnknown
from modelfleet.dataplane.spec import KIND, REMOTE_SECRETS_DIR, InferenceDeploymentSpec, RuntimeKind
from modelfleet.operator.resources import names
from modelfleet.operator.resources.sizing import engine_resources
from modelfleet.operator.settings import OperatorSettings


@dataclass(frozen=True)
class PodPlacement:
    """What placement decided, in the shape a pod template needs."""

    gpu_resource: str | None = None  # "nvidia.com/gpu" / "amd.com/gpu"; None for CPU pods
    gpus_per_replica: int = 0
    node_affinity: dict[str, Any] | None = None
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    spread_topology_key: str | None = None  # replicas never share this topology domain


@dataclass(frozen=True)
class Owner:
    name: str
    namespace: str
    uid: str
    candidate: bool = False  # the children of a rollout's candidate, beside the baseline's

    def reference(self) -> dict[str, Any]:
        return names.owner_reference(self.name, self.uid)

    @property
    def instance(self) -> str:
        """Base name of the children (and their selector): the CR's name, or its candidate's."""
        return names.candidate_name(self.name) if self.candidate else self.name

    def labels(self) -> dict[str, str]:
        return names.labels(self.instance, candidate_of=self.name if self.candidate else None)

    def metadata(self, child: str) -> dict[str, Any]:
        return {
            "name": child,
            "namespace": self.namespace,
            "labels": self.labels(),
            "ownerReferences": [self.reference()],
        }


def engine_image(spec: InferenceDeploymentSpec, settings: OperatorSettings, placement: PodPlacement) -> str:
    kind = spec.runtime.kind
    if kind is RuntimeKind.TORCH:
        image = "engine-torch-cuda" if placement.gpus_per_replica else "engine-torch-cpu"
    elif kind is RuntimeKind.REMOTE:
        image = "modelfleet"
    else:
        image = f"engine-{kind.value}"
    return f"{settings.image_registry}/{image}:{settings.image_tag}"


def config_map(
    owner: Owner, spec: InferenceDeploymentSpec, rollout_plan: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The manifest the pods read (named after the CR: the engine and sidecar look their deployment up
    by ``--deployment``, a candidate's too), and the rollout plan the baseline's sidecars follow."""
    manifest = {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": KIND,
        "metadata": {"name": owner.name},
        "spec": spec.to_wire(),
    }
    data = {names.CONFIG_FILE: yaml.safe_dump(manifest, sort_keys=True)}
    if rollout_plan is not None:
        data[names.ROLLOUT_FILE] = json.dumps(rollout_plan, sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": owner.metadata(names.config_map_name(owner.instance)),
        "data": data,
    }


def _secret_volumes(spec: InferenceDeploymentSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes and engine mounts for the Secret an apiKey names (a volume, not an env var: the kubelet
    updates the file when the Secret is rotated, and the remote runner reads it again on a 401)."""
    remote = spec.runtime.remote
    ref = remote.api_key.secret if remote is not None and remote.api_key is not None else None
    if ref is None:
        return [], []
    volume = {
        "name": "remote-api-key",
        "secret": {"secretName": ref.name, "items": [{"key": ref.key, "path": ref.key}], "defaultMode": 0o440},
    }
    mount = {"name": "remote-api-key", "mountPath": f"{REMOTE_SECRETS_DIR}/{ref.name}", "readOnly": True}
    return [volume], [mount]


# Graceful drain (docs/reliability.md): the preStop sleep lets EndpointSlice watchers (sidecars,
# kube-proxy) drop a terminating pod before it gets SIGTERM; then each container drains its streams
# for SHUTDOWN_TIMEOUT_S. The grace period covers both with room to spare (tests/chart/test_drain_timing.py).
PRESTOP_SLEEP_S = 5
SHUTDOWN_TIMEOUT_S = 30
TERMINATION_GRACE_S = 60


def _shutdown_env() -> dict[str, str]:
    return {"name": "MODELFLEET_SHUTDOWN_TIMEOUT_S", "value": str(SHUTDOWN_TIMEOUT_S)}


def _prestop() -> dict[str, Any]:
    return {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_S}}}


RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}


# what the kubelet would mount for automountServiceAccountToken (a bound, expiring token, the
# cluster CA, the namespace), as a volume the pod template gives to the sidecar container alone
KUBE_API_ACCESS = {
    "name": "kube-api-access",
    "projected": {
        "defaultMode": 0o444,
        "sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {
                "downwardAPI": {
                    "items": [
                        {"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
                    ]
                }
            },
        ],
    },
}


def _probe(path: str, port: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def deployment(
    owner: Owner,
    spec: InferenceDeploymentSpec,
    settings: OperatorSettings,
    placement: PodPlacement,
    estimate: MemoryEstimate | SizeUnknown | None = None,
) -> dict[str, Any]:
    name = owner.instance
    gpu = placement.gpus_per_replica
    secret_volumes, secret_mounts = _secret_volumes(spec)
    resources = engine_resources(spec, gpu, placement.gpu_resource, estimate)
    engine = {
        "name": "engine",
        "image": engine_image(spec, settings, placement),
        "imagePullPolicy": settings.image_pull_policy,
        "args": [
            "engine",
            "-f",
            f"{names.CONFIG_DIR}/{names.CONFIG_FILE}",
            "--deployment",
            owner.name,
            "--host",
            "0.0.0.0",
            "--port",
            str(names.ENGINE_PORT),
        ],
        "ports": [{"name": "engine", "containerPort": names.ENGINE_PORT, "protocol": "TCP"}],
        "env": [
            {"name": "MODELFLEET_CACHE", "value": "/cache"},
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": "HOME", "value": "/tmp"},
            _shutdown_env(),
        ],
        "resources": resources,
        # the engine answers /healthz at once and /readyz once weights are loaded
        "startupProbe": _probe("/healthz", "engine", 5, 120),
        "readinessProbe": _probe("/readyz", "engine", 5, 3),
        "livenessProbe": _probe("/healthz", "engine", 10, 3),
        "lifecycle": _prestop(),
        "securityContext": RESTRICTED,
        "volumeMounts": [
            {"name": "config", "mountPath": names.CONFIG_DIR, "readOnly": True},
            {"name": "cache", "mountPath": "/cache"},
            {"name": "tmp", "mountPath": "/tmp"},
            *secret_mounts,
        ],
    }
    sidecar = {
        "name": "sidecar",
        "image": f"{settings.image_registry}/modelfleet:{settings.image_tag}",
        "imagePullPolicy": settings.image_pull_policy,
        "args": [
            "sidecar",
            "-f",
            f"{names.CONFIG_DIR}/{names.CONFIG_FILE}",  # spec.routing
            "--deployment",
            owner.name,
            # the rollout plan, a key of the same ConfigMap: no file, no rollout (dataplane/rollout/plan.py)
            "--rollout-file",
            f"{names.CONFIG_DIR}/{names.ROLLOUT_FILE}",
            # peers: the ready endpoints of the headless Service (dataplane/sidecar/discovery.py);
            # its own engine on loopback until the first list
            "--kubernetes",
            "--service",
            names.peers_service_name(name),
            "--namespace",
            owner.namespace,
            "--engine-port",
            str(names.ENGINE_PORT),
            "--peer",
            f"http://127.0.0.1:{names.ENGINE_PORT}",
            "--host",
            "0.0.0.0",
            "--port",
            str(names.SIDECAR_PORT),
        ],
        "ports": [{"name": "http", "containerPort": names.SIDECAR_PORT, "protocol": "TCP"}],
        # its own pod's engine takes new prompt prefixes first (PrefixAffinity; dataplane/sidecar/placement.py)
        "env": [
            _shutdown_env(),
            {"name": "MODELFLEET_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "readinessProbe": _probe("/readyz", "http", 5, 3),
        "livenessProbe": _probe("/healthz", "http", 10, 3),
        "lifecycle": _prestop(),
        "securityContext": RESTRICTED,
        "volumeMounts": [
            {"name": "config", "mountPath": names.CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            # the API token, in this container only: the engine (model code) gets none
            {"name": "kube-api-access", "mountPath": names.SERVICE_ACCOUNT_DIR, "readOnly": True},
        ],
    }
    pod_spec: dict[str, Any] = {
        "containers": [engine, sidecar],
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "enableServiceLinks": False,
        "serviceAccountName": names.sidecar_account_name(owner.name),  # a candidate's pods share it
        "automountServiceAccountToken": False,  # mounted by hand into the sidecar only (kube-api-access)
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": [
            {"name": "config", "configMap": {"name": names.config_map_name(name)}},
            {"name": "cache", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "256Mi"}},
            KUBE_API_ACCESS,
            *secret_volumes,
        ],
    }
    if spec.placement.node_selector and gpu:
        pod_spec["nodeSelector"] = dict(spec.placement.node_selector)
    affinity: dict[str, Any] = {}
    if placement.node_affinity:
        affinity["nodeAffinity"] = placement.node_affinity
    if placement.spread_topology_key:
        affinity["podAntiAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {"matchLabels": names.selector_labels(name)},
                    "topologyKey": placement.spread_topology_key,
                }
            ]
        }
    if affinity:
        pod_spec["affinity"] = affinity
    if placement.tolerations:
        pod_spec["tolerations"] = placement.tolerations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": owner.metadata(name),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": names.selector_labels(name)},
            # GPU nodes rarely have a spare GPU for a surge pod: replace in place
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 0 if gpu else 1, "maxUnavailable": 1},
            },
            "template": {
                "metadata": {
                    "labels": owner.labels(),
                    "annotations": {"modelfleet.io/config-hash": spec_version(spec)},
                },
                "spec": pod_spec,
            },
        },
    }


def services(owner: Owner, front_port: int = 80) -> list[dict[str, Any]]:
    name = owner.instance
    peers = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owner.metadata(names.peers_service_name(name)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # sidecars see loading replicas and track their readiness themselves
            "selector": names.selector_labels(name),
            "ports": [{"name": "engine", "port": names.ENGINE_PORT, "targetPort": "engine", "protocol": "TCP"}],
        },
    }
    front = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owner.metadata(names.service_name(name)),
        "spec": {
            "type": "ClusterIP",
            "selector": names.selector_labels(name),
            "ports": [{"name": "http", "port": front_port, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    return [peers, front]


def sidecar_access(owner: Owner) -> list[dict[str, Any]]:
    """The pods' ServiceAccount, allowed to read EndpointSlices in their namespace and nothing else.

    RBAC cannot narrow this further: slice names are generated (no resourceNames)
    and a label selector is no authorization boundary, so the sidecar may read
    every EndpointSlice of its namespace. One set per deployment, owned by it,
    so the garbage collector removes it with the deployment.
    """
    account = names.sidecar_account_name(owner.name)

    def meta() -> dict[str, Any]:
        return names.metadata(owner.name, owner.namespace, owner.reference(), account)

    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(), "automountServiceAccountToken": False},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta(),
            "rules": [
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta(),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": owner.namespace}],
        },
    ]


def pod_disruption_budget(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": names.metadata(owner.name, owner.namespace, owner.reference(), owner.name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": names.selector_labels(owner.name)}},
    }


def plan_children(
    owner: Owner,
    spec: InferenceDeploymentSpec,
    settings: OperatorSettings,
    placement: PodPlacement,
    rollout_plan: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Every child object, in apply order: the config the pods mount and the ServiceAccount they
    run as (admission rejects a pod whose account does not exist), then the pods' Deployment (the
    slow part to come up), then what only routes to them."""
    cm = config_map(owner, spec, rollout_plan)
    return [
        cm,
        *sidecar_access(owner),
        deployment(owner, spec, settings, placement),
        *services(owner),
        pod_disruption_budget(owner),
    ]


def candidate_children(
    owner: Owner, spec: InferenceDeploymentSpec, settings: OperatorSettings, placement: PodPlacement
) -> list[dict[str, Any]]:
    """A rollout's candidate, beside the baseline: its own config, Deployment and Services (named
    ``<name>-candidate``), the baseline's ServiceAccount. Its front Service listens on the sidecar
    port; the baseline's sidecars send it the candidate's share of traffic (:func:`candidate_url`)."""
    cand = Owner(owner.name, owner.namespace, owner.uid, candidate=True)
    return [
        config_map(cand, spec),
        deployment(cand, spec, settings, placement),
        *services(cand, front_port=names.SIDECAR_PORT),
    ]


def candidate_url(owner: Owner) -> str:
    return f"http://{names.service_name(names.candidate_name(owner.name))}.{owner.namespace}.svc:{names.SIDECAR_PORT}"


def endpoint(owner: Owner, settings: OperatorSettings) -> str:
    return f"http://{names.service_name(owner.name)}.{owner.namespace}.svc.{settings.cluster_domain}"
