#!/usr/bin/env bash
# kubectl against the cluster hack/cluster-up.sh started, run inside its
# network namespace so pod IPs (port-forward, curl) are reachable too.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
exec ip netns exec capstan kubectl --kubeconfig="${CAPSTAN_OUTPUT}/cluster/kubeconfig" "$@"
