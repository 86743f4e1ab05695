"""Runner registry: runtime kind -> factory. Imports are lazy so a process only
loads the runtime it runs (the gateway never imports torch)."""

from __future__ import annotations

from modelfleet.dataplane.runners.base import ModelRunner, RunnerError
from modelfleet.dataplane.spec import InferenceDeploymentSpec, Mode, RuntimeKind


def create_runner(spec: InferenceDeploymentSpec) -> ModelRunner:
    kind = spec.runtime.kind
    if kind is RuntimeKind.TORCH:
        try:
            from modelfleet.dataplane.runners.torch import TorchRunner
        except ImportError as exc:
            raise RunnerError(
                f"runtime torch needs the torch extra: pip install 'modelfleet[torch]' ({exc.name} missing)"
            ) from None
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
