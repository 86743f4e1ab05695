"""GPU-aware placement: which GPU type, how many per replica, which nodes, and why not."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelfleet.dataplane.sizing import GIB, MemoryEstimate, estimate_for
from modelfleet.dataplane.spec import InferenceDeploymentSpec, Toleration
from modelfleet.operator.inventory import GpuNode, Taint, gpu_nodes
from modelfleet.operator.placement import (
    PlacementFailure,
    PlacementPlan,
    Reason,
    place_many,
    plan_placement,
    tolerates,
    untolerated,
)

# (product label, memory label in MiB as the driver reports it, GPUs per node)
H100 = ("NVIDIA-H100-80GB-HBM3", "81559", 8)
A100_40 = ("NVIDIA-A100-SXM4-40GB", "40960", 4)
L4 = ("NVIDIA-L4", "23034", 2)
MI300X = ("AMD_Instinct_MI300X_OAM", "192G", 8)

# parameters, layers, KV heads, head dim
SIZES = {
    "1b": (1_235_814_400, 16, 8, 64),
    "8b": (8_030_261_248, 32, 8, 128),
    "70b": (70_553_706_496, 80, 8, 128),
}


def node(
    name: str,
    kind: tuple[str, str, int] = H100,
    *,
    zone: str | None = "zone-a",
    taints: list[dict] | None = None,
    ready: bool = True,
    cordoned: bool = False,
    labels: dict | None = None,
    memory: bool = True,
) -> dict:
    product, mem, gpus = kind
    amd = product.startswith("AMD")
    lab = {"kubernetes.io/hostname": name, **(labels or {})}
    lab["amd.com/gpu.product-name" if amd else "nvidia.com/gpu.product"] = product
    if memory:
        lab["amd.com/gpu.vram" if amd else "nvidia.com/gpu.memory"] = mem
    if zone:
        lab["topology.kubernetes.io/zone"] = zone
    return {
        "metadata": {"name": name, "labels": lab},
        "spec": {"taints": taints or [], "unschedulable": cordoned},
        "status": {
            "allocatable": {"amd.com/gpu" if amd else "nvidia.com/gpu": str(gpus)},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def pod(node_name: str, gpus: int, phase: str = "Running") -> dict:
    res = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return {
        "spec": {"nodeName": node_name, "containers": [{"name": "c", "resources": res}]},
        "status": {"phase": phase},
    }


def spec(size: str | None = "1b", replicas: int = 1, *, runtime: str = "vllm", **placement) -> InferenceDeploymentSpec:
    model: dict = {"name": "m", "source": {"runtimeManaged": True}}
    if size:
        p, layers, kv, hd = SIZES[size]
        model["size"] = {"parameters": p, "numLayers": layers, "numKvHeads": kv, "headDim": hd}
    doc: dict = {"model": model, "replicas": replicas, "placement": placement}
    if runtime == "cpu":
        doc["runtime"] = {"kind": "torch", "device": "cpu"}
        doc["model"]["source"] = {"path": "/models/m"}
    else:
        doc["runtime"] = {"kind": runtime}
    return InferenceDeploymentSpec.model_validate(doc)


def place(s: InferenceDeploymentSpec, nodes: list[GpuNode], **kw) -> PlacementPlan | PlacementFailure:
    return plan_placement(s, nodes, estimate_for(s), **kw)


def plan(s: InferenceDeploymentSpec, nodes: list[GpuNode], **kw) -> PlacementPlan:
    result = place(s, nodes, **kw)
    assert isinstance(result, PlacementPlan), result
    return result


def failure(s: InferenceDeploymentSpec, nodes: list[GpuNode], reason: Reason, **kw) -> str:
    result = place(s, nodes, **kw)
    assert isinstance(result, PlacementFailure), result
    assert result.reason is reason, result.message
    return result.message


@pytest.fixture
def mixed() -> list[GpuNode]:
    """One node of each NVIDIA type, all idle."""
    return gpu_nodes([node("h100-1", H100), node("a100-1", A100_40), node("l4-1", L4)])


# --- GPU type and count ------------------------------------------------------------------


def test_cpu_deployment_gets_no_gpus_and_no_affinity(mixed):
    p = plan(spec(runtime="cpu", replicas=2), mixed)
    assert p.gpus_per_replica == 0 and p.resource_name is None
    assert p.node_affinity() is None and p.tolerations == []
    status = p.to_status()
    assert status.gpus_per_replica == 0 and status.nodes == []
    assert status.summary == "2 replicas on CPU: no GPUs requested"


def test_small_model_takes_the_cheapest_gpu_that_fits(mixed):
    p = plan(spec("1b"), mixed)
    assert (p.gpu_type, p.gpus_per_replica, p.replica_nodes) == ("NVIDIA-L4", 1, ("l4-1",))


def test_fewest_gpus_beats_cheaper_cards(mixed):
    # 8B bf16 with 16 x 2048 tokens of KV cache needs about 21.9 GiB: two L4s or one A100-40GB.
    p = plan(spec("8b"), mixed)
    assert (p.gpu_type, p.gpus_per_replica) == ("NVIDIA-A100-SXM4-40GB", 1)
    assert p.memory_per_replica_gib == pytest.approx(21.9, abs=0.05)


def test_70b_bf16_needs_four_h100s():
    s = spec("70b")
    est = estimate_for(s)
    assert isinstance(est, MemoryEstimate)
    h100_usable = 81559 * 2**20 * 0.9
    assert 2 * h100_usable < est.total_bytes <= 4 * h100_usable  # 156.6 GiB: 2 x 71.7 GiB is too little
    p = plan(s, gpu_nodes([node("h100-1", H100), node("a100-1", A100_40)]))
    assert (p.gpu_type, p.gpus_per_replica, p.tensor_parallel_size) == ("NVIDIA-H100-80GB-HBM3", 4, 4)
    assert p.to_status().summary == (
        "1 replica of 4 x NVIDIA-H100-80GB-HBM3 (tensor parallel 4, 156.6 GiB estimated) on h100-1"
    )


def test_70b_does_not_fit_on_four_gpu_a100_40gb_nodes():
    msg = failure(
        spec("70b"), gpu_nodes([node("a100-1", A100_40), node("a100-2", A100_40)]), Reason.INSUFFICIENT_GPU_MEMORY
    )
    assert "needs 156.6 GiB" in msg
    assert "the largest option is 4 x 40.0 GiB NVIDIA-A100-SXM4-40GB (144.0 GiB usable) on node a100-1" in msg
    assert "8 x NVIDIA-A100-SXM4-40GB would hold it, but the largest such node has 4 GPUs" in msg
    assert "allow larger GPUs or nodes (spec.placement.gpuTypes)" in msg


def test_max_gpus_per_replica_caps_the_estimate(mixed):
    msg = failure(spec("70b", maxGpusPerReplica=2), mixed, Reason.INSUFFICIENT_GPU_MEMORY)
    assert "2 x 79.6 GiB NVIDIA-H100-80GB-HBM3 (143.4 GiB usable) on node h100-1" in msg
    assert "4 x NVIDIA-H100-80GB-HBM3 would hold it, but spec.placement.maxGpusPerReplica is 2" in msg


def test_explicit_gpus_per_replica_wins_over_the_estimate(mixed):
    p = plan(spec("1b", gpusPerReplica=2), mixed)
    assert (p.gpus_per_replica, p.tensor_parallel_size, p.gpu_type) == (2, 2, "NVIDIA-L4")


def test_explicit_gpus_per_replica_places_a_model_of_unknown_size(mixed):
    p = plan(spec(None, gpusPerReplica=4), mixed)
    assert (p.gpus_per_replica, p.gpu_type, p.memory_per_replica_gib) == (4, "NVIDIA-A100-SXM4-40GB", None)


def test_explicit_gpus_per_replica_too_small_for_the_model():
    msg = failure(
        spec("8b", gpusPerReplica=1, gpuTypes=["L4"]), gpu_nodes([node("l4-1", L4)]), Reason.INSUFFICIENT_GPU_MEMORY
    )
    assert "spec.placement.gpusPerReplica 1 gives at most 1 x 22.5 GiB NVIDIA-L4 (20.2 GiB usable) on node l4-1" in msg
    assert "needs 21.9 GiB" in msg


def test_explicit_gpus_per_replica_larger_than_any_node(mixed):
    msg = failure(spec("1b", gpusPerReplica=16, maxGpusPerReplica=16), mixed, Reason.INSUFFICIENT_FREE_GPUS)
    assert "gpusPerReplica is 16, but the largest matching node has 8 GPUs (h100-1)" in msg
    assert "never spans nodes" in msg


def test_unknown_model_size_asks_for_size_or_gpu_count(mixed):
    msg = failure(spec(None), mixed, Reason.MODEL_SIZE_UNKNOWN)
    assert "spec.model.size" in msg and "spec.placement.gpusPerReplica" in msg
    assert "runtimeManaged" in msg


def test_unknown_gpu_memory_needs_explicit_gpu_count():
    nodes = gpu_nodes([node("h100-1", H100, memory=False)])
    msg = failure(spec("1b"), nodes, Reason.INSUFFICIENT_GPU_MEMORY)
    assert "memory of the matching nodes is unknown (no nvidia.com/gpu.memory label on h100-1)" in msg
    assert plan(spec("1b", gpusPerReplica=1), nodes).replica_nodes == ("h100-1",)


# --- constraints -------------------------------------------------------------------------


def test_gpu_types_restrict_the_product(mixed):
    p = plan(spec("1b", gpuTypes=["a100"]), mixed)
    assert p.gpu_type == "NVIDIA-A100-SXM4-40GB"
    msg = failure(spec("1b", gpuTypes=["H200", "B200"]), mixed, Reason.NO_MATCHING_NODES)
    assert "3 nodes have GPUs not in gpuTypes ['H200', 'B200']" in msg
    assert "NVIDIA-A100-SXM4-40GB, NVIDIA-H100-80GB-HBM3, NVIDIA-L4" in msg


def test_min_gpu_memory_accepts_cards_that_report_a_little_less(mixed):
    # The H100 "80GB" reports 79.6 GiB; asking for 80 must still accept it, and refuse the 40 GB A100.
    p = plan(spec("1b", minGpuMemoryGib=80), mixed)
    assert p.gpu_type == "NVIDIA-H100-80GB-HBM3"
    p = plan(spec("1b", minGpuMemoryGib=24), mixed)
    assert p.gpu_type == "NVIDIA-L4"  # "24 GB" L4 reports 22.5 GiB
    msg = failure(spec("1b", minGpuMemoryGib=96), mixed, Reason.NO_MATCHING_NODES)
    assert "3 nodes have less GPU memory than minGpuMemoryGib 96 (largest 79.6 GiB)" in msg


def test_node_selector_limits_nodes_and_appears_in_the_affinity():
    nodes = gpu_nodes([node("l4-1", L4), node("l4-2", L4, labels={"pool": "inference"})])
    p = plan(spec("1b", nodeSelector={"pool": "inference"}), nodes)
    assert p.replica_nodes == ("l4-2",)
    (term,) = p.required_node_affinity["nodeSelectorTerms"]
    assert {"key": "pool", "operator": "In", "values": ["inference"]} in term["matchExpressions"]
    msg = failure(spec("1b", nodeSelector={"pool": "batch"}), nodes, Reason.NO_MATCHING_NODES)
    assert "2 nodes lack the nodeSelector labels pool=batch [l4-1, l4-2]" in msg


TRAINING = {"key": "dedicated", "value": "training", "effect": "NoSchedule"}


def test_tainted_node_is_avoided_unless_tolerated():
    nodes = gpu_nodes([node("h100-1", taints=[TRAINING]), node("h100-2")])
    assert plan(spec("1b", replicas=1), nodes).replica_nodes == ("h100-2",)
    only_tainted = gpu_nodes([node("h100-1", taints=[TRAINING])])
    msg = failure(spec("1b"), only_tainted, Reason.NO_MATCHING_NODES)
    assert (
        "1 node has taints not tolerated (dedicated=training:NoSchedule; add spec.placement.tolerations) [h100-1]"
        in msg
    )
    tolerant = spec("1b", tolerations=[{"key": "dedicated", "operator": "Equal", "value": "training"}])
    p = plan(tolerant, only_tainted)
    assert p.replica_nodes == ("h100-1",)
    assert {"key": "dedicated", "operator": "Equal", "value": "training"} in p.tolerations


def test_soft_taints_and_the_gpu_taint_do_not_block():
    taints = [
        {"key": "spot", "value": "true", "effect": "PreferNoSchedule"},
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
    ]
    p = plan(spec("1b"), gpu_nodes([node("h100-1", taints=taints)]))
    assert p.replica_nodes == ("h100-1",)
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in p.tolerations


@pytest.mark.parametrize(
    ("toleration", "taint", "expected"),
    [
        ({"operator": "Exists"}, Taint("anything", "x", "NoExecute"), True),
        ({"key": "k", "operator": "Exists"}, Taint("k", "whatever", "NoSchedule"), True),
        ({"key": "k", "operator": "Exists"}, Taint("other", "", "NoSchedule"), False),
        ({"key": "k", "operator": "Equal", "value": "v"}, Taint("k", "v", "NoSchedule"), True),
        ({"key": "k", "operator": "Equal", "value": "v"}, Taint("k", "w", "NoSchedule"), False),
        ({"key": "k", "operator": "Equal"}, Taint("k", "", "NoSchedule"), True),
        ({"key": "k", "value": "v", "effect": "NoSchedule"}, Taint("k", "v", "NoExecute"), False),
        ({"key": "k", "value": "v", "effect": "NoExecute"}, Taint("k", "v", "NoExecute"), True),
        ({"key": "k", "value": "v"}, Taint("k", "v", "NoExecute"), True),  # empty effect: every effect
    ],
)
def test_toleration_semantics_match_kubernetes(toleration, taint, expected):
    assert tolerates(Toleration.model_validate(toleration), taint) is expected


def test_only_blocking_taints_need_tolerating():
    taints = [Taint("a", "", "PreferNoSchedule"), Taint("b", "", "NoExecute")]
    assert untolerated(taints, []) == [Taint("b", "", "NoExecute")]


def test_unready_and_cordoned_nodes_are_never_used():
    nodes = gpu_nodes([node("h100-1", ready=False), node("h100-2", cordoned=True), node("h100-3")])
    assert plan(spec("1b", replicas=2), nodes).replica_nodes == ("h100-3", "h100-3")
    msg = failure(spec("1b"), [n for n in nodes if n.name != "h100-3"], Reason.NO_MATCHING_NODES)
    assert "of 2 GPU nodes, 1 node is not ready [h100-1]; 1 node is cordoned [h100-2]" in msg


def test_amd_nodes_use_the_amd_resource_and_label():
    nodes = gpu_nodes([node("mi300-1", MI300X), node("h100-1", H100)])
    p = plan(spec("70b", gpuVendor="amd"), nodes)
    # 192 GiB x 0.9 = 172.8 GiB holds the 156.6 GiB replica on one MI300X.
    assert (p.gpu_type, p.gpus_per_replica, p.resource_name) == ("AMD_Instinct_MI300X_OAM", 1, "amd.com/gpu")
    (term,) = p.required_node_affinity["nodeSelectorTerms"]
    assert term["matchExpressions"][0] == {
        "key": "amd.com/gpu.product-name",
        "operator": "In",
        "values": ["AMD_Instinct_MI300X_OAM"],
    }
    assert {"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in p.tolerations
    msg = failure(spec("1b", gpuVendor="amd"), gpu_nodes([node("h100-1")]), Reason.NO_MATCHING_NODES)
    assert "1 node has nvidia GPUs, not amd [h100-1]" in msg


def test_no_gpu_nodes_at_all():
    msg = failure(spec("1b"), [], Reason.NO_MATCHING_NODES)
    assert "no GPU nodes" in msg


# --- node choice -------------------------------------------------------------------------


def occupied() -> list[GpuNode]:
    """Three H100 nodes: 8, 6 and 1 GPUs free."""
    return gpu_nodes([node("h100-a"), node("h100-b"), node("h100-c")], [pod("h100-b", 2), pod("h100-c", 7)])


def test_binpack_uses_the_fullest_node_that_fits():
    assert plan(spec("1b", gpuTypes=["H100"]), occupied()).replica_nodes == ("h100-c",)
    assert plan(spec("1b", gpusPerReplica=2), occupied()).replica_nodes == ("h100-b",)


def test_spread_uses_the_emptiest_node():
    p = plan(spec("1b", replicas=3, gpusPerReplica=2, strategy="Spread"), occupied())
    assert p.replica_nodes == ("h100-a", "h100-a", "h100-b")  # 8 -> 6 free, then a 6-6 tie goes by name


def test_binpack_keeps_whole_nodes_free_for_big_models():
    nodes = gpu_nodes([node("h100-a"), node("h100-b")], [pod("h100-b", 4)])
    small = [(spec("1b", gpusPerReplica=1), None)] * 4
    big = (spec(None, gpusPerReplica=8), None)
    packed = place_many([*small, big], nodes)
    assert [r.replica_nodes for r in packed[:4]] == [("h100-b",)] * 4
    assert isinstance(packed[4], PlacementPlan) and packed[4].replica_nodes == ("h100-a",)
    spread = [(spec("1b", gpusPerReplica=1, strategy="Spread"), None)] * 4
    scattered = place_many([*spread, big], nodes)
    assert isinstance(scattered[4], PlacementFailure)
    assert scattered[4].reason is Reason.INSUFFICIENT_FREE_GPUS


A100_80 = ("NVIDIA-A100-SXM4-80GB", "81920", 8)


def test_binpack_fills_a_used_card_before_opening_an_empty_node_of_the_same_size():
    # H100 80GB (79.6 GiB) and A100 80GB (80 GiB) count as the same size; memory alone would pick the H100.
    nodes = gpu_nodes([node("h100-a"), node("a100-a", A100_80)], [pod("a100-a", 4)])
    assert plan(spec("1b"), nodes).replica_nodes == ("a100-a",)
    assert plan(spec("1b", strategy="Spread"), nodes).replica_nodes == ("h100-a",)


def test_ties_go_to_the_first_name():
    nodes = gpu_nodes([node("h100-z"), node("h100-m"), node("h100-b")])
    assert plan(spec("1b"), nodes).replica_nodes == ("h100-b",)


def test_partially_used_nodes_count_only_free_gpus():
    nodes = gpu_nodes([node("h100-a"), node("h100-b")], [pod("h100-a", 6), pod("h100-b", 8, phase="Succeeded")])
    p = plan(spec("70b"), nodes)
    assert p.replica_nodes == ("h100-b",)  # h100-a has 2 free; the finished pod on h100-b holds nothing


def test_a_replica_is_never_split_across_nodes():
    nodes = gpu_nodes([node("h100-a"), node("h100-b")], [pod("h100-a", 6), pod("h100-b", 5)])
    msg = failure(spec("70b"), nodes, Reason.INSUFFICIENT_FREE_GPUS)
    assert "needs 1 replica of 4 x NVIDIA-H100-80GB-HBM3 (79.6 GiB each) on one node, 156.6 GiB per replica" in msg
    assert "only 0 fit now: the largest free is 3 x NVIDIA-H100-80GB-HBM3 on node h100-b" in msg
    assert "(5 free on 2 matching nodes)" in msg


def test_insufficient_free_gpus_says_how_many_replicas_fit():
    nodes = gpu_nodes([node("h100-a"), node("h100-b")], [pod("h100-b", 8)])
    msg = failure(spec("70b", replicas=3), nodes, Reason.INSUFFICIENT_FREE_GPUS)
    assert "needs 3 replicas of 4 x NVIDIA-H100-80GB-HBM3" in msg and "only 2 fit now" in msg


def test_spread_across_nodes():
    nodes = gpu_nodes([node("h100-a"), node("h100-b"), node("h100-c")])
    p = plan(spec("1b", replicas=3, spreadAcross="Node"), nodes)
    assert sorted(p.replica_nodes) == ["h100-a", "h100-b", "h100-c"]
    assert p.spread_topology_key == "kubernetes.io/hostname"
    assert plan(spec("1b", replicas=3), nodes).replica_nodes == ("h100-a",) * 3  # BinPack alone packs


def test_spread_across_nodes_impossible_names_what_has_room():
    nodes = gpu_nodes([node("h100-a"), node("h100-b")])
    msg = failure(spec("1b", replicas=3, spreadAcross="Node"), nodes, Reason.SPREAD_IMPOSSIBLE)
    assert "spreadAcross Node needs 3 different nodes with 1 free NVIDIA-H100-80GB-HBM3 GPU each" in msg
    assert "only 2 have room (h100-a, h100-b)" in msg


def test_spread_across_zones():
    nodes = gpu_nodes(
        [node("h100-a1", zone="a"), node("h100-a2", zone="a"), node("h100-b1", zone="b"), node("h100-x", zone=None)]
    )
    p = plan(spec("1b", replicas=2, spreadAcross="Zone"), nodes)
    assert {n[-2] for n in p.replica_nodes} == {"a", "b"}
    assert p.spread_topology_key == "topology.kubernetes.io/zone"
    msg = failure(spec("1b", replicas=3, spreadAcross="Zone"), nodes, Reason.SPREAD_IMPOSSIBLE)
    assert "needs 3 different zones" in msg and "only 2 have room (a, b)" in msg
    assert "1 matching node without a topology.kubernetes.io/zone label [h100-x]" in msg


def test_existing_replicas_count_as_free_for_their_own_deployment():
    nodes = gpu_nodes([node("h100-a"), node("h100-b")], [pod("h100-a", 4), pod("h100-b", 6)])
    s = spec("70b")
    first = plan(s, nodes)
    assert first.replica_nodes == ("h100-a",)
    # Once running, its own 4 GPUs on h100-a are in use; re-planning must not move or refuse it.
    now = gpu_nodes([node("h100-a"), node("h100-b")], [pod("h100-a", 4), pod("h100-a", 4), pod("h100-b", 6)])
    assert isinstance(place(s, now), PlacementFailure)
    assert plan(s, now, existing={"h100-a": 4}).replica_nodes == ("h100-a",)


def test_place_many_sees_what_earlier_deployments_took():
    nodes = gpu_nodes([node("h100-a"), node("h100-b")])
    results = place_many([(spec(None, gpusPerReplica=8), None)] * 3, nodes)
    assert [r.replica_nodes for r in results[:2]] == [("h100-a",), ("h100-b",)]
    assert isinstance(results[2], PlacementFailure) and results[2].reason is Reason.INSUFFICIENT_FREE_GPUS
    assert "the largest free is 0" in results[2].message


def test_zero_replicas_is_a_valid_plan(mixed):
    p = plan(spec("8b", replicas=0), mixed)
    assert p.replica_nodes == () and p.gpus_per_replica == 1
    assert p.to_status().summary.startswith("0 replicas of 1 x NVIDIA-A100-SXM4-40GB")


# --- what the operator writes ------------------------------------------------------------

OPERATORS = {"In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"}


def test_affinity_is_valid_kubernetes_and_prefers_the_chosen_nodes():
    nodes = gpu_nodes([node("h100-a"), node("h100-b"), node("a100-a", A100_40)])
    p = plan(spec("8b", replicas=2, gpuTypes=["H100"], spreadAcross="Node"), nodes)
    affinity = p.node_affinity()
    assert affinity is not None
    required = affinity["requiredDuringSchedulingIgnoredDuringExecution"]
    for term in required["nodeSelectorTerms"]:
        for expr in term["matchExpressions"]:
            assert set(expr) <= {"key", "operator", "values"} and expr["operator"] in OPERATORS
            assert all(isinstance(v, str) for v in expr.get("values", []))
    assert required["nodeSelectorTerms"][0]["matchExpressions"][0] == {
        "key": "nvidia.com/gpu.product",
        "operator": "In",
        "values": ["NVIDIA-H100-80GB-HBM3"],
    }
    (preferred,) = affinity["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred == {
        "weight": 100,
        "preference": {
            "matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["h100-a", "h100-b"]}]
        },
    }
    assert p.resource_name == "nvidia.com/gpu"


def test_status_reports_the_decision(mixed):
    status = plan(spec("8b"), mixed).to_status()
    assert status.gpu_type == "NVIDIA-A100-SXM4-40GB"
    assert (status.gpus_per_replica, status.tensor_parallel_size, status.nodes) == (1, 1, ["a100-1"])
    assert status.memory_per_replica_gib == pytest.approx(21.9, abs=0.05)
    fail = place(spec(None), mixed)
    assert isinstance(fail, PlacementFailure)
    assert fail.to_status().summary.startswith("ModelSizeUnknown: ")


# --- invariants over random clusters -----------------------------------------------------

KINDS = [H100, A100_40, L4]


@settings(max_examples=60, deadline=None)
@given(
    cluster=st.lists(
        st.tuples(st.sampled_from(range(3)), st.integers(0, 8), st.sampled_from(["a", "b", "c"])),
        min_size=1,
        max_size=8,
    ),
    requests=st.lists(
        st.tuples(
            st.sampled_from(["1b", "8b", "70b"]),
            st.integers(1, 4),
            st.sampled_from(["BinPack", "Spread"]),
            st.sampled_from(["None", "Node", "Zone"]),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_plans_never_oversubscribe_and_honour_spread(cluster, requests):
    dicts, pods = [], []
    for i, (kind, used, zone) in enumerate(cluster):
        dicts.append(node(f"n{i}", KINDS[kind], zone=zone))
        if used:
            pods.append(pod(f"n{i}", min(used, KINDS[kind][2])))
    nodes = gpu_nodes(dicts, pods)
    specs = [
        spec(size, replicas, strategy=strategy, spreadAcross=across) for size, replicas, strategy, across in requests
    ]
    free = {n.name: n.free_gpus for n in nodes}
    by_name = {n.name: n for n in nodes}
    for s, result in zip(specs, place_many([(s, estimate_for(s)) for s in specs], nodes), strict=True):
        if isinstance(result, PlacementFailure):
            assert result.message
            continue
        assert len(result.replica_nodes) == s.replicas
        for name in result.replica_nodes:
            assert by_name[name].product == result.gpu_type
            free[name] -= result.gpus_per_replica
            assert free[name] >= 0
        est = estimate_for(s)
        assert isinstance(est, MemoryEstimate)
        per_gpu = by_name[result.replica_nodes[0]].gpu_memory_mib * 2**20 * 0.9
        assert result.gpus_per_replica * per_gpu >= est.total_bytes
        if s.placement.spread_across.value == "Node":
            assert len(set(result.replica_nodes)) == s.replicas
        if s.placement.spread_across.value == "Zone":
            assert len({by_name[n].zone for n in result.replica_nodes}) == s.replicas


def test_estimate_and_gib_units_agree():
    est = estimate_for(spec("70b"))
    assert isinstance(est, MemoryEstimate)
    assert est.total_gib == est.total_bytes / GIB
