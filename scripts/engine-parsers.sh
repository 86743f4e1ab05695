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
lock="$root/locks/engine-parsers.txt"   # hashes; made from locks/engine-parsers.in by `make lock`
# The engine pins of the lock must be pyproject.toml's vllm and sglang extras.
for engine in vllm sglang; do
  want_pin="$(grep -oE "\"$engine==[0-9.]+\"" "$root/pyproject.toml" | tr -d '"')"
  grep -qx "$want_pin \\\\" "$lock" || {
    echo "engine-parsers: $lock does not pin $want_pin (pyproject.toml's $engine extra): run make lock" >&2; exit 1; }
done
site="$root/.venv/lib/python3.11/site-packages"
[ -d "$site" ] || { echo "engine-parsers: $site missing; run make venv-test first" >&2; exit 1; }
[ -x "$uv" ] || { echo "engine-parsers: $uv missing; run scripts/bootstrap.sh first" >&2; exit 1; }

want="$(cat "$lock" "$0" | sha256sum | cut -c1-16) $site"
stamp="$env_dir/.modelfleet-stamp"
if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ]; then exit 0; fi

start=$(date +%s)
echo "engine-parsers: installing $lock (--no-deps) into $env_dir (about 1 GB the first time)"
[ -x "$env_dir/bin/python" ] || "$uv" venv --quiet --python python3.11 "$env_dir"
VIRTUAL_ENV="$env_dir" "$uv" pip sync --quiet --require-hashes "$lock"
# after the environment's own site-packages: its packages win, the repo's .venv fills the rest
echo "$site" > "$env_dir/lib/python3.11/site-packages/zz_modelfleet_venv.pth"
echo "$want" > "$stamp"
echo "engine-parsers: ready in $(( $(date +%s) - start )) s"
