"""The e2e harness itself: a real kube-apiserver (+ KCM, scheduler, kwok) works.

Needs the binaries from ``scripts/k8s-install.sh``; without them these tests
fail with a message that says so (they are never skipped silently).
Run: ``python3 -m pytest e2e/test_control_plane.py -p no:cacheprovider``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.cluster import (
    DEFAULT_K8S_VERSION,
    ControlPlane,
    MissingBinariesError,
    binary_dir,
    fake_gpu_node,
    port_is_listening,
)

pytestmark = pytest.mark.k8s


@pytest.fixture(scope="module")
def cluster() -> Iterator[ControlPlane]:
    """Full control plane: etcd, apiserver, controller-manager, scheduler, kwok."""
    cp = ControlPlane(controller_manager=True, scheduler=True, kwok=True)
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print the control-plane logs when a test using ``cluster`` fails."""
    failed_before = request.session.testsfailed
    yield
    cp = request.node.funcargs.get("cluster")
    if request.session.testsfailed > failed_before and isinstance(cp, ControlPlane):
        cp.dump_logs()


def test_kubectl_version_and_namespaces(cluster: ControlPlane) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == cluster.version
    namespaces = {item["metadata"]["name"] for item in cluster.get_json("namespaces")["items"]}
    assert {"default", "kube-system", "kube-public", "kube-node-lease"} <= namespaces


def test_custom_resource_is_served(cluster: ControlPlane) -> None:
    group = "e2e.modelfleet.test"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["replicas"],
                                    "properties": {
                                        "replicas": {"type": "integer", "minimum": 0},
                                        "model": {"type": "string"},
                                    },
                                    "x-kubernetes-validations": [
                                        {"rule": "self.replicas <= 10", "message": "at most 10"}
                                    ],
                                },
                                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                            },
                        }
                    },
                }
            ],
        },
    }
    cluster.apply(crd)
    cluster.kubectl("wait", "--for=condition=Established", f"crd/widgets.{group}", "--timeout=60s", timeout=70)
    obj = {
        "apiVersion": f"{group}/v1",
        "kind": "Widget",
        "metadata": {"name": "w1", "namespace": "default"},
        "spec": {"replicas": 2, "model": "tiny"},
    }
    # discovery of a fresh CRD can lag a moment behind Established
    cluster.wait_for("widget create", lambda: cluster.apply(obj), timeout=30)
    got = cluster.get_json(f"widgets.{group}", "w1", "-n", "default")
    assert got["spec"] == {"replicas": 2, "model": "tiny"}
    listed = cluster.get_json(f"widgets.{group}", "-n", "default")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["w1"]
    # CEL validation rule is enforced
    bad = dict(obj, metadata={"name": "w2", "namespace": "default"}, spec={"replicas": 11})
    res = cluster.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False)
    assert res.returncode != 0 and "at most 10" in res.stderr
    cluster.kubectl("delete", f"crd/widgets.{group}", "--wait=true", "--timeout=60s", timeout=70)


def test_gpu_deployment_scheduled_ready_and_garbage_collected(cluster: ControlPlane) -> None:
    node_name = f"gpu-{uuid.uuid4().hex[:6]}"
    cluster.apply(
        fake_gpu_node(
            node_name,
            gpu_count=8,
            taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
        )
    )

    def node_ready() -> bool:
        node = cluster.get_json("node", node_name)
        conds = {c["type"]: c["status"] for c in node["status"].get("conditions", [])}
        return conds.get("Ready") == "True" and node["status"]["allocatable"]["nvidia.com/gpu"] == "8"

    cluster.wait_for(f"node {node_name} Ready", node_ready, timeout=60)
    node = cluster.get_json("node", node_name)
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"

    ns = f"e2e-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    # the serviceaccount controller creates "default"; pods need it for admission
    cluster.wait_for("default serviceaccount", lambda: cluster.get_json("sa", "default", "-n", ns), 60)
    labels = {"app": "llm"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "llm", "namespace": ns},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {"nvidia.com/gpu.present": "true"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [
                        {
                            "name": "server",
                            "image": "example.invalid/llm:latest",
                            "resources": {
                                "requests": {"nvidia.com/gpu": "2", "cpu": "1", "memory": "1Gi"},
                                "limits": {"nvidia.com/gpu": "2"},
                            },
                        }
                    ],
                },
            },
        },
    }
    cluster.apply(deployment)

    def pod_ready() -> Any:
        pods = cluster.get_json("pods", "-n", ns, "-l", "app=llm")["items"]
        for pod in pods:
            conds = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
            if pod["status"].get("phase") == "Running" and conds.get("Ready") == "True":
                return pod
        return None

    pod = cluster.wait_for("GPU pod Running and Ready", pod_ready, timeout=120)
    assert pod["spec"]["nodeName"] == node_name
    cluster.wait_for(
        "deployment available",
        lambda: cluster.get_json("deployment", "llm", "-n", ns)["status"].get("availableReplicas") == 1,
        timeout=60,
    )
    # the scheduler accounted for the 2 GPUs: a pod asking for 7 more does not fit
    big = json.loads(json.dumps(deployment))
    big["metadata"]["name"] = "too-big"
    big["spec"]["selector"]["matchLabels"] = {"app": "too-big"}
    big["spec"]["template"]["metadata"]["labels"] = {"app": "too-big"}
    big["spec"]["template"]["spec"]["containers"][0]["resources"] = {
        "requests": {"nvidia.com/gpu": "7"},
        "limits": {"nvidia.com/gpu": "7"},
    }
    cluster.apply(big)

    def unschedulable() -> bool:
        pods = cluster.get_json("pods", "-n", ns, "-l", "app=too-big")["items"]
        return any(
            c.get("reason") == "Unschedulable"
            for p in pods
            for c in p["status"].get("conditions", [])
            if c["type"] == "PodScheduled"
        )

    cluster.wait_for("7-GPU pod Unschedulable", unschedulable, timeout=60)

    # deleting the Deployment (background propagation) lets the garbage
    # collector remove its ReplicaSet and pods
    cluster.kubectl("delete", "deployment", "llm", "too-big", "-n", ns, "--cascade=background")

    def gone() -> bool:
        rs = cluster.get_json("replicasets", "-n", ns)["items"]
        pods = cluster.get_json("pods", "-n", ns)["items"]
        return not rs and not pods

    cluster.wait_for("ReplicaSets and pods garbage-collected", gone, timeout=120)
    cluster.kubectl("delete", "node", node_name)
    cluster.kubectl("delete", "namespace", ns, "--wait=false")


def test_bearer_token_kubeconfig_and_clean_stop(tmp_path: Path) -> None:
    """Minimal plane (etcd + apiserver); a ServiceAccount token works; stop cleans up."""
    cp = ControlPlane()
    cp.start()
    try:
        pids = dict(cp.pids)
        ports = [p for ps in cp.ports.values() for p in ps]
        assert set(pids) == {"etcd", "kube-apiserver"}
        cp.kubectl("create", "serviceaccount", "operator", "-n", "default")
        # (no controller-manager here, so aggregated roles like "view" stay empty)
        cp.kubectl("create", "clusterrole", "cm-reader", "--verb=get,list", "--resource=configmaps")
        cp.kubectl(
            "create",
            "clusterrolebinding",
            "operator-cm-reader",
            "--clusterrole=cm-reader",
            "--serviceaccount=default:operator",
        )
        token = cp.create_token("operator", "default")
        kc = cp.write_kubeconfig_for_token(tmp_path / "sa.kubeconfig", token, user="operator")
        who = json.loads(cp.kubectl("auth", "whoami", "-o", "json", kubeconfig=kc).stdout)
        assert who["status"]["userInfo"]["username"] == "system:serviceaccount:default:operator"
        assert cp.kubectl("get", "configmaps", "-n", "kube-system", kubeconfig=kc).returncode == 0
        denied = cp.kubectl("create", "configmap", "x", "-n", "default", kubeconfig=kc, check=False)
        assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
        sa_dir = cp.write_serviceaccount_dir(tmp_path / "sa", token)
        assert (sa_dir / "token").read_text() == token
        assert cp.in_cluster_env()["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"
        workdir = cp.workdir
    except BaseException:
        cp.dump_logs()
        raise
    finally:
        cp.stop()
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"process {pid} still alive"
    assert not [p for p in ports if port_is_listening(p)]
    assert not workdir.exists()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def test_binaries_of_another_version_are_refused() -> None:
    """The harness asserts the pinned versions at start: the cached v1.37.2 binaries are not v1.36.0."""
    plane = ControlPlane(version="v1.36.0", bin_dir=binary_dir(DEFAULT_K8S_VERSION))
    with pytest.raises(MissingBinariesError, match=r"reports 'Kubernetes v1\.37\.2', expected 'Kubernetes v1\.36\.0'"):
        plane._check_binaries()
