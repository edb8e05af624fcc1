#!/usr/bin/env bash
# Benchmarks capstan-scheduler (make bench-scheduler):
#
#  1. Scheduling throughput on a real control plane: 1,000 model-server pods
#     on 500 kwok nodes, with the ModelSlots profile and with the same
#     binary's profile without the plugin, alternating over several rounds in
#     one run (test/e2e/scheduler TestSchedulingThroughput, which re-runs
#     itself inside hack/netns.sh). Target: with/without >= 0.9.
#  2. Go benchmarks of PreFilter, Filter and Score at 5,000 nodes.
#
# Prints Markdown tables for docs/benchmarks/scheduler.md, and keeps them in
# _output/bench/scheduler.md.
#
# Knobs: CAPSTAN_BENCH_NODES (500), CAPSTAN_BENCH_PODS (1000),
# CAPSTAN_BENCH_ROUNDS (4 per profile), BENCHTIME (go test -benchtime, 2s),
# CAPSTAN_BENCH_PROFILES=<dir> (where the CPU profile of the scheduler in each
# round is kept, for go tool pprof bin/capstan-scheduler <dir>/<round>.pprof;
# default: a temporary folder), CAPSTAN_BENCH_PROFILE_SECONDS (15, longer than
# a round).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ "$(id -u)" == 0 ]] || die "the benchmark runs a local cluster in a private network namespace, which needs root"
for tool in unshare ip; do
  if ! command -v "${tool}" >/dev/null; then
    log "installing util-linux and iproute2 (for ${tool})"
    apt-get update -qq && apt-get install -y -qq util-linux iproute2 >/dev/null
  fi
done

cd "${CAPSTAN_ROOT}"
# lib.sh names the cache folder; build-control-plane.sh fills it when empty.
tools="$(hack/build-control-plane.sh)"
export CAPSTAN_TOOLS_DIR="${tools}"
export CAPSTAN_BIN_DIR="${CAPSTAN_BIN_DIR:-${CAPSTAN_ROOT}/bin}"
go build -o "${CAPSTAN_BIN_DIR}/" ./plugins/cmd/capstan-scheduler

out="$(mktemp -d "${TMPDIR:-/tmp}/capstan-bench-scheduler.XXXXXX")"
trap 'rm -rf "${out}"' EXIT
report="${CAPSTAN_OUTPUT}/bench/scheduler.md"
mkdir -p "$(dirname "${report}")"
exec > >(tee "${report}")

echo "# capstan-scheduler benchmark, $(date -u +%Y-%m-%dT%H:%MZ)"
echo "machine: $(nproc) CPUs, $(awk '/model name/ {sub(/.*: /, ""); print; exit}' /proc/cpuinfo), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(go version | cut -d' ' -f3)"
echo

export CAPSTAN_BENCH_PROFILES="${CAPSTAN_BENCH_PROFILES:-${out}/profiles}"
mkdir -p "${CAPSTAN_BENCH_PROFILES}"

log "throughput: ${CAPSTAN_BENCH_PODS:-1000} pods on ${CAPSTAN_BENCH_NODES:-500} nodes, ${CAPSTAN_BENCH_ROUNDS:-4} rounds per profile"
# -count=1: never a cached result. The test bounds each round itself.
if ! CAPSTAN_BENCH_SCHEDULER=1 CAPSTAN_BENCH_OUT="${out}/throughput.md" \
  go test -count=1 -timeout 40m -run '^TestSchedulingThroughput$' -v ./test/e2e/scheduler/ >"${out}/throughput.log" 2>&1; then
  tail -n 40 "${out}/throughput.log" >&2
  die "the throughput benchmark failed (log above)"
fi
grep -E 'round [0-9]+ ' "${out}/throughput.log" | sed 's/^ *bench_test.go:[0-9]*: /  /' >&2 || true
cat "${out}/throughput.md"
echo

# Throughput and CPU time move with whatever else the machine runs; the share
# of the scheduler's own CPU samples spent inside the plugin does not.
echo "Share of capstan-scheduler's CPU samples inside ModelSlots (plugins/modelslots), per measured round:"
echo
echo "| round | samples in ModelSlots | of all samples |"
echo "|---|---|---|"
for f in "${CAPSTAN_BENCH_PROFILES}"/scheduler-[0-9]*.pprof; do
  go tool pprof -top -focus='capstan-dev/capstan/plugins/modelslots' -nodefraction=0 -nodecount=1000000 \
    "${CAPSTAN_BIN_DIR}/capstan-scheduler" "${f}" 2>/dev/null |
    awk -v round="$(basename "${f}" .pprof)" '/^Showing nodes accounting for/ {sub(/,$/, "", $5); print "| " round " | " $5 " of " $8 " | " $6 " |"}'
done
echo

log "Go benchmarks at 5,000 nodes"
echo '```'
go test -run '^$' -bench . -benchmem -benchtime="${BENCHTIME:-2s}" ./plugins/modelslots/ | grep -E '^(Benchmark|goos|goarch|cpu)'
echo '```'
log "report kept in ${report}"
