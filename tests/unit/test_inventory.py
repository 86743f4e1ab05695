"""GPU inventory: Kubernetes Node and Pod objects read into GpuNode facts."""

from __future__ import annotations

import pytest

from modelfleet.dataplane.spec import GpuVendor
from modelfleet.operator.inventory import Taint, gpu_nodes, node_from_dict, parse_memory_mib, pod_gpu_request


def node(
    name: str,
    *,
    labels: dict | None = None,
    allocatable: dict | None = None,
    taints: list | None = None,
    ready: str | None = "True",
    unschedulable: bool = False,
) -> dict:
    obj: dict = {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
        "spec": {},
        "status": {"allocatable": {"cpu": "64", "memory": "512Gi", **(allocatable or {})}},
    }
    if taints:
        obj["spec"]["taints"] = taints
    if unschedulable:
        obj["spec"]["unschedulable"] = True
    if ready is not None:
        obj["status"]["conditions"] = [
            {"type": "MemoryPressure", "status": "False"},
            {"type": "Ready", "status": ready},
        ]
    return obj


def h100(name: str, **kw) -> dict:
    labels = {
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
        "nvidia.com/gpu.memory": "81559",
        "topology.kubernetes.io/zone": "us-east-1a",
        **kw.pop("labels", {}),
    }
    return node(name, labels=labels, allocatable={"nvidia.com/gpu": "8"}, **kw)


def pod(name: str, node_name: str | None, gpus: int | None = 1, *, phase: str = "Running", **spec) -> dict:
    container: dict = {"name": "main", "resources": {}}
    if gpus is not None:
        container["resources"] = {"requests": {"nvidia.com/gpu": str(gpus)}, "limits": {"nvidia.com/gpu": str(gpus)}}
    body = {"containers": [container], **spec}
    if node_name:
        body["nodeName"] = node_name
    return {"metadata": {"name": name}, "spec": body, "status": {"phase": phase}}


def test_nvidia_node_facts_come_from_gfd_labels_and_allocatable():
    (n,) = gpu_nodes([h100("gpu-1", labels={"pool": "inference"})])
    assert n.name == "gpu-1"
    assert n.vendor is GpuVendor.NVIDIA
    assert n.product == "NVIDIA-H100-80GB-HBM3"
    assert n.product_label == "nvidia.com/gpu.product"
    assert n.gpu_memory_mib == 81559
    assert n.gpu_memory_gib == pytest.approx(79.65, abs=0.01)
    assert n.allocatable_gpus == 8 and n.used_gpus == 0 and n.free_gpus == 8
    assert n.zone == "us-east-1a"
    assert n.labels["pool"] == "inference"
    assert n.ready and not n.unschedulable
    assert n.resource_name == "nvidia.com/gpu"


def test_amd_node_reads_rocm_labeller_labels():
    obj = node(
        "mi300-1",
        labels={"amd.com/gpu.product-name": "AMD_Instinct_MI300X_OAM", "amd.com/gpu.vram": "192G"},
        allocatable={"amd.com/gpu": "8"},
    )
    (n,) = gpu_nodes([obj])
    assert n.vendor is GpuVendor.AMD
    assert n.product == "AMD_Instinct_MI300X_OAM"
    assert n.product_label == "amd.com/gpu.product-name"
    assert n.gpu_memory_mib == 192 * 1024
    assert n.resource_name == "amd.com/gpu"


def test_nodes_without_gpus_are_left_out_and_result_is_sorted():
    nodes = [h100("b"), node("cpu-only"), h100("a")]
    assert [n.name for n in gpu_nodes(nodes)] == ["a", "b"]


def test_gpu_labels_without_device_plugin_mean_zero_allocatable():
    obj = node("gpu-new", labels={"nvidia.com/gpu.product": "NVIDIA-L4"})
    n = node_from_dict(obj)
    assert n is not None and n.allocatable_gpus == 0 and n.free_gpus == 0


def test_taints_ready_and_cordon():
    taints = [
        {"key": "dedicated", "value": "training", "effect": "NoSchedule"},
        {"key": "nvidia.com/gpu", "effect": "NoSchedule"},
    ]
    (n,) = gpu_nodes([h100("gpu-1", taints=taints, ready="False", unschedulable=True)])
    assert n.taints == (Taint("dedicated", "training", "NoSchedule"), Taint("nvidia.com/gpu", "", "NoSchedule"))
    assert str(n.taints[0]) == "dedicated=training:NoSchedule"
    assert not n.ready
    assert n.unschedulable


def test_node_without_conditions_is_not_ready():
    (n,) = gpu_nodes([h100("gpu-1", ready=None)])
    assert not n.ready


def test_used_gpus_count_only_pods_that_hold_them():
    pods = [
        pod("running", "gpu-1", 2),
        pod("pending-bound", "gpu-1", 1, phase="Pending"),
        pod("done", "gpu-1", 4, phase="Succeeded"),
        pod("crashed", "gpu-1", 4, phase="Failed"),
        pod("unbound", None, 4, phase="Pending"),
        pod("elsewhere", "gpu-2", 3),
        pod("cpu", "gpu-1", None),
    ]
    nodes = {n.name: n for n in gpu_nodes([h100("gpu-1"), h100("gpu-2")], pods)}
    assert nodes["gpu-1"].used_gpus == 3
    assert nodes["gpu-1"].free_gpus == 5
    assert nodes["gpu-2"].used_gpus == 3


def test_limit_only_container_counts_its_limit():
    spec = {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "2"}}}]}
    assert pod_gpu_request(spec, "nvidia.com/gpu") == 2
    assert pod_gpu_request(spec, "amd.com/gpu") == 0


def test_init_containers_use_scheduler_semantics():
    def c(gpus: int, **kw) -> dict:
        return {"name": "x", "resources": {"requests": {"nvidia.com/gpu": str(gpus)}}, **kw}

    # A plain init container runs before the app: the larger of the two phases counts.
    assert pod_gpu_request({"containers": [c(1), c(1)], "initContainers": [c(4)]}, "nvidia.com/gpu") == 4
    assert pod_gpu_request({"containers": [c(2), c(2)], "initContainers": [c(3)]}, "nvidia.com/gpu") == 4
    # A sidecar (restartPolicy Always) runs alongside the app: it adds.
    sidecar = c(1, restartPolicy="Always")
    assert pod_gpu_request({"containers": [c(2)], "initContainers": [sidecar]}, "nvidia.com/gpu") == 3


def test_over_committed_node_reports_zero_free():
    (n,) = gpu_nodes([h100("gpu-1")], [pod("a", "gpu-1", 6), pod("b", "gpu-1", 6)])
    assert n.used_gpus == 12 and n.free_gpus == 0


@pytest.mark.parametrize(
    ("label", "mib"),
    [("81559", 81559), ("192G", 196608), ("64Gi", 65536), ("40960M", 40960), ("", None), ("lots", None), (None, None)],
)
def test_memory_labels(label, mib):
    assert parse_memory_mib(label) == mib
