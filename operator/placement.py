"""GPU-aware placement: pure functions from a spec, GPU nodes and a memory estimate to a plan.

No I/O and no Kubernetes client: ``inventory.gpu_nodes`` turns Node and Pod
objects into ``GpuNode`` facts, ``dataplane.sizing.estimate_for`` gives the memory
one replica needs, and this module decides.

The algorithm, for one deployment:

1. CPU deployments (``not spec.needs_gpu()``) get a plan with no GPUs.
2. Nodes are grouped by GPU type: (vendor, product, per-GPU memory). A type is a
   candidate when its vendor is ``gpuVendor``, its product contains one of
   ``gpuTypes`` (case-insensitive substring; empty allows any) and its memory
   is at least ``minGpuMemoryGib`` (with a 7% allowance: drivers report less than
   the nominal size, an "80 GB" H100 reports 79.6 GiB and a "24 GB" L4 22.5 GiB).
   Not-ready and cordoned nodes never count. A node of a candidate type is
   eligible when every NoSchedule/NoExecute taint is tolerated (Kubernetes
   semantics: an empty effect tolerates every effect, ``Exists`` with an empty
   key tolerates every taint, ``Equal`` needs key and value; the taint
   ``<vendor>.com/gpu`` with effect NoSchedule is always tolerated, as GPU node
   pools usually carry it) and it carries every ``nodeSelector`` label.
3. GPUs per replica, per type: ``gpusPerReplica`` when set (checked against the
   estimate when there is one), else the smallest power of two ``g`` with
   ``g * per-GPU memory * 0.9 >= estimate.total_bytes`` (10% of each GPU stays
   free for the CUDA context and fragmentation), at most ``maxGpusPerReplica``
   and at most the largest node's allocatable GPUs: a replica never spans nodes.
   Tensor parallel size is ``g``.
4. Candidate types are tried in order of fewest total GPUs (``g * replicas``),
   then least memory per GPU in whole GiB (the cheapest card that fits); the
   first that takes every replica wins. Types of the same size (an H100 80GB
   reports 79.6 GiB, an A100 80GB 80 GiB) are all tried and compared: BinPack
   keeps the one that opens the fewest whole free nodes and then leaves the
   fewest GPUs free on the nodes it uses; Spread the one that leaves the most;
   then product name. Replicas are assigned one at a time to the node with free
   GPUs ``>= g`` that is the fullest (BinPack: best fit, least fragmentation) or
   the emptiest (Spread); ties go to the node name that sorts first. ``spreadAcross`` Node/Zone skips nodes/zones that already
   hold a replica (nodes without a zone label cannot prove a distinct zone).
   Greedy is exact for feasibility here: without spread a type takes
   ``sum(free // g)`` replicas whatever the order, and with spread the choice
   within one node or zone does not affect the others.
5. When no type takes every replica, a diagnosis explains why, with numbers and
   the best candidate: ModelSizeUnknown, NoMatchingNodes (how many nodes each
   filter removed), InsufficientGPUMemory (the largest option and what it holds),
   SpreadImpossible (it would fit without ``spreadAcross``), or
   InsufficientFreeGPUs (how many replicas fit now, and the largest free node).

Free GPUs are kept in buckets: for each type, for each pool of nodes that share
taints and zone, one sorted list of node indices per free-GPU count. Picking a
node scans at most ``max GPUs per node`` buckets per pool and moving a node
between buckets is two bisections, so ``place_many`` (which keeps the free
counts up to date as it places) costs O(replicas * pools * GPUs per node) per
deployment, not O(nodes).

The required node affinity in a plan selects by labels: the product label of
the chosen type plus the ``nodeSelector`` labels. The scheduler itself enforces
readiness, cordons, taints and free GPUs, so that selects the same eligible
nodes, stays small on large clusters, and admits nodes added later (an
autoscaler scaling up the node pool). The nodes this plan chose are a preferred
affinity (weight 100).
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from modelfleet.dataplane.sizing import GIB, MemoryEstimate, SizeUnknown
from modelfleet.dataplane.spec import (
    GpuVendor,
    InferenceDeploymentSpec,
    PlacementStatus,
    PlacementStrategy,
    SpreadDomain,
    Toleration,
)
from modelfleet.operator.inventory import HOSTNAME_LABEL, MEMORY_LABELS, RESOURCE_NAMES, GpuNode, Taint

MIB = 1024**2
USABLE_FRACTION = 0.9
MEMORY_LABEL_ALLOWANCE = 0.93
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)
BLOCKING_EFFECTS = frozenset({"NoSchedule", "NoExecute"})
ZONE_LABEL = "topology.kubernetes.io/zone"
SPREAD_TOPOLOGY_KEYS = {SpreadDomain.NODE: HOSTNAME_LABEL, SpreadDomain.ZONE: ZONE_LABEL}


class Reason(StrEnum):
    """Why a deployment could not be placed (the Placed condition's reason)."""

    MODEL_SIZE_UNKNOWN = "ModelSizeUnknown"
    NO_MATCHING_NODES = "NoMatchingNodes"
    INSUFFICIENT_GPU_MEMORY = "InsufficientGPUMemory"
    INSUFFICIENT_FREE_GPUS = "InsufficientFreeGPUs"
    SPREAD_IMPOSSIBLE = "SpreadImpossible"


@dataclass(frozen=True)
class PlacementFailure:
    """Nothing fits; ``message`` says with numbers what is missing and what to change."""

    reason: Reason
    message: str

    def to_status(self) -> PlacementStatus:
        return PlacementStatus(summary=f"{self.reason}: {self.message}")


@dataclass(frozen=True)
class PlacementPlan:
    """Where the replicas go and what their pods must ask for."""

    replicas: int
    gpu_vendor: GpuVendor | None
    gpu_type: str | None
    gpus_per_replica: int
    tensor_parallel_size: int
    memory_per_replica_gib: float | None
    replica_nodes: tuple[str, ...] = ()
    resource_name: str | None = None
    required_node_affinity: dict[str, Any] | None = None
    preferred_node_affinity: list[dict[str, Any]] = field(default_factory=list)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    spread_topology_key: str | None = None

    def node_affinity(self) -> dict[str, Any] | None:
        """The pod's ``spec.affinity.nodeAffinity``, or None for CPU deployments."""
        if self.required_node_affinity is None:
            return None
        return {
            "requiredDuringSchedulingIgnoredDuringExecution": self.required_node_affinity,
            "preferredDuringSchedulingIgnoredDuringExecution": self.preferred_node_affinity,
        }

    @property
    def summary(self) -> str:
        replicas = self.replicas
        if self.gpus_per_replica == 0:
            return f"{_n(replicas, 'replica')} on CPU: no GPUs requested"
        memory = f", {self.memory_per_replica_gib:.1f} GiB estimated" if self.memory_per_replica_gib else ""
        gpus = f"{self.gpus_per_replica} x {self.gpu_type or self.resource_name}"
        text = f"{_n(replicas, 'replica')} of {gpus} (tensor parallel {self.tensor_parallel_size}{memory})"
        nodes = list(dict.fromkeys(self.replica_nodes))
        if nodes:
            more = f", +{len(nodes) - 5} more" if len(nodes) > 5 else ""
            text += f" on {', '.join(nodes[:5])}{more}"
        return text

    def to_status(self) -> PlacementStatus:
        return PlacementStatus(
            gpu_type=self.gpu_type,
            gpus_per_replica=self.gpus_per_replica,
            tensor_parallel_size=self.tensor_parallel_size,
            memory_per_replica_gib=self.memory_per_replica_gib,
            nodes=list(dict.fromkeys(self.replica_nodes)),
            summary=self.summary,
        )


def tolerates(toleration: Toleration, taint: Taint) -> bool:
    """Kubernetes ``Toleration.ToleratesTaint``."""
    if toleration.effect and toleration.effect != taint.effect:
        return False
    if toleration.key and toleration.key != taint.key:
        return False
    if toleration.operator == "Exists":
        return True
    return (toleration.value or "") == taint.value


def untolerated(taints: Iterable[Taint], tolerations: Sequence[Toleration]) -> list[Taint]:
    """The taints that keep a pod with ``tolerations`` off the node."""
    return [t for t in taints if t.effect in BLOCKING_EFFECTS and not any(tolerates(tol, t) for tol in tolerations)]


def product_matches(product: str | None, gpu_types: Sequence[str]) -> bool:
    """True when ``gpu_types`` is empty or one entry is a case-insensitive substring of ``product``."""
    if not gpu_types:
        return True
    lowered = (product or "").lower()
    return any(t.lower() in lowered for t in gpu_types)


# --- the free-GPU index ------------------------------------------------------------------


class _Node:
    __slots__ = ("free", "idx", "info", "pool")

    def __init__(self, idx: int, info: GpuNode, free: int, pool: _Pool) -> None:
        self.idx = idx
        self.info = info
        self.free = free
        self.pool = pool


class _Pool:
    """Nodes of one GPU type sharing taints and zone; ``buckets[f]`` holds node indices with ``f`` free GPUs."""

    __slots__ = ("buckets", "members", "taints", "zone")

    def __init__(self, taints: tuple[Taint, ...], zone: str | None, top: int) -> None:
        self.taints = taints
        self.zone = zone
        self.buckets: list[list[int]] = [[] for _ in range(top + 1)]
        self.members: list[_Node] = []


class _Group:
    """Nodes of one GPU type: (vendor, product, per-GPU memory)."""

    __slots__ = ("max_allocatable", "memory_mib", "nodes", "pools", "product", "product_label", "vendor")

    def __init__(self, vendor: GpuVendor, product: str | None, memory_mib: int | None) -> None:
        self.vendor = vendor
        self.product = product
        self.memory_mib = memory_mib
        self.product_label: str | None = None
        self.nodes: list[_Node] = []
        self.pools: list[_Pool] = []
        self.max_allocatable = 0

    @property
    def label(self) -> str:
        return self.product or f"{self.vendor} GPU (no product label)"


class _Index:
    """Schedulable GPU nodes by type and pool, with their free GPUs in buckets."""

    def __init__(self, nodes: Sequence[GpuNode], existing: Mapping[str, int] | None = None) -> None:
        existing = existing or {}
        self.unusable: list[GpuNode] = []  # not ready or cordoned
        self.nodes: list[_Node] = []
        self.total = len(nodes)
        by_type: dict[tuple[GpuVendor, str | None, int | None], list[GpuNode]] = {}
        for info in sorted(nodes, key=lambda n: n.name):
            if not info.ready or info.unschedulable:
                self.unusable.append(info)
            else:
                by_type.setdefault((info.vendor, info.product, info.gpu_memory_mib), []).append(info)
        self.groups: list[_Group] = []
        for (vendor, product, memory), infos in sorted(by_type.items(), key=lambda kv: _type_order(kv[0])):
            group = _Group(vendor, product, memory)
            group.max_allocatable = max(n.allocatable_gpus for n in infos)
            group.product_label = next((n.product_label for n in infos if n.product_label), None)
            pools: dict[tuple[tuple[Taint, ...], str | None], _Pool] = {}
            for info in infos:
                key = (tuple(sorted(set(info.taints), key=str)), info.zone)
                pool = pools.get(key)
                if pool is None:
                    pool = pools[key] = _Pool(key[0], key[1], group.max_allocatable)
                free = min(info.allocatable_gpus, info.free_gpus + existing.get(info.name, 0))
                node = _Node(len(self.nodes), info, free, pool)
                self.nodes.append(node)
                group.nodes.append(node)
                pool.members.append(node)
                pool.buckets[free].append(node.idx)  # indices grow with the name: buckets stay sorted
            group.pools = list(pools.values())
            self.groups.append(group)


def _type_order(key: tuple[GpuVendor, str | None, int | None]) -> tuple[str, str, int]:
    return (key[0].value, key[1] or "", key[2] or 0)


def _take(node: _Node, gpus: int) -> None:
    _move(node, node.free - gpus)


def _give(node: _Node, gpus: int) -> None:
    _move(node, node.free + gpus)


def _move(node: _Node, free: int) -> None:
    buckets = node.pool.buckets
    old = buckets[node.free]
    del old[bisect_left(old, node.idx)]
    node.free = free
    insort(buckets[free], node.idx)


# --- one request -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    spec: InferenceDeploymentSpec
    need_bytes: int | None
    tolerations: tuple[Toleration, ...]
    selector: tuple[tuple[str, str], ...]

    @property
    def replicas(self) -> int:
        return self.spec.replicas


def _request(spec: InferenceDeploymentSpec, estimate: MemoryEstimate | None) -> _Request:
    p = spec.placement
    auto = Toleration(key=RESOURCE_NAMES[p.gpu_vendor], operator="Exists", effect="NoSchedule")
    return _Request(
        spec=spec,
        need_bytes=estimate.total_bytes if estimate else None,
        tolerations=(*p.tolerations, auto),
        selector=tuple(sorted(p.node_selector.items())),
    )


def _type_mismatch(vendor: GpuVendor, product: str | None, memory_mib: int | None, req: _Request) -> str | None:
    p = req.spec.placement
    if vendor is not p.gpu_vendor:
        return "vendor"
    if not product_matches(product, p.gpu_types):
        return "product"
    if p.min_gpu_memory_gib is not None and (
        memory_mib is None or memory_mib < p.min_gpu_memory_gib * 1024 * MEMORY_LABEL_ALLOWANCE
    ):
        return "memory"
    return None


def _pool_ok(pool: _Pool, req: _Request) -> bool:
    return not untolerated(pool.taints, req.tolerations)


def _labels_match(labels: Mapping[str, str], selector: tuple[tuple[str, str], ...]) -> bool:
    return all(labels.get(k) == v for k, v in selector)


def _usable_bytes(memory_mib: int, gpus: int) -> float:
    return gpus * memory_mib * MIB * USABLE_FRACTION


def _gpu_count(group: _Group, req: _Request, max_allocatable: int) -> int | None:
    """GPUs per replica on this type, or None when no allowed count holds the model."""
    p = req.spec.placement
    need = req.need_bytes
    if p.gpus_per_replica is not None:
        g = p.gpus_per_replica
        if g > max_allocatable:
            return None
        # Checked against the estimate when both are known; an explicit count is trusted otherwise.
        if need is not None and group.memory_mib is not None and _usable_bytes(group.memory_mib, g) < need:
            return None
        return g
    if need is None or group.memory_mib is None:
        return None
    for g in GPU_COUNTS:
        if g > p.max_gpus_per_replica or g > max_allocatable:
            return None
        if _usable_bytes(group.memory_mib, g) >= need:
            return g
    return None


def _assign(index: _Index, group: _Group, pools: list[_Pool], gpus: int, req: _Request, spread: bool) -> list[_Node]:
    """Take GPUs for as many replicas as fit (up to ``replicas``); the caller gives them back on failure."""
    domain = req.spec.placement.spread_across if spread else SpreadDomain.NONE
    top = group.max_allocatable
    if req.spec.placement.strategy is PlacementStrategy.BIN_PACK:
        frees: range = range(gpus, top + 1)
    else:
        frees = range(top, gpus - 1, -1)
    selector = req.selector
    nodes = index.nodes
    placed: list[_Node] = []
    used_nodes: set[int] = set()
    used_zones: set[str] = set()
    for _ in range(req.replicas):
        chosen: _Node | None = None
        for f in frees:
            for pool in pools:
                if domain is SpreadDomain.ZONE and (pool.zone is None or pool.zone in used_zones):
                    continue
                for idx in pool.buckets[f]:
                    if chosen is not None and idx >= chosen.idx:
                        break
                    if domain is SpreadDomain.NODE and idx in used_nodes:
                        continue
                    if selector and not _labels_match(nodes[idx].info.labels, selector):
                        continue
                    chosen = nodes[idx]
                    break
            if chosen is not None:
                break
        if chosen is None:
            break
        _take(chosen, gpus)
        placed.append(chosen)
        used_nodes.add(chosen.idx)
        if chosen.info.zone is not None:
            used_zones.add(chosen.info.zone)
    return placed


def _undo(placed: list[_Node], gpus: int) -> None:
    for node in reversed(placed):
        _give(node, gpus)


Result = PlacementPlan | PlacementFailure


def _place(index: _Index, spec: InferenceDeploymentSpec, estimate: MemoryEstimate | SizeUnknown | None) -> Result:
    if not spec.needs_gpu():
        return PlacementPlan(
            spec.replicas, None, None, gpus_per_replica=0, tensor_parallel_size=1, memory_per_replica_gib=None
        )
    known = estimate if isinstance(estimate, MemoryEstimate) else None
    if known is None and spec.placement.gpus_per_replica is None:
        reason = (
            estimate.reason
            if isinstance(estimate, SizeUnknown)
            else "the model size is unknown: set spec.model.size (parameters, numLayers, numKvHeads, headDim) "
            "or spec.placement.gpusPerReplica"
        )
        return PlacementFailure(Reason.MODEL_SIZE_UNKNOWN, reason)
    req = _request(spec, known)
    options: dict[tuple[int, int], list[tuple[_Group, list[_Pool], int]]] = {}
    for group in index.groups:
        if _type_mismatch(group.vendor, group.product, group.memory_mib, req):
            continue
        pools = [pool for pool in group.pools if _pool_ok(pool, req)]
        if not pools:
            continue
        g = _gpu_count(group, req, group.max_allocatable)
        if g is not None:
            total = g * max(spec.replicas, 1)  # a deployment scaled to zero still reports what one replica needs
            options.setdefault((total, _memory_class(group)), []).append((group, pools, g))
    binpack = spec.placement.strategy is PlacementStrategy.BIN_PACK
    for key in sorted(options):
        best: tuple[tuple[int, int], _Group, int, list[_Node]] | None = None
        for group, pools, g in options[key]:  # groups come sorted by product name
            placed = _assign(index, group, pools, g, req, spread=True)
            if len(placed) < spec.replicas:
                _undo(placed, g)
                continue
            opened, left = _fragmentation(placed, g)
            score = (opened, left) if binpack else (0, -left)
            if best is None or score < best[0]:
                if best is not None:
                    _undo(best[3], best[2])
                best = (score, group, g, placed)
            else:
                _undo(placed, g)
        if best is not None:
            return _plan(req, best[1], best[2], best[3], known)
    return _diagnose(index, req, known)


def _memory_class(group: _Group) -> int:
    """Per-GPU memory in whole GiB: cards of one nominal size (H100 and A100 80GB) count as equally costly."""
    return round((group.memory_mib or 0) / 1024)


def _fragmentation(placed: list[_Node], gpus: int) -> tuple[int, int]:
    """How much a BinPack placement breaks up: whole nodes it opens, then GPUs left free on the nodes it uses."""
    taken = Counter(n.idx for n in placed)
    used = {n.idx: n for n in placed}
    opened = sum(1 for i, n in used.items() if n.free + taken[i] * gpus == n.info.allocatable_gpus)
    return opened, sum(n.free for n in used.values())


def _plan(
    req: _Request, group: _Group, gpus: int, placed: list[_Node], estimate: MemoryEstimate | None
) -> PlacementPlan:
    p = req.spec.placement
    if group.product_label and group.product:
        exprs: list[dict[str, Any]] = [{"key": group.product_label, "operator": "In", "values": [group.product]}]
    else:  # no product label to select on: pin the type's nodes by hostname
        exprs = [{"key": HOSTNAME_LABEL, "operator": "In", "values": sorted({n.info.hostname for n in group.nodes})}]
    exprs += [{"key": k, "operator": "In", "values": [v]} for k, v in req.selector]
    hosts = sorted({n.info.hostname for n in placed})
    preferred = (
        [
            {
                "weight": 100,
                "preference": {"matchExpressions": [{"key": HOSTNAME_LABEL, "operator": "In", "values": hosts}]},
            }
        ]
        if hosts
        else []
    )
    tolerations = [t.to_wire() for t in req.tolerations]
    return PlacementPlan(
        replicas=req.replicas,
        gpu_vendor=group.vendor,
        gpu_type=group.product,
        gpus_per_replica=gpus,
        tensor_parallel_size=gpus,
        memory_per_replica_gib=round(estimate.total_gib, 1) if estimate else None,
        replica_nodes=tuple(n.info.name for n in placed),
        resource_name=RESOURCE_NAMES[group.vendor],
        required_node_affinity={"nodeSelectorTerms": [{"matchExpressions": exprs}]},
        preferred_node_affinity=preferred,
        tolerations=list({repr(sorted(t.items())): t for t in tolerations}.values()),
        spread_topology_key=SPREAD_TOPOLOGY_KEYS.get(p.spread_across),
    )


# --- diagnosis ---------------------------------------------------------------------------


def _diagnose(index: _Index, req: _Request, estimate: MemoryEstimate | None) -> PlacementFailure:
    """Why nothing fits, in the order a person would fix it."""
    rejected: dict[str, list[GpuNode]] = {}
    eligible: dict[int, tuple[_Group, list[_Node]]] = {}
    for gi, group in enumerate(index.groups):
        mismatch = _type_mismatch(group.vendor, group.product, group.memory_mib, req)
        if mismatch:
            rejected.setdefault(mismatch, []).extend(n.info for n in group.nodes)
            continue
        for pool in group.pools:
            if not _pool_ok(pool, req):
                rejected.setdefault("taints", []).extend(n.info for n in pool.members)
                continue
            for node in pool.members:
                if req.selector and not _labels_match(node.info.labels, req.selector):
                    rejected.setdefault("selector", []).append(node.info)
                else:
                    eligible.setdefault(gi, (group, []))[1].append(node)
    for info in index.unusable:
        why = _type_mismatch(info.vendor, info.product, info.gpu_memory_mib, req) or (
            "not ready" if not info.ready else "cordoned"
        )
        rejected.setdefault(why, []).append(info)
    if not eligible:
        return PlacementFailure(Reason.NO_MATCHING_NODES, _no_match_message(index, req, rejected))

    sized: list[tuple[_Group, list[_Node], int]] = []
    for group, nodes in eligible.values():
        g = _gpu_count(group, req, max(n.info.allocatable_gpus for n in nodes))
        if g is not None:
            sized.append((group, nodes, g))
    if not sized:
        return _too_small(req, estimate, list(eligible.values()))

    # Every type that holds a replica failed on free GPUs or on spread: find the closest one.
    best: tuple[tuple[int, int, int], _Group, list[_Node], int, list[_Node]] | None = None
    spread_blocked: tuple[_Group, int, list[_Node]] | None = None
    for group, nodes, g in sized:
        pools = [pool for pool in group.pools if _pool_ok(pool, req)]
        placed = _assign(index, group, pools, g, req, spread=True)
        _undo(placed, g)
        if req.spec.placement.spread_across is not SpreadDomain.NONE and spread_blocked is None:
            unspread = _assign(index, group, pools, g, req, spread=False)
            _undo(unspread, g)
            if len(unspread) == req.replicas:
                spread_blocked = (group, g, placed)
        key = (-len(placed), g * req.replicas, group.memory_mib or 0)
        if best is None or key < best[0]:
            best = (key, group, nodes, g, placed)
    if spread_blocked is not None:
        return _spread_message(req, *spread_blocked, eligible)
    assert best is not None
    _, group, nodes, g, placed = best
    return _free_message(req, group, nodes, g, placed, estimate)


def _no_match_message(index: _Index, req: _Request, rejected: dict[str, list[GpuNode]]) -> str:
    p = req.spec.placement
    if index.total == 0:
        return "the cluster has no GPU nodes (no node offers nvidia.com/gpu or amd.com/gpu)"
    parts: list[str] = []
    for why in ("vendor", "product", "memory", "not ready", "cordoned", "taints", "selector"):
        infos = rejected.get(why)
        if not infos:
            continue
        one = len(infos) == 1
        has, is_ = ("has", "is") if one else ("have", "are")
        if why == "vendor":
            text = f"{has} {'/'.join(sorted({i.vendor.value for i in infos}))} GPUs, not {p.gpu_vendor.value}"
        elif why == "product":
            seen = ", ".join(sorted({i.product or "no product label" for i in infos}))
            text = f"{has} GPUs not in gpuTypes {list(p.gpu_types)} ({seen})"
        elif why == "memory":
            largest = max((i.gpu_memory_mib or 0 for i in infos), default=0) / 1024
            text = f"{has} less GPU memory than minGpuMemoryGib {p.min_gpu_memory_gib} (largest {largest:.1f} GiB)"
        elif why == "taints":
            taints = sorted({str(t) for ts in {i.taints for i in infos} for t in untolerated(ts, req.tolerations)})
            text = f"{has} taints not tolerated ({', '.join(taints)}; add spec.placement.tolerations)"
        elif why == "selector":
            wanted = ", ".join(f"{k}={v}" for k, v in req.selector)
            text = f"{'lacks' if one else 'lack'} the nodeSelector labels {wanted}"
        else:
            text = f"{is_} {why}"
        parts.append(f"{_n(len(infos), 'node')} {text} [{_names(infos)}]")
    return f"no GPU node matches spec.placement: of {_n(index.total, 'GPU node')}, " + "; ".join(parts)


def _too_small(
    req: _Request, estimate: MemoryEstimate | None, eligible: list[tuple[_Group, list[_Node]]]
) -> PlacementFailure:
    p = req.spec.placement
    largest_node = max((n for _, nodes in eligible for n in nodes), key=lambda n: (n.info.allocatable_gpus, -n.idx))
    if p.gpus_per_replica is not None and p.gpus_per_replica > largest_node.info.allocatable_gpus:
        return PlacementFailure(
            Reason.INSUFFICIENT_FREE_GPUS,
            f"spec.placement.gpusPerReplica is {p.gpus_per_replica}, but the largest matching node has "
            f"{largest_node.info.allocatable_gpus} GPUs ({largest_node.info.name}); a replica never spans nodes",
        )
    known = [(group, nodes) for group, nodes in eligible if group.memory_mib is not None]
    if estimate is None or not known:
        unknown = [n.info for _, nodes in eligible for n in nodes]
        labels = "/".join(sorted({MEMORY_LABELS[i.vendor][0] for i in unknown}))
        return PlacementFailure(
            Reason.INSUFFICIENT_GPU_MEMORY,
            f"the GPU memory of the matching nodes is unknown (no {labels} label on {_names(unknown)}); "
            "set spec.placement.gpusPerReplica",
        )

    def capacity(item: tuple[_Group, list[_Node]]) -> tuple[float, int]:
        group, nodes = item
        return (_usable_bytes(group.memory_mib or 0, _option(req, group, nodes)[0]), -(group.memory_mib or 0))

    group, nodes = max(known, key=capacity)
    gpus, node = _option(req, group, nodes)
    memory = group.memory_mib or 0
    usable = _usable_bytes(memory, gpus) / GIB
    offer = f"{gpus} x {memory / 1024:.1f} GiB {group.label} ({usable:.1f} GiB usable) on node {node.info.name}"
    if p.gpus_per_replica is not None:
        return PlacementFailure(
            Reason.INSUFFICIENT_GPU_MEMORY,
            f"needs {estimate.describe()} per replica, but spec.placement.gpusPerReplica {p.gpus_per_replica} gives at "
            f"most {offer}; raise gpusPerReplica, or lower spec.engine.maxModelLen or maxNumSeqs",
        )
    would = next((g for g in GPU_COUNTS if _usable_bytes(memory, g) >= estimate.total_bytes), None)
    if would is not None and would > p.max_gpus_per_replica:
        limit = (
            f"{would} x {group.label} would hold it, but spec.placement.maxGpusPerReplica is {p.max_gpus_per_replica}"
        )
        hint = "raise spec.placement.maxGpusPerReplica"
    elif would is not None:
        limit = (
            f"{would} x {group.label} would hold it, but the largest such node has {node.info.allocatable_gpus} GPUs"
        )
        hint = "allow larger GPUs or nodes (spec.placement.gpuTypes)"
    else:
        limit = f"no count of {group.label} up to {GPU_COUNTS[-1]} holds it"
        hint = "use a smaller model"
    return PlacementFailure(
        Reason.INSUFFICIENT_GPU_MEMORY,
        f"needs {estimate.describe()} per replica; the largest option is {offer}; {limit}; "
        f"{hint}, lower spec.engine.maxModelLen or maxNumSeqs, or choose a smaller dtype",
    )


def _option(req: _Request, group: _Group, nodes: list[_Node]) -> tuple[int, _Node]:
    """The most GPUs one replica could use on this type (a power of two) and the node that has them."""
    node = max(nodes, key=lambda n: (n.info.allocatable_gpus, -n.idx))
    cap = min(req.spec.placement.max_gpus_per_replica, node.info.allocatable_gpus)
    if req.spec.placement.gpus_per_replica is not None:
        return min(req.spec.placement.gpus_per_replica, cap), node
    return max((g for g in GPU_COUNTS if g <= cap), default=1), node


def _spread_message(
    req: _Request, group: _Group, gpus: int, placed: list[_Node], eligible: dict[int, tuple[_Group, list[_Node]]]
) -> PlacementFailure:
    domain = req.spec.placement.spread_across
    what = "nodes" if domain is SpreadDomain.NODE else "zones"
    have = (
        ", ".join(n.info.name for n in placed)
        if domain is SpreadDomain.NODE
        else ", ".join(sorted({n.info.zone or "" for n in placed}))
    )
    text = (
        f"spreadAcross {domain.value} needs {req.replicas} different {what} with {gpus} free {group.label} "
        f"GPU{'s' if gpus > 1 else ''} each; only {len(placed)} {'has' if len(placed) == 1 else 'have'} room"
        + (f" ({have})" if have else "")
    )
    if domain is SpreadDomain.ZONE:
        nozone = [n.info for _, nodes in eligible.values() for n in nodes if n.info.zone is None]
        if nozone:
            text += f"; {_n(len(nozone), 'matching node')} without a {ZONE_LABEL} label [{_names(nozone)}]"
    text += f"; lower spec.replicas, add capacity in more {what}, or set spreadAcross None"
    return PlacementFailure(Reason.SPREAD_IMPOSSIBLE, text)


def _free_message(
    req: _Request, group: _Group, nodes: list[_Node], gpus: int, placed: list[_Node], estimate: MemoryEstimate | None
) -> PlacementFailure:
    memory = f" ({(group.memory_mib or 0) / 1024:.1f} GiB each)" if group.memory_mib else ""
    per_replica = f", {estimate.total_gib:.1f} GiB per replica" if estimate else ""
    roomiest = max(nodes, key=lambda n: (n.free, -n.idx))
    free_total = sum(n.free for n in nodes)
    return PlacementFailure(
        Reason.INSUFFICIENT_FREE_GPUS,
        f"needs {_n(req.replicas, 'replica')} of {gpus} x {group.label}{memory} on one node{per_replica}; "
        f"only {len(placed)} {'fits' if len(placed) == 1 else 'fit'} now: the largest free is {roomiest.free} x "
        f"{group.label} on node {roomiest.info.name} ({free_total} free on {_n(len(nodes), 'matching node')}); "
        "free GPUs, add nodes, or lower spec.replicas",
    )


def _names(infos: Sequence[GpuNode], limit: int = 3) -> str:
    names = heapq.nsmallest(limit, (i.name for i in infos))
    return ", ".join(names) + (f", +{len(infos) - limit} more" if len(infos) > limit else "")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


# --- public entry points -----------------------------------------------------------------


def plan_placement(
    spec: InferenceDeploymentSpec,
    nodes: Sequence[GpuNode],
    estimate: MemoryEstimate | SizeUnknown | None,
    *,
    existing: Mapping[str, int] | None = None,
) -> PlacementPlan | PlacementFailure:
    """Place one deployment.

    ``existing`` maps node name to the GPUs this deployment's own pods hold there
    now; they count as free, so re-planning a running deployment does not see
    itself as the obstacle (and, with nothing else changed, picks the same nodes).
    """
    return _place(_Index(nodes, existing), spec, estimate)


def place_many(
    specs_with_estimates: Iterable[tuple[InferenceDeploymentSpec, MemoryEstimate | SizeUnknown | None]],
    nodes: Sequence[GpuNode],
) -> list[PlacementPlan | PlacementFailure]:
    """Place deployments one after another, each seeing the GPUs the previous ones took."""
    index = _Index(nodes)
    return [_place(index, spec, estimate) for spec, estimate in specs_with_estimates]
