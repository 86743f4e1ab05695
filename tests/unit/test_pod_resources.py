"""The engine container's requests and limits follow the memory estimate and the runtime
(operator/resources/sizing.py): no size is the same for every runtime."""

from __future__ import annotations

from pathlib import Path

import yaml

from modelfleet.dataplane.manifest import load_manifests
from modelfleet.dataplane.sizing import GIB, MemoryEstimate, estimate_for
from modelfleet.dataplane.spec import InferenceDeploymentSpec
from modelfleet.operator.resources.children import Owner, PodPlacement, deployment
from modelfleet.operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
OWNER = Owner("chat", "llm", "uid-1")
SETTINGS = OperatorSettings()
MIB = 1024**2


def example(name: str) -> InferenceDeploymentSpec:
    return load_manifests(ROOT / "examples" / name)[0].spec


def containers(spec: InferenceDeploymentSpec, placement: PodPlacement | None = None) -> dict[str, dict]:
    dep = deployment(OWNER, spec, SETTINGS, placement or PodPlacement())
    return {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}


def mib(quantity: str) -> int:
    assert quantity.endswith("Mi"), quantity
    return int(quantity[:-2])


def millicores(quantity: str) -> int:
    return int(quantity[:-1]) if quantity.endswith("m") else int(quantity) * 1000


def test_a_cpu_engine_holds_the_whole_estimate_in_its_memory():
    spec = example("smollm2-local.yaml")
    est = estimate_for(spec)
    assert isinstance(est, MemoryEstimate)
    res = containers(spec)["engine"]["resources"]
    assert mib(res["requests"]["memory"]) * MIB >= est.total_bytes > (mib(res["requests"]["memory"]) - 1) * MIB
    # the GGUF is dequantized once at the first start: a GiB of headroom above the estimate
    assert mib(res["limits"]["memory"]) - mib(res["requests"]["memory"]) == 1024
    assert res["requests"]["cpu"] == "500m"


def test_a_gpu_engine_stages_weights_in_host_memory_and_requests_its_gpus():
    spec = example("llama-8b-vllm.yaml")
    est = estimate_for(spec)
    assert isinstance(est, MemoryEstimate)
    res = containers(spec, PodPlacement(gpu_resource="nvidia.com/gpu", gpus_per_replica=2))["engine"]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "2"
    assert mib(res["requests"]["memory"]) == 4 * 1024
    assert mib(res["limits"]["memory"]) * MIB >= est.weights_bytes + 4 * GIB  # 16 GB of bf16 weights: above 8Gi
    assert mib(res["limits"]["memory"]) > 8 * 1024


def test_a_remote_engine_is_small_and_an_unknown_size_gets_no_limit():
    remote = InferenceDeploymentSpec.model_validate(
        {"model": {"name": "m", "source": {"runtimeManaged": True}},
         "runtime": {"kind": "remote", "remote": {"baseUrl": "https://api.example.com/v1"}}}
    )  # fmt: skip
    res = containers(remote)["engine"]["resources"]
    assert res == {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    unknown = InferenceDeploymentSpec.model_validate(
        {"model": {"name": "m", "source": {"path": "/models/absent"}}, "runtime": {"kind": "torch", "device": "cpu"}}
    )
    res = containers(unknown)["engine"]["resources"]
    assert res == {"requests": {"cpu": "500m", "memory": "2048Mi"}}


def test_two_cpu_replicas_the_gateway_and_the_operator_fit_two_cores():
    values = yaml.safe_load((ROOT / "helm" / "modelfleet" / "values.yaml").read_text())
    pods = containers(example("smollm2-local.yaml"))
    replica = sum(millicores(c["resources"]["requests"]["cpu"]) for c in pods.values())
    chart = sum(millicores(values[part]["resources"]["requests"]["cpu"]) for part in ("operator", "gateway"))
    assert 2 * replica + chart <= 2000, (replica, chart)
