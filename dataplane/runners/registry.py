"""Runner registry: runtime kind -> factory. Imports are lazy so a process only
loads the runtime it runs (the gateway never imports torch)."""

from __future__ import annotations

import importlib.util

from modelfleet.dataplane.runners.base import ModelRunner, RunnerError, RunnerFamily
from modelfleet.dataplane.spec import InferenceDeploymentSpec, Mode, RuntimeKind

# What the torch runner imports, by module name: pyproject.toml's `torch` extra.
TORCH_EXTRA_MODULES = ("torch", "transformers", "gguf", "accelerate", "safetensors")

# Each runtime's runner family, for processes that must not import the runners (the gateway decides by it
# whether to validate a request strictly); tests/unit/test_runner_capabilities.py checks it against the
# runners' own ``capabilities``.
RUNTIME_FAMILY: dict[RuntimeKind, RunnerFamily] = {
    RuntimeKind.TORCH: RunnerFamily.TOKEN_GENERATOR,
    RuntimeKind.VLLM: RunnerFamily.OPENAI_PASSTHROUGH,
    RuntimeKind.SGLANG: RunnerFamily.OPENAI_PASSTHROUGH,
    RuntimeKind.REMOTE: RunnerFamily.OPENAI_PASSTHROUGH,
}


def forwards_requests(runtime: RuntimeKind) -> bool:
    """Whether a deployment of this runtime hands requests to an OpenAI-compatible backend as sent."""
    return RUNTIME_FAMILY.get(runtime) is RunnerFamily.OPENAI_PASSTHROUGH


class MissingExtraError(RunnerError):
    """A runtime's optional dependencies are not installed; the message names the pip extra."""


def require_runtime(spec: InferenceDeploymentSpec) -> None:
    """Fail before anything starts when the runtime's extra is missing (the vLLM and SGLang
    runners check their own server install when they load)."""
    if spec.runtime.kind is not RuntimeKind.TORCH:
        return
    missing = [m for m in TORCH_EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"runtime torch needs the torch extra, which is not installed (missing: {', '.join(missing)}); "
            "install it with: pip install 'modelfleet[torch]'"
        )


def create_runner(spec: InferenceDeploymentSpec) -> ModelRunner:
    kind = spec.runtime.kind
    require_runtime(spec)
    if kind is RuntimeKind.TORCH:
        from modelfleet.dataplane.runners.torch import TorchRunner

        if spec.model.mode is not Mode.COMPLETION:  # embedding and rerank: a bi-encoder, no generation
            from modelfleet.dataplane.runners.embedding import EmbeddingRunner

            return EmbeddingRunner(
                dtype=spec.model.dtype, device=spec.runtime.device, cpu_threads=spec.runtime.cpu_threads
            )
        return TorchRunner(
            dtype=spec.model.dtype,
            quantization=spec.model.quantization,
            device=spec.runtime.device,
            engine=spec.engine,
            cpu_threads=spec.runtime.cpu_threads,
        )
    if kind is RuntimeKind.REMOTE:
        from modelfleet.dataplane.runners.remote import RemoteRunner

        return RemoteRunner(spec)
    if kind in (RuntimeKind.VLLM, RuntimeKind.SGLANG) and spec.model.mode is not Mode.COMPLETION:
        raise RunnerError(f"runtime {kind.value} serves mode completion only in this version of ModelFleet")
    if kind is RuntimeKind.VLLM:  # the install check is in load_weights (it names the pip extra)
        from modelfleet.dataplane.runners.vllm import VllmRunner

        return VllmRunner(spec)
    if kind is RuntimeKind.SGLANG:
        from modelfleet.dataplane.runners.sglang import SglangRunner

        return SglangRunner(spec)
    raise RunnerError(f"runtime {kind.value!r} is not available in this version of ModelFleet yet")
