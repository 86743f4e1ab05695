"""Security checks of every pod ModelFleet creates and of the chart's optional NetworkPolicies (issue #9, item 7).

Pods: every pod template the chart renders (every value set, every kind with a pod
template) and every pod template the operator plans (operator/resources/children.py:
each runtime, GPU and CPU, a remote runner with a Secret-held key, a rollout's
candidate): every container, initContainer and ephemeral container runs as non-root
with a read-only root filesystem, no privilege escalation and every capability
dropped; every pod has the RuntimeDefault seccomp profile and no host namespaces or
host paths. tests/chart/test_chart.py checks the chart's Deployments' pod-level
fields and resources; this file covers every container of both sources.

NetworkPolicies: off by default; on, they validate against the Kubernetes 1.37
schema, pass `helm lint --strict`, and, evaluated by a small model of NetworkPolicy
semantics over the real pod labels (the chart's and the operator's), allow exactly
the paths ModelFleet uses and refuse the rest.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from modelfleet.dataplane.spec import InferenceDeploymentSpec
from modelfleet.operator.resources.children import Owner, PodPlacement, candidate_children, plan_children
from modelfleet.operator.settings import OperatorSettings
from tests.chart.test_chart import ALL_ON, CHART, HELMS, VALUE_SETS, helm, kubernetes_validate, render, sets

AUTH = ["gateway.auth.apiKeys.existingSecret=keys", "gateway.auth.adminToken.existingSecret=admin"]
NP_ON = ["networkPolicy.enabled=true"]
CHART_VALUE_SETS = {**VALUE_SETS, "auth": AUTH, "network-policy": NP_ON + ALL_ON}

# --------------------------------------------------------------------------- pod security


def pod_specs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    kind = doc["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        yield doc["spec"]["template"]["spec"]
    elif kind == "CronJob":
        yield doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    elif kind == "Pod":
        yield doc["spec"]


def assert_locked_down(where: str, pod: dict[str, Any]) -> int:
    """Every rule of the restricted pod profile this project holds to; returns the number of containers."""
    psc = pod.get("securityContext") or {}
    assert psc.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot"
    assert psc.get("seccompProfile") == {"type": "RuntimeDefault"}, f"{where}: pod seccompProfile"
    assert psc.get("runAsUser", 1) != 0 and psc.get("runAsGroup", 1) != 0, f"{where}: pod runs as root"
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(host), f"{where}: {host}"
    assert not any("hostPath" in v for v in pod.get("volumes") or []), f"{where}: hostPath volume"
    count = 0
    for group in ("initContainers", "containers", "ephemeralContainers"):
        for c in pod.get(group) or []:
            count += 1
            sc = c.get("securityContext") or {}
            name = f"{where} {group[:-1]} {c['name']}"
            assert sc.get("runAsNonRoot") is True, f"{name}: runAsNonRoot"
            assert sc.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem"
            assert sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation"
            assert sc.get("capabilities") == {"drop": ["ALL"]}, f"{name}: capabilities {sc.get('capabilities')}"
            assert not sc.get("privileged"), f"{name}: privileged"
            assert sc.get("runAsUser", 1) != 0, f"{name}: runAsUser 0"
            assert not any(p.get("hostPort") for p in c.get("ports") or []), f"{name}: hostPort"
    return count


@pytest.mark.parametrize("values", CHART_VALUE_SETS.values(), ids=CHART_VALUE_SETS.keys())
def test_every_chart_container_is_non_root_read_only_and_unprivileged(values: list[str]) -> None:
    containers = 0
    for doc in render(values):
        for pod in pod_specs(doc):
            containers += assert_locked_down(f"{doc['kind']}/{doc['metadata']['name']}", pod)
    assert containers >= 2  # operator and gateway at least


OWNER = Owner("chat", "llm", "uid-1")
SETTINGS = OperatorSettings(image_registry="registry.example/mf", image_tag="1.2.3")
GPU = PodPlacement(gpu_resource="nvidia.com/gpu", gpus_per_replica=1)
SOURCE = {"path": "/models/m"}
OPERATOR_PODS: dict[str, tuple[dict[str, Any], PodPlacement]] = {
    "torch-cpu": (
        {"model": {"name": "m", "source": SOURCE}, "runtime": {"kind": "torch", "device": "cpu"}},
        PodPlacement(),
    ),
    "torch-cuda": ({"model": {"name": "m", "source": SOURCE}, "runtime": {"kind": "torch", "device": "cuda"}}, GPU),
    "vllm": ({"model": {"name": "m", "source": SOURCE}, "runtime": {"kind": "vllm"}}, GPU),
    "sglang": ({"model": {"name": "m", "source": SOURCE}, "runtime": {"kind": "sglang"}}, GPU),
    "remote-secret-key": (
        {
            "model": {"name": "m", "source": {"runtimeManaged": True}},
            "runtime": {
                "kind": "remote",
                "remote": {
                    "baseUrl": "https://api.example.com/v1",
                    "apiKey": {"secret": {"name": "provider-key", "key": "token"}},
                },
            },
        },
        PodPlacement(),
    ),
}


@pytest.mark.parametrize("case", OPERATOR_PODS.keys())
def test_every_operator_pod_template_is_non_root_read_only_and_unprivileged(case: str) -> None:
    raw, placement = OPERATOR_PODS[case]
    spec = InferenceDeploymentSpec.model_validate(raw)
    objs = [
        *plan_children(OWNER, spec, SETTINGS, placement),
        *candidate_children(OWNER, spec, SETTINGS, placement),
    ]
    containers = 0
    for obj in objs:
        for pod in pod_specs(obj):
            containers += assert_locked_down(f"{case} {obj['kind']}/{obj['metadata']['name']}", pod)
    assert containers == 4  # engine + sidecar, baseline and candidate


def test_the_lock_down_check_fails_on_a_weakened_pod() -> None:
    """The checker itself: each weakening of a good pod is caught."""
    raw, placement = OPERATOR_PODS["torch-cpu"]
    good = next(
        o
        for o in plan_children(OWNER, InferenceDeploymentSpec.model_validate(raw), SETTINGS, placement)
        if o["kind"] == "Deployment"
    )["spec"]["template"]["spec"]
    assert_locked_down("good", good)

    def weakened(change: Any) -> dict[str, Any]:
        import copy

        pod: dict[str, Any] = copy.deepcopy(good)
        change(pod)
        return pod

    cases = [
        lambda p: p["securityContext"].pop("seccompProfile"),
        lambda p: p.update(hostNetwork=True),
        lambda p: p["containers"][1]["securityContext"].update(readOnlyRootFilesystem=False),
        lambda p: p["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
        lambda p: p["containers"][0]["securityContext"].update(capabilities={"drop": ["ALL"], "add": ["NET_ADMIN"]}),
        lambda p: p.update(initContainers=[{"name": "init", "image": "x", "securityContext": {"runAsNonRoot": True}}]),
        lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
    ]
    for change in cases:
        with pytest.raises(AssertionError):
            assert_locked_down("weakened", weakened(change))


# --------------------------------------------------------------------------- NetworkPolicy

NP_FULL = [
    *NP_ON,
    "networkPolicy.gateway.ingressNamespaces[0]=apps",
    "networkPolicy.gateway.ingressCIDRs[0]=10.1.0.0/16",
    "networkPolicy.dataPlane.namespaces[0]=team-a",
    "networkPolicy.dataPlane.namespaces[1]=team-b",
    "networkPolicy.apiServer.cidrs[0]=10.0.0.1/32",
    "networkPolicy.metrics.namespaces[0]=monitoring",
]


def policies(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == "NetworkPolicy"]


def test_no_network_policy_by_default() -> None:
    for values in VALUE_SETS.values():
        assert policies(render(values)) == []


@pytest.mark.parametrize(
    "values", [NP_ON, NP_FULL, [*NP_ON, "operator.watchNamespace=team-a"]], ids=["on", "full", "watch"]
)
def test_network_policies_validate_against_kubernetes_1_37(values: list[str]) -> None:
    kv = kubernetes_validate()
    found = policies(render(values))
    assert len(found) >= 3
    for doc in found:
        try:
            kv.validate(doc, "1.37.0", strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"NetworkPolicy/{doc['metadata']['name']} is invalid for Kubernetes 1.37: {exc}")


@pytest.mark.parametrize("name", HELMS)
def test_helm_lint_strict_passes_with_network_policies(name: str) -> None:
    res = helm(name, "lint", "--strict", str(CHART), *sets(NP_FULL))
    assert res.returncode == 0 and "[WARNING]" not in res.stdout, f"{res.stdout}{res.stderr}"


@pytest.mark.parametrize(
    ("value", "names"),
    [
        ("networkPolicy.enabeld=true", ["enabeld"]),
        ("networkPolicy.gateway.ingressCIDRs[0]=not-a-cidr", ["ingressCIDRs"]),
        ("networkPolicy.apiServer.ports[0]=70000", ["ports"]),
        ("networkPolicy.metrics.namespaces[0]=Bad_NS", ["namespaces"]),
    ],
)
def test_network_policy_values_are_checked_by_the_schema(value: str, names: list[str]) -> None:
    res = helm("helm", "template", "mf", str(CHART), "--set", value)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "schema" in out, out[-2000:]
    for n in names:
        assert n in out, out


@dataclass
class Endpoint:
    """A pod (namespace and labels) or, with namespace None, an address outside the cluster's pods."""

    name: str
    namespace: str | None
    labels: dict[str, str] = field(default_factory=dict)
    ip: str = "10.244.0.10"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _peer_matches(peer: dict[str, Any], policy_ns: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        ip = ipaddress.ip_address(other.ip)
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except") or []
        )
    if other.namespace is None:
        return False
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": other.namespace}):
            return False
    elif other.namespace != policy_ns:
        return False
    return "podSelector" not in peer or _selects(peer["podSelector"], other.labels)


def _port_matches(rule: dict[str, Any], port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    return not ports or any(p["port"] == port and p.get("protocol", "TCP") == protocol for p in ports)


def _direction_allows(
    pols: list[dict[str, Any]], me: Endpoint, other: Endpoint, port: int, proto: str, kind: str
) -> bool:
    """Ingress to / egress from ``me``: allowed when no policy isolates it, or one rule matches."""
    key, peers = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
    isolating = [
        p
        for p in pols
        if me.namespace == p["metadata"]["namespace"]
        and kind in p["spec"]["policyTypes"]
        and _selects(p["spec"]["podSelector"], me.labels)
    ]
    if not isolating:
        return True
    return any(
        _port_matches(rule, port, proto)
        and (not rule.get(peers) or any(_peer_matches(peer, p["metadata"]["namespace"], other) for peer in rule[peers]))
        for p in isolating
        for rule in p["spec"].get(key) or []
    )


def allowed(pols: list[dict[str, Any]], src: Endpoint, dst: Endpoint, port: int, proto: str = "TCP") -> bool:
    egress = src.namespace is None or _direction_allows(pols, src, dst, port, proto, "Egress")
    ingress = dst.namespace is None or _direction_allows(pols, dst, src, port, proto, "Ingress")
    return egress and ingress


def _fleet(docs: list[dict[str, Any]]) -> dict[str, Endpoint]:
    """The real pod labels: the chart's operator and gateway pods, the operator's data-plane pods."""
    deps = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs if d["kind"] == "Deployment"}
    ns = deps["gateway"]["metadata"]["namespace"]
    raw, placement = OPERATOR_PODS["torch-cpu"]
    spec = InferenceDeploymentSpec.model_validate(raw)

    def data_pod(namespace: str) -> dict[str, str]:
        objs = plan_children(Owner("chat", namespace, "uid"), spec, SETTINGS, placement)
        dep = next(o for o in objs if o["kind"] == "Deployment")
        return dict(dep["spec"]["template"]["metadata"]["labels"])

    return {
        "gateway": Endpoint("gateway", ns, deps["gateway"]["spec"]["template"]["metadata"]["labels"]),
        "operator": Endpoint("operator", ns, deps["operator"]["spec"]["template"]["metadata"]["labels"]),
        "pod team-a": Endpoint("chat pod in team-a", "team-a", data_pod("team-a")),
        "pod team-b": Endpoint("chat pod in team-b", "team-b", data_pod("team-b")),
        "app in apps": Endpoint("client pod in apps", "apps", {"app": "web"}),
        "app in default": Endpoint("client pod in default", "default", {"app": "web"}),
        "rogue in team-a": Endpoint("other pod in team-a", "team-a", {"app": "notebook"}),
        "prometheus": Endpoint("prometheus", "monitoring", {"app": "prometheus"}),
        "dns": Endpoint("kube-dns", "kube-system", {"k8s-app": "kube-dns"}),
        "office": Endpoint("client at 10.1.2.3", None, ip="10.1.2.3"),
        "internet": Endpoint("client at 203.0.113.9", None, ip="203.0.113.9"),
        "apiserver": Endpoint("API server 10.0.0.1", None, ip="10.0.0.1"),
        "elsewhere": Endpoint("10.0.0.2", None, ip="10.0.0.2"),
    }


# (source, destination, port, protocol, allowed?) with NP_FULL
NP_PATHS = [
    ("app in apps", "gateway", 8000, "TCP", True),
    ("office", "gateway", 8000, "TCP", True),
    ("prometheus", "gateway", 8000, "TCP", True),
    ("app in default", "gateway", 8000, "TCP", False),
    ("internet", "gateway", 8000, "TCP", False),
    ("app in apps", "gateway", 9000, "TCP", False),
    ("gateway", "pod team-a", 8000, "TCP", True),  # gateway -> sidecar
    ("gateway", "pod team-b", 8000, "TCP", True),
    ("gateway", "pod team-a", 8001, "TCP", False),  # the gateway never talks to an engine directly
    ("gateway", "app in apps", 8000, "TCP", False),
    ("gateway", "apiserver", 443, "TCP", True),
    ("gateway", "elsewhere", 443, "TCP", False),
    ("gateway", "dns", 53, "UDP", True),
    ("pod team-a", "pod team-a", 8001, "TCP", True),  # sidecar -> engine, same namespace
    ("pod team-a", "pod team-a", 8000, "TCP", True),  # sidecar -> sidecar (rollout traffic)
    ("pod team-b", "pod team-a", 8001, "TCP", False),  # not across namespaces
    ("rogue in team-a", "pod team-a", 8001, "TCP", False),
    ("rogue in team-a", "pod team-a", 8000, "TCP", False),
    ("app in apps", "pod team-a", 8000, "TCP", False),
    ("operator", "apiserver", 6443, "TCP", True),
    ("operator", "elsewhere", 6443, "TCP", False),
    ("operator", "pod team-b", 8001, "TCP", True),  # engine metrics into CR status
    ("operator", "app in apps", 8000, "TCP", False),
    ("prometheus", "pod team-a", 8001, "TCP", True),
    ("prometheus", "operator", 8080, "TCP", True),
    ("internet", "operator", 9999, "TCP", False),
]


def test_network_policies_allow_exactly_modelfleets_paths() -> None:
    docs = render(NP_FULL)
    pols = policies(docs)
    assert {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in pols} == {
        ("llm", "mf-gateway"),
        ("llm", "mf-operator"),
        ("team-a", "mf-dataplane"),
        ("team-b", "mf-dataplane"),
    }
    fleet = _fleet(docs)
    lines, wrong = [], []
    for src, dst, port, proto, expected in NP_PATHS:
        got = allowed(pols, fleet[src], fleet[dst], port, proto)
        lines.append(
            f"{fleet[src].name:<24} -> {fleet[dst].name:<24} {port:>5}/{proto:<3} {'allow' if got else 'deny'}"
        )
        if got != expected:
            wrong.append(lines[-1] + f" (expected {'allow' if expected else 'deny'})")
    print("\n".join(lines))
    assert not wrong, "\n".join(wrong)


def test_network_policy_defaults_open_the_gateway_port_and_follow_the_watched_namespace() -> None:
    docs = render([*NP_ON, "operator.watchNamespace=team-a"])
    pols = policies(docs)
    assert {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in pols} == {
        ("llm", "mf-gateway"),
        ("llm", "mf-operator"),
        ("team-a", "mf-dataplane"),
    }
    fleet = _fleet(docs)
    assert allowed(pols, fleet["internet"], fleet["gateway"], 8000)  # no sources configured: any, on its port
    assert not allowed(pols, fleet["internet"], fleet["gateway"], 22)
    assert allowed(pols, fleet["gateway"], fleet["elsewhere"], 443)  # no API server CIDRs: any address, its ports
    assert not allowed(pols, fleet["gateway"], fleet["elsewhere"], 80)
    assert allowed(pols, fleet["gateway"], fleet["pod team-a"], 8000)
    assert not allowed(pols, fleet["gateway"], fleet["pod team-b"], 8000)  # not a data-plane namespace
    assert not allowed(pols, fleet["prometheus"], fleet["pod team-a"], 8001)  # no metrics namespaces configured
