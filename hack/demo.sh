#!/usr/bin/env bash
# `make demo`: the local control plane, the CRD, every example applied, and the result.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/hack/cluster.sh" up
export KUBECONFIG="$root/.cluster/kubeconfig"
kubectl="$root/.cluster/bin/kubectl"

"$kubectl" apply --server-side --force-conflicts -f "$root/crds/deepstackdisaggregations.yaml"
"$kubectl" wait --for=condition=Established --timeout=60s \
  crd/deepstackdisaggregations.disagg.deepstack.dev
"$kubectl" apply -n default -f "$root/crds/examples/"
echo
"$kubectl" get dsd -A
echo
echo "KUBECONFIG=$KUBECONFIG"
echo "Use it:  export KUBECONFIG=$KUBECONFIG PATH=$root/.cluster/bin:\$PATH"
echo "Stop it: make demo-down"
