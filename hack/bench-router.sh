#!/usr/bin/env bash
# The router benchmark (make bench-router): one run on one machine.
#
#  1. go test -bench for the balancers' pick path at 10, 100 and 1,000
#     endpoints (ns/op, allocs/op).
#  2. Side by side, against the same fleet-simulated backends in a local
#     cluster (small fixed response, keep-alive): wrk directly against one
#     backend, through nginx, through HAProxy and through capstan-router;
#     then direct and router at half the router's maximum rate with an
#     open-loop generator, for the p99 latency the router adds.
#
# Results go to stdout and to _output/bench/router.md. Needs root (the
# cluster runs in a private network namespace). Installs nginx, HAProxy and
# wrk from Debian if they are missing.
#
# Environment: CAPSTAN_BENCH_DURATION (default 10s per measurement),
# CAPSTAN_BENCH_CONNECTIONS (default 64), CAPSTAN_BENCH_PROFILE=<file> (the
# router's CPU profile under wrk), CAPSTAN_BENCH_TRACE=<file> (its execution
# trace under the open loop, for go tool trace).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "${CAPSTAN_ROOT}"

[[ "$(id -u)" == 0 ]] || die "the benchmark runs a local cluster in a network namespace, which needs root"

missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v wrk >/dev/null || missing+=(wrk)
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts the services it installs; the benchmark runs its own.
for svc in nginx haproxy; do
  if command -v systemctl >/dev/null && systemctl is-active --quiet "${svc}" 2>/dev/null; then
    systemctl stop "${svc}" || true
  fi
done

out="${CAPSTAN_OUTPUT}/bench"
mkdir -p "${out}"
tools="$(hack/build-control-plane.sh)"
go build -o "${CAPSTAN_ROOT}/bin/" ./router/cmd/capstan-router

log "pick path: go test -bench BenchmarkSelect ./router/balance"
go test -run '^$' -bench 'BenchmarkSelect' -benchmem -benchtime 200000x ./router/balance | tee "${out}/router-pick.txt"

log "side by side: direct, nginx, haproxy, capstan-router"
CAPSTAN_TOOLS_DIR="${tools}" CAPSTAN_BIN_DIR="${CAPSTAN_ROOT}/bin" CAPSTAN_BENCH_ROUTER=1 \
  CAPSTAN_BENCH_OUT="${out}/router.md" \
  go test -count=1 -timeout 30m -run '^TestSideBySide$' -v ./test/e2e/router/ | grep -v '^=== RUN' || {
    echo "the side-by-side benchmark failed" >&2
    exit 1
  }
echo
cat "${out}/router.md"
echo
grep -E 'endpoints=1000' "${out}/router-pick.txt"
