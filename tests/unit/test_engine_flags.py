"""The vLLM and SGLang command lines: the spec mapped to each engine's real flags.

Two layers. The argv tests below pin the mapping itself. ``test_*_parser_accepts``
parse every command with the engine's OWN argument parser (vllm 0.33.0 and
sglang 0.5.23, the extras' pins), imported in the environment
``scripts/engine-parsers.sh`` builds (``make test`` and ``make unit`` run it).
When that environment is missing the parser tests fail; set
``MODELFLEET_SKIP_ENGINE_PARSERS=1`` to skip them on purpose.
"""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from modelfleet.dataplane.runners import sglang, vllm
from modelfleet.dataplane.spec import InferenceDeploymentSpec

ROOT = Path(__file__).resolve().parents[2]
PARSER_ENV = Path(os.environ.get("MODELFLEET_CACHE", Path.home() / ".cache" / "modelfleet")) / "engine-parsers"


def make(**kw: Any) -> InferenceDeploymentSpec:
    body: dict[str, Any] = {
        "model": {"name": "llama-8b", "source": {"huggingFace": {"repo": "meta-llama/Llama-3.1-8B", "revision": "v2"}}},
        "runtime": {"kind": "vllm"},
    }
    for key, value in kw.items():
        body[key] = {**body.get(key, {}), **value}
    return InferenceDeploymentSpec.model_validate(body)


FULL = make(
    model={"dtype": "bfloat16", "aliases": ["llama"]},
    runtime={
        "gpuMemoryUtilization": 0.85,
        "enableAutoToolChoice": True,
        "toolCallParser": "hermes",
        "chatTemplate": "/templates/tools.jinja",
        "enforceEager": True,
        "extraArgs": ["--seed", "7"],
    },
    engine={"maxModelLen": 8192, "maxNumSeqs": 64, "prefixCaching": False, "speculative": {"numDraftTokens": 5}},
    placement={"gpusPerReplica": 2},
)
DRAFT = make(engine={"speculative": {"numDraftTokens": 3, "draftModel": "meta-llama/Llama-3.2-1B"}})
MANAGED = make(model={"name": "Qwen/Qwen3-0.6B", "source": {"runtimeManaged": True}})
LOCAL = make(model={"source": {"path": "/models/llama"}})


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_vllm_command_maps_every_field():
    argv = vllm.command(FULL, "/run/mf/vllm.sock")
    assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(argv, "--model") == "meta-llama/Llama-3.1-8B"
    assert flag(argv, "--uds") == "/run/mf/vllm.sock" and "--port" not in argv
    served = argv.index("--served-model-name")
    assert argv[served + 1 : served + 3] == ["llama-8b", "llama"]  # the name first (vLLM answers with it)
    assert flag(argv, "--revision") == "v2"
    assert flag(argv, "--max-model-len") == "8192"
    assert flag(argv, "--dtype") == "bfloat16"
    assert flag(argv, "--tensor-parallel-size") == "2"
    assert flag(argv, "--gpu-memory-utilization") == "0.85"
    assert flag(argv, "--max-num-seqs") == "64"
    assert "--no-enable-prefix-caching" in argv
    assert json.loads(flag(argv, "--speculative-config")) == {
        "method": "ngram",
        "num_speculative_tokens": 5,
        "prompt_lookup_max": 3,
        "prompt_lookup_min": 1,
    }
    assert flag(argv, "--tool-call-parser") == "hermes"
    assert flag(argv, "--chat-template") == "/templates/tools.jinja"
    assert "--enable-auto-tool-choice" in argv and "--enforce-eager" in argv
    assert argv[-2:] == ["--seed", "7"]  # extraArgs last, so they override
    assert vllm.command(FULL, "/s", "/cache/converted")[4] == "/cache/converted"  # a converted GGUF folder


def test_vllm_defaults_draft_model_and_sources():
    argv = vllm.command(DRAFT, 41000)
    assert argv[argv.index("--host") : argv.index("--host") + 4] == ["--host", "127.0.0.1", "--port", "41000"]
    assert flag(argv, "--tensor-parallel-size") == "1"
    assert flag(argv, "--gpu-memory-utilization") == "0.9"
    assert flag(argv, "--dtype") == "auto"
    assert "--enable-prefix-caching" in argv
    assert json.loads(flag(argv, "--speculative-config")) == {
        "model": "meta-llama/Llama-3.2-1B",
        "num_speculative_tokens": 3,
    }
    for absent in ("--tool-call-parser", "--chat-template", "--enable-auto-tool-choice", "--enforce-eager"):
        assert absent not in argv
    managed = vllm.command(MANAGED, "/s")
    assert flag(managed, "--model") == "Qwen/Qwen3-0.6B"
    assert "--revision" not in managed and "--speculative-config" not in managed
    assert flag(vllm.command(LOCAL, "/s"), "--model") == "/models/llama"


def test_vllm_cpu_settings_come_from_the_spec():
    cpu = make(model={"source": {"path": "/m"}}, runtime={"device": "cpu", "cpuThreads": 1, "cpuKvCacheSpace": 3})
    env = vllm.cpu_env(cpu)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == str(min(os.sched_getaffinity(0)))
    assert vllm.on_cpu(cpu) and not vllm.on_cpu(make(runtime={"device": "cuda"}))
    # without cpuKvCacheSpace: what maxNumSeqs sequences of maxModelLen tokens need (placement's formula)
    sized = make(
        model={
            "source": {"path": "/m"},
            "size": {"parameters": 10**9, "numLayers": 32, "numKvHeads": 8, "headDim": 128},
        },
        runtime={"device": "cpu"},
        engine={"maxModelLen": 8192, "maxNumSeqs": 4},
    )
    # 2 (K and V) x 32 layers x 8 heads x 128 x 4 bytes (float32 on CPU) x 8192 tokens x 4 sequences = 4 GiB
    assert vllm.cpu_env(sized) == {"VLLM_CPU_KVCACHE_SPACE": "4"}


def test_sglang_command_maps_every_field():
    argv = sglang.command(FULL, 41001)
    assert argv[:4] == ["sglang", "serve", "--model-type", "llm"]
    assert flag(argv, "--model-path") == "meta-llama/Llama-3.1-8B"
    assert (flag(argv, "--host"), flag(argv, "--port")) == ("127.0.0.1", "41001")
    assert flag(argv, "--served-model-name") == "llama-8b"
    assert flag(argv, "--revision") == "v2"
    assert flag(argv, "--context-length") == "8192"
    assert flag(argv, "--dtype") == "bfloat16"
    assert flag(argv, "--tp-size") == "2"
    assert flag(argv, "--mem-fraction-static") == "0.85"
    assert flag(argv, "--max-running-requests") == "64"
    assert "--disable-radix-cache" in argv
    assert flag(argv, "--speculative-algorithm") == "NGRAM"
    assert flag(argv, "--speculative-num-draft-tokens") == "5"
    assert argv[-2:] == ["--seed", "7"]
    draft = sglang.command(DRAFT, 41001)
    assert flag(draft, "--speculative-algorithm") == "STANDALONE"
    assert flag(draft, "--speculative-draft-model-path") == "meta-llama/Llama-3.2-1B"
    assert (flag(draft, "--speculative-num-steps"), flag(draft, "--speculative-num-draft-tokens")) == ("3", "4")
    assert "--disable-radix-cache" not in draft
    with pytest.raises(ValueError, match="TCP only"):
        sglang.command(FULL, "/s")


def test_draft_model_is_refused_for_torch():
    with pytest.raises(ValueError, match="draftModel needs runtime vllm or sglang"):
        make(
            model={"source": {"path": "/m"}},
            runtime={"kind": "torch"},
            engine={"speculative": {"draftModel": "x"}},
        )


def test_gpu_memory_utilization_bounds():
    for bad in (0, 1.5):
        with pytest.raises(ValueError):
            make(runtime={"gpuMemoryUtilization": bad})


# ---- the engines' own parsers -------------------------------------------------------------------------------
def parse_with(engine: str, argvs: list[list[str]]) -> list[dict[str, Any]]:
    if os.environ.get("MODELFLEET_SKIP_ENGINE_PARSERS") == "1":
        pytest.skip("MODELFLEET_SKIP_ENGINE_PARSERS=1")
    python = PARSER_ENV / "bin" / "python"
    if not python.exists():
        pytest.fail(
            f"{PARSER_ENV} is missing: run scripts/engine-parsers.sh (make test does), "
            "or set MODELFLEET_SKIP_ENGINE_PARSERS=1 to skip the engine parser checks"
        )
    proc = subprocess.run(
        [str(python), str(Path(__file__).with_name("engine_parse.py"))],
        input=json.dumps({"engine": engine, "argvs": argvs}),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"},  # vLLM's parser asks the platform; no GPU here
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return list(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_parser_env_has_the_pinned_versions():
    if os.environ.get("MODELFLEET_SKIP_ENGINE_PARSERS") == "1":
        pytest.skip("MODELFLEET_SKIP_ENGINE_PARSERS=1")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    site = PARSER_ENV / "lib" / "python3.11" / "site-packages"
    for pin in (*extras["vllm"], *extras["sglang"]):
        name, version = pin.split("==")
        assert (site / f"{name}-{version}.dist-info").is_dir(), (
            f"{PARSER_ENV} lacks {pin}: rerun scripts/engine-parsers.sh"
        )


def test_vllm_parser_accepts_the_commands():
    specs = [FULL, DRAFT, MANAGED, LOCAL]
    got = parse_with("vllm", [vllm.command(FULL, "/run/mf/vllm.sock"), *(vllm.command(s, 41000) for s in specs[1:])])
    full, draft, managed, local = got
    assert "error" not in full, full
    assert full["model"] == "meta-llama/Llama-3.1-8B"
    assert full["uds"] == "/run/mf/vllm.sock"
    assert full["served_model_name"] == ["llama-8b", "llama"]
    assert full["revision"] == "v2"
    assert full["max_model_len"] == 8192
    assert full["dtype"] == "bfloat16"
    assert full["tensor_parallel_size"] == 2
    assert full["gpu_memory_utilization"] == 0.85
    assert full["max_num_seqs"] == 64
    assert full["enable_prefix_caching"] is False
    assert full["enforce_eager"] is True
    assert full["enable_auto_tool_choice"] is True
    assert full["tool_call_parser"] == "hermes"
    assert full["chat_template"] == "/templates/tools.jinja"
    assert full["seed"] == 7
    assert draft["port"] == 41000 and draft["host"] == "127.0.0.1" and draft["enable_prefix_caching"] is True
    assert managed["model"] == "Qwen/Qwen3-0.6B" and local["model"] == "/models/llama"


def test_vllm_parser_refuses_a_wrong_flag():
    (bad,) = parse_with("vllm", [[*vllm.command(DRAFT, 41000), "--no-such-flag", "1"]])
    assert "error" in bad


def test_sglang_parser_accepts_the_commands():
    argvs = [[*sglang.command(FULL, 41001)[:-2], "--disable-cuda-graph"], sglang.command(DRAFT, 41002)]
    argvs.append(sglang.command(MANAGED, 41003))
    full, draft, managed = parse_with("sglang", argvs)
    assert "error" not in full, full
    assert full["model_path"] == "meta-llama/Llama-3.1-8B"
    assert (full["host"], full["port"]) == ("127.0.0.1", 41001)
    assert full["served_model_name"] == "llama-8b"
    assert full["revision"] == "v2"
    assert full["context_length"] == 8192
    assert full["dtype"] == "bfloat16"
    assert full["tp_size"] == 2
    assert full["mem_fraction_static"] == 0.85
    assert full["max_running_requests"] == 64
    assert full["disable_radix_cache"] is True
    assert full["speculative_algorithm"] == "NGRAM" and full["speculative_num_draft_tokens"] == 5
    assert full["disable_cuda_graph"] is True
    assert draft["speculative_algorithm"] == "STANDALONE"
    assert draft["speculative_draft_model_path"] == "meta-llama/Llama-3.2-1B"
    assert (draft["speculative_num_steps"], draft["speculative_eagle_topk"]) == (3, 1)
    assert managed["model_path"] == "Qwen/Qwen3-0.6B"
