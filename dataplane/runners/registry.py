"""Runner registry: runtime kind -> factory. Imports are lazy so a process only
loads the runtime it runs (the gateway never imports torch)."""

from __future__ import annotations

from modelfleet.dataplane.runners.base import ModelRunner, RunnerError
from modelfleet.dataplane.spec import InferenceDeploymentSpec, RuntimeKind


def create_runner(spec: InferenceDeploymentSpec) -> ModelRunner:
    kind = spec.runtime.kind
    if kind is RuntimeKind.TORCH:
        try:
            from modelfleet.dataplane.runners.torch import TorchRunner
        except ImportError as exc:
            raise RunnerError(
                f"runtime torch needs the torch extra: pip install 'modelfleet[torch]' ({exc.name} missing)"
            ) from None
        return TorchRunner(
            dtype=spec.model.dtype,
            quantization=spec.model.quantization,
            device=spec.runtime.device,
            engine=spec.engine,
            cpu_threads=spec.runtime.cpu_threads,
        )
    raise RunnerError(f"runtime {kind.value!r} is not available in this version of ModelFleet yet")
