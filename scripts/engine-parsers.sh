#!/usr/bin/env bash
# Build the environment in which tests/unit/test_engine_flags.py runs vLLM's and
# SGLang's own argument parsers over the commands the runners produce. Cached
# outside the repo ($MODELFLEET_CACHE/engine-parsers, default ~/.cache/modelfleet);
# idempotent and fast when nothing changed.
#
# vllm and sglang are CUDA wheels that pin their own torch, so they are installed
# here with --no-deps, plus the few packages their parsers import. torch, numpy,
# transformers and the like are borrowed from the repo's .venv through a .pth
# file (the parsers import torch but never touch a GPU). vLLM's parser needs
# VLLM_TARGET_DEVICE=cpu on a machine without a GPU (the test sets it).
#
#   scripts/engine-parsers.sh        (make test and make unit run it)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${MODELFLEET_CACHE:-$HOME/.cache/modelfleet}"
uv="$cache/uvtool/bin/uv"
env_dir="$cache/engine-parsers"
# The engine pins come from pyproject.toml's vllm and sglang extras.
vllm_pin="$(grep -oE '"vllm==[0-9.]+"' "$root/pyproject.toml" | tr -d '"')"
sglang_pin="$(grep -oE '"sglang==[0-9.]+"' "$root/pyproject.toml" | tr -d '"')"
# What their parsers import beyond the repo's .venv (found by importing until it worked).
parser_deps=(
  msgspec==0.22.0 pybase64==1.5.1 pillow==13.0.0 pyzmq==27.3.0 ipython==9.18.1 traitlets==5.16.1
  cbor2==6.3.0 openai-harmony==0.0.8 cloudpickle==3.1.2 cachetools==8.0.1 uvloop==0.23.0 py-cpuinfo==9.0.0
  partial-json-parser==0.2.1.1.post7 xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 llguidance==1.9.1 orjson==3.13.0
)
site="$root/.venv/lib/python3.11/site-packages"
[ -d "$site" ] || { echo "engine-parsers: $site missing; run make venv-test first" >&2; exit 1; }
[ -x "$uv" ] || { echo "engine-parsers: $uv missing; run scripts/bootstrap.sh first" >&2; exit 1; }

want="$(printf '%s\n' "$vllm_pin" "$sglang_pin" "${parser_deps[@]}" "$site" | sha256sum | cut -c1-16)"
stamp="$env_dir/.modelfleet-stamp"
if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ]; then exit 0; fi

start=$(date +%s)
echo "engine-parsers: installing $vllm_pin and $sglang_pin (--no-deps) into $env_dir (about 1 GB the first time)"
[ -x "$env_dir/bin/python" ] || "$uv" venv --quiet --python python3.11 "$env_dir"
VIRTUAL_ENV="$env_dir" "$uv" pip install --quiet --no-deps "$vllm_pin" "$sglang_pin" "${parser_deps[@]}"
# after the environment's own site-packages: its packages win, the repo's .venv fills the rest
echo "$site" > "$env_dir/lib/python3.11/site-packages/zz_modelfleet_venv.pth"
echo "$want" > "$stamp"
echo "engine-parsers: ready in $(( $(date +%s) - start )) s"
