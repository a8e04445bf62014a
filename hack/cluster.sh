#!/usr/bin/env bash
# Start or stop the local control plane: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and kwok, run by kwokctl's binary runtime on 127.0.0.1 from the
# binaries hack/build-control-plane.sh built.
#   hack/cluster.sh up     start (idempotent); writes .cluster/kubeconfig
#   hack/cluster.sh down   stop and delete
#   hack/cluster.sh env    print the environment to use it from a shell
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=hack/versions.env
source "$root/hack/versions.env"

name="${DEEPSTACK_CLUSTER_NAME:-deepstack}"
nodes="${DEEPSTACK_CLUSTER_NODES:-2}"
state="$root/.cluster"
kubeconfig="$state/kubeconfig"

bin="$("$root/hack/build-control-plane.sh")"
export KWOK_WORKDIR="$state/kwok"
export KWOK_RUNTIME=binary
export KWOK_KUBE_VERSION="$KUBE_VERSION"
export KWOK_KUBE_APISERVER_BINARY="$bin/kube-apiserver"
export KWOK_KUBE_CONTROLLER_MANAGER_BINARY="$bin/kube-controller-manager"
export KWOK_KUBE_SCHEDULER_BINARY="$bin/kube-scheduler"
export KWOK_CONTROLLER_BINARY="$bin/kwok"
export KWOK_ETCD_BINARY="$bin/etcd"
kwokctl="$bin/kwokctl"
kubectl=("$bin/kubectl" --kubeconfig "$kubeconfig")

log() { printf '[cluster] %s\n' "$*" >&2; }

ready() {
  [[ -f "$kubeconfig" ]] && "${kubectl[@]}" get --raw /readyz >/dev/null 2>&1
}

wait_nodes() {
  local deadline=$((SECONDS + 120)) count
  while ((SECONDS < deadline)); do
    count="$("${kubectl[@]}" get nodes --no-headers 2>/dev/null | awk '$2 == "Ready"' | wc -l)"
    if ((count >= nodes)); then return 0; fi
    sleep 1
  done
  log "error: fewer than $nodes Ready nodes after 120s"
  "${kubectl[@]}" get nodes >&2 || true
  return 1
}

up() {
  mkdir -p "$state" "$state/bin"
  # Convenience links: PATH="$PWD/.cluster/bin:$PATH" gives the pinned kubectl, helm, kwokctl.
  for tool in kubectl helm kwokctl; do ln -sfn "$bin/$tool" "$state/bin/$tool"; done
  if ready; then
    log "already running ($kubeconfig)"
  else
    if "$kwokctl" get clusters 2>/dev/null | grep -qx "$name"; then
      log "restarting stopped cluster $name"
      "$kwokctl" start cluster --name "$name" --wait 2m >&2 || {
        log "restart failed; recreating"
        "$kwokctl" delete cluster --name "$name" >&2 || true
      }
    fi
    if ! ready; then
      log "creating cluster $name (Kubernetes $KUBE_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION)"
      rm -f "$kubeconfig"
      "$kwokctl" create cluster --name "$name" --kubeconfig "$kubeconfig" \
        --runtime binary --wait 3m >&2
    fi
  fi
  local have
  have="$("${kubectl[@]}" get nodes --no-headers 2>/dev/null | wc -l)"
  if ((have < nodes)); then
    "$kwokctl" scale node --name "$name" --replicas "$nodes" >&2
  fi
  wait_nodes
  log "ready: export KUBECONFIG=$kubeconfig PATH=$state/bin:\$PATH"
}

down() {
  if "$kwokctl" get clusters 2>/dev/null | grep -qx "$name"; then
    "$kwokctl" delete cluster --name "$name" >&2
  fi
  rm -f "$kubeconfig"
  log "deleted"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) echo "export KUBECONFIG=$kubeconfig PATH=$state/bin:\$PATH" ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
