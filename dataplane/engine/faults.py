"""Telling a poisoned device context from an ordinary error, and faking one.

After some CUDA errors (an illegal memory access, a device-side assert) the
whole CUDA context is unusable: every later kernel fails too, so retrying the
step or failing only the sequence at hand cannot help. The engine worker has to
rebuild the runner's session instead. This module decides which errors those
are, without importing torch itself: the gateway and sidecar import the data
plane but never torch, and a process that raised a torch error has torch
loaded already.
"""

from __future__ import annotations

import threading

INJECTED_MESSAGE = "CUDA error: an illegal memory access was encountered (injected)"


class FaultInjector:
    """An armed hook that raises what a poisoned CUDA context raises: a test-only fake.

    A CPU machine cannot poison a CUDA context, so the supervision path
    (fail the batch, rebuild the session, resume the sequences) would go
    untested. The runner calls :meth:`check` once per step with work; while
    armed it raises ``torch.AcceleratorError`` with the message a real illegal
    memory access carries, so the runner takes the very path a real fault
    takes. Enabled only by ``MODELFLEET_FAULT_INJECTION=1`` (``POST /admin/fault``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    @property
    def armed(self) -> int:
        """How many more checks will raise."""
        return self._count

    def arm(self, count: int = 1) -> None:
        """Make the next ``count`` checks raise; 0 disarms."""
        if count < 0:
            raise ValueError("count must be >= 0")
        with self._lock:
            self._count = count

    def check(self) -> None:
        """Raise the poisoned-context error if armed (called from the runner's step thread)."""
        with self._lock:
            if self._count <= 0:
                return
            self._count -= 1
        import torch  # only runner processes arm this, and they have torch loaded

        raise torch.AcceleratorError(INJECTED_MESSAGE)
