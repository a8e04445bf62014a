#!/usr/bin/env bash
# Start or stop the local cluster: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and kwok, run by kwokctl's binary runtime from the binaries
# hack/build-control-plane.sh built, with simulated (kwok) nodes for scale tests and one
# real node (hack/node.sh: containerd, kubelet, kube-proxy, CoreDNS) for real pods.
# The kwok nodes are tainted: a workload that wants one tolerates SIMULATED_TAINT and
# selects type=kwok; everything else runs on the real node.
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
# Services get addresses from this range; the real node's DNS Service is its tenth.
SERVICE_CIDR=10.96.0.0/16
SIMULATED_TAINT=deepstack.dev/simulated=true:NoSchedule
# Bump when the cluster's creation flags change: an older cluster is recreated.
LAYOUT=real-node-1

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

wait_nodes() { # how many Ready nodes
  local deadline=$((SECONDS + 120)) count want=$1
  while ((SECONDS < deadline)); do
    count="$("${kubectl[@]}" get nodes --no-headers 2>/dev/null | awk '$2 == "Ready"' | wc -l)"
    if ((count >= want)); then return 0; fi
    sleep 1
  done
  log "error: fewer than $want Ready nodes after 120s"
  "${kubectl[@]}" get nodes >&2 || true
  return 1
}

up() {
  mkdir -p "$state" "$state/bin"
  # Convenience links: PATH="$PWD/.cluster/bin:$PATH" gives the pinned kubectl, helm, kwokctl.
  for tool in kubectl helm kwokctl; do ln -sfn "$bin/$tool" "$state/bin/$tool"; done
  if [[ "$(cat "$state/layout" 2>/dev/null)" != "$LAYOUT" ]] &&
    "$kwokctl" get clusters 2>/dev/null | grep -qx "$name"; then
    log "recreating cluster $name: it predates the real node"
    "$root/hack/node.sh" down
    "$kwokctl" delete cluster --name "$name" >&2
  fi
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
      # Pods reach the API server at the real node's bridge address (hack/node.sh), as the
      # `kubernetes` Service's first address: both must be in its certificate. kwok fakes
      # only its own nodes, never the real one.
      cat >"$state/kwokctl.yaml" <<EOF
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokctlConfiguration
options:
  kubeApiserverCertSANs: [10.244.0.1, "$(python3 -c 'import ipaddress, sys; print(ipaddress.ip_network(sys.argv[1])[1])' "$SERVICE_CIDR")"]
componentsPatches:
- name: kube-apiserver
  extraArgs:
  - {key: bind-address, value: 0.0.0.0}
  - {key: advertise-address, value: 10.244.0.1}
  - {key: service-cluster-ip-range, value: "$SERVICE_CIDR"}
  # kubectl logs/exec/port-forward: the API server reaches the real kubelet as admin.
  - {key: kubelet-preferred-address-types, value: InternalIP}
  - {key: kubelet-client-certificate, value: "$KWOK_WORKDIR/clusters/$name/pki/admin.crt"}
  - {key: kubelet-client-key, value: "$KWOK_WORKDIR/clusters/$name/pki/admin.key"}
- name: kube-controller-manager
  extraArgs:
  - {key: service-cluster-ip-range, value: "$SERVICE_CIDR"}
- name: kwok-controller
  extraArgs:
  - {key: manage-all-nodes, value: "false"}
  - {key: manage-nodes-with-label-selector, value: type=kwok}
EOF
      "$kwokctl" create cluster --name "$name" --kubeconfig "$kubeconfig" \
        --config "$state/kwokctl.yaml" --runtime binary --wait 3m >&2
      echo "$LAYOUT" >"$state/layout"
    fi
  fi
  local have
  have="$("${kubectl[@]}" get nodes --selector type=kwok --no-headers 2>/dev/null | wc -l)"
  if ((have < nodes)); then
    "$kwokctl" scale node --name "$name" --replicas "$nodes" >&2
  fi
  "${kubectl[@]}" taint nodes --selector type=kwok "$SIMULATED_TAINT" --overwrite >/dev/null
  "$root/hack/node.sh" up "$kubeconfig" "$SERVICE_CIDR" "$KWOK_WORKDIR/clusters/$name/pki/ca.crt"
  wait_nodes $((nodes + 1))  # and the real one
  log "ready: export KUBECONFIG=$kubeconfig PATH=$state/bin:\$PATH"
}

down() {
  "$root/hack/node.sh" down
  if "$kwokctl" get clusters 2>/dev/null | grep -qx "$name"; then
    "$kwokctl" delete cluster --name "$name" >&2
  fi
  rm -f "$kubeconfig" "$state/layout"
  log "deleted"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) echo "export KUBECONFIG=$kubeconfig PATH=$state/bin:\$PATH" ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
