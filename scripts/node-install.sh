#!/usr/bin/env bash
# Build or install what a REAL Kubernetes node needs in ModelFleet's e2e tests
# (e2e/node.py), next to the control plane of scripts/k8s-install.sh:
#
#   kubelet, kube-proxy   built from the same Kubernetes version and Go wrapper
#                         module as kube-apiserver (reusing its Go caches)
#   containerd, runc,     Debian 12 packages, pinned below (asserted, installed
#   CNI plugins, iptables when missing; needs root + apt)
#   pause image           scripts/node/pause.c, built static here and wrapped
#                         as an OCI image archive (no registry is reachable)
#   busybox image         Debian's busybox-static as a tiny OCI image, for the
#                         trivial-pod test
#
# Outputs live OUTSIDE the repository:
#   ${MODELFLEET_CACHE:-~/.cache/modelfleet}/k8s/<version>/bin/{kubelet,kube-proxy}
#   ${MODELFLEET_CACHE:-~/.cache/modelfleet}/node/images/*.oci.tar + images.txt
#   ${MODELFLEET_CACHE:-~/.cache/modelfleet}/node/stamp   (what was installed)
# A rerun with nothing changed is a fast no-op (binary version checks + input
# hashes of the images).
#
# Env vars:
#   MODELFLEET_CACHE            cache root (default: $HOME/.cache/modelfleet)
#   MODELFLEET_K8S_VERSION      Kubernetes version (default: k8s-install.sh's)
#   MODELFLEET_NODE_DEB_DRIFT=1 accept other Debian package versions than the
#                               pinned ones (warn instead of failing)
#   MODELFLEET_NODE_NO_APT=1    never call apt-get; fail if a package is missing
#   MODELFLEET_NODE_ONLY        space separated subset of: debs kubelet images
#                               (default: all)
#
# Prints the wall time of every step and the total.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
K8S_INSTALL="$HERE/k8s-install.sh"

# The Kubernetes version and staging module list come from k8s-install.sh so the
# node and the control plane are always built from one module tree.
default_k8s_version="$(sed -n 's/^K8S_VERSION="\${MODELFLEET_K8S_VERSION:-\(v[0-9.]*\)}"$/\1/p' "$K8S_INSTALL")"
[[ -n "$default_k8s_version" ]] || { echo "node-install: cannot read K8S_VERSION from $K8S_INSTALL" >&2; exit 1; }
K8S_VERSION="${MODELFLEET_K8S_VERSION:-$default_k8s_version}"
eval "$(sed -n '/^STAGING_MODULES=(/,/^)/p' "$K8S_INSTALL")"
[[ ${#STAGING_MODULES[@]} -gt 10 ]] || { echo "node-install: cannot read STAGING_MODULES from $K8S_INSTALL" >&2; exit 1; }

# --------------------------------------------------------------- pinned inputs
# Debian 12 (bookworm) packages: name=version. Asserted on every run.
DEBS=(
  "containerd=1.6.20~ds1-1+deb12u3"        # CRI runtime (kubelet 1.37 still accepts 1.6: no RuntimeConfig -> kubelet's cgroupDriver)
  "runc=1.1.5+ds1-1+deb12u1"               # OCI runtime
  "containernetworking-plugins=1.1.1+ds1-3+b5"  # bridge, host-local, loopback, portmap
  "iptables=1.8.9-2"                       # kube-proxy (iptables mode), CNI portmap
  "conntrack=1:1.4.7-1+b2"                 # kube-proxy flushes stale UDP entries with it
  "busybox-static=1:1.35.0-4+deb12u1+b1"   # the busybox test image
  "gcc-12=12.2.0-14+deb12u1"               # builds the pause binary
  "libc6-dev=2.36-9+deb12u14"              # static libc for the pause binary
)
GO_MIN="go1.26"          # same toolchain rule as k8s-install.sh (GOTOOLCHAIN=auto)
PAUSE_VERSION="3.10-mf1" # tag of the pause image built from scripts/node/pause.c
IMAGE_REGISTRY="modelfleet.local"   # never resolvable: images are imported, never pulled

# shellcheck source=scripts/go-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/go-env.sh"
NODE="$CACHE/node"
IMAGES="$NODE/images"
mkdir -p "$IMAGES"

log() { printf '[node-install] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s; }
T_START=$(now)
ok() { printf '%-24s %s\n' "$1" "ok ($2)"; }

timed() {
  local label="$1"; shift
  local t0 rc=0
  t0=$(now)
  "$@" || rc=$?
  log "$label: $(( $(now) - t0 ))s wall (rc=$rc)"
  return "$rc"
}

# ------------------------------------------------------------ Debian packages
deb_version() { dpkg-query -W -f='${db:Status-Abbrev} ${Version}' "$1" 2>/dev/null | awk '$1=="ii"{print $2}'; }

ensure_debs() {
  local missing=() drift=() spec name want have
  for spec in "${DEBS[@]}"; do
    name="${spec%%=*}"; want="${spec#*=}"
    have="$(deb_version "$name")"
    if [[ -z "$have" ]]; then missing+=("$spec")
    elif [[ "$have" != "$want" ]]; then drift+=("$name: have $have, pinned $want")
    fi
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    [[ "${MODELFLEET_NODE_NO_APT:-0}" != 1 ]] || die "missing Debian packages: ${missing[*]}"
    [[ $(id -u) == 0 ]] || die "missing Debian packages (${missing[*]}); run as root or install them"
    log "installing ${missing[*]}"
    if ! nice -n 15 apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
      timed "apt-get update" apt-get update -qq >&2
      timed "apt-get install" nice -n 15 apt-get install -y --no-install-recommends "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed (a pinned version may have left the mirror: update DEBS)"
    fi
  fi
  if [[ ${#drift[@]} -gt 0 ]]; then
    local msg; msg="Debian packages differ from the pins in $0: ${drift[*]}"
    [[ "${MODELFLEET_NODE_DEB_DRIFT:-0}" == 1 ]] && log "WARNING: $msg" || die "$msg (update DEBS, or MODELFLEET_NODE_DEB_DRIFT=1)"
  fi
  for spec in "${DEBS[@]}"; do ok "${spec%%=*}" "$(deb_version "${spec%%=*}")"; done
  [[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] \
    || die "CNI plugins missing under /usr/lib/cni"
}

# ---------------------------------------------------------- kubelet, kube-proxy
has_version() {
  local bin="$BIN/$1" expect="$2"; shift 2
  [[ -x "$bin" ]] || return 1
  local out; out="$("$bin" "$@" 2>&1 | head -n 5)" || return 1
  [[ "$out" == *"$expect"* ]]
}

ldflags_k8s() {   # the same stamping as k8s-install.sh
  local flags="-s -w" date; date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$K8S_MINOR"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  printf '%s' "$flags"
}

build_node_binaries() {
  local missing=0 c
  for c in kubelet kube-proxy; do
    if has_version "$c" "Kubernetes $K8S_VERSION" --version; then ok "$c" "$K8S_VERSION"; else missing=1; fi
  done
  [[ $missing == 1 ]] || return 0
  command -v go >/dev/null 2>&1 || die "Go is not installed (need $GO_MIN+ on PATH)"
  # Its own wrapper module (k8s-install.sh's holds the control plane): same
  # require + replaces, so minimal version selection picks the same versions.
  local dir="$SRC/kubernetes-node"
  mkdir -p "$dir"
  if [[ ! -f "$dir/go.sum" || ! -f "$dir/.prepared-$K8S_VERSION" ]]; then
    rm -f "$dir/go.mod" "$dir/go.sum" "$dir"/.prepared-*
    {
      printf 'module modelfleet.local/k8s-node-build\n\ngo 1.26.0\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$K8S_VERSION"
      for m in "${STAGING_MODULES[@]}"; do printf '\tk8s.io/%s => k8s.io/%s %s\n' "$m" "$m" "$STAGING_VERSION"; done
      printf ')\n'
    } > "$dir/go.mod"
    printf '//go:build tools\n\npackage tools\n\nimport (\n\t_ "k8s.io/kubernetes/cmd/kubelet"\n\t_ "k8s.io/kubernetes/cmd/kube-proxy"\n)\n' > "$dir/tools.go"
    (cd "$dir" && timed "kubelet/kube-proxy go mod tidy" nice -n 15 go mod tidy) || die "go mod tidy failed"
    touch "$dir/.prepared-$K8S_VERSION"
  fi
  local out="$dir/out"
  rm -rf "$out"; mkdir -p "$out"
  (cd "$dir" && timed "go build kubelet+kube-proxy $K8S_VERSION" \
    nice -n 15 go build -trimpath -ldflags "$(ldflags_k8s)" -o "$out/" \
      k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy) || die "building kubelet/kube-proxy failed"
  for c in kubelet kube-proxy; do
    mv -f "$out/$c" "$BIN/$c"
    has_version "$c" "Kubernetes $K8S_VERSION" --version || die "$c does not report $K8S_VERSION"
    ok "$c" "$K8S_VERSION, built"
  done
}

# ------------------------------------------------------------------ OCI images
# oci_archive <rootfs dir> <image ref> <out.tar> <entrypoint json array>
# Writes an OCI image layout (one uncompressed layer, reproducible: fixed
# mtimes and owners) as a tar archive that `ctr images import` takes. Prints
# "<manifest digest> <config digest>": the config digest is the image ID that
# kubelet reports as a pod's imageID for an image that came from no registry.
oci_archive() {
  local rootfs="$1" ref="$2" out="$3" entrypoint="$4"
  local w; w="$(mktemp -d)"
  mkdir -p "$w/blobs/sha256"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
      --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
      -C "$rootfs" -cf "$w/layer.tar" .
  local layer_digest layer_size
  layer_digest="$(sha256sum "$w/layer.tar" | cut -d' ' -f1)"
  layer_size="$(stat -c %s "$w/layer.tar")"
  mv "$w/layer.tar" "$w/blobs/sha256/$layer_digest"
  printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Entrypoint":%s,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"ModelFleet scripts/node-install.sh"}]}' \
    "$entrypoint" "$layer_digest" > "$w/config.json"
  local cfg_digest cfg_size
  cfg_digest="$(sha256sum "$w/config.json" | cut -d' ' -f1)"; cfg_size="$(stat -c %s "$w/config.json")"
  mv "$w/config.json" "$w/blobs/sha256/$cfg_digest"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "$cfg_digest" "$cfg_size" "$layer_digest" "$layer_size" > "$w/manifest.json"
  local man_digest man_size
  man_digest="$(sha256sum "$w/manifest.json" | cut -d' ' -f1)"; man_size="$(stat -c %s "$w/manifest.json")"
  mv "$w/manifest.json" "$w/blobs/sha256/$man_digest"
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$man_digest" "$man_size" "$ref" "${ref##*:}" > "$w/index.json"
  printf '{"imageLayoutVersion":"1.0.0"}' > "$w/oci-layout"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$w" -cf "$out.tmp" oci-layout index.json blobs
  mv -f "$out.tmp" "$out"
  rm -rf "$w"
  printf 'sha256:%s sha256:%s' "$man_digest" "$cfg_digest"
}

# image_up_to_date <name> <inputs hash>
image_up_to_date() { [[ -f "$IMAGES/$1.oci.tar" && "$(cat "$IMAGES/$1.inputs" 2>/dev/null)" == "$2" ]]; }

build_pause_image() {
  local ref="$IMAGE_REGISTRY/pause:$PAUSE_VERSION"
  local inputs; inputs="$(sha256sum < "$HERE/node/pause.c" | cut -c1-16) $PAUSE_VERSION $(deb_version gcc-12) $(deb_version libc6-dev) v2"
  if image_up_to_date pause "$inputs"; then ok pause-image "$ref $(cat "$IMAGES/pause.digest")"; return 0; fi
  local w; w="$(mktemp -d)"
  mkdir -p "$w/rootfs"
  nice -n 15 gcc -Os -static -s -Wall -Wextra -Werror -DPAUSE_VERSION="\"$PAUSE_VERSION\"" \
    -o "$w/rootfs/pause" "$HERE/node/pause.c" || die "compiling pause.c failed"
  "$w/rootfs/pause" -v | grep -q "$PAUSE_VERSION" || die "pause binary does not run"
  local digest; digest="$(oci_archive "$w/rootfs" "$ref" "$IMAGES/pause.oci.tar" '["/pause"]')"
  rm -rf "$w"
  echo "$digest" > "$IMAGES/pause.digest"; echo "$inputs" > "$IMAGES/pause.inputs"
  ok pause-image "$ref $digest, built"
}

build_busybox_image() {
  local bbver; bbver="$(deb_version busybox-static)"
  local tag="${bbver#*:}"; tag="${tag//[^A-Za-z0-9_.-]/_}"
  local ref="$IMAGE_REGISTRY/busybox:$tag"
  local inputs; inputs="$bbver $(sha256sum /bin/busybox | cut -c1-16) v2"
  if image_up_to_date busybox "$inputs"; then ok busybox-image "$ref $(cat "$IMAGES/busybox.digest")"; return 0; fi
  local w; w="$(mktemp -d)"
  mkdir -p "$w/rootfs/bin" "$w/rootfs/tmp" "$w/rootfs/etc" "$w/rootfs/proc" "$w/rootfs/sys" "$w/rootfs/dev"
  chmod 1777 "$w/rootfs/tmp"
  cp /bin/busybox "$w/rootfs/bin/busybox"
  local applet
  for applet in $(/bin/busybox --list); do
    [[ "$applet" == busybox ]] || ln -s busybox "$w/rootfs/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$w/rootfs/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$w/rootfs/etc/group"
  local digest; digest="$(oci_archive "$w/rootfs" "$ref" "$IMAGES/busybox.oci.tar" '["/bin/sh"]')"
  rm -rf "$w"
  echo "$digest" > "$IMAGES/busybox.digest"; echo "$inputs" > "$IMAGES/busybox.inputs"
  ok busybox-image "$ref $digest, built"
}

write_image_list() {
  # images.txt: "<role> <ref> <archive> <manifest digest> <image id>" (read by e2e/node.py)
  {
    echo "pause $IMAGE_REGISTRY/pause:$PAUSE_VERSION $IMAGES/pause.oci.tar $(cat "$IMAGES/pause.digest")"
    local tag; tag="$(deb_version busybox-static)"; tag="${tag#*:}"; tag="${tag//[^A-Za-z0-9_.-]/_}"
    echo "busybox $IMAGE_REGISTRY/busybox:$tag $IMAGES/busybox.oci.tar $(cat "$IMAGES/busybox.digest")"
  } > "$IMAGES/images.txt.tmp"
  mv -f "$IMAGES/images.txt.tmp" "$IMAGES/images.txt"
}

# ----------------------------------------------------------------------- main
log "cache: $ROOT and $NODE ($(go env GOVERSION 2>/dev/null || echo 'go missing'), $(nproc) cpus)"
[[ "$(uname -s)" == Linux ]] || die "a real node needs Linux"
ONLY="${MODELFLEET_NODE_ONLY:-debs kubelet images}"
want() { [[ " $ONLY " == *" $1 "* ]]; }
want debs && timed "debian packages" ensure_debs
want kubelet && timed "kubelet + kube-proxy" build_node_binaries
if want images; then
  timed "pause image" build_pause_image
  timed "busybox image" build_busybox_image
  write_image_list
fi

{
  echo "k8s=$K8S_VERSION"
  for spec in "${DEBS[@]}"; do echo "deb:${spec%%=*}=$(deb_version "${spec%%=*}")"; done
  echo "pause=$IMAGE_REGISTRY/pause:$PAUSE_VERSION $(cat "$IMAGES/pause.digest")"
  echo "busybox=$(awk '$1=="busybox"{print $2, $4, $5}' "$IMAGES/images.txt")"
  echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > "$NODE/stamp"

log "total: $(( $(now) - T_START ))s"
echo "node: $NODE"
