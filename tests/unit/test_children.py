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
        ("ServiceAccount", "chat-sidecar"),
        ("Role", "chat-sidecar"),
        ("RoleBinding", "chat-sidecar"),
    }
    order = [o["kind"] for o in a]
    assert order.index("ServiceAccount") < order.index("Deployment")  # admission needs the pods' account first
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


def test_sidecar_discovers_peers_with_a_read_only_account_of_its_own():
    kinds = by_kind(plan_children(OWNER, spec(routing={"policy": "PrefixAffinity"}), SETTINGS, PodPlacement()))
    pod = kinds[("Deployment", "chat")]["spec"]["template"]["spec"]
    engine, sidecar = pod["containers"]
    args = sidecar["args"]
    flags = dict(zip(args[1::2], args[2::2], strict=False)) if args[0] == "sidecar" else {}
    assert "--kubernetes" in args
    for flag, value in [
        ("-f", "/etc/modelfleet/deployment.yaml"),  # spec.routing reaches the sidecar
        ("--deployment", "chat"),
        ("--service", "chat-peers"),
        ("--namespace", "llm"),
        ("--engine-port", "8001"),
        ("--peer", "http://127.0.0.1:8001"),  # its own engine until the first list
    ]:
        assert args[args.index(flag) + 1] == value, (flag, args)
    assert flags  # args start with the subcommand
    assert kinds[("Service", "chat-peers")]["spec"]["ports"][0]["name"] == "engine"  # the port the sidecar looks up
    # the pods run as the deployment's account; only the sidecar container gets its token
    assert pod["serviceAccountName"] == "chat-sidecar"
    assert pod["automountServiceAccountToken"] is False
    token_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert {m["mountPath"] for m in sidecar["volumeMounts"]} >= {token_dir, "/etc/modelfleet"}
    assert token_dir not in {m["mountPath"] for m in engine["volumeMounts"]}
    (access,) = [v for v in pod["volumes"] if v["name"] == "kube-api-access"]
    sources = access["projected"]["sources"]
    assert sources[0]["serviceAccountToken"]["expirationSeconds"] <= 3607
    assert {k for s in sources for k in s} == {"serviceAccountToken", "configMap", "downwardAPI"}
    # RBAC: get/list/watch EndpointSlices in the namespace, nothing else
    account = kinds[("ServiceAccount", "chat-sidecar")]
    assert account["automountServiceAccountToken"] is False
    role = kinds[("Role", "chat-sidecar")]
    assert role["metadata"]["namespace"] == "llm"
    assert role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
    ]
    binding = kinds[("RoleBinding", "chat-sidecar")]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "chat-sidecar"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "chat-sidecar", "namespace": "llm"}]


def remote_spec(**remote: object) -> InferenceDeploymentSpec:
    return InferenceDeploymentSpec.model_validate(
        {
            "model": {"name": "hosted", "source": {"runtimeManaged": True}},
            "runtime": {"kind": "remote", "remote": {"baseUrl": "https://api.example.com/v1", **remote}},
        }
    )


def test_remote_api_key_secret_is_mounted_into_the_engine_only():
    s = remote_spec(apiKey={"secret": {"name": "provider-key", "key": "token"}})
    dep = by_kind(plan_children(OWNER, s, SETTINGS, PodPlacement()))[("Deployment", "chat")]
    pod = dep["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "remote-api-key")
    assert volume["secret"]["secretName"] == "provider-key"
    assert volume["secret"]["items"] == [{"key": "token", "path": "token"}]  # no subPath: rotations reach the file
    engine, sidecar = pod["containers"]
    mount = next(m for m in engine["volumeMounts"] if m["name"] == "remote-api-key")
    assert mount["readOnly"] and f"{mount['mountPath']}/token" == s.runtime.remote.api_key.secret.mounted_path(
        "/var/run/modelfleet/secrets"
    )
    assert all(m["name"] != "remote-api-key" for m in sidecar["volumeMounts"])
    assert all("token" not in str(e) for e in engine["env"])  # never an env var holding the key


def test_remote_endpoint_change_is_applied_in_place_but_engine_change_rolls_pods():
    key = "modelfleet.io/config-hash"

    def template_hash(s: InferenceDeploymentSpec) -> str:
        dep = by_kind(plan_children(OWNER, s, SETTINGS, PodPlacement()))[("Deployment", "chat")]
        return str(dep["spec"]["template"]["metadata"]["annotations"][key])

    base = template_hash(remote_spec())
    assert template_hash(remote_spec(headers={"x-team": "ads"})) == base  # the engine reloads runtime.remote
    assert template_hash(remote_spec(maxRetries=5)) == base
    moved = remote_spec().model_copy(update={"engine": remote_spec().engine.model_copy(update={"max_num_seqs": 3})})
    assert template_hash(moved) != base


def test_sidecar_learns_its_pod_ip_for_prefix_locality():
    dep = by_kind(plan_children(OWNER, spec(), SETTINGS, PodPlacement()))[("Deployment", "chat")]
    sidecar = next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "sidecar")
    env = {e["name"]: e for e in sidecar["env"]}
    assert env["MODELFLEET_POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
