"""Security checks on the real API server (issue #9, item 7).

1. Least privilege, as a table of ``kubectl auth can-i VERB RESOURCE
   --as=system:serviceaccount:NS:NAME`` answers (printed with ``-s``), for the
   operator's and the gateway's ServiceAccounts with exactly the ServiceAccounts,
   ClusterRoles and bindings ``helm template`` renders, and for the per-deployment
   sidecar ServiceAccount, Role and RoleBinding the operator creates
   (operator/resources/children.py ``sidecar_access``). Then ``kubectl auth can-i
   --list`` for each account: every write it holds is on a resource it must write.
   The test control plane (e2e/cluster.py) runs kube-apiserver with
   ``--authorization-mode=Node,RBAC``, so the answers are RBAC's own: nothing is
   granted by an AlwaysAllow authorizer. e2e/test_helm.py runs the operator and
   the gateway as those accounts end to end; this file is the full table.
2. A remote-runner InferenceDeployment whose apiKey is a Secret: the Secret's value
   (plain or base64) appears nowhere the operator writes: not in the CR's status,
   not in any event, not in any child object, not in the operator's log. The key
   reaches the engine only as a Secret volume.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.cluster import ControlPlane
from e2e.operator_process import OperatorProcess, running_operator
from modelfleet.operator.resources.children import Owner, sidecar_access

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "modelfleet"
RELEASE = "sec"

# (verb, resource, extra kubectl args, allowed?, why)
Check = tuple[str, str, tuple[str, ...], bool, str]
ALL = ("--all-namespaces",)
OPERATOR_TABLE: list[Check] = [
    ("watch", "inferencedeployments.modelfleet.io", ALL, True, "its custom resource"),
    ("patch", "inferencedeployments.modelfleet.io", (), True, "kopf finalizer and annotations"),
    ("patch", "inferencedeployments.modelfleet.io", ("--subresource=status",), True, "status"),
    ("delete", "inferencedeployments.modelfleet.io", (), False, "users delete their CRs, not the operator"),
    ("create", "deployments.apps", (), True, "child: the pods"),
    ("delete", "deployments.apps", (), True, "child"),
    ("deletecollection", "deployments.apps", (), False, "no bulk delete"),
    ("patch", "services", (), True, "child"),
    ("create", "configmaps", (), True, "child: the deployment's config"),
    ("create", "poddisruptionbudgets.policy", (), True, "child"),
    ("create", "serviceaccounts", (), True, "child: the sidecar's account"),
    ("create", "roles.rbac.authorization.k8s.io", (), True, "child: the sidecar's Role"),
    ("create", "rolebindings.rbac.authorization.k8s.io", (), True, "child: the sidecar's RoleBinding"),
    ("list", "endpointslices.discovery.k8s.io", (), True, "held so it may grant it to sidecars"),
    ("create", "endpointslices.discovery.k8s.io", (), False, "the endpoint controller's job"),
    ("watch", "pods", ALL, True, "placement: GPUs in use; metrics: pod IPs"),
    ("watch", "nodes", (), True, "placement: GPU inventory"),
    ("create", "events", (), True, "events on its CRs"),
    ("create", "events.events.k8s.io", (), True, "events on its CRs"),
    ("create", "clusterkopfpeerings.kopf.dev", (), True, "kopf peering"),
    ("list", "customresourcedefinitions.apiextensions.k8s.io", (), True, "kopf discovery"),
    ("list", "namespaces", (), True, "kopf namespace observation"),
    ("get", "secrets", (), False, "never reads credentials (apiKey Secrets are mounted, not read)"),
    ("list", "secrets", ALL, False, "never reads credentials"),
    ("watch", "secrets", ALL, False, "never reads credentials"),
    ("create", "pods", (), False, "pods come from its Deployments"),
    ("create", "pods", ("--subresource=exec",), False, "no exec into pods"),
    ("create", "pods", ("--subresource=portforward",), False, "no port-forward"),
    ("get", "pods", ("--subresource=log",), False, "no pod logs"),
    ("create", "serviceaccounts", ("--subresource=token",), False, "mints no tokens"),
    ("patch", "nodes", (), False, "read-only on nodes"),
    ("delete", "nodes", (), False, "read-only on nodes"),
    ("create", "namespaces", (), False, "read-only on namespaces"),
    ("delete", "namespaces", (), False, "read-only on namespaces"),
    ("create", "clusterroles.rbac.authorization.k8s.io", (), False, "no cluster-wide RBAC"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", (), False, "no cluster-wide RBAC"),
    ("bind", "roles.rbac.authorization.k8s.io", (), False, "grants only what it holds"),
    ("escalate", "roles.rbac.authorization.k8s.io", (), False, "grants only what it holds"),
    ("impersonate", "serviceaccounts", (), False, "no impersonation"),
    ("impersonate", "users", (), False, "no impersonation"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", (), False, "CRDs come from the chart"),
    ("create", "mutatingwebhookconfigurations.admissionregistration.k8s.io", (), False, "no admission hooks"),
    ("create", "daemonsets.apps", (), False, "not a child kind"),
    ("create", "statefulsets.apps", (), False, "not a child kind"),
    ("create", "jobs.batch", (), False, "not a child kind"),
    ("create", "persistentvolumes", (), False, "not a child kind"),
]
GATEWAY_TABLE: list[Check] = [
    ("watch", "inferencedeployments.modelfleet.io", ALL, True, "routes: model -> endpoint"),
    ("watch", "endpointslices.discovery.k8s.io", ALL, True, "ready endpoints"),
    ("patch", "inferencedeployments.modelfleet.io", (), False, "read-only"),
    ("get", "secrets", (), False, "keys come as a mounted volume"),
    ("list", "pods", (), False, "not needed"),
    ("list", "nodes", (), False, "not needed"),
    ("create", "events", (), False, "not needed"),
    ("create", "pods", ("--subresource=exec",), False, "no exec"),
]
SIDECAR_TABLE: list[Check] = [
    ("get", "endpointslices.discovery.k8s.io", (), True, "peer discovery, own namespace"),
    ("watch", "endpointslices.discovery.k8s.io", (), True, "peer discovery, own namespace"),
    ("list", "endpointslices.discovery.k8s.io", ("-n", "default"), False, "not another namespace"),
    ("list", "endpointslices.discovery.k8s.io", ALL, False, "not cluster-wide"),
    ("create", "endpointslices.discovery.k8s.io", (), False, "read-only"),
    ("get", "secrets", (), False, "no credentials"),
    ("list", "pods", (), False, "not needed"),
    ("get", "configmaps", (), False, "its config is a mounted volume"),
    ("get", "inferencedeployments.modelfleet.io", (), False, "not needed"),
    ("create", "events", (), False, "not needed"),
    ("create", "pods", ("--subresource=exec",), False, "no exec"),
]
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection", "bind", "escalate", "impersonate", "*"}
# what every authenticated user may do (system:basic-user): ask the API server about itself
SELF_REVIEWS = {
    "selfsubjectaccessreviews.authorization.k8s.io",
    "selfsubjectrulesreviews.authorization.k8s.io",
    "selfsubjectreviews.authentication.k8s.io",
}
MAY_WRITE = {
    "operator": SELF_REVIEWS
    | {
        "inferencedeployments.modelfleet.io",
        "inferencedeployments.modelfleet.io/status",
        "deployments.apps",
        "services",
        "configmaps",
        "poddisruptionbudgets.policy",
        "serviceaccounts",
        "roles.rbac.authorization.k8s.io",
        "rolebindings.rbac.authorization.k8s.io",
        "events",
        "events.events.k8s.io",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    },
    "gateway": SELF_REVIEWS,
    "sidecar": SELF_REVIEWS,
}


def _strip(obj: dict[str, Any]) -> dict[str, Any]:
    """No ownerReferences: the owner (a CR) does not exist here, and the garbage collector would delete it."""
    obj = json.loads(json.dumps(obj))
    obj["metadata"].pop("ownerReferences", None)
    return obj


@pytest.fixture
def accounts(k8s: ControlPlane, crd: ControlPlane, namespace: str) -> Iterator[dict[str, str]]:
    """The chart's ServiceAccounts, ClusterRoles and bindings (helm template) and one sidecar's Role, applied."""
    # kubectl resolves `clusterkopfpeerings.kopf.dev` through discovery: the CRDs must exist
    crd.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "kopf-peerings.yaml"))
    crd.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "--timeout=60s")
    res = subprocess.run(
        [k8s.bin("helm"), "template", RELEASE, str(CHART), "--namespace", namespace],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rbac_kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    docs = [d for d in yaml.safe_load_all(res.stdout) if d and d["kind"] in rbac_kinds]
    for d in docs:
        if d["kind"] in ("ServiceAccount", "Role", "RoleBinding"):
            d["metadata"]["namespace"] = namespace
    sidecar = [_strip(o) for o in sidecar_access(Owner("chat", namespace, "uid-none"))]
    k8s.apply(*docs, *sidecar)
    cluster_scoped = [f"{d['kind'].lower()}/{d['metadata']['name']}" for d in docs if d["kind"].startswith("Cluster")]
    assert len(cluster_scoped) == 4
    try:
        yield {
            "operator": f"{RELEASE}-operator",
            "gateway": f"{RELEASE}-gateway",
            "sidecar": sidecar[0]["metadata"]["name"],
        }
    finally:
        k8s.kubectl("delete", "--ignore-not-found", *cluster_scoped, check=False)


def can_i(k8s: ControlPlane, user: str, ns: str, verb: str, resource: str, extra: tuple[str, ...]) -> bool:
    scope = () if "-n" in extra or "--all-namespaces" in extra else ("-n", ns)
    res = k8s.kubectl("auth", "can-i", verb, resource, f"--as={user}", *scope, *extra, check=False)
    answer = res.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl auth can-i {verb} {resource} {extra}: {res.stdout}{res.stderr}"
    return answer == "yes"


def test_rbac_is_least_privilege_table(k8s: ControlPlane, namespace: str, accounts: dict[str, str]) -> None:
    tables = {"operator": OPERATOR_TABLE, "gateway": GATEWAY_TABLE, "sidecar": SIDECAR_TABLE}
    lines = [f"{'account':<9} {'verb':<16} {'resource':<58} {'scope':<16} {'answer':<6} why"]
    wrong = []
    for who, table in tables.items():
        user = f"system:serviceaccount:{namespace}:{accounts[who]}"
        for verb, resource, extra, expected, why in table:
            got = can_i(k8s, user, namespace, verb, resource, extra)
            scope = " ".join(extra) if extra else "own namespace"
            scope = scope.replace("--subresource=", "sub: ").replace("--all-namespaces", "all namespaces")
            line = f"{who:<9} {verb:<16} {resource:<58} {scope:<16} {'yes' if got else 'no':<6} {why}"
            lines.append(line)
            if got != expected:
                wrong.append(f"{line}  <- expected {'yes' if expected else 'no'}")
    print("\n" + "\n".join(lines))
    assert not wrong, "\n".join(wrong)


_ROW = re.compile(r"^(\S*)\s*\[(.*?)\]\s+\[(.*?)\]\s+\[(.*?)\]\s*$")


def rules_of(k8s: ControlPlane, user: str, ns: str) -> list[tuple[str, list[str], list[str]]]:
    """``kubectl auth can-i --list`` as (resource, resource names, verbs) rows (non-resource URLs left out)."""
    out = k8s.kubectl("auth", "can-i", "--list", f"--as={user}", "-n", ns).stdout
    rows = []
    for line in out.splitlines()[1:]:
        m = _ROW.match(line)
        assert m, f"unexpected `can-i --list` line: {line!r}"
        resource, _urls, names, verbs = m.groups()
        if resource:
            rows.append((resource, names.split(), verbs.split()))
    return rows


def test_every_write_an_account_holds_is_one_it_needs(
    k8s: ControlPlane, namespace: str, accounts: dict[str, str]
) -> None:
    for who, account in accounts.items():
        rows = rules_of(k8s, f"system:serviceaccount:{namespace}:{account}", namespace)
        print(f"\n{who}: kubectl auth can-i --list")
        for resource, names, verbs in rows:
            print(f"  {resource:<58} {' '.join(names) or '-':<20} {' '.join(verbs)}")
        resources = {r for r, _, _ in rows}
        assert not {r for r in resources if r == "*" or r.startswith("*.")}, f"{who} holds a wildcard resource"
        assert not {r for r in resources if r.split(".")[0] in ("secrets", "pods/exec", "pods/attach")}, who
        writes = {r for r, _, verbs in rows if WRITE_VERBS & set(verbs)}
        extra = writes - MAY_WRITE[who]
        assert not extra, f"{who} may write what it never needs: {sorted(extra)}"
        assert all("*" not in verbs for _, _, verbs in rows), f"{who} holds a wildcard verb"


# ------------------------------------------------------------------- remote runner key


SECRET_VALUE = f"sk-remote-{secrets.token_hex(12)}"


@pytest.fixture
def operator(
    k8s: ControlPlane, crd: ControlPlane, gpu_nodes: list[str], namespace: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    peering = f"security-{namespace}"  # a peering of its own: no other test's operator waits on it
    running = running_operator(crd, tmp_path / "operator.log", env={"MODELFLEET_OPERATOR_PEERING_NAME": peering})
    op = next(running)
    try:
        yield op
    finally:
        # never leave a CR with the operator's finalizer behind
        if k8s.kubectl("get", "infd/hosted", "-n", namespace, check=False).returncode == 0:
            k8s.kubectl("delete", "infd/hosted", "-n", namespace, "--timeout=60s", check=False)
        for _ in running:  # stops the operator
            pass
        k8s.kubectl("delete", "clusterkopfpeering", peering, "--ignore-not-found", check=False)


def test_remote_api_key_secret_never_reaches_status_events_children_or_logs(
    k8s: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    k8s.kubectl("create", "secret", "generic", "provider-key", f"--from-literal=token={SECRET_VALUE}", "-n", namespace)
    cr = {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": "hosted"},
        "spec": {
            "model": {"name": "hosted-chat", "source": {"runtimeManaged": True}},
            "runtime": {
                "kind": "remote",
                "remote": {
                    "baseUrl": "https://api.example.com/v1",
                    "apiKey": {"secret": {"name": "provider-key", "key": "token"}},
                },
            },
        },
    }
    k8s.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(cr))

    def available() -> dict[str, Any] | None:
        obj = json.loads(k8s.kubectl("get", "infd/hosted", "-n", namespace, "-o", "json").stdout)
        return obj if (obj.get("status") or {}).get("phase") == "Available" else None

    try:
        obj = k8s.wait_for("hosted Available (kwok runs the pods)", available, 120)
    except TimeoutError:
        print(operator.output()[-6000:])
        raise
    events = k8s.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    reasons = {e["reason"] for e in json.loads(events)["items"] if e["involvedObject"]["name"] == "hosted"}
    assert "Placed" in reasons, reasons  # the operator did write events
    children = k8s.kubectl("get", "deploy,rs,pods,svc,cm,sa,role,rolebinding,pdb", "-n", namespace, "-o", "json").stdout
    # the key reaches the engine by reference only: a Secret volume
    dep = json.loads(k8s.kubectl("get", "deploy/hosted", "-n", namespace, "-o", "json").stdout)
    volumes = dep["spec"]["template"]["spec"]["volumes"]
    assert any((v.get("secret") or {}).get("secretName") == "provider-key" for v in volumes), volumes
    texts = {
        "CR status": json.dumps(obj.get("status")),
        "whole CR": json.dumps(obj),
        "events": events,
        "child objects": children,
        "operator log": operator.output(),
    }
    forms = {"value": SECRET_VALUE, "base64": base64.b64encode(SECRET_VALUE.encode()).decode()}
    leaks = [f"{form} in {where}" for where, text in texts.items() for form, v in forms.items() if v in text]
    assert not leaks, leaks
    # and the scan can see it: the Secret itself holds the base64 form
    secret = k8s.kubectl("get", "secret/provider-key", "-n", namespace, "-o", "json").stdout
    assert forms["base64"] in secret
