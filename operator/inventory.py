"""GPU inventory: plain Kubernetes Node and Pod objects turned into ``GpuNode`` facts.

Pure functions over the JSON dicts the API server returns (``kubectl get nodes
-o json`` items, or ``ApiClient.sanitize_for_serialization`` output); no client,
no I/O, so placement can be tested and benchmarked without a cluster.

What is read from a Node:

- vendor: the extended resource in ``status.allocatable`` (``nvidia.com/gpu`` or
  ``amd.com/gpu``), else the vendor's product label. Nodes with neither are not
  GPU nodes and are left out.
- product: ``nvidia.com/gpu.product`` (NVIDIA GPU feature discovery), or for AMD
  ``amd.com/gpu.product-name`` / ``beta.amd.com/gpu.product-name`` (ROCm node
  labeller) / ``amd.com/gpu.product``. The key found is kept, so node affinity
  can use the same key.
- per-GPU memory in MiB: ``nvidia.com/gpu.memory`` (MiB, as the driver reports
  it: an H100 80GB says 81559), or ``amd.com/gpu.vram`` such as ``192G``.
- allocatable GPUs, zone (``topology.kubernetes.io/zone``), labels, taints,
  ready (condition ``Ready`` is ``True``) and cordoned (``spec.unschedulable``).

Used GPUs on a node are the effective GPU requests of the pods bound to it
(``spec.nodeName``) that still hold resources (phase neither Succeeded nor
Failed). A pod's effective request follows the scheduler: the larger of (a) the
sum over its containers plus restartable (sidecar) init containers and (b) the
largest single init container plus the sidecars started before it. A container
without a GPU request counts its GPU limit (for extended resources Kubernetes
defaults the request to the limit).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from modelfleet.dataplane.spec import GpuVendor

RESOURCE_NAMES: dict[GpuVendor, str] = {GpuVendor.NVIDIA: "nvidia.com/gpu", GpuVendor.AMD: "amd.com/gpu"}
PRODUCT_LABELS: dict[GpuVendor, tuple[str, ...]] = {
    GpuVendor.NVIDIA: ("nvidia.com/gpu.product",),
    GpuVendor.AMD: ("amd.com/gpu.product-name", "beta.amd.com/gpu.product-name", "amd.com/gpu.product"),
}
MEMORY_LABELS: dict[GpuVendor, tuple[str, ...]] = {
    GpuVendor.NVIDIA: ("nvidia.com/gpu.memory",),
    GpuVendor.AMD: ("amd.com/gpu.vram", "beta.amd.com/gpu.vram", "amd.com/gpu.memory"),
}
ZONE_LABELS = ("topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone")
HOSTNAME_LABEL = "kubernetes.io/hostname"
TERMINATED_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class Taint:
    """A node taint. Only NoSchedule and NoExecute keep new pods away."""

    key: str
    value: str = ""
    effect: str = "NoSchedule"

    def __str__(self) -> str:
        return f"{self.key}={self.value}:{self.effect}" if self.value else f"{self.key}:{self.effect}"


@dataclass(frozen=True)
class GpuNode:
    """What placement needs to know about one GPU node."""

    name: str
    vendor: GpuVendor
    product: str | None
    gpu_memory_mib: int | None
    allocatable_gpus: int
    used_gpus: int = 0
    zone: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    ready: bool = True
    unschedulable: bool = False
    product_label: str | None = None

    @property
    def free_gpus(self) -> int:
        return max(0, self.allocatable_gpus - self.used_gpus)

    @property
    def hostname(self) -> str:
        """The ``kubernetes.io/hostname`` label value (usually the node name)."""
        return self.labels.get(HOSTNAME_LABEL, self.name)

    @property
    def resource_name(self) -> str:
        return RESOURCE_NAMES[self.vendor]

    @property
    def gpu_memory_gib(self) -> float | None:
        return None if self.gpu_memory_mib is None else self.gpu_memory_mib / 1024


def gpu_nodes(nodes: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]] = ()) -> list[GpuNode]:
    """GPU nodes among ``nodes``, with the GPUs that ``pods`` hold on each, sorted by name."""
    result = [n for n in (node_from_dict(obj) for obj in nodes) if n is not None]
    used = gpus_used_by_node(pods, {n.name: n.resource_name for n in result})
    out = [_with_used(n, used.get(n.name, 0)) for n in result]
    out.sort(key=lambda n: n.name)
    return out


def _with_used(node: GpuNode, used: int) -> GpuNode:
    if used == node.used_gpus:
        return node
    return GpuNode(
        name=node.name,
        vendor=node.vendor,
        product=node.product,
        gpu_memory_mib=node.gpu_memory_mib,
        allocatable_gpus=node.allocatable_gpus,
        used_gpus=used,
        zone=node.zone,
        labels=node.labels,
        taints=node.taints,
        ready=node.ready,
        unschedulable=node.unschedulable,
        product_label=node.product_label,
    )


def node_from_dict(obj: Mapping[str, Any]) -> GpuNode | None:
    """One Node object as a ``GpuNode``, or None when it has no GPUs of a known vendor."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    labels: dict[str, str] = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    allocatable = status.get("allocatable") or {}

    vendor = _vendor(allocatable, labels)
    if vendor is None:
        return None
    product_label = next((key for key in PRODUCT_LABELS[vendor] if labels.get(key)), None)
    return GpuNode(
        name=str(meta.get("name", "")),
        vendor=vendor,
        product=labels[product_label] if product_label else None,
        gpu_memory_mib=next((m for key in MEMORY_LABELS[vendor] if (m := parse_memory_mib(labels.get(key)))), None),
        allocatable_gpus=parse_count(allocatable.get(RESOURCE_NAMES[vendor])),
        zone=next((labels[key] for key in ZONE_LABELS if labels.get(key)), None),
        labels=labels,
        taints=tuple(
            Taint(str(t.get("key", "")), str(t.get("value") or ""), str(t.get("effect") or ""))
            for t in spec.get("taints") or ()
        ),
        ready=any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ()),
        unschedulable=bool(spec.get("unschedulable", False)),
        product_label=product_label,
    )


def _vendor(allocatable: Mapping[str, Any], labels: Mapping[str, str]) -> GpuVendor | None:
    for vendor, resource in RESOURCE_NAMES.items():
        if resource in allocatable:
            return vendor
    for vendor, keys in PRODUCT_LABELS.items():
        if any(key in labels for key in keys):
            return vendor
    return None


def gpus_used_by_node(pods: Iterable[Mapping[str, Any]], resource_by_node: Mapping[str, str]) -> dict[str, int]:
    """GPUs held on each node (by that node's resource name) by pods that still run there."""
    used: dict[str, int] = {}
    for pod in pods:
        spec = pod.get("spec") or {}
        node = spec.get("nodeName")
        if not node or node not in resource_by_node:
            continue
        if (pod.get("status") or {}).get("phase") in TERMINATED_PHASES:
            continue
        count = pod_gpu_request(spec, resource_by_node[node])
        if count:
            used[node] = used.get(node, 0) + count
    return used


def pod_gpu_request(pod_spec: Mapping[str, Any], resource: str) -> int:
    """The effective request of one pod for ``resource`` (see the module docstring)."""
    app = sum(_container_request(c, resource) for c in pod_spec.get("containers") or ())
    sidecars = 0
    init_peak = 0
    for c in pod_spec.get("initContainers") or ():
        request = _container_request(c, resource)
        if c.get("restartPolicy") == "Always":  # a sidecar: runs for the pod's whole life
            sidecars += request
        else:
            init_peak = max(init_peak, sidecars + request)
    return max(app + sidecars, init_peak)


def _container_request(container: Mapping[str, Any], resource: str) -> int:
    res = container.get("resources") or {}
    requests = res.get("requests") or {}
    if resource in requests:
        return parse_count(requests[resource])
    return parse_count((res.get("limits") or {}).get(resource))


def parse_count(value: object) -> int:
    """An extended-resource quantity (always a whole number) as an int; 0 when absent or unreadable."""
    if value is None:
        return 0
    try:
        return max(0, int(str(value).strip()))
    except ValueError:
        return 0


_MEMORY_UNITS = {"": 1, "M": 1, "MI": 1, "MIB": 1, "G": 1024, "GI": 1024, "GIB": 1024, "GB": 1024, "T": 1024 * 1024}


def parse_memory_mib(value: str | None) -> int | None:
    """A GPU memory label in MiB: ``81559`` (NVIDIA, MiB) or ``192G`` (AMD). None when absent or unreadable."""
    if not value:
        return None
    text = value.strip().upper()
    digits = text.rstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = _MEMORY_UNITS.get(text[len(digits) :].strip())
    try:
        number = float(digits)
    except ValueError:
        return None
    if unit is None or number <= 0:
        return None
    return round(number * unit)
