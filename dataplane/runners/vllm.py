"""The vLLM runner: ``vllm serve`` as a one-shot child on a Unix socket (see ``engine_server``).

Checked against vllm 0.33.0 (the version the ``vllm`` extra pins), by
building its own argument parser (``vllm.entrypoints.common.cli_args.
make_arg_parser``) in a throwaway environment (``scripts/engine-parsers.sh``)
and parsing every command this module produces (tests/unit/test_engine_flags.py):

- ``--uds PATH``: vLLM's OpenAI server listens on a Unix socket (checked in
  0.33.0; it binds no TCP port then). This runner always uses it.
- ``--served-model-name`` (nargs +), ``--revision``, ``--max-model-len``,
  ``--dtype`` (auto, bfloat16, float, float16, float32, half),
  ``--tensor-parallel-size``, ``--gpu-memory-utilization`` (float, default
  0.92 upstream; the spec's default is 0.9), ``--max-num-seqs``,
  ``--enable-prefix-caching`` / ``--no-enable-prefix-caching``,
  ``--speculative-config JSON``: ``{"method": "ngram", "num_speculative_tokens": n,
  "prompt_lookup_max": 3, "prompt_lookup_min": 1}`` for prompt lookup (the
  torch runner's n-gram window, runners/ngram.py) or ``{"model": draft,
  "num_speculative_tokens": n}`` for a draft model (vLLM infers method
  draft_model). ``minAcceptanceRate`` and ``maxBatch`` have no vLLM flag and
  are not passed.
- ``GET /health`` answers 200 once the engine is up.
"""

from __future__ import annotations

import json
from typing import ClassVar

from modelfleet.dataplane.runners.base import RuntimeKind
from modelfleet.dataplane.runners.engine_server import (
    EngineServerRunner,
    dtype_flag,
    flag_pairs,
    model_argument,
    tensor_parallel_size,
)
from modelfleet.dataplane.spec import InferenceDeploymentSpec

NGRAM_MAX, NGRAM_MIN = 3, 1  # the torch runner's prompt-lookup window (runners/ngram.py, propose)


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


def command(spec: InferenceDeploymentSpec, endpoint: str | int) -> list[str]:
    """``vllm serve`` for the spec; ``endpoint`` is a Unix socket path, or a loopback port."""
    source = spec.model.source
    listen = ["--uds", endpoint] if isinstance(endpoint, str) else ["--host", "127.0.0.1", "--port", str(endpoint)]
    engine = spec.engine
    return [
        "vllm",
        "serve",
        model_argument(spec),
        *listen,
        "--served-model-name",
        spec.model.name,
        *flag_pairs(
            [
                ("--revision", source.hugging_face.revision if source.hugging_face is not None else None),
                ("--max-model-len", engine.max_model_len),
                ("--dtype", dtype_flag(spec.model.dtype)),
                ("--tensor-parallel-size", tensor_parallel_size(spec)),
                ("--gpu-memory-utilization", spec.runtime.gpu_memory_utilization),
                ("--max-num-seqs", engine.max_num_seqs),
                ("--speculative-config", speculative_config(spec)),
            ]
        ),
        "--enable-prefix-caching" if engine.prefix_caching else "--no-enable-prefix-caching",
        *spec.runtime.extra_args,
    ]


class VllmRunner(EngineServerRunner):
    runtime_kind = RuntimeKind.VLLM
    program: ClassVar[str] = "vllm"
    extra: ClassVar[str] = "vllm"
    supports_uds: ClassVar[bool] = True

    command = staticmethod(command)
