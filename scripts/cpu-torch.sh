#!/usr/bin/env bash
# Swap the locked torch of a venv for the same version from another index (for example
# PyTorch's CPU-only wheels), used by docker/engine-torch-cpu.Dockerfile:
#   scripts/cpu-torch.sh <venv python> <index url>      (an empty url does nothing)
# The swapped torch is not locked by hash: no such index is reachable where the lock is made.
# The CUDA libraries and triton that PyPI's torch depends on are removed with it.
set -euo pipefail
python="$1"
index="${2:-}"
[ -n "$index" ] || exit 0
version="$("$python" -c 'import importlib.metadata as m; print(m.version("torch"))')"
mapfile -t cuda < <(uv pip list --python "$python" --format freeze | grep -E '^(nvidia-|triton==)' | cut -d= -f1)
[ "${#cuda[@]}" = 0 ] || uv pip uninstall --python "$python" "${cuda[@]}"
uv pip install --python "$python" --no-deps --reinstall --index-url "$index" "torch==${version%%+*}"
echo "cpu-torch: torch ${version%%+*} from $index (removed: ${cuda[*]:-nothing})"
