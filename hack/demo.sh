#!/usr/bin/env bash
# make demo: builds what it needs, then runs Capstan's closed loop on a local
# cluster inside the network namespace "capstan-demo" and shows it live.
# Arguments go to capstan-demo (e.g. --duration=2m for a non-interactive run).
# Ctrl-C tears everything down.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

netns=capstan-demo
[[ "$(id -u)" == 0 ]] || die "the demo runs in a network namespace, and creating one needs root"
command -v ip >/dev/null || die "'ip' (iproute2) is needed to create the network namespace"

log "building the control plane (first time: ~15 minutes) and Capstan"
tools="$("${CAPSTAN_ROOT}/hack/build-control-plane.sh")"
(cd "${CAPSTAN_ROOT}" && go build -o "${CAPSTAN_ROOT}/bin/" \
  ./plugins/cmd/... ./metricsadapter/cmd/... ./router/cmd/... ./test/demo/cmd/capstan-demo)

if ip netns list | grep -q "^${netns}\b"; then
  die "network namespace ${netns} exists: is another demo running? (remove it with: ip netns del ${netns})"
fi
ip netns add "${netns}"
trap 'ip netns del "${netns}" 2>/dev/null || true' EXIT
ip netns exec "${netns}" ip link set lo up
ip netns exec "${netns}" ip addr add 198.18.255.1/32 dev lo
ip netns exec "${netns}" ip route add local 198.18.0.0/16 dev lo

ip netns exec "${netns}" env CAPSTAN_NETNS=1 CAPSTAN_TOOLS_DIR="${tools}" CAPSTAN_BIN_DIR="${CAPSTAN_ROOT}/bin" \
  "${CAPSTAN_ROOT}/bin/capstan-demo" --netns="${netns}" "$@"
