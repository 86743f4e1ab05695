"""Child manifests are pure functions of the spec and the placement decision."""

from __future__ import annotations

import yaml

from modelfleet.dataplane.spec import InferenceDeploymentSpec
from modelfleet.operator.resources.children import Owner, PodPlacement, config_map, plan_children
from modelfleet.operator.settings import OperatorSettings

OWNER = Owner("chat", "llm", "uid-1")
SETTINGS = OperatorSettings(image_registry="registry.example/mf", image_tag="1.2.3")


def spec(**kw) -> InferenceDeploymentSpec:
    base = {"model": {"name": "m", "source": {"path": "/models/m"}}, "runtime": {"kind": "torch", "device": "cpu"}}
    base.update(kw)
    return InferenceDeploymentSpec.model_validate(base)


def by_kind(objs):
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def test_plan_is_deterministic_and_owned():
    a = plan_children(OWNER, spec(), SETTINGS, PodPlacement())
    b = plan_children(OWNER, spec(), SETTINGS, PodPlacement())
    assert a == b
    kinds = by_kind(a)
    assert set(kinds) == {
        ("ConfigMap", "chat-config"),
        ("Service", "chat"),
        ("Service", "chat-peers"),
        ("PodDisruptionBudget", "chat"),
        ("Deployment", "chat"),
    }
    for obj in a:
        assert obj["metadata"]["namespace"] == "llm"
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert obj["metadata"]["labels"]["modelfleet.io/deployment"] == "chat"


def test_config_map_round_trips_the_spec():
    s = spec(engine={"maxNumSeqs": 3})
    text = config_map(OWNER, s)["data"]["deployment.yaml"]
    doc = yaml.safe_load(text)
    assert doc["kind"] == "InferenceDeployment" and doc["metadata"]["name"] == "chat"
    assert InferenceDeploymentSpec.model_validate(doc["spec"]) == s


def test_spec_change_changes_the_pod_template():
    one = by_kind(plan_children(OWNER, spec(), SETTINGS, PodPlacement()))[("Deployment", "chat")]
    two = by_kind(plan_children(OWNER, spec(engine={"maxNumSeqs": 2}), SETTINGS, PodPlacement()))[
        ("Deployment", "chat")
    ]
    key = "modelfleet.io/config-hash"
    assert (
        one["spec"]["template"]["metadata"]["annotations"][key]
        != two["spec"]["template"]["metadata"]["annotations"][key]
    )


def test_gpu_placement_becomes_requests_affinity_and_tolerations():
    affinity = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}
    placement = PodPlacement(
        gpu_resource="nvidia.com/gpu",
        gpus_per_replica=2,
        node_affinity=affinity,
        tolerations=[{"key": "dedicated", "operator": "Equal", "value": "x", "effect": "NoSchedule"}],
        spread_topology_key="kubernetes.io/hostname",
    )
    dep = by_kind(plan_children(OWNER, spec(runtime={"kind": "vllm"}), SETTINGS, placement))[("Deployment", "chat")]
    pod = dep["spec"]["template"]["spec"]
    engine = pod["containers"][0]
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert engine["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert engine["image"] == "registry.example/mf/engine-vllm:1.2.3"
    assert pod["affinity"]["nodeAffinity"] == affinity
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0  # no spare GPUs for surge pods


def test_cpu_pods_request_no_gpu_and_run_locked_down():
    dep = by_kind(plan_children(OWNER, spec(), SETTINGS, PodPlacement()))[("Deployment", "chat")]
    pod = dep["spec"]["template"]["spec"]
    assert "affinity" not in pod
    for c in pod["containers"]:
        assert not any(k.endswith("/gpu") for k in c["resources"].get("limits", {}))
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["containers"][0]["image"] == "registry.example/mf/engine-torch-cpu:1.2.3"
    assert pod["containers"][1]["image"] == "registry.example/mf/modelfleet:1.2.3"
