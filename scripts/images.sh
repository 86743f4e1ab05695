#!/usr/bin/env bash
# Build ModelFleet's container images ON THIS MACHINE, without Docker and
# without any image registry, for the real node of the e2e tests (e2e/node.py):
#
#   1. a Python 3.11 base image from Debian bookworm (mmdebstrap), laid out like
#      python:3.11-slim where the Dockerfiles look (/usr/local/bin/python3.11,
#      pip), which stands in for the PYTHON_IMAGE build argument;
#   2. each requested image with buildah (overlay storage, chroot isolation) from
#      the UNCHANGED Dockerfile in docker/, on that base (the build context is
#      the working tree, as with `docker build .`);
#   3. an OCI archive per image that `ctr images import` takes.
#
#   scripts/images.sh [NAME...]      NAME: modelfleet (default), engine-torch-cpu
#
# Outputs, OUTSIDE the repository, rebuilt only when their inputs change:
#   ${MODELFLEET_CACHE:-~/.cache/modelfleet}/images/<name>.oci.tar
#   ${MODELFLEET_CACHE:-~/.cache/modelfleet}/images/images.txt   (read by e2e/node.py)
#   ${MODELFLEET_CACHE:-~/.cache/modelfleet}/images/base-packages.txt
#     (every Debian package of the base, with its version)
#   ${MODELFLEET_CACHE:-~/.cache/modelfleet}/images/buildah/<driver>/  (buildah's
#     storage: its layer cache makes a source-only change rebuild the last steps only)
#
# Env: MODELFLEET_BUILDAH_DRIVER  overlay (default; kernel overlayfs, root) or vfs
#   (works anywhere, but copies the whole root filesystem at every step: measured
#   here 339 s cold / 246 s after a source change / 4.2 GB store for the modelfleet
#   image, against 48 s / 11 s / 0.6 GB with overlay)
#
# Needs root and Debian 12 (buildah, mmdebstrap are installed when missing).
# The machines here reach PyPI through a TLS-inspecting proxy: its CA bundle
# (the host's /etc/ssl/certs/ca-certificates.crt) is bind-mounted into the
# RUN steps only, never into a layer.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"

# --------------------------------------------------------------- pinned inputs
DEBS=(
  "buildah=1.28.2+ds1-3+deb12u1+b3"
  "mmdebstrap=1.3.5-7"
)
SUITE=bookworm
BASE_PACKAGES="python3,python3-venv,python3-pip,ca-certificates"
BASE_REF="modelfleet.local/python:3.11-bookworm"
REGISTRY="modelfleet.local"          # never resolvable: images are imported into the node
TAG="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO/pyproject.toml" | head -1)"

CACHE="${MODELFLEET_CACHE:-$HOME/.cache/modelfleet}"
OUT="$CACHE/images"
DRIVER="${MODELFLEET_BUILDAH_DRIVER:-overlay}"
STORE="$OUT/buildah/$DRIVER"
mkdir -p "$OUT" "$STORE"
B=(buildah --root "$STORE/root" --runroot "$STORE/run" --storage-driver "$DRIVER")

log() { printf '[images] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s; }
T_START=$(now)
timed() {
  local label="$1"; shift
  local t0 rc=0; t0=$(now)
  "$@" || rc=$?
  log "$label: $(( $(now) - t0 ))s wall (rc=$rc)"
  return "$rc"
}

deb_version() { dpkg-query -W -f='${db:Status-Abbrev} ${Version}' "$1" 2>/dev/null | awk '$1=="ii"{print $2}'; }
ensure_debs() {
  local spec name want have missing=()
  for spec in "${DEBS[@]}"; do
    name="${spec%%=*}"; want="${spec#*=}"; have="$(deb_version "$name")"
    if [[ -z "$have" ]]; then missing+=("$spec")
    elif [[ "$have" != "$want" && "${MODELFLEET_NODE_DEB_DRIFT:-0}" != 1 ]]; then
      die "$name is $have, pinned $want in $0 (update DEBS, or MODELFLEET_NODE_DEB_DRIFT=1)"
    fi
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing ${missing[*]}"
    nice -n 15 apt-get install -y --no-install-recommends "${missing[@]}" >&2 \
      || { apt-get update -qq >&2 && nice -n 15 apt-get install -y --no-install-recommends "${missing[@]}" >&2; } \
      || die "apt-get install ${missing[*]} failed"
  fi
}

CA_MOUNT=()
[[ -f /etc/ssl/certs/ca-certificates.crt ]] && CA_MOUNT=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)

# ------------------------------------------------------------------ base image
build_base() {
  local inputs="$SUITE $BASE_PACKAGES v1"
  if [[ "$(cat "$OUT/base.inputs" 2>/dev/null)" == "$inputs" ]] && "${B[@]}" inspect --type image "$BASE_REF" >/dev/null 2>&1; then
    log "base $BASE_REF up to date"; return 0
  fi
  local w; w="$(mktemp -d)"
  timed "mmdebstrap $SUITE" nice -n 15 mmdebstrap --variant=minbase --include="$BASE_PACKAGES" \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='chroot "$1" dpkg-query -W -f="\${Package}=\${Version}\n" > "$1/base-packages.txt"' \
    "$SUITE" "$w/base.tar" >&2 || die "mmdebstrap failed"
  local c; c="$("${B[@]}" from scratch)"
  "${B[@]}" add "$c" "$w/base.tar" / >/dev/null
  rm -rf "$w"
  # where python:3.11-slim has them (the Dockerfiles use /usr/local/bin/python3.11 and pip)
  "${B[@]}" run --isolation chroot "$c" -- sh -c '
    set -e
    mv /base-packages.txt /usr/share/base-packages.txt
    ln -sf /usr/bin/python3.11 /usr/local/bin/python3.11
    ln -sf python3.11 /usr/local/bin/python3
    ln -sf python3.11 /usr/local/bin/python
    ln -sf /usr/bin/pip3 /usr/local/bin/pip
    printf "[global]\nbreak-system-packages = true\n" > /etc/pip.conf
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*'
  "${B[@]}" run --isolation chroot "$c" -- cat /usr/share/base-packages.txt > "$OUT/base-packages.txt"
  # SSL_CERT_FILE names Debian's own bundle (uv reads only that variable); at build time the
  # RUN steps see the host's bundle at that path (CA_MOUNT)
  "${B[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt --cmd '["python3"]' "$c"
  "${B[@]}" commit -q --rm "$c" "$BASE_REF" >/dev/null
  echo "$inputs" > "$OUT/base.inputs"
  log "base $BASE_REF: $(wc -l < "$OUT/base-packages.txt") Debian packages ($OUT/base-packages.txt)"
}

# ---------------------------------------------------------------------- images
dockerfile_of() {
  case "$1" in
    modelfleet) echo docker/Dockerfile ;;
    engine-torch-cpu) echo docker/engine-torch-cpu.Dockerfile ;;
    *) die "unknown image $1 (modelfleet, engine-torch-cpu)" ;;
  esac
}

# hash of everything the Dockerfile's COPY lines can see (tracked and untracked, .dockerignore'd paths excluded)
context_hash() {
  local df="$1"
  (cd "$REPO" && {
    sha256sum "$df" "$OUT/base.inputs"
    git ls-files -co --exclude-standard -- pyproject.toml uv.lock README.md locks operator dataplane scripts/cpu-torch.sh \
      | grep -v '__pycache__' | sort | xargs -r sha256sum
  } | sha256sum | cut -c1-16)
}

build_image() {
  local name="$1" df; df="$(dockerfile_of "$name")"
  local ref="$REGISTRY/$name:$TAG" archive="$OUT/$name.oci.tar"
  local inputs; inputs="$(context_hash "$df")"
  if [[ -f "$archive" && "$(cat "$OUT/$name.inputs" 2>/dev/null)" == "$inputs" ]]; then
    log "$ref up to date ($archive)"; return 0
  fi
  (cd "$REPO" && timed "buildah bud $ref" nice -n 15 "${B[@]}" bud --isolation chroot --layers "${CA_MOUNT[@]}" \
    --build-arg PYTHON_IMAGE="$BASE_REF" -f "$df" -t "$ref" . >&2) || die "building $ref failed"
  rm -f "$archive.tmp"
  timed "buildah push $ref -> oci-archive" nice -n 15 "${B[@]}" push -q "$ref" "oci-archive:$archive.tmp:$ref" >&2 \
    || die "exporting $ref failed"
  mv -f "$archive.tmp" "$archive"
  echo "$inputs" > "$OUT/$name.inputs"
  local digest id size
  digest="$(tar -xOf "$archive" index.json | python3 -c 'import json,sys; print(json.load(sys.stdin)["manifests"][0]["digest"])')"
  id="sha256:$("${B[@]}" inspect --type image -f '{{.FromImageID}}' "$ref")"
  size="$("${B[@]}" images --format '{{.Size}}' "$ref" | head -1)"
  printf '%s %s %s %s %s\n' "$name" "$ref" "$archive" "$digest" "$id" > "$OUT/$name.line"
  log "$ref: $size unpacked, $(( $(stat -c %s "$archive") / 1048576 )) MiB archive, image ID $id"
}

[[ $(id -u) == 0 ]] || die "needs root (buildah, mmdebstrap)"
names=("$@"); [[ ${#names[@]} -gt 0 ]] || names=(modelfleet)
timed "debian packages" ensure_debs
timed "base image" build_base
for n in "${names[@]}"; do timed "image $n" build_image "$n"; done
cat "$OUT"/*.line > "$OUT/images.txt.tmp" && mv -f "$OUT/images.txt.tmp" "$OUT/images.txt"

log "total: $(( $(now) - T_START ))s"
echo "images: $OUT/images.txt"
