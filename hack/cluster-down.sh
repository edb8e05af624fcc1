#!/usr/bin/env bash
# Stops the cluster hack/cluster-up.sh started and removes its namespace.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

dir="${CAPSTAN_OUTPUT}/cluster"
if [[ -f "${dir}/pid" ]]; then
  pid="$(cat "${dir}/pid")"
  if kill -TERM "${pid}" 2>/dev/null; then
    for _ in $(seq 1 100); do kill -0 "${pid}" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "${pid}" 2>/dev/null || true
  fi
fi
ip netns del capstan 2>/dev/null || true
rm -rf "${dir}"
echo "local cluster stopped"
