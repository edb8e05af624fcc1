#!/usr/bin/env bash
# The endpoint-picker benchmark (make bench-picker): what asking an
# InferencePool's endpoint picker adds to each request.
#
# On a local cluster, one capstan-router and four fleet-simulated model
# servers (small fixed latency) serve two InferencePools of the same pods:
# one whose endpoint picker is the Inference Extension's lwepp v1.6.0, one
# balanced by the router itself. Streamed completions with 1 KiB and
# 220 KiB prompts, from 1 and then 20 concurrent clients, go to both in
# alternating blocks of a fixed number of requests; the report gives the
# time to first byte and to the end at the client (p50, p99) for each, the
# difference and the ratio, and the router's and lwepp's CPU per request.
# First, go test -bench for the picker client's exchange alone, against an
# in-process picker on loopback (1 KiB and 220 KiB bodies).
#
# Results go to stdout and to _output/bench/endpoint-picker.md (and
# endpoint-picker-client.txt). Needs root (the cluster runs in a private
# network namespace). About 3 minutes.
#
# Environment: CAPSTAN_BENCH_PICKER_REQUESTS, measured requests per arm,
# prompt size and client count (default 2000).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "${CAPSTAN_ROOT}"

[[ "$(id -u)" == 0 ]] || die "the benchmark runs a local cluster in a network namespace, which needs root"

out="${CAPSTAN_OUTPUT}/bench"
mkdir -p "${out}"
tools="$(hack/build-control-plane.sh)"

log "the picker client's exchange: go test -bench BenchmarkPick ./router/picker"
go test -run '^$' -bench 'BenchmarkPick' -benchmem ./router/picker | tee "${out}/endpoint-picker-client.txt"

log "end to end: lwepp against the router's own balancer"
CAPSTAN_TOOLS_DIR="${tools}" CAPSTAN_BIN_DIR="${CAPSTAN_ROOT}/bin" CAPSTAN_BENCH_PICKER=1 \
  CAPSTAN_BENCH_OUT="${out}/endpoint-picker.md" \
  go test -count=1 -timeout 40m -run '^TestEndpointPickerOverhead$' -v ./test/e2e/gateway/ | grep -v '^=== RUN' || {
    echo "the endpoint-picker benchmark failed" >&2
    exit 1
  }
echo
cat "${out}/endpoint-picker.md"
