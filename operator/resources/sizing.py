"""CPU and memory requests and limits of the engine container, from the memory estimate and the
runtime (docs/runners.md, "Pod resources"). No size is hard-coded for every runtime: a CPU engine
holds the whole model in the pod's memory, a GPU engine only stages weights and runs its host
side, a remote engine holds neither.
"""

from __future__ import annotations

import math
from typing import Any

from modelfleet.dataplane.sizing import GIB, MemoryEstimate, SizeUnknown, estimate_for
from modelfleet.dataplane.spec import InferenceDeploymentSpec, RuntimeKind

MIB = 1024**2
#: A GGUF source is dequantized once at the engine's first start: about the float32 weights again.
CONVERSION_HEADROOM = 1 * GIB
#: Host memory of a GPU engine beyond staging weights: the CUDA context, the tokenizer, the server.
GPU_HOST_BYTES = 4 * GIB
#: Unknown size: what a small model needs to start; no limit, so a large one is not killed.
UNKNOWN_REQUEST = 2 * GIB


def quantity(nbytes: int) -> str:
    """Bytes as a Kubernetes quantity in whole MiB (rounded up)."""
    return f"{math.ceil(nbytes / MIB)}Mi"


def engine_resources(
    spec: InferenceDeploymentSpec, gpus: int, gpu_resource: str | None, estimate: MemoryEstimate | SizeUnknown | None
) -> dict[str, Any]:
    """The engine container's ``resources``. ``estimate``: ``dataplane.sizing.estimate_for(spec)`` (computed
    here when None)."""
    if estimate is None:
        estimate = estimate_for(spec)
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if spec.runtime.kind is RuntimeKind.REMOTE:  # a client of a hosted API: no weights, no KV cache
        requests |= {"cpu": "100m", "memory": "256Mi"}
        limits["memory"] = "1Gi"
    elif gpus:  # the model and its KV cache live in GPU memory; the host stages weights and runs the server
        requests["cpu"] = "1"
        if isinstance(estimate, MemoryEstimate):
            requests["memory"] = quantity(GPU_HOST_BYTES)
            limits["memory"] = quantity(estimate.weights_bytes + GPU_HOST_BYTES)
        else:
            requests["memory"] = quantity(UNKNOWN_REQUEST)
        if gpu_resource:
            requests[gpu_resource] = limits[gpu_resource] = str(gpus)
    else:  # on the CPU the pod's memory holds everything the estimate counts
        threads = spec.runtime.cpu_threads
        requests["cpu"] = str(threads) if threads else "500m"
        if isinstance(estimate, MemoryEstimate):
            requests["memory"] = quantity(estimate.total_bytes)
            limits["memory"] = quantity(estimate.total_bytes + CONVERSION_HEADROOM)
        else:
            requests["memory"] = quantity(UNKNOWN_REQUEST)
    return {"requests": requests, "limits": limits} if limits else {"requests": requests}
