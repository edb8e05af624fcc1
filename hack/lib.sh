# Shared settings for hack/ scripts. Source it; do not run it.
# shellcheck shell=bash

CAPSTAN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Control-plane binaries are cached here, one folder per pinned version set, so
# a rebuild is skipped when the versions have not changed.
CAPSTAN_OUTPUT="${CAPSTAN_OUTPUT:-${CAPSTAN_ROOT}/_output}"

KUBE_VERSION="$(cd "${CAPSTAN_ROOT}" && go list -m -f '{{.Version}}' k8s.io/kubernetes)"
ETCD_VERSION="$(cd "${CAPSTAN_ROOT}/hack/tools/etcd" && go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)"
KWOK_VERSION="v0.8.0"

# Used by the scripts that source this file, not here.
# shellcheck disable=SC2034
CAPSTAN_TOOLS_DIR="${CAPSTAN_OUTPUT}/tools/kube-${KUBE_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}"

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
