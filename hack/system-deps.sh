#!/usr/bin/env bash
# Debian packages the project needs on a development or CI machine: the RDMA user-space
# libraries Mooncake links against (also needed for tcp), Prometheus for the dashboard
# tests, and for the local cluster's real node containerd, runc, the CNI plugins,
# iptables, ipset and conntrack (kube-proxy, kube-router's NetworkPolicy firewall),
# mmdebstrap and buildah (images without a Docker daemon), a static busybox (the pause
# image), and gcc and binutils (the GPU image check's stand-in for the driver library).
# Installs only what is missing.
set -euo pipefail
need=()
for pkg in libibverbs1 librdmacm1 libnuma1 prometheus containerd runc containernetworking-plugins \
  iptables ipset conntrack mmdebstrap buildah busybox-static gcc binutils; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
((${#need[@]} == 0)) && exit 0
echo "[system-deps] installing ${need[*]}" >&2
sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
