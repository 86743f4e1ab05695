# Sourced by scripts/k8s-install.sh and scripts/node-install.sh (set K8S_VERSION first): the
# cache layout and the Go environment they share, so the node's kubelet reuses the control
# plane's module and build caches.
CACHE="${MODELFLEET_CACHE:-$HOME/.cache/modelfleet}"
K8S_ROOT="$CACHE/k8s"
ROOT="$K8S_ROOT/$K8S_VERSION"
BIN="$ROOT/bin"
SRC="$ROOT/src"
mkdir -p "$BIN" "$SRC"

# Keep every Go artefact under the cache (shared between versions).
export GOPATH="$K8S_ROOT/gopath"
export GOMODCACHE="$GOPATH/pkg/mod"
export GOCACHE="$K8S_ROOT/gocache"
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
export GOTOOLCHAIN="${MODELFLEET_GOTOOLCHAIN:-auto}"

# k8s.io staging modules are tagged v0.<minor>.<patch> for k8s v1.<minor>.<patch>.
STAGING_VERSION="v0.${K8S_VERSION#v1.}"
K8S_MAJOR=1
K8S_MINOR="${K8S_VERSION#v1.}"; K8S_MINOR="${K8S_MINOR%%.*}"
