"""The SGLang runner: ``sglang serve`` as a one-shot child on a free loopback port (see ``engine_server``).

Checked against sglang 0.5.23 (the version the ``sglang`` extra pins), by
building its own argument parser (``ServerArgs.add_cli_args``) in a throwaway
environment (``scripts/engine-parsers.sh``) and parsing every command this
module produces (tests/unit/test_engine_flags.py):

- No Unix socket: ServerArgs has ``--host`` and ``--port`` only (its HTTP
  server binds TCP), so the runner picks a free port on 127.0.0.1.
- ``sglang serve --model-type llm`` is the recommended entry point
  (``python -m sglang.launch_server`` warns it is legacy); ``--model-type
  llm`` skips its auto-detection of diffusion models.
- ``--model-path``, ``--revision``, ``--served-model-name`` (one name),
  ``--context-length``, ``--dtype`` (auto, half, float16, bfloat16, float,
  float32), ``--tp-size``, ``--mem-fraction-static``,
  ``--max-running-requests``, ``--disable-radix-cache`` (prefix caching off),
  speculative decoding: ``--speculative-algorithm NGRAM
  --speculative-num-draft-tokens n`` for prompt lookup, or
  ``--speculative-algorithm STANDALONE --speculative-draft-model-path draft
  --speculative-num-steps n --speculative-eagle-topk 1
  --speculative-num-draft-tokens n+1`` (a chain of n drafts) for a draft model.
- ``GET /health`` answers 200 once the server is up.
"""

from __future__ import annotations

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


def speculative_flags(spec: InferenceDeploymentSpec) -> list[str]:
    sd = spec.engine.speculative
    if sd is None:
        return []
    n = sd.num_draft_tokens
    if sd.draft_model is None:
        return ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", str(n)]
    return [
        "--speculative-algorithm",
        "STANDALONE",
        "--speculative-draft-model-path",
        sd.draft_model,
        "--speculative-num-steps",
        str(n),
        "--speculative-eagle-topk",
        "1",
        "--speculative-num-draft-tokens",
        str(n + 1),
    ]


def command(spec: InferenceDeploymentSpec, endpoint: str | int) -> list[str]:
    """``sglang serve`` for the spec; ``endpoint`` must be a loopback port (SGLang has no Unix socket)."""
    if not isinstance(endpoint, int):
        raise ValueError("SGLang listens on TCP only: pass a port")
    source = spec.model.source
    engine = spec.engine
    return [
        "sglang",
        "serve",
        "--model-type",
        "llm",
        "--model-path",
        model_argument(spec),
        "--host",
        "127.0.0.1",
        "--port",
        str(endpoint),
        "--served-model-name",
        spec.model.name,
        *flag_pairs(
            [
                ("--revision", source.hugging_face.revision if source.hugging_face is not None else None),
                ("--context-length", engine.max_model_len),
                ("--dtype", dtype_flag(spec.model.dtype)),
                ("--tp-size", tensor_parallel_size(spec)),
                ("--mem-fraction-static", spec.runtime.gpu_memory_utilization),
                ("--max-running-requests", engine.max_num_seqs),
            ]
        ),
        *([] if engine.prefix_caching else ["--disable-radix-cache"]),
        *speculative_flags(spec),
        *spec.runtime.extra_args,
    ]


class SglangRunner(EngineServerRunner):
    runtime_kind = RuntimeKind.SGLANG
    program: ClassVar[str] = "sglang"
    extra: ClassVar[str] = "sglang"
    supports_uds: ClassVar[bool] = False

    command = staticmethod(command)
