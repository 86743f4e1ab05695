"""How much accelerator memory one replica of a model needs.

Two steps, both usable without a cluster:

1. ``model_facts(spec)`` finds the size facts: parameter count, layers, KV heads
   and head dimension. Each fact comes from ``spec.model.size`` when set there;
   the missing ones are read from the weights' headers when the operator can see
   the weights (a ``pythonPackage`` file, a local ``path``, or a Hugging Face
   repository already in the local cache):

   - a ``.gguf`` file: its metadata (``<arch>.block_count``,
     ``<arch>.attention.head_count_kv``, ``<arch>.attention.key_length`` or
     ``<arch>.embedding_length / <arch>.attention.head_count``) and the element
     count of every tensor, read with the ``gguf`` package's ``GGUFReader``
     (memory-mapped: tensor data is never read; about 2 s for SmolLM2 because the
     reader decodes the tokenizer arrays too);
   - safetensors (a file, or every ``*.safetensors`` in a folder): the JSON
     header only (8 bytes little-endian length, then JSON with each tensor's
     shape), plus ``config.json`` next to it (``num_hidden_layers``,
     ``num_key_value_heads``, ``head_dim`` or ``hidden_size / num_attention_heads``).

   When a fact is still missing the answer is ``SizeUnknown`` with a reason a
   person can act on (set ``spec.model.size`` or ``spec.placement.gpusPerReplica``).

2. ``estimate_memory(spec, facts)`` applies the formula, in bytes::

       b        = bytes per value of spec.model.dtype
                  (float32 4, float16/bfloat16 2; auto is bfloat16 on GPU, float32 on CPU)
       weights  = parameters * b
       kv_cache = 2 (K and V) * layers * kv_heads * head_dim * b * kv_tokens
       kv_tokens = numKvBlocks * kvBlockSize when numKvBlocks is set (what the engine allocates),
                   else maxModelLen * maxNumSeqs
       overhead = 10% of (weights + kv_cache) + 1 GiB
                  (CUDA context, activations and the sampler's workspace)
       total    = weights + kv_cache + overhead

   Without ``numKvBlocks`` the KV cache term is what one replica needs to hold
   ``maxNumSeqs`` sequences of ``maxModelLen`` tokens at once (the worst case, not an
   average); with it, the exact paged cache the engine will allocate. The file's
   own dtype (for example a Q4 GGUF) is not used for the weights: the runtime
   loads them in ``spec.model.dtype``.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelfleet.dataplane.modelfiles import WeightSourceError, source_file_or_dir
from modelfleet.dataplane.spec import DType, InferenceDeploymentSpec

GIB = 1024**3
OVERHEAD_FRACTION = 0.10
OVERHEAD_FIXED_BYTES = 1 * GIB
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
DTYPE_BYTES = {DType.FLOAT32: 4, DType.FLOAT16: 2, DType.BFLOAT16: 2}
FACT_FIELDS = ("parameters", "num_layers", "num_kv_heads", "head_dim")
WIRE_NAMES = {
    "parameters": "parameters",
    "num_layers": "numLayers",
    "num_kv_heads": "numKvHeads",
    "head_dim": "headDim",
}


@dataclass(frozen=True)
class ModelFacts:
    """Size facts of a model, and the bytes per value it will be loaded with."""

    parameters: int
    bytes_per_param: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    source: str = "spec.model.size"


@dataclass(frozen=True)
class SizeUnknown:
    """The facts could not be found; ``reason`` says why and what to set."""

    reason: str


@dataclass(frozen=True)
class MemoryEstimate:
    """Accelerator memory one replica needs, in bytes."""

    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    total_bytes: int

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def describe(self) -> str:
        return (
            f"{self.total_gib:.1f} GiB (weights {self.weights_bytes / GIB:.1f} + KV cache "
            f"{self.kv_cache_bytes / GIB:.1f} + overhead {self.overhead_bytes / GIB:.1f})"
        )


@dataclass(frozen=True)
class HeaderFacts:
    """Facts read from weight files; any of them may be missing."""

    parameters: int | None = None
    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None


def bytes_per_param(spec: InferenceDeploymentSpec) -> int:
    """Bytes per weight (and KV-cache value) for the deployment's dtype on its device."""
    dtype = spec.model.dtype
    if dtype is DType.AUTO:
        return 2 if spec.needs_gpu() else 4
    return DTYPE_BYTES[dtype]


def model_facts(spec: InferenceDeploymentSpec) -> ModelFacts | SizeUnknown:
    """Size facts from ``spec.model.size``, completed from the weights' headers when readable."""
    size = spec.model.size
    known: dict[str, int | None] = {name: getattr(size, name) if size else None for name in FACT_FIELDS}
    source = "spec.model.size"
    if any(v is None for v in known.values()):
        read = read_weight_facts(spec)
        if isinstance(read, str):
            missing = ", ".join(f"spec.model.size.{WIRE_NAMES[k]}" for k, v in known.items() if v is None)
            return SizeUnknown(f"cannot estimate memory: {read}; set {missing}, or set spec.placement.gpusPerReplica")
        header, where = read
        source = where if size is None else f"spec.model.size and {where}"
        for name in FACT_FIELDS:
            if known[name] is None:
                known[name] = getattr(header, name)
        still = [k for k, v in known.items() if v is None]
        if still:
            missing = ", ".join(f"spec.model.size.{WIRE_NAMES[k]}" for k in still)
            return SizeUnknown(
                f"cannot estimate memory: {where} does not say {missing.replace('spec.model.size.', '')}; "
                f"set {missing}, or set spec.placement.gpusPerReplica"
            )
    return ModelFacts(
        parameters=_int(known["parameters"]),
        bytes_per_param=bytes_per_param(spec),
        num_layers=_int(known["num_layers"]),
        num_kv_heads=_int(known["num_kv_heads"]),
        head_dim=_int(known["head_dim"]),
        source=source,
    )


def _int(value: int | None) -> int:
    assert value is not None
    return value


def estimate_memory(spec: InferenceDeploymentSpec, facts: ModelFacts) -> MemoryEstimate:
    """The formula of the module docstring."""
    b = facts.bytes_per_param
    weights = facts.parameters * b
    engine = spec.engine
    if engine.num_kv_blocks is not None:
        kv_tokens = engine.num_kv_blocks * engine.kv_block_size
    else:
        kv_tokens = engine.max_model_len * engine.max_num_seqs
    kv = 2 * facts.num_layers * facts.num_kv_heads * facts.head_dim * b * kv_tokens
    overhead = math.ceil(OVERHEAD_FRACTION * (weights + kv)) + OVERHEAD_FIXED_BYTES
    return MemoryEstimate(weights, kv, overhead, weights + kv + overhead)


def estimate_for(spec: InferenceDeploymentSpec) -> MemoryEstimate | SizeUnknown:
    """``model_facts`` then ``estimate_memory``, in one call."""
    facts = model_facts(spec)
    return facts if isinstance(facts, SizeUnknown) else estimate_memory(spec, facts)


def read_weight_facts(spec: InferenceDeploymentSpec) -> tuple[HeaderFacts, str] | str:
    """Facts from the weights the spec names and where they came from, or why they cannot be read."""
    if spec.model.source.runtime_managed:
        return "the weights are runtimeManaged, so the operator cannot read them"
    try:
        path = source_file_or_dir(spec.model.source)
    except WeightSourceError as e:
        return f"the weights are not readable by the operator ({e})"
    except ImportError as e:  # huggingface_hub absent in the operator image
        return f"the Hugging Face cache cannot be read here ({e})"
    return read_path_facts(path)


def read_path_facts(path: Path) -> tuple[HeaderFacts, str] | str:
    """Facts from a ``.gguf`` file, a ``.safetensors`` file, or a folder holding either."""
    try:
        if path.is_dir():
            shards = sorted(path.glob("*.safetensors"))
            if shards:
                return _safetensors_facts(shards, path / "config.json"), f"safetensors headers in {path}"
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return gguf_facts(ggufs[0]), f"GGUF header of {ggufs[0].name}"
            return f"{path} holds no .safetensors files and not exactly one .gguf file"
        if path.suffix == ".gguf":
            return gguf_facts(path), f"GGUF header of {path.name}"
        if path.suffix == ".safetensors":
            return _safetensors_facts([path], path.parent / "config.json"), f"safetensors header of {path.name}"
        return f"{path.name} is neither a .gguf nor a .safetensors file"
    except ImportError:
        return "the gguf package is not installed, so the operator cannot read GGUF headers"
    except (OSError, ValueError, KeyError, struct.error) as e:
        return f"the weight headers in {path} are unreadable ({e})"


def gguf_facts(path: Path) -> HeaderFacts:
    """Facts from GGUF metadata and tensor shapes (no tensor data is read).

    Reading a GGUF header decodes its tokenizer arrays too (about 2 s for
    SmolLM2), so results are cached per file version: reconciles after the
    first cost nothing.
    """
    st = path.stat()
    return _gguf_facts_cached(path.resolve(), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _gguf_facts_cached(path: Path, size: int, mtime_ns: int) -> HeaderFacts:
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def value(key: str) -> int | None:
        f = reader.fields.get(key)
        if f is None or not f.data:
            return None
        # Per-layer arrays (some models vary KV heads by layer): the largest bounds the cache.
        return max(int(f.parts[i][0]) for i in f.data)

    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else "llama"
    heads = value(f"{arch}.attention.head_count")
    embedding = value(f"{arch}.embedding_length")
    head_dim = value(f"{arch}.attention.key_length")
    if head_dim is None and heads and embedding:
        head_dim = embedding // heads
    return HeaderFacts(
        parameters=sum(int(t.n_elements) for t in reader.tensors) or None,
        num_layers=value(f"{arch}.block_count"),
        num_kv_heads=value(f"{arch}.attention.head_count_kv") or heads,
        head_dim=head_dim,
    )


def safetensors_parameters(path: Path) -> int:
    """Elements in one safetensors file, from its JSON header."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_SAFETENSORS_HEADER:
            raise ValueError(f"header of {length} bytes is implausibly large")
        header: dict[str, Any] = json.loads(f.read(length))
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")


def _safetensors_facts(files: list[Path], config_path: Path) -> HeaderFacts:
    params = sum(safetensors_parameters(p) for p in files)
    config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.exists() else {}
    config = {**config, **(config.get("text_config") or {})}  # multimodal configs nest the LM
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim")
    if head_dim is None and heads and config.get("hidden_size"):
        head_dim = int(config["hidden_size"]) // int(heads)
    kv_heads = config.get("num_key_value_heads") or heads
    layers = config.get("num_hidden_layers")
    return HeaderFacts(
        parameters=params or None,
        num_layers=int(layers) if layers else None,
        num_kv_heads=int(kv_heads) if kv_heads else None,
        head_dim=int(head_dim) if head_dim else None,
    )
