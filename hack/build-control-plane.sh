#!/usr/bin/env bash
# Build the local control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kwok, kwokctl), the real node's kubelet, kube-proxy, CoreDNS and
# kube-router (only its NetworkPolicy enforcer runs), and the pinned CLIs (kubectl, helm)
# from the Go module proxy. Output: $CP_BIN (printed on the last line). Cached by version:
# a second run builds nothing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=hack/versions.env
source "$here/versions.env"

cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/deepstack-disagg"
key="k8s-${KUBE_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_helm-${HELM_VERSION}_coredns-${COREDNS_VERSION}_kube-router-${KUBE_ROUTER_VERSION}"
bin="$cache_root/control-plane/$key/bin"
tools=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok kwokctl helm
  kubelet kube-proxy coredns kube-router)

all_present() {
  local t
  for t in "${tools[@]}"; do [[ -x "$bin/$t" ]] || return 1; done
}
if all_present; then echo "$bin"; exit 0; fi

command -v go >/dev/null || { echo "error: go is required to build the control plane" >&2; exit 1; }
mkdir -p "$bin"
work="$cache_root/control-plane/$key/src"
mkdir -p "$work"
export CGO_ENABLED=0 GOFLAGS="-buildvcs=false -modcacherw"
# A build cache and module cache of our own (about 7 GB), deleted once every binary
# is built: nothing else reads them, and a fresh CI machine has little disk to spare.
export GOCACHE="$cache_root/control-plane/$key/go-build" GOMODCACHE="$cache_root/control-plane/$key/go-mod"

log() { printf '[control-plane] %s\n' "$*" >&2; }

# --- Kubernetes: a wrapper module that pins every staging module -------------
build_kubernetes() {
  local dir="$work/kubernetes" gomod minor ldflags
  mkdir -p "$dir"
  gomod="$(go mod download -json "k8s.io/kubernetes@${KUBE_VERSION}" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  {
    echo "module deepstack.local/controlplane"
    echo
    echo "go 1.26"
    echo
    echo "require k8s.io/kubernetes ${KUBE_VERSION}"
    echo
    # k8s.io/kubernetes replaces its staging modules with ./staging paths;
    # pin each one to the published release instead.
    sed -n 's#^\s*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#replace \1 => \1 '"${KUBE_STAGING_VERSION}"'#p' "$gomod"
  } >"$dir/go.mod"
  cat >"$dir/tools.go" <<'GO'
//go:build tools

package controlplane

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
GO
  (cd "$dir" && go mod tidy >&2)
  minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=${KUBE_VERSION} -X $pkg.gitMajor=1 -X $pkg.gitMinor=${minor}"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  local cmd
  for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
    [[ -x "$bin/$cmd" ]] && continue
    log "building $cmd ${KUBE_VERSION}"
    (cd "$dir" && go build -trimpath -ldflags "$ldflags" -o "$bin/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd" && mv "$bin/$cmd.tmp" "$bin/$cmd")
  done
}

# --- etcd: its go.mod has local replace directives, so also a wrapper --------
build_etcd() {
  [[ -x "$bin/etcd" ]] && return
  local dir="$work/etcd"
  mkdir -p "$dir"
  printf 'module deepstack.local/etcd\n\ngo 1.26\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" >"$dir/go.mod"
  printf '//go:build tools\n\npackage etcd\n\nimport _ "go.etcd.io/etcd/server/v3"\n' >"$dir/tools.go"
  (cd "$dir" && go mod tidy >&2)
  log "building etcd ${ETCD_VERSION}"
  (cd "$dir" && go build -trimpath \
      -ldflags "-s -w" \
      -o "$bin/etcd.tmp" go.etcd.io/etcd/server/v3 && mv "$bin/etcd.tmp" "$bin/etcd")
}

go_install() { # name module@version [extra ldflags]
  [[ -x "$bin/$1" ]] && return
  log "building $1 from $2"
  GOBIN="$bin" go install -trimpath -ldflags "-s -w ${3:-}" "$2"
}

build_etcd
go_install kwok "sigs.k8s.io/kwok/cmd/kwok@${KWOK_VERSION}"
go_install kwokctl "sigs.k8s.io/kwok/cmd/kwokctl@${KWOK_VERSION}"
go_install helm "helm.sh/helm/v4/cmd/helm@${HELM_VERSION}" \
  "-X helm.sh/helm/v4/internal/version.version=${HELM_VERSION}"
go_install coredns "github.com/coredns/coredns@${COREDNS_VERSION}"
go_install kube-router "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router@${KUBE_ROUTER_VERSION}"
build_kubernetes
all_present || { echo "error: control plane build incomplete in $bin" >&2; exit 1; }
rm -rf "$GOCACHE" "$GOMODCACHE" "$work"
echo "$bin"
