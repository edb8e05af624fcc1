#!/usr/bin/env bash
# Starts a local cluster (control plane, kwok nodes, fleet simulator) in the
# background, inside a named network namespace "capstan" where pod IPs are
# local. Use it with hack/kubectl.sh, or open a shell inside with
# `ip netns exec capstan bash`. Stop it with hack/cluster-down.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

netns=capstan
dir="${CAPSTAN_OUTPUT}/cluster"
[[ "$(id -u)" == 0 ]] || die "the local cluster runs in a network namespace, and creating one needs root"
if [[ -f "${dir}/pid" ]] && kill -0 "$(cat "${dir}/pid")" 2>/dev/null; then
  die "a local cluster is already running (pid $(cat "${dir}/pid")); stop it with make cluster-down"
fi

tools="$("${CAPSTAN_ROOT}/hack/build-control-plane.sh")"
(cd "${CAPSTAN_ROOT}" && go build -o "${CAPSTAN_ROOT}/bin/" ./test/cluster/cmd/capstan-localcluster)

if ! ip netns list | grep -qx "${netns}\( .*\)\?"; then
  ip netns add "${netns}"
  ip netns exec "${netns}" ip link set lo up
  ip netns exec "${netns}" ip addr add 198.18.255.1/32 dev lo
  ip netns exec "${netns}" ip route add local 198.18.0.0/16 dev lo
fi

rm -rf "${dir}"
mkdir -p "${dir}"
ip netns exec "${netns}" env CAPSTAN_NETNS=1 CAPSTAN_TOOLS_DIR="${tools}" \
  setsid "${CAPSTAN_ROOT}/bin/capstan-localcluster" --dir="${dir}" "$@" >"${dir}/localcluster.log" 2>&1 &
echo $! >"${dir}/pid"

for _ in $(seq 1 300); do
  if [[ -f "${dir}/ready" ]]; then
    cat <<MSG
Local cluster is up (network namespace "${netns}", state in ${dir}).
  kubectl:  hack/kubectl.sh get nodes
  a shell:  ip netns exec ${netns} env KUBECONFIG=${dir}/kubeconfig bash
  stop:     make cluster-down
MSG
    exit 0
  fi
  if ! kill -0 "$(cat "${dir}/pid")" 2>/dev/null; then
    tail -n 30 "${dir}/localcluster.log" >&2
    die "the local cluster exited during start-up (log: ${dir}/localcluster.log)"
  fi
  sleep 0.2
done
die "the local cluster did not become ready within 60 s (log: ${dir}/localcluster.log)"
