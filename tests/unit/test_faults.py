"""Which errors count as a poisoned device context, and the injector that fakes one.

The injector stands in for a CUDA fault a CPU machine cannot produce; these
tests check that it raises exactly what torch raises for a real one.
"""

from __future__ import annotations

import pytest
import torch

from modelfleet.dataplane.engine.faults import FaultInjector
from modelfleet.dataplane.runners.base import ContextFaultError, RunnerError, is_context_fault


def test_accelerator_error_is_a_context_fault() -> None:
    assert is_context_fault(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))


def test_runtime_error_with_a_cuda_error_message_is_a_context_fault() -> None:
    assert is_context_fault(RuntimeError("CUDA error: device-side assert triggered"))
    assert is_context_fault(ContextFaultError("session gone"))


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("shape mismatch"),
        ValueError("CUDA error: but not a RuntimeError"),
        RunnerError("model step failed"),
        torch.OutOfMemoryError("CUDA out of memory."),
    ],
)
def test_other_errors_are_not(exc: BaseException) -> None:
    assert not is_context_fault(exc)


def test_injector_raises_while_armed_then_stops() -> None:
    injector = FaultInjector()
    injector.check()  # not armed: nothing
    injector.arm(2)
    for _ in range(2):
        with pytest.raises(torch.AcceleratorError, match="illegal memory access") as err:
            injector.check()
        assert is_context_fault(err.value)
    injector.check()
    assert injector.armed == 0


def test_arm_zero_disarms() -> None:
    injector = FaultInjector()
    injector.arm(1000)
    injector.arm(0)
    injector.check()
    with pytest.raises(ValueError):
        injector.arm(-1)
