#!/usr/bin/env bash
# Builds the local control plane from the Go module proxy into a cache folder
# keyed by version: kube-apiserver, kube-controller-manager and kube-scheduler
# (from this module's pinned k8s.io/kubernetes), etcd (hack/tools/etcd) and
# kwok.
# Each binary is skipped when it is already in the cache. Prints the folder.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bin="${CAPSTAN_TOOLS_DIR}"
mkdir -p "${bin}"
# Suites and people may build at once: one builds, the others wait for it.
exec 9>"${bin}/.lock"
flock 9
export CGO_ENABLED=0

# Without these the binaries report v0.0.0-master, which kwok and discovery
# clients compare against.
minor="$(echo "${KUBE_VERSION}" | cut -d. -f2)"
ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X ${p}.gitVersion=${KUBE_VERSION} -X ${p}.gitMajor=1 -X ${p}.gitMinor=${minor} -X ${p}.gitTreeState=clean"
done

build() { # name, then the command that writes ${bin}/name
  local name=$1; shift
  if [[ -x "${bin}/${name}" ]]; then
    return
  fi
  log "building ${name} (a cold build takes minutes)"
  local start=${SECONDS}
  "$@"
  log "built ${name} in $((SECONDS - start)) s"
}

cd "${CAPSTAN_ROOT}"
for c in kube-apiserver kube-controller-manager kube-scheduler; do
  build "${c}" go build -trimpath -ldflags="${ldflags}" -o "${bin}/${c}" "k8s.io/kubernetes/cmd/${c}"
done

build etcd bash -c "cd hack/tools/etcd && go build -trimpath -ldflags='-s -w' -o '${bin}/etcd' ."

# go install with @version uses kwok's own go.mod, so its dependencies stay the
# ones kwok was released with.
build kwok env GOBIN="${bin}" go install -trimpath -ldflags="-s -w" "sigs.k8s.io/kwok/cmd/kwok@${KWOK_VERSION}"

echo "${bin}"
