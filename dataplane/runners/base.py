"""The ModelRunner protocol, its two families, and the plain data they speak.

A runner is the seam between the engine core and a runtime: in-process torch,
a vLLM or SGLang server on a Unix socket, or a hosted OpenAI-compatible API.
Every runner declares a ``RunnerCapabilities`` record; the engine reads it,
never probes the runner's attributes. Its ``family`` says who implements the
OpenAI API:

- ``token_generator`` (the torch runners): ModelFleet does. The engine
  validates the request strictly, tokenizes it and builds the answer from the
  ``TokenChunk`` objects the runner streams (``TokenGenerator.execute``), or
  from the vectors an embedding runner computes.
- ``openai_passthrough`` (vLLM, SGLang, remote): the backend does. The engine
  forwards the client's JSON body (the model name and the stream's usage
  request are the only rewrites, docs/openai-api.md) and relays the backend's
  bytes (``OpenAIBackend.open``); it reads only the status, the first byte's
  time and the usage.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, cast, runtime_checkable

from modelfleet.dataplane.spec import RuntimeKind, WeightSource

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "EMBEDDINGS",
    "RERANK",
    "BackendResponse",
    "ContextFaultError",
    "DeviceContext",
    "ExecuteBatch",
    "FaultInjectable",
    "FinishReason",
    "ModelRunner",
    "ModelServerMetrics",
    "OpenAIBackend",
    "OpenAICall",
    "RunnerCapabilities",
    "RunnerError",
    "RunnerFamily",
    "RuntimeKind",
    "SamplingParams",
    "SequenceRequest",
    "SessionRebuildCause",
    "TextCodec",
    "TokenChunk",
    "TokenGenerator",
    "TransportKind",
    "UpstreamError",
    "Usage",
    "WeightSource",
    "as_backend",
    "as_token_generator",
    "is_context_fault",
]

# The OpenAI routes an engine serves (a runner's ``capabilities.endpoints`` says which of them it can answer)
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RERANK = "/v1/rerank"


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


def is_context_fault(exc: BaseException) -> bool:
    """Whether exc leaves the device context unusable (only a session rebuild helps)."""
    if isinstance(exc, ContextFaultError):
        return True
    torch = sys.modules.get("torch")
    accelerator_error = getattr(torch, "AcceleratorError", None) if torch is not None else None
    if isinstance(accelerator_error, type) and isinstance(exc, accelerator_error):
        return True
    # torch builds without AcceleratorError raise a plain RuntimeError for the same fault
    return isinstance(exc, RuntimeError) and str(exc).startswith("CUDA error")


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
    """Decoding settings of one sequence, with vLLM's semantics. temperature 0 means greedy.

    Applied to the logits in vLLM's order: ``min_tokens`` (end-of-sequence and ``stop_token_ids`` cannot
    be sampled before that many tokens), ``logit_bias`` (token id -> added to its logit), then the
    penalties: ``repetition_penalty`` over prompt and output tokens (a positive logit divided by it, a
    negative one multiplied), ``frequency_penalty`` x each token's count in the output and
    ``presence_penalty`` once per token in the output, both subtracted. Greedy takes the argmax of the
    result; otherwise temperature, then ``min_p`` (tokens below min_p x the top token's probability are
    dropped), ``top_k`` (0: all), ``top_p``. A token of ``stop_token_ids`` ends the sequence (its text
    is not emitted) even with ``ignore_eos``.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    min_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether the logits are changed before the choice (bias, penalties, min_tokens): greedy is then
        the argmax of the changed logits, not the model's."""
        return bool(
            self.logit_bias
            or self.min_tokens
            or self.repetition_penalty != 1.0
            or self.presence_penalty
            or self.frequency_penalty
        )


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


@runtime_checkable
class TextCodec(Protocol):
    """Tokenization for runners that see token ids (local runtimes)."""

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]: ...

    def encode_text(self, text: str) -> list[int]: ...

    @property
    def vocab_size(self) -> int: ...  # token ids are 0 .. vocab_size - 1 (the model's logits, for a generator)


class RunnerFamily(StrEnum):
    """Who implements the OpenAI API for a runner (see the module's docstring)."""

    OPENAI_PASSTHROUGH = "openai_passthrough"
    TOKEN_GENERATOR = "token_generator"


@dataclass(frozen=True, slots=True)
class RunnerCapabilities:
    """What a runner is and can do, declared by its class; the engine decides from this record alone.

    ``endpoints``: the OpenAI routes it answers (``CHAT``, ``COMPLETIONS``, ``EMBEDDINGS``, ``RERANK``).
    ``one_model_per_process``: its backend serves exactly one model, so a request naming another one
    reached the wrong process: 421 Misdirected Request instead of 404 (docs/runners.md).
    ``fault_injection``: it has a ``fault_hook`` the engine's test-only fault injector may set
    (``FaultInjectable``). ``embeds``: a token generator that computes vectors instead of text
    (``engine.pooling.Embedder``). ``model_server_metrics``: its backend serves the model-server
    metrics (vLLM's ``vllm:*`` names) itself, which the engine re-exports (``ModelServerMetrics``)
    instead of computing them from its own queue.
    """

    family: RunnerFamily
    endpoints: frozenset[str]
    one_model_per_process: bool = False
    fault_injection: bool = False
    embeds: bool = False
    model_server_metrics: bool = False

    @property
    def passthrough(self) -> bool:
        """Requests go to an OpenAI-compatible backend as sent; unknown fields are the backend's to judge."""
        return self.family is RunnerFamily.OPENAI_PASSTHROUGH


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts as an OpenAI-compatible backend reported them (its ``usage`` object)."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class OpenAICall:
    """One request for a passthrough runner's backend.

    ``body`` is the JSON to send, already rewritten by the engine (the backend's model name; usage asked
    for in a stream). ``prompt_tokens_estimate`` and ``max_tokens`` (n x the completion limit; 0 for
    embeddings and rerank) size rate limits and spend before the backend's usage is known.
    """

    request_id: str
    path: str
    body: bytes
    stream: bool
    prompt_tokens_estimate: int
    max_tokens: int


class BackendResponse:
    """A backend's answer as the engine relays it: status, the headers worth keeping, the body's bytes.

    ``chunks`` yields the body as it arrives. Before its first bytes it raises ``ContextFaultError`` when
    the backend itself is gone (the worker rebuilds and resubmits), after them ``RunnerError`` (the client
    has part of the answer: it can only be failed). ``finish(usage)`` is called once when the engine is
    done with the answer, with the backend's usage when it sent one (a runner's cost and rate accounting);
    ``aclose`` releases the connection.
    """

    def __init__(
        self,
        status: int,
        headers: Mapping[str, str],
        chunks: AsyncGenerator[bytes],
        *,
        close: Callable[[], Awaitable[None]] | None = None,
        on_finish: Callable[[Usage | None], None] | None = None,
    ) -> None:
        self.status = status
        self.headers = {k.lower(): v for k, v in headers.items()}  # looked up by lower-case name
        self.chunks = chunks
        self._close = close
        self._on_finish = on_finish
        self._finished = False

    def finish(self, usage: Usage | None) -> None:
        if self._finished:
            return
        self._finished = True
        if self._on_finish is not None:
            self._on_finish(usage)

    async def aclose(self) -> None:
        await self.chunks.aclose()  # end the generator (and its finally) now, not at garbage collection
        if self._close is not None:
            await self._close()


class ModelRunner(Protocol):
    """What every runtime implements. See DESIGN.md, "The runner protocol", and the two families below."""

    capabilities: RunnerCapabilities
    runtime_kind: RuntimeKind
    transport_kind: TransportKind
    gil_pinned: bool
    progress: str  # what it is doing, for /readyz while it loads

    async def load_weights(self, ctx: DeviceContext | None, source: WeightSource) -> None: ...

    async def rebuild_session(self, cause: SessionRebuildCause) -> None: ...

    def runtime_stats(self) -> dict[str, float]: ...

    async def close(self) -> None: ...


class ModelServerMetrics(Protocol):
    """A backend that serves the model-server metrics itself (``capabilities.model_server_metrics``)."""

    async def model_server_metrics(self) -> str:
        """Its Prometheus text, only the model-server families (``vllm:*``)."""
        ...


class TokenGenerator(ModelRunner, Protocol):
    """Family ``token_generator``: ModelFleet implements the OpenAI API on the tokens it streams."""

    @property
    def codec(self) -> TextCodec | None: ...  # None until the weights are loaded

    def execute(self, batch: ExecuteBatch) -> AsyncIterator[TokenChunk]: ...


class OpenAIBackend(ModelRunner, Protocol):
    """Family ``openai_passthrough``: an OpenAI-compatible backend answers; the engine relays its bytes."""

    @property
    def backend_model(self) -> str: ...  # the model name the backend serves (what ``model`` is rewritten to)

    async def open(self, call: OpenAICall) -> BackendResponse: ...


class FaultInjectable(Protocol):
    """A runner with ``capabilities.fault_injection``: the injector's check runs once per step with work."""

    fault_hook: Callable[[], None] | None


def as_token_generator(runner: ModelRunner) -> TokenGenerator:
    """The runner as a token generator, by its declared family (a RunnerError for a passthrough runner)."""
    if runner.capabilities.family is not RunnerFamily.TOKEN_GENERATOR:
        raise RunnerError(
            f"{type(runner).__name__} is a {runner.capabilities.family.value} runner, not a token generator"
        )
    return cast(TokenGenerator, runner)


def as_backend(runner: ModelRunner) -> OpenAIBackend:
    """The runner as an OpenAI-compatible backend, by its declared family (a RunnerError otherwise)."""
    if runner.capabilities.family is not RunnerFamily.OPENAI_PASSTHROUGH:
        raise RunnerError(f"{type(runner).__name__} is a {runner.capabilities.family.value} runner, not a passthrough")
    return cast(OpenAIBackend, runner)
