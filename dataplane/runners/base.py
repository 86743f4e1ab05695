"""The ModelRunner protocol and the plain data it speaks.

A runner is the seam between the engine core and a runtime: in-process torch,
a vLLM or SGLang server on a Unix socket, or a hosted OpenAI-compatible API.
Every runner streams the same ``TokenChunk`` objects, so everything above it
(engine core, sidecar, gateway) is runtime-agnostic.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from modelfleet.dataplane.spec import InferenceDeploymentSpec, RuntimeKind, WeightSource

__all__ = [
    "ContextFaultError",
    "DeviceContext",
    "ExecuteBatch",
    "FinishReason",
    "ModelRunner",
    "OpenAIRequest",
    "RateLimits",
    "RequiredMemory",
    "RunnerError",
    "RuntimeKind",
    "SamplingParams",
    "SequenceRequest",
    "SessionRebuildCause",
    "TextCodec",
    "TokenChunk",
    "TransportKind",
    "UpstreamError",
    "WeightSource",
]


class TransportKind(StrEnum):
    """How the engine core reaches the runtime."""

    IN_PROCESS = "in_process"
    UNIX_SOCKET = "unix_socket"
    HTTP = "http"


class SessionRebuildCause(StrEnum):
    """Why the worker asks a runner to rebuild its device context or session."""

    DEVICE_CONTEXT_POISONED = "device_context_poisoned"
    STEP_LOOP_FAILED = "step_loop_failed"  # a step failed outside any one sequence: the runner's state is suspect
    REMOTE_AUTH_FAILURE = "remote_auth_failure"
    REMOTE_CONFIG_CHANGE = "remote_config_change"
    MANUAL = "manual"


class FinishReason(StrEnum):
    """Why a sequence ended (OpenAI's `finish_reason` values plus `abort`)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


class RunnerError(RuntimeError):
    """A runner failed in a way the caller should report, not hide."""


class ContextFaultError(RunnerError):
    """The runner's device context (or remote session) is unusable.

    Nothing the runner does per sequence can fix it; only ``rebuild_session``
    can. The engine worker reacts by rebuilding once for every affected
    sequence and resuming them (``SequenceRequest.resume_token_ids``).
    ``cause`` is what the worker passes to ``rebuild_session``.
    """

    def __init__(self, message: str, cause: SessionRebuildCause = SessionRebuildCause.DEVICE_CONTEXT_POISONED) -> None:
        super().__init__(message)
        self.cause = cause


class UpstreamError(RunnerError):
    """An OpenAI-compatible upstream refused the request; its status and error body reach the client as they are."""

    def __init__(self, status: int, message: str, *, type: str, code: str | None, retry_after: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.code = code
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Decoding settings of one sequence. temperature 0 means greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    """The client's request as sent, for runners that forward to an OpenAI-compatible server.

    ``path`` is ``/v1/chat/completions`` or ``/v1/completions``; ``body`` the
    parsed JSON body (the runner sets its own ``model`` and ``stream``).
    """

    path: str
    body: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SequenceRequest:
    """One sequence to generate: already tokenized, with its sampling settings.

    ``resume_token_ids`` are tokens this request already generated, and whose
    text was already handed out, before a context fault: the runner continues
    after them (they count toward ``sampling.max_tokens``) and emits only the
    text that follows.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    priority: int = 0
    resume_token_ids: tuple[int, ...] = ()
    openai: OpenAIRequest | None = None  # set when the runner forwards requests (no token ids then)
    prompt_tokens_estimate: int = 0  # forwarding runners: the prompt's size, estimated, for queue and rate accounting


@dataclass(frozen=True, slots=True)
class ExecuteBatch:
    """Sequences handed to a runner together; chunks come back tagged by request id."""

    sequences: tuple[SequenceRequest, ...]


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """Newly generated tokens of one sequence and the text they complete.

    ``text`` may be empty while a multi-byte character or a possible stop string
    is held back; the final chunk of a sequence carries ``finish_reason``.
    """

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None


@dataclass(frozen=True, slots=True)
class DeviceContext:
    """The device a local runner computes on ("cpu", "cuda:0", ...)."""

    device: str


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Declared limits of a remote provider."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


@dataclass(frozen=True, slots=True)
class RequiredMemory:
    """Working memory a replica needs, used by placement."""

    ram_bytes: int
    vram_bytes: int
    detail: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class TextCodec(Protocol):
    """Tokenization for runners that see token ids (local runtimes)."""

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]: ...

    def encode_text(self, text: str) -> list[int]: ...


class ModelRunner(Protocol):
    """What every runtime implements. See DESIGN.md, "The runner protocol"."""

    runtime_kind: RuntimeKind
    transport_kind: TransportKind
    gil_pinned: bool

    async def load_weights(self, ctx: DeviceContext | None, source: WeightSource) -> None: ...

    def execute(self, batch: ExecuteBatch) -> AsyncIterator[TokenChunk]: ...

    async def abort(self, request_id: str) -> None: ...

    async def rebuild_session(self, cause: SessionRebuildCause) -> None: ...

    def rate_limits(self) -> RateLimits | None: ...

    def estimate_cost_usd(self, batch: ExecuteBatch) -> float: ...

    def required_memory(self, spec: InferenceDeploymentSpec) -> RequiredMemory: ...

    async def close(self) -> None: ...
