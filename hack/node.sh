#!/usr/bin/env bash
# The local cluster's one real node: containerd + runc, a CNI bridge for pods, kubelet,
# kube-proxy (iptables), CoreDNS and kube-router's NetworkPolicy firewall (nothing else of
# kube-router runs), as root on this machine, joined to the control plane
# that hack/cluster.sh started. Everything it changes is recorded and undone by `down`.
#   hack/node.sh up KUBECONFIG SERVICE_CIDR CA   start (idempotent); CA signs API clients
#   hack/node.sh load IMAGE...                   give the node these images (hack/images.sh)
#   hack/node.sh down                            stop, and undo every change to the machine
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

NODE_NAME=deepstack-node
BRIDGE=dsd0
POD_CIDR=10.244.0.0/24
# The bridge's address: the pods' gateway, the node's address, where the API server and
# CoreDNS are reached from pods.
NODE_IP=10.244.0.1
lib=/var/lib/deepstack-disagg   # containerd's and the kubelet's state (mounts live here)
run=/run/deepstack-disagg        # sockets, pid files, what `down` must restore
logs="$root/.cluster/node"
sock="$run/containerd/containerd.sock"
ctr=(ctr --address "$sock" --namespace k8s.io)
# The sandbox ("pause") image: busybox from Debian's busybox-static, sleeping.
PAUSE_IMAGE=localhost/deepstack-pause:1

log() { printf '[node] %s\n' "$*" >&2; }

# A pid file may outlive its process (a killed session, a machine restored from a snapshot
# keeps /run on disk) and its number may now be another process's: check the name too.
running() {
  local pid
  [[ -f "$run/$1.pid" ]] || return 1
  pid="$(cat "$run/$1.pid")"
  [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "${1:0:15}" ]] &&
    [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]]
}

start() { # name logfile command...
  local name=$1
  shift
  running "$name" && return
  setsid "$@" >>"$logs/$name.log" 2>&1 </dev/null &
  echo $! >"$run/$name.pid"
}

wait_until() { # seconds what command...
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "error: timed out after ${deadline}s waiting for $what"
      return 1
    fi
    sleep 0.5
  done
}

# --- what the node changes on the machine, recorded once so that `down` restores it ---
SYSCTLS=(net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables
  kernel.panic kernel.panic_on_oops vm.overcommit_memory vm.panic_on_oom
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

record_machine_state() {
  [[ -f "$run/sysctl.saved" ]] && return
  # br_netfilter (built into these kernels; loaded if it is a module) makes bridged
  # pod traffic visible to iptables.
  [[ -d /proc/sys/net/bridge ]] || modprobe br_netfilter
  [[ -d /var/log/containers ]] || : >"$run/log-containers.created"
  local key
  for key in "${SYSCTLS[@]}"; do
    echo "$key=$(sysctl -n "$key")"
  done >"$run/sysctl.saved.tmp"
  mv "$run/sysctl.saved.tmp" "$run/sysctl.saved"
}

network() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$NODE_IP/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  # Pod-to-Service traffic on the bridge must pass kube-proxy's iptables rules.
  sysctl -qw net.bridge.bridge-nf-call-iptables=1 net.ipv4.ip_forward=1
  mkdir -p "$lib/cni/net.d"
  cat >"$lib/cni/net.d/10-deepstack.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "deepstack",
  "plugins": [
    {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$lib/cni/ipam",
              "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
}

containerd_up() {
  mkdir -p "$lib/containerd" "$run/containerd"
  cat >"$run/containerd.toml" <<EOF
version = 2
root = "$lib/containerd"
state = "$run/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # root here lacks CAP_SYS_RESOURCE: a negative oom_score_adj would make runc fail.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$lib/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
EOF
  start containerd containerd --config "$run/containerd.toml"
  wait_until 30 containerd "${ctr[@]}" version
}

pause_image() {
  "${ctr[@]}" images ls -q | grep -qx "$PAUSE_IMAGE" && return
  "${ctr[@]}" images import "$("$root/hack/images.sh" pause)" >&2
}

kubelet_up() { # bin kubeconfig dns_ip client_ca
  local bin=$1 kubeconfig=$2 dns_ip=$3 client_ca=$4
  mkdir -p "$lib/kubelet"
  cat >"$run/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $client_ca}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$sock
clusterDomain: cluster.local
clusterDNS: [$dns_ip]
resolvConf: /dev/null
maxPods: 40
podLogsDir: $lib/pod-logs
podCIDR: $POD_CIDR
serializeImagePulls: false
# Images are imported, never pulled: never collect them, and do not evict for disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%}
EOF
  start kubelet "$bin/kubelet" --config "$run/kubelet.yaml" --kubeconfig "$kubeconfig" \
    --root-dir "$lib/kubelet" --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" \
    --node-labels deepstack.dev/node=real
}

proxy_up() { # bin kubeconfig
  cat >"$run/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
clientConnection: {kubeconfig: $2}
# Leave the machine's conntrack and localhost routing settings alone.
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
iptables: {localhostNodePorts: false}
EOF
  start kube-proxy "$1/kube-proxy" --config "$run/kube-proxy.yaml"
  wait_until 60 "kube-proxy's rules" iptables -t nat -n -L KUBE-SERVICES
}

dns_up() { # bin kubeconfig dns_ip kubectl...
  local bin=$1 kubeconfig=$2 dns_ip=$3
  shift 3
  cat >"$run/Corefile" <<EOF
.:53 {
    bind $NODE_IP
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $kubeconfig
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }
}
EOF
  start coredns "$bin/coredns" -conf "$run/Corefile"
  # The cluster's DNS Service, as in any cluster, backed by CoreDNS on the node's address.
  "$@" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $dns_ip
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-node
  namespace: kube-system
  labels: {kubernetes.io/service-name: kube-dns, endpointslice.kubernetes.io/managed-by: deepstack-node}
addressType: IPv4
endpoints: [{addresses: [$NODE_IP], conditions: {ready: true}}]
ports:
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 53, protocol: TCP}
EOF
}

# NetworkPolicies enforced by kube-router's firewall (iptables and ipsets), as a CNI that
# supports them would; routing and Services stay with the bridge and kube-proxy.
policy_up() { # bin kubeconfig
  start kube-router "$1/kube-router" --kubeconfig "$2" --hostname-override "$NODE_NAME" \
    --run-firewall=true --run-router=false --run-service-proxy=false --run-loadbalancer=false \
    --enable-cni=false --enable-ipv6=false --health-port=0 --metrics-port=0
}

node_ready() { # kubectl...
  [[ "$("$@" get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}

up() {
  if [[ $(id -u) -ne 0 ]]; then
    log "error: the real node (containerd, kubelet, kube-proxy, iptables) needs root"
    return 1
  fi
  local kubeconfig=$1 service_cidr=$2 client_ca=$3 bin dns_ip
  bin="$("$root/hack/build-control-plane.sh")"
  local kubectl=("$bin/kubectl" --kubeconfig "$kubeconfig")
  # The tenth address of the Service range, as kubeadm does.
  dns_ip="$(python3 -c 'import ipaddress, sys; print(ipaddress.ip_network(sys.argv[1])[10])' "$service_cidr")"
  mkdir -p "$run" "$lib" "$logs"
  # One real node per machine: it may serve only the cluster that started it.
  if [[ -f "$run/cluster" && "$(cat "$run/cluster")" != "$kubeconfig" ]] && running kubelet; then
    log "error: the real node is in use by the cluster of $(cat "$run/cluster"); stop that one first"
    return 1
  fi
  # What a node that was killed rather than stopped left behind (mounts, iptables rules of
  # dead pods, the machine's settings to restore) is undone before starting afresh.
  if [[ -f "$run/sysctl.saved" ]] && ! running kubelet && ! running containerd; then
    log "undoing what an earlier node, no longer running, left on this machine"
    down
    mkdir -p "$run" "$lib" "$logs"
  fi
  echo "$kubeconfig" >"$run/cluster"
  record_machine_state
  network
  containerd_up
  pause_image
  kubelet_up "$bin" "$kubeconfig" "$dns_ip" "$client_ca"
  proxy_up "$bin" "$kubeconfig"
  dns_up "$bin" "$kubeconfig" "$dns_ip" "${kubectl[@]}"
  # kube-router finds its node by name at start, and exits if the kubelet has not yet
  # registered it.
  wait_until 60 "node $NODE_NAME to register" "${kubectl[@]}" get node "$NODE_NAME"
  policy_up "$bin" "$kubeconfig"
  wait_until 60 "kube-proxy's rules for the DNS Service" \
    sh -c "iptables -t nat -S KUBE-SERVICES | grep -q -- '-d $dns_ip/32'"
  wait_until 120 "node $NODE_NAME to be Ready" node_ready "${kubectl[@]}"
  local name
  for name in containerd kubelet kube-proxy coredns kube-router; do
    running "$name" || { log "error: $name exited; see $logs/$name.log"; return 1; }
  done
  log "node $NODE_NAME Ready ($NODE_IP, pods $POD_CIDR, DNS $dns_ip)"
}

stop() { # name
  [[ -f "$run/$1.pid" ]] || return 0
  local pid
  pid="$(cat "$run/$1.pid")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$run/$1.pid"
}

down() {
  local bin
  bin="$("$root/hack/build-control-plane.sh")"
  stop kubelet
  stop kube-router
  stop coredns
  stop kube-proxy
  # The pods' containers run under containerd's shims: kill them, then containerd.
  if running containerd; then
    local id
    for id in $("${ctr[@]}" tasks ls -q 2>/dev/null); do
      "${ctr[@]}" tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    done
    for id in $("${ctr[@]}" tasks ls -q 2>/dev/null); do
      "${ctr[@]}" tasks delete -f "$id" >/dev/null 2>&1 || true
    done
  fi
  stop containerd
  pkill -9 -f "containerd-shim-runc-v2 -namespace k8s.io -address $sock" 2>/dev/null || true
  # Mounts: volumes, rootfs, shm, network namespaces; deepest first.
  local target
  while read -r target; do
    umount -l "$target" 2>/dev/null || true
  done < <(findmnt -rn -o TARGET | grep -E "^($lib|$run|/run/netns/cni-|/var/run/netns/cni-)" | sort -r)
  rm -f /run/netns/cni-* 2>/dev/null || true
  # iptables: kube-proxy's, the kubelet's and CNI's chains and the rules that jump to them.
  if command -v iptables-save >/dev/null; then
    "$bin/kube-proxy" --cleanup >/dev/null 2>&1 || true
    "$bin/kube-router" --cleanup-config >/dev/null 2>&1 || true
    local tool
    for tool in iptables ip6tables; do
      if "$tool-save" | grep -qE 'KUBE-|CNI-'; then
        "$tool-save" | grep -vE 'KUBE-|CNI-' | "$tool-restore"
      fi
    done
  fi
  # kube-router's ipsets, once no rule refers to them.
  if command -v ipset >/dev/null; then
    ipset list -n 2>/dev/null | grep -E '^(KUBE-|kube-router)' | xargs -r -n1 ipset destroy 2>/dev/null || true
  fi
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link delete "$BRIDGE"; fi
  ip -o link show type veth 2>/dev/null | awk -F'[ @:]+' '/master '"$BRIDGE"'/ {print $2}' |
    while read -r veth; do ip link delete "$veth" 2>/dev/null || true; done
  # The kubelet's cgroups, deepest first, once their processes are gone.
  local controller
  for controller in /sys/fs/cgroup/*/; do
    [[ -d "$controller/kubepods" ]] || continue
    find "$controller/kubepods" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  if [[ -f "$run/sysctl.saved" ]]; then
    while IFS='=' read -r key value; do
      sysctl -qw "$key=$value" 2>/dev/null || true
    done <"$run/sysctl.saved"
  fi
  # The kubelet links every container's log into /var/log/containers.
  find /var/log/containers -maxdepth 1 -type l -lname "$lib/*" -delete 2>/dev/null || true
  if [[ -f "$run/log-containers.created" ]]; then rmdir /var/log/containers 2>/dev/null || true; fi
  rm -rf "$lib" "$run"
  log "stopped; machine restored"
}

load() { # image...
  local image
  for image in "$@"; do
    "${ctr[@]}" images ls -q | grep -qx "$image" && continue
    log "importing $image"
    "${ctr[@]}" images import "$("$root/hack/images.sh" archive "$image")" >/dev/null
  done
}

case "${1:-}" in
  load) shift; load "$@" ;;
  up) up "${2:?kubeconfig}" "${3:?service CIDR}" "${4:?client CA}" ;;
  down) down ;;
  *) echo "usage: $0 up KUBECONFIG SERVICE_CIDR CA | load IMAGE... | down" >&2; exit 2 ;;
esac
