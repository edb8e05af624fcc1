#!/usr/bin/env bash
# The routing benchmark (make bench-routing): what each balancer is worth.
#
# On a local cluster, 8 pods of the simulator's vLLM engine model
# (docs/simulator.md) serve one model behind capstan-router; an open-loop
# Poisson generator sends streamed chat requests at rising rates, for four
# workloads (shared-prefix with the group text first, shared-prefix behind a
# common instruction block, multi-turn chat, no shared prefix), through
# each balancer in turn, and once through two router replicas. Then LoRA
# adapter affinity: 4 pods of one base model with 8 adapters and 2 slots
# each, round-robin against the default balancer, counting the adapters
# the pods load into a slot. And go test -bench for the cache-aware pick at
# 1,000 endpoints and for the pick of a request for an adapter.
#
# Results go to stdout and to _output/bench/routing.md (with one SVG plot
# per workload beside it) and _output/bench/routing-lora.md. Needs root (the cluster runs in a private network
# namespace).
#
# Environment: CAPSTAN_BENCH_ROUTING=quick for two rates of 10 s each (about
# 15 minutes); the default is five rates of 12 s (about 40 minutes: a point
# past saturation takes longer than its window to drain).
# CAPSTAN_BENCH_ROUTING=lora runs only the LoRA part (about 3 minutes).
# For development, CAPSTAN_BENCH_BALANCERS=a,b measures only those balancers,
# CAPSTAN_BENCH_WORKLOADS=2,3 only those workloads (numbered from 1 in the
# order above) and CAPSTAN_BENCH_ROUTER_FLAGS="--flag=value ..." adds flags
# to every router.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "${CAPSTAN_ROOT}"

[[ "$(id -u)" == 0 ]] || die "the benchmark runs a local cluster in a network namespace, which needs root"

out="${CAPSTAN_OUTPUT}/bench"
mkdir -p "${out}"
tools="$(hack/build-control-plane.sh)"

mode="${CAPSTAN_BENCH_ROUTING:-full}"

log "pick path: go test -bench 'BenchmarkPrefixCacheSelect|BenchmarkSelect|BenchmarkSelectAdapter' ./router/balance"
go test -run '^$' -bench 'BenchmarkPrefixCacheSelect|BenchmarkSelect//endpoints=1000|BenchmarkSelectAdapter' -benchmem ./router/balance | tee "${out}/routing-pick.txt"

if [[ "${mode}" != lora ]]; then
  log "routing quality: every balancer, every workload"
  CAPSTAN_TOOLS_DIR="${tools}" CAPSTAN_BIN_DIR="${CAPSTAN_ROOT}/bin" CAPSTAN_BENCH_ROUTING="${mode}" \
    CAPSTAN_BENCH_OUT="${out}/routing.md" \
    go test -count=1 -timeout 90m -run '^TestRoutingQuality$' -v ./test/e2e/router/ | grep -v '^=== RUN' || {
      echo "the routing benchmark failed" >&2
      exit 1
    }
  echo
  cat "${out}/routing.md"
fi

log "LoRA adapter affinity: round-robin against the default balancer"
CAPSTAN_TOOLS_DIR="${tools}" CAPSTAN_BIN_DIR="${CAPSTAN_ROOT}/bin" CAPSTAN_BENCH_ROUTING="${mode}" \
  CAPSTAN_BENCH_LORA_OUT="${out}/routing-lora.md" \
  go test -count=1 -timeout 20m -run '^TestLoRAAffinity$' -v ./test/e2e/router/ | grep -v '^=== RUN' || {
    echo "the LoRA routing benchmark failed" >&2
    exit 1
  }
echo
cat "${out}/routing-lora.md"
